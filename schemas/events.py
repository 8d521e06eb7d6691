"""Stream events a worker publishes on a request's pub/sub channel.

Tokens are the hot path, so they skip JSON objects: a token event is
`T<choice index>:<JSON string literal>`. The worker encodes the text once and
the API splices the literal straight into its SSE chunk without decoding it.
Every other event is a JSON object with a `type`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

TOKEN_PREFIX = b"T"
LOGPROB_PREFIX = b"L"


@dataclass(frozen=True, slots=True)
class TokenEvent:
    index: int
    # The text as a JSON string literal, quotes included.
    text_json: bytes
    # Per generated token: {"id", "token", "logprob", "bytes", "top_logprobs":
    # [{"id", "token", "logprob", "bytes"}]}, when the request asked for them.
    logprobs: list[dict[str, Any]] | None = None

    @property
    def text(self) -> str:
        value: str = json.loads(self.text_json)
        return value


@dataclass(frozen=True, slots=True)
class Accepted:
    """The worker admitted the request: it fits and a slot will run it."""

    prompt_tokens: int
    # llama.cpp-style jobs (/completion, /infill): the resolved generation
    # settings and the prompt as evaluated, which llama-server echoes back.
    settings: dict[str, Any] | None = None
    prompt: str | None = None
    # The heartbeat id of the worker running the job: the API watches that
    # worker's heartbeat and ends the request if it dies (api/streaming/watch.py).
    worker_id: str | None = None
    type: str = "accepted"


@dataclass(frozen=True, slots=True)
class ChoiceResult:
    index: int
    finish_reason: str
    # The whole text (and its log-probabilities), for jobs that were not streamed.
    text: str | None = None
    logprobs: list[dict[str, Any]] | None = None
    # Beam search: the hypothesis' summed log-probability and its length.
    cumulative_logprob: float | None = None
    n_tokens: int | None = None
    # Why the choice ended, as llama-server reports it: "eos", "word" (a stop
    # string, `stopping_word`) or "limit" (max tokens or the slot's context);
    # None when cancelled. `slot` is the slot that ran it.
    stop_type: str | None = None
    stopping_word: str | None = None
    slot: int | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Done:
    choices: list[ChoiceResult]
    usage: Usage
    ttft_ms: float | None = None
    duration_ms: float = 0.0
    # Prompt tokens reused from a slot's KV cache instead of evaluated.
    tokens_cached: int = 0
    # Time spent evaluating the prompt (its first batch to its logits).
    prompt_ms: float | None = None
    type: str = "done"


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """A failure; `status` is the HTTP status the API answers with when no
    byte of the response has been sent yet."""

    message: str
    type: str = "error"
    error_type: str = "server_error"
    code: str = "internal_error"
    status: int = 500
    param: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Embeddings:
    """The answer to an EmbedJob. Embeddings travel as one base64 string of
    little-endian float32 rows (`data`, `dim` wide): decoding and re-encoding
    thousands of JSON floats per request cost more CPU than the rest of the
    serving path. Rerank scores travel as `vectors` ([[score], ...])."""

    prompt_tokens: int
    vectors: list[list[float]] = field(default_factory=list)
    data: str = ""
    dim: int = 0
    type: str = "embeddings"

    @classmethod
    def from_matrix(cls, rows: Sequence[npt.NDArray[Any]], prompt_tokens: int) -> Embeddings:
        matrix = np.asarray(rows, dtype="<f4")
        dim = int(matrix.shape[1]) if matrix.ndim == 2 else 0
        return cls(prompt_tokens, data=base64.b64encode(matrix.tobytes()).decode(), dim=dim)

    def matrix(self) -> npt.NDArray[np.float32]:
        """The embeddings, one row per input."""
        flat = np.frombuffer(base64.b64decode(self.data), dtype="<f4")
        return flat.reshape(-1, self.dim) if self.dim else flat.reshape(0, 0)


Event = TokenEvent | Accepted | Done | ErrorEvent | Embeddings


def encode_token(index: int, text: str) -> bytes:
    return b"T%d:%s" % (index, json.dumps(text, ensure_ascii=False).encode())


def encode_token_logprobs(index: int, text: str, logprobs: list[dict[str, Any]]) -> bytes:
    body = json.dumps({"text": text, "logprobs": logprobs}, ensure_ascii=False)
    return b"L%d:%s" % (index, body.encode())


def encode(event: Accepted | Done | ErrorEvent | Embeddings) -> bytes:
    return json.dumps(asdict(event), separators=(",", ":")).encode()


def decode(raw: bytes) -> Event:
    if raw[:1] == TOKEN_PREFIX:
        sep = raw.index(b":")
        return TokenEvent(int(raw[1:sep]), raw[sep + 1 :])
    if raw[:1] == LOGPROB_PREFIX:
        sep = raw.index(b":")
        body = json.loads(raw[sep + 1 :])
        text_json = json.dumps(body["text"], ensure_ascii=False).encode()
        return TokenEvent(int(raw[1:sep]), text_json, body["logprobs"])
    data = json.loads(raw)
    kind = data.pop("type")
    if kind == "accepted":
        return Accepted(**data)
    if kind == "done":
        return Done(
            choices=[ChoiceResult(**c) for c in data["choices"]],
            usage=Usage(**data["usage"]),
            ttft_ms=data.get("ttft_ms"),
            duration_ms=data.get("duration_ms", 0.0),
            tokens_cached=data.get("tokens_cached", 0),
            prompt_ms=data.get("prompt_ms"),
        )
    if kind == "error":
        return ErrorEvent(**data)
    if kind == "embeddings":
        return Embeddings(**data)
    raise ValueError(f"unknown stream event type {kind!r}")


def error_body(message: str, *, type: str, code: str, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error envelope, with a string code."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
