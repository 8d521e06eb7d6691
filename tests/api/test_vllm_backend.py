"""What a user of the vLLM backend checks, end to end through the API and real
vLLM on CPU: embeddings and rerank scores equal to what transformers computes
from the same weights, beam search, function calling, logit bias, refusals of
what vLLM cannot do, and batches (also that interactive requests overtake a
running batch)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from openai.types import Completion
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageParam,
)

from tests.support.batches import by_custom_id, chat_line, numbered_lines, read_lines, submit, wait
from tests.support.deploy import poll_usage, wait_lines_running
from tests.support.stack import MODEL, Stack
from tests.support.vllm_stack import EMBED_MODEL, RERANK_MODEL

Body = dict[str, Any]
# tests.support.tinyhf's directories (it imports torch, which this environment lacks).
LLAMA_DIR, RERANKER_DIR = "tiny-llama-hf", "tiny-reranker-hf"
TEXTS = ["hello world", "the cat sat on the mat", "Hello world! How are you today?"]
QUERY = "what do cats eat?"
DOCUMENTS = ["Cats eat fish and drink milk.", "The city has many roads.", "Dogs like to run."]

# Run in the vLLM environment (torch, transformers): the same weights through
# transformers, with no vLLM code involved. "embed": the last token's final
# hidden state (after the final norm) of LlamaModel, L2-normalised: vLLM's
# default pooling for a causal LM converted with convert="embed" (LAST, then
# normalise). "rerank": sigmoid of the one-label BERT cross-encoder's logit on
# the tokenizer's (query, document) pair, token types included.
REFERENCE = """
import json, sys
import torch
from transformers import AutoTokenizer, BertForSequenceClassification, LlamaModel
job = json.load(sys.stdin)
tok = AutoTokenizer.from_pretrained(job["path"])
out = {}
with torch.no_grad():
    if job["kind"] == "embed":
        model = LlamaModel.from_pretrained(job["path"], dtype=torch.float32).eval()
        out = {"vectors": [], "tokens": []}
        for text in job["texts"]:
            ids = tok(text, return_tensors="pt")
            last = model(**ids).last_hidden_state[0, -1]
            out["vectors"].append(torch.nn.functional.normalize(last, dim=0).tolist())
            out["tokens"].append(int(ids["input_ids"].shape[1]))
    else:
        model = BertForSequenceClassification.from_pretrained(job["path"]).eval()
        out = {"scores": []}
        for doc in job["documents"]:
            pair = tok(job["query"], doc, return_tensors="pt")
            assert set(pair["token_type_ids"][0].tolist()) == {0, 1}, pair
            out["scores"].append(torch.sigmoid(model(**pair).logits[0, 0]).item())
