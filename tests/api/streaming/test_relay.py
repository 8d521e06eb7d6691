"""The relay loop and its two formats without a stack: events pushed on a
stream's queue, the exact bytes the client would read."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from api.llama.serving import LlamaStream
from api.openai.chunks import ChunkFormat
from api.openai.serving import OpenAIStream
from api.streaming import relay
from api.streaming.jobs import JobStream
from api.streaming.watch import Tracked
from schemas.events import (
    Accepted,
    ChoiceResult,
    Done,
    ErrorEvent,
    Event,
    TokenEvent,
    Usage,
    encode,
    encode_token,
    error_body,
)
from schemas.jobs import GenerateJob, SamplingOptions

HEAD = b'data: {"id":"r","object":"chat.completion.chunk","created":7,"model":"m",'
HEAD += b'"system_fingerprint":null,"choices":['
DONE_EVENT = Done([ChoiceResult(0, "stop", stop_type="eos")], Usage(3, 2))


def _job(endpoint: str = "chat.completions", **fields: Any) -> GenerateJob:
    return GenerateJob(request_id="r", model="m", endpoint=endpoint, stream=True, **fields)  # type: ignore[arg-type]


async def _never() -> bool:
    return False


def _stream(job: GenerateJob, raw: list[bytes], ping_interval: float = 30.0) -> JobStream:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for item in raw:
        queue.put_nowait(item)
    return JobStream(
        job,
        queue,
        Tracked(job.model, queue, requeue=_never, worker_id="w"),
        deadline=time.monotonic() + 60,
        ping_interval=ping_interval,
    )


def _relay(stream: JobStream, fmt: relay.StreamFormat, first: Event | None) -> list[bytes]:
    async def run() -> list[bytes]:
        return [c async for c in relay._relay(contextlib.AsyncExitStack(), stream, fmt, first)]

    return asyncio.run(run())


def _openai(job: GenerateJob, include_usage: bool = False) -> OpenAIStream:
    fmt = ChunkFormat(request_id="r", model="m", created=7, chat=True)
    return OpenAIStream(fmt, job, include_usage=include_usage)


def test_openai_chunks_are_spliced_and_closed_by_done() -> None:
    job = _job()
    stream = _stream(job, [encode_token(0, " b"), encode(DONE_EVENT)])
    chunks = _relay(stream, _openai(job, include_usage=True), TokenEvent(0, b'"a"'))
    assert chunks == [
        HEAD + b'{"index":0,"delta":{"role":"assistant","content":""},'
        b'"logprobs":null,"finish_reason":null}]}\n\n',
        HEAD + b'{"index":0,"delta":{"content":"a"},"logprobs":null,"finish_reason":null}]}\n\n',
        HEAD + b'{"index":0,"delta":{"content":" b"},"logprobs":null,"finish_reason":null}]}\n\n',
        HEAD + b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}\n\n',
        HEAD + b'],"usage":{"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, '
        b'"prompt_tokens_details": {"cached_tokens": 0}}}\n\n',
        relay.DONE,
    ]


def test_a_quiet_stream_pings_and_an_error_still_ends_with_done() -> None:
    job = _job("completions")
    failure = ErrorEvent("worker lost", code="worker_lost", status=503)
    stream = _stream(job, [encode(failure)], ping_interval=0.01)
    fmt = OpenAIStream(
        ChunkFormat(request_id="r", model="m", created=7, chat=False), job, include_usage=True
    )
    chunks = _relay(stream, fmt, None)
    error = error_body("worker lost", type="server_error", code="worker_lost")
    assert chunks == [relay.PING, relay.sse(error), relay.DONE]


def test_a_timeout_while_queued_is_an_error_event() -> None:
    job = _job("completions")
    stream = _stream(job, [])
    stream.tracked.worker_id = None
    stream.deadline = time.monotonic() - 1
    fmt = OpenAIStream(
        ChunkFormat(request_id="r", model="m", created=7, chat=False), job, include_usage=False
    )
    chunks = _relay(stream, fmt, None)
    assert chunks[0] == relay.PING and chunks[-1] == relay.DONE
    assert json.loads(chunks[1][6:])["error"]["type"] == "timeout_error"


def test_a_tool_call_is_held_back_until_whole() -> None:
    job = _job(tools=[{"type": "function", "function": {"name": "f"}}], tool_mode="auto")
    call = '{"name": "f", "arguments": {"x": 1}}'
    done = Done([ChoiceResult(0, "stop")], Usage(1, 1))
    stream = _stream(job, [encode_token(0, call[1:]), encode(done)])
    chunks = _relay(stream, _openai(job), TokenEvent(0, json.dumps(call[0]).encode()))
    # Role, the call, its finish: no token chunk of the call's text.
    assert len(chunks) == 4 and b'"tool_calls"' in chunks[1]
    assert chunks[2].endswith(b'"finish_reason":"tool_calls"}]}\n\n')


def test_llama_chunks_end_with_the_final_body_and_no_done() -> None:
    job = _job("llama.completion")
    accepted = Accepted(3, settings={"temperature": 0.5}, prompt="hi")
    stream = _stream(job, [encode_token(0, "\nb"), encode(accepted), encode(DONE_EVENT)])
    fmt = LlamaStream(job, {"n_predict": 2})
    chunks = _relay(stream, fmt, TokenEvent(0, b'"a"'))
    assert chunks[:2] == [
        b'data: {"index":0,"content":"a","stop":false}\n\n',
        b'data: {"index":0,"content":"\\nb","stop":false}\n\n',
    ]
    last = json.loads(chunks[2][6:])
    assert len(chunks) == 3 and last["stop"] is True and last["content"] == ""
    assert last["has_new_line"] is True and last["prompt"] == "hi"
    assert last["generation_settings"] == {"temperature": 0.5, "n_predict": 2}
    assert last["stop_type"] == "eos" and last["tokens_predicted"] == 2


def test_llama_error_has_no_done() -> None:
    job = _job("llama.completion")
    stream = _stream(job, [encode(ErrorEvent("boom"))])
    chunks = _relay(stream, LlamaStream(job, {}), TokenEvent(0, b'"a"'))
    error = error_body("boom", type="server_error", code="internal_error")
    assert chunks == [b'data: {"index":0,"content":"a","stop":false}\n\n', relay.sse(error)]


def test_collect_keeps_parts_and_accepted() -> None:
    job = _job("completions", sampling=SamplingOptions(n=2))
    raw = [encode(Accepted(2)), encode_token(1, "y"), encode_token(0, "x"), encode(DONE_EVENT)]
    result = asyncio.run(relay._collect(_stream(job, raw)))
    assert isinstance(result, relay.Collected)
    assert result.end == DONE_EVENT and result.accepted == Accepted(2)
    assert result.text(0) == "x" and result.text(1) == "y" and result.text(2) == ""


def test_collect_stops_at_an_error() -> None:
    job = _job("completions")
    failure = ErrorEvent("bad", status=400)
    assert asyncio.run(relay._collect(_stream(job, [encode(failure)]))) == failure
