"""Hostile values at the API edge: every one is a 400 in the OpenAI envelope,
answered at once, and the worker serves the next request."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from tests.support.stack import MODEL, Stack

pytestmark = pytest.mark.timeout(120)

MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **extra}


def _nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


# (route, raw JSON body, the param the error names or None)
CASES: list[tuple[str, str, str | None]] = [
    # issue 10's example: a logit_bias key that is not a token id was a 500.
    (CHAT, json.dumps(_chat(logit_bias={"²": 1})), "logit_bias"),
    (CHAT, json.dumps(_chat(logit_bias={"99999999999": 1})), "logit_bias"),
    (CHAT, json.dumps(_chat(logit_bias={"1": 1e39})), "logit_bias"),
    # NaN, Infinity and overflowing numbers, which Python's parser accepts.
    (CHAT, json.dumps(_chat())[:-1] + ', "temperature": NaN}', None),
    (CHAT, json.dumps(_chat())[:-1] + ', "top_p": Infinity}', None),
    (CHAT, json.dumps(_chat())[:-1] + ', "temperature": 1e400}', None),
    (CHAT, json.dumps(_chat())[:-1] + ', "json_schema": {"minimum": -Infinity}}', None),
    # Integers beyond the C types they end up in.
    (CHAT, json.dumps(_chat(seed=2**40)), "seed"),
    (CHAT, json.dumps(_chat(top_k=2**40)), "top_k"),
    (CHAT, json.dumps(_chat(max_tokens=2**31)), "max_tokens"),
    ("/completion", json.dumps({"prompt": [2**40], "n_predict": 2}), None),
    ("/completion", json.dumps({"prompt": "x", "id_slot": 2**40}), "id_slot"),
    ("/detokenize", json.dumps({"tokens": [2**33]}), None),
    (
        "/v1/generate",
        json.dumps({"prompt": "x", "use_beam_search": True, "n": 2, "length_penalty": 2000}),
        "length_penalty",
    ),
    # Strings Postgres, UTF-8 encoders and C strings cannot take.
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', None),
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "a\\u0000b"}]}', None),
    ("/tokenize", '{"content": "\\udfff"}', None),
    # Deep nesting: refused, never a RecursionError.
    (CHAT, json.dumps(_chat())[:-1] + ', "json_schema": ' + _nested(100) + "}", None),
    (CHAT, json.dumps(_chat())[:-1] + ', "json_schema": ' + _nested(100_000) + "}", None),
    ("/completion", '{"prompt": ' + "[" * 50_000 + "]" * 50_000 + "}", None),
    # Limits: stop strings, messages, slots (`parallel: 2`), context (2048).
    (CHAT, json.dumps(_chat(stop=[str(i) for i in range(17)])), "stop"),
    (CHAT, json.dumps(_chat(stop=["x" * 513])), "stop"),
    (CHAT, json.dumps({"model": MODEL, "messages": MESSAGES * 2049}), "messages"),
    (CHAT, json.dumps(_chat(n=3)), "n"),
    ("/v1/generate", json.dumps({"model": MODEL, "prompt": "x", "n": 1, "best_of": 4}), "n"),
    (
        "/v1/completions",
        json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 5000}),
        "max_tokens",
    ),
]


def _served(stack: Stack) -> None:
    response = httpx.post(stack.url + CHAT, json=_chat(), timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize(("route", "body", "param"), CASES, ids=lambda v: str(v)[:40])
def test_hostile_value_is_a_400(stack: Stack, route: str, body: str, param: str | None) -> None:
    started = time.monotonic()
    response = httpx.post(
        stack.url + route,
        content=body.encode("utf-8", "surrogatepass"),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    elapsed = time.monotonic() - started
    assert response.status_code == 400, response.text[:500]
    error = response.json()["error"]
    assert isinstance(error["code"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert (error["param"] or "").split(".")[0] == param, error
    assert elapsed < 5
    _served(stack)


def test_context_limit_keeps_its_code(stack: Stack) -> None:
    response = httpx.post(
        stack.url + "/v1/completions",
        json={"model": MODEL, "prompt": "x", "max_tokens": 5000},
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_text_logit_bias_keeps_the_list_form(stack: Stack) -> None:
    """Text biases stay available to llama.cpp clients: the list form on the
    OpenAI routes, and non-integer keys on /completion."""
    listed = httpx.post(stack.url + CHAT, json=_chat(logit_bias=[["hi", -5]]), timeout=30)
    assert listed.status_code == 200, listed.text
    keyed = httpx.post(
        stack.url + "/completion",
        json={"prompt": "x", "n_predict": 2, "logit_bias": {"hi": -5}},
        timeout=30,
    )
    assert keyed.status_code == 200, keyed.text


def test_body_that_is_not_utf8_is_a_400(stack: Stack) -> None:
    response = httpx.post(
        stack.url + CHAT,
        content=b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400
    assert isinstance(response.json()["error"]["code"], str)
    _served(stack)
