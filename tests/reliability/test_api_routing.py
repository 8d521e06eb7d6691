"""Model routing per capability, as `inferq up` serves it: one chat model
and one embedding model. Any model name on a route only one model can serve
reaches that model (the `openai` client's usual names work); llama-server's
model-less routes go to the chat model (or INFERQ_DEFAULT_MODEL), /embedding
to the embedding model; /apply-template renders the chat template."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.procs import inferq_up
from tests.support.tinybert import write_tiny_bert

pytestmark = pytest.mark.timeout(180)

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[str]:
    root = tmp_path_factory.mktemp("routing-stack")
    models = root / "models"
    models.mkdir()
    # "all-minilm" sorts first: model-less routes must still pick the chat model.
    write_tiny_bert(models / "all-minilm.gguf")
    (models / "all-minilm.yaml").write_text(
        "name: all-minilm\nparameters:\n  model: all-minilm.gguf\nembeddings: true\n"
        "pooling: mean\nembedding_max_tokens: 256\nthreads: 1\n"
    )
    (models / "tinychat.gguf").write_bytes(tiny_gguf.read_bytes())
    (models / "tinychat.yaml").write_text(
        "name: tinychat\nparameters:\n  model: tinychat.gguf\ncontext_size: 512\nparallel: 2\n"
        "threads: 1\ntemplate:\n  chat: \"{% for m in messages %}[{{ m['role'] }}] "
        "{{ m['content'] }}\\n{% endfor %}[assistant] \"\n"
    )
    with inferq_up(root, models=("all-minilm", "tinychat")) as up:
        yield up.url


def test_any_name_reaches_the_only_model_of_a_capability(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(
        model="gpt-3.5-turbo",
        messages=MESSAGES,
        max_tokens=4,  # type: ignore[arg-type]
    )
    assert chat.model == "tinychat"
    embedded = client.embeddings.create(model="text-embedding-ada-002", input="hello world")
    assert embedded.model == "all-minilm" and len(embedded.data[0].embedding) > 0
    # A model that exists but serves the other capability is a 400, not rerouted.
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="tinychat", input="hello")
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "unsupported_model"
    # No model reranks here: an unknown name has nowhere to go.
    rerank = httpx.post(
        url + "/v1/rerank", json={"model": "nope", "query": "a", "documents": ["b"]}, timeout=30
    )
    assert rerank.status_code == 404 and rerank.json()["error"]["code"] == "model_not_found"


def test_model_less_llama_routes_use_the_chat_model(url: str) -> None:
    props = httpx.get(url + "/props", timeout=10)
    assert props.status_code == 200, props.text
    assert props.json()["model_alias"] == "tinychat"
    completion = httpx.post(url + "/completion", json={"prompt": "x", "n_predict": 2}, timeout=30)
    assert completion.status_code == 200 and completion.json()["model"] == "tinychat"
    tokens = httpx.post(url + "/tokenize", json={"content": "hello"}, timeout=30)
    assert tokens.status_code == 200 and tokens.json()["tokens"]
    text = httpx.post(url + "/detokenize", json={"tokens": tokens.json()["tokens"]}, timeout=30)
    assert text.status_code == 200 and "hello" in text.json()["content"]
    embedding = httpx.post(url + "/embedding", json={"content": "hello"}, timeout=30)
    assert embedding.status_code == 200, embedding.text
    assert len(embedding.json()[0]["embedding"][0]) > 0
    # The OpenAI routes without /v1, as llama-server answers them.
    assert httpx.post(url + "/embeddings", json={"input": "hi"}, timeout=30).status_code == 200
    chat = httpx.post(
        url + "/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}, timeout=30
    )
    assert chat.status_code == 200 and chat.json()["model"] == "tinychat"


def test_apply_template(url: str) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    response = httpx.post(url + "/apply-template", json={"messages": messages}, timeout=10)
    assert response.status_code == 200, response.text
    assert response.json() == {"prompt": "[system] be brief\n[user] hi\n[assistant] "}
    bad = httpx.post(url + "/apply-template", json={"messages": []}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