print(json.dumps(out))
"""


def reference(stack: Stack, job: Body) -> Body:
    assert stack.python is not None
    done = subprocess.run(
        [str(stack.python), "-c", REFERENCE],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: Body = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def post(stack: Stack, path: str, body: Body, status: int = 200) -> Body:
    response = httpx.post(stack.url + path, json=body, timeout=120)
    assert response.status_code == status, response.text
    data: Body = response.json()
    return data


def refused(stack: Stack, path: str, body: Body) -> Body:
    """The error of a 400 answer (never a 5xx)."""
    error: Body = post(stack, path, body, 400)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def test_embeddings_match_transformers(vllm_stack: Stack, hf_models: Path) -> None:
    client = vllm_stack.client()
    inputs = [*TEXTS, TEXTS[0]]
    # The client asks for base64 and decodes it unless told otherwise.
    default = client.embeddings.create(model=EMBED_MODEL, input=inputs)
    floats = client.embeddings.create(model=EMBED_MODEL, input=inputs, encoding_format="float")
    assert [d.index for d in floats.data] == list(range(len(inputs)))
    vectors = np.array([d.embedding for d in floats.data])
    assert vectors.shape == (len(inputs), 64)
    assert np.allclose([d.embedding for d in default.data], vectors, atol=1e-6)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(vectors[0], vectors[3], rtol=0, atol=1e-6)
    cosines = vectors[:3] @ vectors[:3].T
    assert cosines[np.triu_indices(3, 1)].max() < 0.999, cosines

    expected = reference(
        vllm_stack, {"kind": "embed", "path": str(hf_models / LLAMA_DIR), "texts": inputs}
    )
    assert floats.usage.prompt_tokens == sum(expected["tokens"]) > 0
    want = np.array(expected["vectors"])
    # The same float32 weights; only the order of the kernels' sums differs
    # (measured: cosine 1 - 2e-8). Measured misses stay below 0.999: mean
    # pooling 0.59, an earlier layer's state 0.77-0.89, no BOS 0.96-0.998.
    assert (vectors * want).sum(axis=1).min() > 0.9999, vectors @ want.T
    assert np.abs(vectors - want).max() < 1e-3


def test_rerank_cross_encoder_matches_transformers(vllm_stack: Stack, hf_models: Path) -> None:
    body = post(
        vllm_stack, "/v1/rerank", {"model": RERANK_MODEL, "query": QUERY, "documents": DOCUMENTS}
    )
    results = body["results"]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    assert all(r["document"]["text"] == DOCUMENTS[r["index"]] for r in results)
    assert body["usage"]["prompt_tokens"] > 0

    expected = reference(
        vllm_stack,
        {
            "kind": "rerank",
            "path": str(hf_models / RERANKER_DIR),
            "query": QUERY,
            "documents": DOCUMENTS,
        },
    )["scores"]
    got = {r["index"]: r["relevance_score"] for r in results}
    assert got == pytest.approx(dict(enumerate(expected)), abs=1e-3)

    top = post(
        vllm_stack,
        "/v1/rerank",
        {
            "model": RERANK_MODEL,
            "query": QUERY,
            "documents": DOCUMENTS,
            "top_n": 2,
            "return_documents": False,
        },
    )["results"]
    assert [set(r) for r in top] == [{"index", "relevance_score"}] * 2
    assert [r["index"] for r in top] == [r["index"] for r in results[:2]]
    # The same pair scores the same up to float noise between two forwards.
    assert [r["relevance_score"] for r in top] == pytest.approx(scores[:2], abs=1e-5)


def test_rerank_on_an_embedding_model_is_cosine(vllm_stack: Stack) -> None:
    vectors = vllm_stack.client().embeddings.create(
        model=EMBED_MODEL, input=[QUERY, *DOCUMENTS], encoding_format="float"
    )
    query = np.array(vectors.data[0].embedding)
    expected = {i: float(query @ np.array(v.embedding)) for i, v in enumerate(vectors.data[1:])}
    body = post(
        vllm_stack, "/v1/rerank", {"model": EMBED_MODEL, "query": QUERY, "documents": DOCUMENTS}
    )
    got = {r["index"]: r["relevance_score"] for r in body["results"]}
    assert got == pytest.approx(expected, abs=1e-4)


def test_beam_search(vllm_stack: Stack) -> None:
    body = {"model": MODEL, "prompt": "The cat", "use_beam_search": True, "n": 2}
    answer = post(vllm_stack, "/v1/generate", {**body, "max_tokens": 6, "length_penalty": 1.0})
    choices = answer["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert answer["text"] == [c["text"] for c in choices]
    assert choices[0]["text"] != choices[1]["text"]
    cumulative = [c["cumulative_logprob"] for c in choices]
    assert all(isinstance(c, float) and c < 0 for c in cumulative), choices
    # vLLM ranks hypotheses by cumulative / length ** length_penalty; both
    # run to max_tokens (EOS is never likely here), so by the cumulative.
    assert cumulative[0] >= cumulative[1]
    for choice in choices:
        assert choice["finish_reason"] == "length"
        assert choice["mean_logprob"] == pytest.approx(choice["cumulative_logprob"] / 6)
    error = refused(vllm_stack, "/v1/generate", {**body, "early_stopping": True})
    assert (error["code"], error["param"]) == ("unsupported_parameter", "early_stopping")


def test_refusals_leave_the_worker_serving(vllm_stack: Stack) -> None:
    base = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
    for extra, param in (
        ({"typical_p": 0.5}, "typical_p"),
        ({"mirostat": 2}, "mirostat"),
        ({"repeat_last_n": 32, "repeat_penalty": 1.1}, "repeat_last_n"),
    ):
        error = refused(vllm_stack, "/v1/completions", {**base, **extra})
        assert (error["code"], error["param"]) == ("unsupported_parameter", param), error
    llama_only = (
        ("/completion", {"model": MODEL, "prompt": "hi", "n_predict": 4}),
        ("/infill", {"model": MODEL, "input_prefix": "def f(", "input_suffix": ")"}),
    )
    for path, llama_body in llama_only:
        assert refused(vllm_stack, path, llama_body)["code"] == "unsupported_model"
    refused(vllm_stack, "/v1/completions", {**base, "grammar": "root ::= ((("})
    after = Completion.model_validate(post(vllm_stack, "/v1/completions", base))
    assert after.choices[0].text and after.usage is not None
    assert after.usage.completion_tokens == 4


ASK: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the weather in Paris?"}
]
WEATHER: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
        },
    },
}


def test_function_calling(vllm_stack: Stack) -> None:
    client = vllm_stack.client()
    required = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=100,
        seed=1,
    )
    ChatCompletion.model_validate(required.model_dump())
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
    assert isinstance(arguments, dict) and isinstance(arguments["city"], str)

    for seed in (1, 2, 3):
        auto = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=[WEATHER],
            tool_choice="auto",
            max_tokens=100,
            seed=seed,
        ).choices[0]
        if auto.message.tool_calls:
            assert auto.finish_reason == "tool_calls" and auto.message.content is None
            [call] = auto.message.tool_calls
            assert call.function.name == "get_weather"  # type: ignore[union-attr]
            assert "city" in json.loads(call.function.arguments)  # type: ignore[union-attr]
        else:
            assert auto.message.content and not auto.message.content.lstrip().startswith("{")


def test_logit_bias(vllm_stack: Stack) -> None:
    prompt = {"model": MODEL, "prompt": "The cat", "max_tokens": 4, "temperature": 0}
    # /v1/generate's log-probability entries carry token ids.
    entries = post(vllm_stack, "/v1/generate", {**prompt, "logprobs": 0})["choices"][0]["logprobs"]
    ids = [e["id"] for e in entries]
    greedy = post(vllm_stack, "/v1/completions", {**prompt, "logprobs": 0})
    tokens = greedy["choices"][0]["logprobs"]["tokens"]
    assert tokens == [e["token"] for e in entries] and len(set(ids)) == 4

    banned = post(
        vllm_stack, "/v1/completions", {**prompt, "logprobs": 0, "logit_bias": {str(ids[0]): -100}}
    )
    assert banned["choices"][0]["logprobs"]["tokens"][0] != tokens[0]
    forced = post(
        vllm_stack,
        "/v1/completions",
        {**prompt, "temperature": 1.0, "seed": 3, "logprobs": 0, "logit_bias": {str(ids[2]): 100}},
    )
    assert forced["choices"][0]["logprobs"]["tokens"] == [tokens[2]] * 4
    assert forced["choices"][0]["text"] == tokens[2] * 4


def test_batch_through_the_official_client(vllm_stack: Stack) -> None:
    client = vllm_stack.client()
    lines = [chat_line(f"q{i}", f"question {i}", max_tokens=8) for i in range(20)]
    batch = wait(client, submit(client, lines).id, 180)
    assert batch.status == "completed", batch
    counts = batch.request_counts
    assert counts is not None and (counts.total, counts.completed, counts.failed) == (20, 20, 0)
    assert read_lines(client, batch.error_file_id) == []
    output = read_lines(client, batch.output_file_id)
    assert [line["custom_id"] for line in output] == [f"q{i}" for i in range(20)]
    completion_tokens = 0
    for line in output:
        assert line["error"] is None and line["response"]["status_code"] == 200
        body = ChatCompletion.model_validate(line["response"]["body"])
        assert body.model == MODEL and body.choices[0].message.content
        assert body.usage is not None and 0 < body.usage.completion_tokens <= 8
        completion_tokens += body.usage.completion_tokens

    rows = poll_usage(
        database_url=vllm_stack.database_url,
        where="batch_id = :b",
        params={"b": batch.id},
        until=lambda found: len(found) >= 20,
    )
    assert len(rows) == 20, rows
    # A batch line's row is `<batch id>:<line>` (lines count from 0).
    assert {row["request_id"] for row in rows} == {f"{batch.id}:{i}" for i in range(20)}
    assert all(row["model"] == MODEL and row["status"] == "completed" for row in rows), rows
    assert sum(int(row["completion_tokens"]) for row in rows) == completion_tokens


BULK_LINES = 48
# Lines long enough that one runs for seconds (48 lines of 200 tokens took
# 3 s in all on a fast CPU), where an interactive answer takes milliseconds.
BULK_TOKENS = 1500


def test_interactive_requests_do_not_wait_for_batch_lines(vllm_stack: Stack) -> None:
    client = vllm_stack.client()
    batch = submit(client, numbered_lines(BULK_LINES, max_tokens=BULK_TOKENS))
    # The worker holds lines, and has handed them to its engine.
    wait_lines_running(database_url=vllm_stack.database_url, timeout=120)
    answers = [
        client.completions.create(model=MODEL, prompt=f"question {i}", max_tokens=8, timeout=120)
        for i in range(3)
    ]
    during = client.batches.retrieve(batch.id)
    for answer in answers:
        assert answer.choices[0].text and answer.usage is not None
        assert answer.usage.completion_tokens == 8
    # Each answer came while the first batch lines were still running: none
    # had to finish to make room for an interactive request.
    assert during.status == "in_progress" and during.request_counts is not None, during
    assert during.request_counts.completed == 0, during

    done = wait(client, batch.id, 300)
    assert done.status == "completed" and done.request_counts is not None, done
    assert (done.request_counts.completed, done.request_counts.failed) == (BULK_LINES, 0)
    output = by_custom_id(read_lines(client, done.output_file_id))
    assert len(output) == BULK_LINES
    tokens = {line["response"]["body"]["usage"]["completion_tokens"] for line in output.values()}
    assert tokens == {BULK_TOKENS}
