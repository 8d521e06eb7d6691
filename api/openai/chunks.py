"""SSE chunk formatting for the hot path.

A token chunk is a fixed prefix, the token's JSON string literal exactly as
the worker encoded it, and a fixed suffix: no per-token JSON object is built
or parsed. Pings, `[DONE]` and the relay loop: api/streaming/relay.py."""

from __future__ import annotations

import json
from typing import Any

from api.openai import logprobs
from schemas.events import TokenEvent, Usage


def usage_dict(usage: Usage, cached: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `cached`: prompt tokens reused from the KV cache
    (OpenAI's prompt_tokens_details.cached_tokens), as the usage rows count them."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class ChunkFormat:
    """Chunks of one response; `object` is chat.completion.chunk or text_completion."""

    def __init__(
        self, *, request_id: str, model: str, created: int, chat: bool, kind: str | None = None
    ) -> None:
        self.chat = chat
        head = {
            "id": request_id,
            "object": kind or ("chat.completion.chunk" if chat else "text_completion"),
            "created": created,
            "model": model,
            "system_fingerprint": None,
        }
        self._head = b"data: " + json.dumps(head, separators=(",", ":"))[:-1].encode()
        self._head += b',"choices":['

    def role(self, index: int = 0) -> bytes:
        return self._head + (
            b'{"index":%d,"delta":{"role":"assistant","content":""},'
            b'"logprobs":null,"finish_reason":null}]}\n\n' % index
        )

    def token(self, index: int, text_json: bytes) -> bytes:
        if self.chat:
            body = b'{"index":%d,"delta":{"content":%s},"logprobs":null,"finish_reason":null}'
        else:
            body = b'{"index":%d,"text":%s,"logprobs":null,"finish_reason":null}'
        return self._head + body % (index, text_json) + b"]}\n\n"

    def token_logprobs(self, event: TokenEvent, text_offset: int) -> bytes:
        """The slow path: a token chunk that carries log-probabilities."""
        assert event.logprobs is not None
        if self.chat:
            choice: dict[str, Any] = {
                "index": event.index,
                "delta": {"content": event.text},
                "logprobs": logprobs.chat(event.logprobs),
            }
        else:
            choice = {
                "index": event.index,
                "text": event.text,
                "logprobs": logprobs.completion(event.logprobs, text_offset),
            }
        choice["finish_reason"] = None
        body = json.dumps([choice], separators=(",", ":"), ensure_ascii=False)
        return self._head + body[1:].encode() + b"}\n\n"

    def tool_call(self, index: int, call: dict[str, Any]) -> bytes:
        delta = {"tool_calls": [{"index": 0, **call}]}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        return self._head + json.dumps(choice, separators=(",", ":")).encode() + b"]}\n\n"

    def finish(self, index: int, reason: str) -> bytes:
        if self.chat:
            body = b'{"index":%d,"delta":{},"logprobs":null,"finish_reason":%s}'
        else:
            body = b'{"index":%d,"text":"","logprobs":null,"finish_reason":%s}'
        return self._head + body % (index, json.dumps(reason).encode()) + b"]}\n\n"

    def usage(self, usage: Usage, cached: int = 0) -> bytes:
        body = json.dumps(usage_dict(usage, cached)).encode()
        return self._head + b'],"usage":' + body + b"}\n\n"
