"""llama-server's /completion (and /infill) answers: one JSON object, or a
stream of `data: {"content", "stop": false}` chunks closed by a chunk with
`"stop": true` and every final field. No `[DONE]` line: llama-server sends
none on these endpoints."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from api.streaming import relay
from api.streaming.jobs import JobRunner
from api.streaming.relay import Collected, sse
from schemas.events import Accepted, Done, TokenEvent
from schemas.jobs import GenerateJob

_TOKEN_HEAD = b'data: {"index":0,"content":'
_TOKEN_TAIL = b',"stop":false}\n\n'


def timings(done: Done) -> dict[str, Any]:
    """llama-server's `timings`. Prompt time is measured by the engine; the
    generation time runs from the first token to the end."""
    cached = done.tokens_cached
    prompt_n = done.usage.prompt_tokens - cached
    prompt_ms = done.prompt_ms if done.prompt_ms is not None else (done.ttft_ms or 0.0)
    predicted_n = done.usage.completion_tokens
    predicted_ms = 0.0
    if done.ttft_ms is not None and predicted_n:
        predicted_ms = max(done.duration_ms - done.ttft_ms, 0.0)
    return {
        "cache_n": cached,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": 1000.0 * prompt_n / prompt_ms if prompt_ms > 0 else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
        "predicted_per_second": 1000.0 * predicted_n / predicted_ms if predicted_ms > 0 else 0.0,
    }


def final_body(
    job: GenerateJob,
    accepted: Accepted | None,
    done: Done,
    echo: dict[str, Any],
    *,
    content: str,
    has_new_line: bool,
) -> dict[str, Any]:
    """The whole answer, or the last chunk of a stream (`content` empty: the
    text went out in the chunks before it)."""
    choice = done.choices[0]
    stop_type = choice.stop_type or "none"
    body: dict[str, Any] = {
        "index": 0,
        "content": content,
        "id_slot": -1 if choice.slot is None else choice.slot,
        "stop": True,
        "model": job.model,
        "tokens_predicted": done.usage.completion_tokens,
        "tokens_evaluated": done.usage.prompt_tokens,
        "generation_settings": {**((accepted and accepted.settings) or {}), **echo},
        "prompt": (accepted and accepted.prompt) or "",
        "has_new_line": has_new_line,
        # inferq rejects a prompt that does not fit (400) and stops at the
        # slot's context: nothing is ever truncated.
        "truncated": False,
        "stop_type": stop_type,
        # The flags llama-server sent before `stop_type`; clients still read them.
        "stopped_eos": stop_type == "eos",
        "stopped_word": stop_type == "word",
        "stopped_limit": stop_type == "limit",
        "stopping_word": choice.stopping_word or "",
        "tokens_cached": done.tokens_cached,
        "timings": timings(done),
    }
    if not job.stream and choice.logprobs is not None:
        body["completion_probabilities"] = choice.logprobs
    return body


class LlamaStream:
    """The relay's format for llama-server's chunks: the Accepted event kept
    for the last chunk, which echoes its settings and prompt."""

    closes_with_done = False

    def __init__(self, job: GenerateJob, echo: dict[str, Any]) -> None:
        self.job = job
        self.echo = echo
        self.accepted_event: Accepted | None = None
        # JSON writes a newline inside a string as \n: no need to decode tokens.
        self.new_line = False

    def start(self) -> Iterator[bytes]:
        return iter(())

    def accepted(self, event: Accepted) -> None:
        self.accepted_event = event

    def token(self, event: TokenEvent) -> bytes:
        self.new_line = self.new_line or b"\\n" in event.text_json
        if event.logprobs is None:
            # Hot path: the worker's JSON string literal is spliced in as it is.
            return _TOKEN_HEAD + event.text_json + _TOKEN_TAIL
        return sse(
            {
                "index": 0,
                "content": event.text,
                "stop": False,
                "completion_probabilities": event.logprobs,
            }
        )

    def end(self, done: Done) -> Iterator[bytes]:
        body = final_body(
            self.job, self.accepted_event, done, self.echo, content="", has_new_line=self.new_line
        )
        yield sse(body)


async def serve_completion(
    request: Request, runner: JobRunner, job: GenerateJob, echo: dict[str, Any]
) -> Response:
    if job.stream:
        return await relay.relay(request, runner, job, LlamaStream(job, echo))

    def render(answer: Collected[Done]) -> Response:
        choice = answer.end.choices[0]
        text = choice.text if choice.text is not None else answer.text()
        body = final_body(
            job, answer.accepted, answer.end, echo, content=text, has_new_line="\n" in text
        )
        return JSONResponse(body)

    return await relay.collect(request, runner, job, render)
