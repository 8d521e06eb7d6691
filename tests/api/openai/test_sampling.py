"""Sampling options over HTTP: n, logprobs, structured output, logit bias,
llama.cpp extras, and cancellation of queued jobs."""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion
from sqlalchemy import create_engine, text

from tests.support.stack import MODEL, Stack
from workers.engine.llama.model import ContextOptions, LlamaModel

MESSAGES = [{"role": "user", "content": "hello world"}]


def _post(served: Stack, path: str, body: dict[str, object]) -> dict[str, object]:
    response = httpx.post(served.url + path, json={"model": MODEL, **body}, timeout=60)
    assert response.status_code == 200, response.text
    data: dict[str, object] = response.json()
    return data


def test_n_choices(served: Stack) -> None:
    response = served.client().chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        n=2,
        max_tokens=6,
        temperature=1.0,
        seed=5,  # type: ignore[arg-type]
    )
    ChatCompletion.model_validate(response.model_dump())
    assert [c.index for c in response.choices] == [0, 1]
    assert response.choices[0].message.content != response.choices[1].message.content
    assert response.usage is not None and response.usage.completion_tokens == 12
    chunks = list(
        served.client().chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            n=2,
            max_tokens=6,
            temperature=1.0,
            seed=5,
            stream=True,  # type: ignore[arg-type]
        )
    )
    for index in (0, 1):
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in chunks
            if c.choices and c.choices[0].index == index
        )
        assert streamed == response.choices[index].message.content
        finishes = [
            c.choices[0].finish_reason
            for c in chunks
            if c.choices and c.choices[0].index == index and c.choices[0].finish_reason
        ]
        assert finishes == ["length"]


def test_chat_logprobs(served: Stack) -> None:
    client = served.client()
    response = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,  # type: ignore[arg-type]
    )
    ChatCompletion.model_validate(response.model_dump())
    content = response.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 5
    assert "".join(t.token for t in content) == response.choices[0].message.content
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 2
        assert token.top_logprobs[0].token == token.token  # greedy
    streamed = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=5,
            temperature=0,
            logprobs=True,
            stream=True,  # type: ignore[arg-type]
        )
    )
    tokens = [
        t.token
        for c in streamed
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content or []
    ]
    assert tokens == [t.token for t in content]


def test_completion_logprobs(served: Stack) -> None:
    response = served.client().completions.create(
        model=MODEL, prompt="hello", max_tokens=4, temperature=0, logprobs=2
    )
    Completion.model_validate(response.model_dump())
    lp = response.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert "".join(lp.tokens) == response.choices[0].text
    assert len(lp.token_logprobs) == 4 and all(v <= 0 for v in lp.token_logprobs)
    assert lp.top_logprobs is not None and all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]


def test_response_format_json_schema(served: Stack) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]}},
        "required": ["ok", "color"],
    }
    response = served.client().chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    )
    value = json.loads(response.choices[0].message.content or "")
    assert value["color"] in ("red", "green") and isinstance(value["ok"], bool)
    obj = _post(
        served,
        "/v1/chat/completions",
        {"messages": MESSAGES, "max_tokens": 3, "response_format": {"type": "json_object"}},
    )
    assert obj["choices"][0]["message"]["content"].lstrip().startswith("{")  # type: ignore[index]


def test_gbnf_grammar_and_llama_extras(served: Stack) -> None:
    body = _post(
        served,
        "/v1/completions",
        {"prompt": "hi", "max_tokens": 20, "grammar": 'root ::= ("yes" | "no") "!"'},
    )
    assert re.fullmatch(r"(yes|no)!", body["choices"][0]["text"])  # type: ignore[index]
    greedy = _post(served, "/v1/completions", {"prompt": "hi", "max_tokens": 8, "temperature": 0})
    top1 = _post(
        served, "/v1/completions", {"prompt": "hi", "max_tokens": 8, "temperature": 1.5, "top_k": 1}
    )
    assert top1["choices"][0]["text"] == greedy["choices"][0]["text"]  # type: ignore[index]
    n_predict = _post(
        served, "/v1/completions", {"prompt": "hi", "n_predict": 5, "ignore_eos": True}
    )
    assert n_predict["usage"]["completion_tokens"] == 5  # type: ignore[index]


def test_logit_bias_openai_and_llama_forms(stack: Stack, tiny_gguf: Path) -> None:
    model = LlamaModel(tiny_gguf, ContextOptions(n_slots=1, n_ctx_per_slot=64, n_threads=1))
    [world] = model.tokenize("world", add_special=False)
    model.close()
    # OpenAI: {"token id": bias}.
    forced = _post(
        stack,
        "/v1/completions",
        {"prompt": "hi", "max_tokens": 3, "temperature": 0, "logit_bias": {str(world): 100}},
    )
    assert forced["choices"][0]["text"] == " world" * 3  # type: ignore[index]
    # llama.cpp: [[text or id, bias or false]]; false bans.
    greedy = _post(
        stack,
        "/v1/completions",
        {"prompt": "hi", "max_tokens": 3, "temperature": 0, "logprobs": 0},
    )
    first = greedy["choices"][0]["logprobs"]["tokens"][0]  # type: ignore[index]
    banned = _post(
        stack,
        "/v1/completions",
        {
            "prompt": "hi",
            "max_tokens": 3,
            "temperature": 0,
            "logprobs": 0,
            "logit_bias": [[first.strip(), False]],
        },
    )
    assert banned["choices"][0]["logprobs"]["tokens"][0] != first  # type: ignore[index]


def _cancelled_since(served: Stack, since: datetime) -> list[dict[str, object]]:
    engine = create_engine(served.database_url)
    try:
        with engine.connect() as conn:
            rows = (
                conn.execute(
                    text("SELECT * FROM usage WHERE created_at >= :t AND status = 'cancelled'"),
                    {"t": since},
                )
                .mappings()
                .all()
            )
        return [dict(r) for r in rows]
    finally:
        engine.dispose()


def test_cancelled_queued_job_never_starts(served: Stack) -> None:
    since = datetime.now(UTC)
    long = {
        "model": MODEL,
        "prompt": "hello",
        "max_tokens": 2000,
        "stream": True,
        "ignore_eos": True,
        # The tiny model makes 2000 tokens in about a second on an idle
        # machine: alternatives for every token keep the slots busy for
        # several seconds (about twice as long), well past the moment the
        # queued request's client leaves.
        "logprobs": 20,
    }
    stop_busy = threading.Event()

    def occupy() -> None:
        # Hold one of the worker's two slots until told to go.
        with httpx.stream("POST", served.url + "/v1/completions", json=long, timeout=60) as r:
            for _ in r.iter_lines():
                if stop_busy.is_set():
                    return

    busy = [threading.Thread(target=occupy) for _ in range(2)]
    for thread in busy:
        thread.start()
    time.sleep(0.5)
    # A third request waits in the queue; its client gives up.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.url + "/v1/completions", json={**long, "stream": False}, timeout=1.0)
    time.sleep(0.3)
    stop_busy.set()
    for thread in busy:
        thread.join(30)
    deadline = time.monotonic() + 15
    rows: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        rows = _cancelled_since(served, since)
        if len(rows) >= 3:
            break
        time.sleep(0.2)
    never_started = [r for r in rows if r["prompt_tokens"] == 0]
    running = [r for r in rows if r["prompt_tokens"] != 0]
    assert len(never_started) == 1, rows
    assert never_started[0]["completion_tokens"] == 0
    # The two that held the slots were cancelled mid-way when their clients left.
    assert len(running) == 2 and all(int(r["completion_tokens"]) < 2000 for r in running)  # type: ignore[call-overload]
