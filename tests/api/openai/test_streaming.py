"""SSE details: pings on a quiet stream, a failure after the headers, the
async client streaming, max_completion_tokens."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
from openai.types.chat import ChatCompletionChunk

from tests.support.procs import free_port, inferq, stop, wait_status
from tests.support.stack import MODEL, Stack

MESSAGES = [{"role": "user", "content": "hello"}]


def test_quiet_stream_gets_pings_then_an_error_event_and_done(served: Stack) -> None:
    # A second API on the same Redis, with short ping and timeout settings.
    port = free_port()
    env = {
        **served.env,
        "INFERQ_PORT": str(port),
        "INFERQ_SSE_PING_INTERVAL": "0.15",
        # Shorter than the two 2000-token jobs that hold both slots.
        "INFERQ_REQUEST_TIMEOUT": "0.8",
    }
    log = served.log.parent / "api-pings.log"
    api = inferq(["api"], env, log)
    release = threading.Event()
    long = {"model": MODEL, "prompt": "hi", "max_tokens": 2000, "stream": True, "ignore_eos": True}

    def occupy() -> None:
        with httpx.stream("POST", served.url + "/v1/completions", json=long, timeout=60) as r:
            for _ in r.iter_lines():
                if release.is_set():
                    return

    busy = [threading.Thread(target=occupy) for _ in range(2)]
    try:
        wait_status(f"http://127.0.0.1:{port}/health", 200, 30, log)
        for thread in busy:
            thread.start()
        time.sleep(0.5)
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "stream": True}
        with httpx.stream(
            "POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=30
        ) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line]
    finally:
        release.set()
        for thread in busy:
            thread.join(30)
        stop(api)
    assert lines.count(": ping") >= 3
    assert lines[-1] == "data: [DONE]"
    assert lines[-2].startswith('data: {"error"') and '"code":"timeout"' in lines[-2]


def test_async_client_streams(served: Stack) -> None:
    async def main() -> list[ChatCompletionChunk]:
        client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_completion_tokens=4,
            stream=True,  # type: ignore[arg-type]
        )
        chunks = [chunk async for chunk in stream]
        await client.close()
        return chunks

    chunks = asyncio.run(main())
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk.model_dump())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]


def test_max_completion_tokens(served: Stack) -> None:
    response = served.client().chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_completion_tokens=7,  # type: ignore[arg-type]
    )
    assert response.usage is not None and response.usage.completion_tokens == 7
