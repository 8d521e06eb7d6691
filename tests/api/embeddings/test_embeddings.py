"""/v1/embeddings, /embedding and /v1/rerank end to end (`inferq up` with a
tiny BERT embedding model, a tiny reranker and a tiny chat model)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.support.procs import inferq_up
from tests.support.tinybert import write_tiny_bert, write_tiny_reranker

TEXTS = ["hello world", "the cat sat", "a big dog ran far away"]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[str]:
    root = tmp_path_factory.mktemp("embed-stack")
    models = root / "models"
    models.mkdir()
    write_tiny_bert(models / "embed.gguf")
    write_tiny_reranker(models / "rerank.gguf")
    (models / "chat.gguf").write_bytes(tiny_gguf.read_bytes())
    (models / "embed.yaml").write_text(
        "name: embed\nparameters:\n  model: embed.gguf\nembeddings: true\nreranking: true\n"
        "pooling: mean\nembedding_batch: 256\nembedding_max_tokens: 256\nthreads: 1\n"
    )
    (models / "rerank.yaml").write_text(
        "name: rerank\nparameters:\n  model: rerank.gguf\nreranking: true\npooling: rank\n"
        "threads: 1\n"
    )
    with inferq_up(root, models=("embed", "rerank", "chat")) as up:
        yield up.url


def test_openai_client_base64_and_float_agree(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    # The client asks for base64 unless told otherwise.
    default = client.embeddings.create(model="embed", input=TEXTS)
    floats = client.embeddings.create(model="embed", input=TEXTS, encoding_format="float")
    assert [d.index for d in default.data] == [0, 1, 2]
    for a, b in zip(default.data, floats.data, strict=True):
        assert np.allclose(a.embedding, b.embedding, atol=1e-6)
        assert abs(np.linalg.norm(b.embedding) - 1.0) < 1e-5
    assert default.usage.prompt_tokens > 0
    raw = httpx.post(
        url + "/v1/embeddings",
        json={"model": "embed", "input": TEXTS[0], "encoding_format": "base64"},
    ).json()
    decoded = np.frombuffer(__import__("base64").b64decode(raw["data"][0]["embedding"]), "<f4")
    assert np.allclose(decoded, floats.data[0].embedding, atol=1e-6)


def test_packed_request_matches_single_inputs(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    packed = client.embeddings.create(model="embed", input=TEXTS, encoding_format="float")
    for text, item in zip(TEXTS, packed.data, strict=True):
        alone = client.embeddings.create(model="embed", input=text, encoding_format="float")
        assert float(np.dot(alone.data[0].embedding, item.embedding)) > 0.9999


def test_token_arrays_and_llama_shape(url: str) -> None:
    tokens = httpx.post(url + "/v1/embeddings", json={"model": "embed", "input": [[5, 6, 7]]})
    assert tokens.status_code == 200, tokens.text
    llama = httpx.post(url + "/embedding", json={"model": "embed", "content": "hello world"})
    assert llama.status_code == 200, llama.text
    [item] = llama.json()
    assert item["index"] == 0 and len(item["embedding"]) == 1 and len(item["embedding"][0]) > 8


def test_bad_embedding_requests(url: str) -> None:
    def post(body: dict[str, object]) -> httpx.Response:
        return httpx.post(url + "/v1/embeddings", json={"model": "embed", **body})

    long = " ".join(["hello"] * 400)
    too_long = post({"input": long})
    assert too_long.status_code == 400 and "truncate" in too_long.json()["error"]["message"]
    assert post({"input": long, "truncate": True}).status_code == 200
    assert post({"input": "x", "dimensions": 8}).json()["error"]["param"] == "dimensions"
    assert post({"input": ""}).status_code == 400
    assert post({"input": [[999999]]}).status_code == 400
    chat = httpx.post(url + "/v1/embeddings", json={"model": "chat", "input": "x"})
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "unsupported_model"
    generate = httpx.post(
        url + "/v1/completions", json={"model": "embed", "prompt": "x", "max_tokens": 2}
    )
    assert generate.status_code == 400 and generate.json()["error"]["code"] == "unsupported_model"


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v1/reranking", "/reranking"])
def test_rerank_with_a_cross_encoder(url: str, path: str) -> None:
    documents = [TEXTS[0], {"text": TEXTS[1]}, TEXTS[2]]
    body = httpx.post(
        url + path, json={"model": "rerank", "query": "hello", "documents": documents}
    ).json()
    results = body["results"]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    assert all(r["document"]["text"] == TEXTS[r["index"]] for r in results)
    top = httpx.post(
        url + path,
        json={
            "model": "rerank",
            "query": "hello",
            "documents": TEXTS,
            "top_n": 1,
            "return_documents": False,
        },
    ).json()["results"]
    assert top == [{"index": results[0]["index"], "relevance_score": results[0]["relevance_score"]}]


def test_rerank_with_an_embedding_model_uses_cosine(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    vectors = client.embeddings.create(
        model="embed", input=["hello", *TEXTS], encoding_format="float"
    ).data
    expected = [float(np.dot(vectors[0].embedding, v.embedding)) for v in vectors[1:]]
    body = httpx.post(
        url + "/v1/rerank", json={"model": "embed", "query": "hello", "documents": TEXTS}
    ).json()
    got = {r["index"]: r["relevance_score"] for r in body["results"]}
    assert got == pytest.approx(dict(enumerate(expected)), abs=1e-4)
    chat = httpx.post(url + "/v1/rerank", json={"model": "chat", "query": "q", "documents": ["d"]})
    assert chat.status_code == 400


def test_embedding_and_rerank_batches_match_direct_calls(url: str) -> None:
    """Bulk jobs on the embedded default (SQLite): each line's answer is what
    the same request gets on its own."""
    from tests.support.batches import by_custom_id, read_lines, submit, wait

    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    embed_lines = [
        {
            "custom_id": f"e{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "embed", "input": [text], "encoding_format": "float"},
        }
        for i, text in enumerate(TEXTS)
    ]
    batch = wait(client, submit(client, embed_lines, endpoint="/v1/embeddings").id, 60)
    assert batch.status == "completed", batch
    output = by_custom_id(read_lines(client, batch.output_file_id))
    direct = client.embeddings.create(model="embed", input=TEXTS, encoding_format="float")
    for i, item in enumerate(direct.data):
        body = output[f"e{i}"]["response"]["body"]
        assert body["object"] == "list" and body["model"] == "embed"
        assert float(np.dot(body["data"][0]["embedding"], item.embedding)) > 0.9999

    rerank_lines = [
        {
            "custom_id": "r0",
            "method": "POST",
            "url": "/v1/rerank",
            "body": {"model": "rerank", "query": "a cat", "documents": TEXTS, "top_n": 2},
        }
    ]
    batch = wait(client, submit(client, rerank_lines, endpoint="/v1/rerank").id, 60)
    assert batch.status == "completed", batch
    [line] = read_lines(client, batch.output_file_id)
    results = line["response"]["body"]["results"]
    alone = httpx.post(
        url + "/v1/rerank",
        json={"model": "rerank", "query": "a cat", "documents": TEXTS, "top_n": 2},
    ).json()["results"]
    assert [r["index"] for r in results] == [r["index"] for r in alone]
    assert len(results) == 2 and results[0]["document"]["text"] in TEXTS
