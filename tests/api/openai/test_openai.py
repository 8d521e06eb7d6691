"""End to end: `inferq api` and `inferq worker` as separate processes, real
Redis and Postgres, a real llama.cpp engine, driven by the official client."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
import redis
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.support.procs import inferq, stop
from tests.support.stack import MODEL, Stack

MESSAGES = [{"role": "user", "content": "hello world"}]


def test_models_and_health(served: Stack) -> None:
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}
    ids = {m.id for m in served.client().models.list()}
    # The vLLM stack serves an embedding model and a reranker beside them.
    assert {"tiny", "other"} <= ids


def test_chat_completion(served: Stack) -> None:
    response = served.client().chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,  # type: ignore[arg-type]
    )
    ChatCompletion.model_validate(response.model_dump())
    assert response.object == "chat.completion"
    assert response.model == MODEL
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content and len(choice.message.content.split()) >= 5
    assert choice.finish_reason == "length"
    assert response.usage is not None
    assert response.usage.completion_tokens == 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12
    row = served.usage(response.id)
    assert row["status"] == "completed"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (response.usage.prompt_tokens, 12)
    assert row["endpoint"] == "chat.completions" and row["model"] == MODEL
    assert row["ttft_ms"] is not None and row["duration_ms"] >= row["ttft_ms"]


def test_chat_streaming_matches_the_whole_answer(served: Stack) -> None:
    client = served.client()
    whole = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,  # type: ignore[arg-type]
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk.model_dump())
        assert chunk.object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_completion_and_streamed_completion(served: Stack) -> None:
    client = served.client()
    response = client.completions.create(
        model=MODEL, prompt="the big dog", max_tokens=10, temperature=0
    )
    Completion.model_validate(response.model_dump())
    assert response.object == "text_completion"
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 10
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="the big dog", max_tokens=10, temperature=0, stream=True
        )
    )
    for chunk in chunks[:-1]:
        # OpenAI itself sends `"finish_reason": null` until the last chunk, which
        # the client's Completion type (shared with whole answers) does not admit.
        dump = chunk.model_dump()
        assert dump["choices"][0]["finish_reason"] is None
        dump["choices"][0]["finish_reason"] = "stop"
        Completion.model_validate(dump)
    Completion.model_validate(chunks[-1].model_dump())
    assert "".join(c.choices[0].text for c in chunks) == response.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_default_completion_length_is_sixteen(served: Stack) -> None:
    response = served.client().completions.create(model=MODEL, prompt="one", temperature=0)
    assert response.usage is not None and response.usage.completion_tokens == 16


def test_stop_sequence_and_seed(served: Stack) -> None:
    client = served.client()
    base = client.completions.create(model=MODEL, prompt="hello", max_tokens=12, temperature=0)
    words = base.choices[0].text.split()
    stop = " " + words[3]
    stopped = client.completions.create(
        model=MODEL, prompt="hello", max_tokens=12, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == base.choices[0].text.split(stop)[0]

    def sample(seed: int) -> str:
        out = client.completions.create(
            model=MODEL, prompt="hello", max_tokens=12, temperature=1.0, top_p=1.0, seed=seed
        )
        return out.choices[0].text

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)


def test_sse_headers(served: Stack) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def _error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["code"], str) and error["message"]
    return error


def test_json_body_without_json_content_type(served: Stack) -> None:
    """`curl -d` sends form-encoded headers; the body is JSON all the same."""
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 3})
    for headers in ({"content-type": "application/x-www-form-urlencoded"}, {}):
        response = httpx.post(served.url + "/v1/chat/completions", content=body, headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 3


def test_bad_input_gets_openai_errors(served: Stack) -> None:
    url = served.url + "/v1/chat/completions"
    bad_json = httpx.post(
        url,
        content=b'{"model": "tiny", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert "JSON" in str(_error(bad_json, 400)["message"])
    missing = _error(httpx.post(url, json={"model": MODEL}), 400)
    assert missing["param"] == "messages"
    wrong_type = _error(
        httpx.post(url, json={"model": MODEL, "messages": MESSAGES, "temperature": "hot"}), 400
    )
    assert wrong_type["param"] == "temperature"
    unknown = _error(httpx.post(url, json={"model": "gpt-5", "messages": MESSAGES}), 404)
    assert unknown["code"] == "model_not_found" and unknown["param"] == "model"
    too_many = _error(httpx.post(url, json={"model": MODEL, "messages": MESSAGES, "n": 3}), 400)
    assert too_many["param"] == "n" and "this model has 2" in str(too_many["message"])
    bad_format = httpx.post(
        url, json={"model": MODEL, "messages": MESSAGES, "response_format": {"type": "json_schema"}}
    )
    assert _error(bad_format, 400)["param"] == "response_format"
    bad_grammar = httpx.post(
        url, json={"model": MODEL, "messages": MESSAGES, "grammar": "root ::= ("}
    )
    assert _error(bad_grammar, 400)["param"] == "grammar"
    bad_bias = httpx.post(
        url, json={"model": MODEL, "messages": MESSAGES, "logit_bias": {"99999999": 1}}
    )
    assert _error(bad_bias, 400)["param"] == "logit_bias"
    with pytest.raises(openai.BadRequestError):
        served.client().chat.completions.create(model=MODEL, messages=[])
    # The service is still fine.
    assert httpx.get(served.url + "/health").status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_context_length_exceeded_is_a_400_before_streaming(served: Stack, stream: bool) -> None:
    prompt = " ".join(["the big dog"] * 800)
    response = httpx.post(
        served.url + "/v1/completions",
        json={"model": MODEL, "prompt": prompt, "max_tokens": 4, "stream": stream},
        timeout=30,
    )
    error = _error(response, 400)
    assert error["code"] == "context_length_exceeded"
    assert "maximum context length is 2048" in str(error["message"])


def test_client_disconnect_cancels_the_job(served: Stack) -> None:
    # Long enough that it is still running when the client hangs up.
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        request_id = first["id"]
    row = served.usage(request_id)
    assert row["status"] == "cancelled"
    assert int(row["completion_tokens"]) < 2000  # type: ignore[call-overload]


def test_concurrent_async_clients(served: Stack) -> None:
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
        prompts = ["hello", "the cat", "we go", "my way", "one two", "big sun"]
        results = await asyncio.gather(
            *[
                client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0)
                for p in prompts
            ]
        )
        await client.close()
        return [r.choices[0].text for r in results]

    texts = asyncio.run(main())
    assert len(texts) == 6 and all(t.strip() for t in texts)


def test_a_second_worker_shares_the_queue(served: Stack) -> None:
    """Scale-out: another worker for the same model (same REDIS_URL) takes
    jobs from the same queue with no other change."""
    log = served.log.parent / "worker2.log"
    second = inferq(["worker", "--model", MODEL], served.env, log, python=served.python)
    try:
        # vLLM takes 15-30 s to start on 2 cores.
        deadline = time.monotonic() + 120
        # Its heartbeat, then its consumer: Celery logs "ready." once it takes jobs.
        while len(_workers(served)) < 2 or " ready." not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)

        async def burst() -> list[str]:
            client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
            results = await asyncio.gather(
                *[
                    client.completions.create(
                        model=MODEL,
                        prompt="hi",
                        max_tokens=400,
                        temperature=0,
                        extra_body={"ignore_eos": True},
                    )
                    for _ in range(6)
                ]
            )
            await client.close()
            return [r.id for r in results]

        ids = asyncio.run(burst())
        served_by = {served.usage(i)["worker"] for i in ids}
        assert len(served_by) == 2
    finally:
        stop(second)


def _workers(served: Stack) -> list[bytes]:
    raw = redis.Redis.from_url(served.env["REDIS_URL"]).hgetall("inferq:workers")
    return [v for k, v in raw.items() if k.decode().startswith(MODEL + "|")]
