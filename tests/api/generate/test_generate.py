"""/v1/generate: vLLM sampling parameters, best_of, beam search, mock_response."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.support.stack import MODEL, Stack


def _generate(stack: Stack, **body: object) -> httpx.Response:
    return httpx.post(stack.url + "/v1/generate", json={"model": MODEL, **body}, timeout=60)


def test_plain_generation_with_vllm_defaults(stack: Stack) -> None:
    response = _generate(stack, prompt="hello world", seed=3)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "generation"
    [choice] = body["choices"]
    assert body["usage"]["completion_tokens"] == 16  # vLLM's default max_tokens
    assert body["text"] == [choice["text"]]
    assert choice["finish_reason"] == "length"


def test_best_of_returns_the_most_likely_samples(stack: Stack) -> None:
    # The test stack's model has two slots: best_of 2.
    body = _generate(stack, prompt="hello", n=1, best_of=2, max_tokens=6, seed=9).json()
    [choice] = body["choices"]
    # Both were generated; the better one came back.
    assert body["usage"]["completion_tokens"] == 2 * 6
    both = _generate(stack, prompt="hello", n=2, max_tokens=6, seed=9, logprobs=0).json()
    means = [sum(e["logprob"] for e in c["logprobs"]) / 6 for c in both["choices"]]
    assert choice["mean_logprob"] == pytest.approx(max(means))
    best = both["choices"][means.index(max(means))]
    assert choice["text"] == best["text"]


def test_beam_search(stack: Stack) -> None:
    body = _generate(
        stack,
        prompt="the big dog",
        n=2,
        use_beam_search=True,
        max_tokens=5,
        temperature=0,
        early_stopping="never",
    ).json()
    choices = body["choices"]
    assert len(choices) == 2 and choices[0]["text"] != choices[1]["text"]
    scores = [c["cumulative_logprob"] for c in choices]
    assert scores == sorted(scores, reverse=True)
    again = _generate(
        stack,
        prompt="the big dog",
        n=2,
        use_beam_search=True,
        max_tokens=5,
        early_stopping="never",
    ).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in choices]


def test_messages_and_streaming(stack: Stack) -> None:
    with httpx.stream(
        "POST",
        stack.url + "/v1/generate",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "stream": True,
        },
    ) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "generation.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_mock_response_needs_no_worker(stack: Stack) -> None:
    # "other" has no worker at all: a real request to it would wait.
    body = httpx.post(
        stack.url + "/v1/generate",
        json={"model": "other", "prompt": "x", "mock_response": "canned", "n": 2},
        timeout=5,
    ).json()
    assert [c["text"] for c in body["choices"]] == ["canned", "canned"]
    assert body["usage"]["total_tokens"] == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"prompt": "x", "messages": [{"role": "user", "content": "y"}]},
        {},
        {"prompt": "x", "n": 3, "best_of": 2},
        {"prompt": "x", "use_beam_search": True, "stream": True},
        {"prompt": "x", "top_k": -5},
    ],
)
def test_invalid_requests(stack: Stack, bad: dict[str, object]) -> None:
    response = _generate(stack, **bad)
    assert response.status_code == 400, response.text
    assert isinstance(response.json()["error"]["code"], str)
