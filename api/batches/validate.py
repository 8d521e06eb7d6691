"""Reads a batch's input file into lines.

Two kinds of problems. A file that is not a batch (a line that is not JSON,
lacks a `custom_id`, names another endpoint, repeats a `custom_id`, or too many
lines) fails the whole batch, with `errors` naming each line and why, as
OpenAI does. A well-formed line whose request is bad (a parameter out of
range, an unknown model) fails alone: it gets the 400/404 the same request
would get on its own, in the error file, and its neighbours run."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from api.catalog import pick_model, require_feature
from api.errors import APIError, describe_validation
from api.serving.requests import chat_job, completion_job, embedding_job, rerank_job
from schemas import batches as b
from schemas.embeddings import EmbeddingRequest, RerankRequest
from schemas.openai import ChatCompletionRequest, CompletionRequest, error_body
from schemas.registry import Registry

# Errors listed per failed batch; past this, one more says how many were left out.
MAX_REPORTED_ERRORS = 100


@dataclass
class Line:
    line: int
    custom_id: str
    request_id: str
    model: str
    job: dict[str, Any] | None
    result: dict[str, Any] | None = None

    @property
    def state(self) -> str:
        return b.PENDING if self.job is not None else b.FAILED


@dataclass
class Parsed:
    lines: list[Line] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def error(self, line: int | None, code: str, message: str, param: str | None = None) -> None:
        self.errors.append({"code": code, "message": message, "param": param, "line": line})


def split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """JSONL lines from file chunks, a line possibly spanning chunks."""
    rest = b""
    for chunk in chunks:
        rest += chunk
        *whole, rest = rest.split(b"\n")
        yield from whole
    if rest:
        yield rest


def _line_error(exc: APIError) -> dict[str, Any]:
    body = error_body(exc.message, type=exc.type, code=exc.code, param=exc.param)
    return b.http_result(exc.status, body)


class LineReader:
    """Turns one request body into the job it runs, as the endpoint would."""

    def __init__(self, endpoint: str, registry: Registry, live_models: set[str]) -> None:
        self.kind = b.ENDPOINTS[endpoint]
        self.registry = registry
        self.names = set(registry.models) | live_models

    def _model(self, name: object) -> str:
        if name is not None and not isinstance(name, str):
            raise APIError(400, "model must be a string", param="model")
        return pick_model(name, self.names)

    def _require(self, model: str, feature: str) -> None:
        require_feature(self.registry.models.get(model), model, feature)

    def _validate(self, model_type: type[BaseModel], body: dict[str, Any]) -> Any:
        try:
            return model_type.model_validate(body)
        except ValidationError as exc:
            message, param = describe_validation(list(exc.errors()))
            raise APIError(400, message, param=param) from None

    def job(self, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """(model, batch_lines.job); APIError when the request is invalid."""
        if body.get("stream"):
            raise APIError(400, "a batch line cannot be streamed", param="stream")
        model = self._model(body.get("model"))
        if self.kind == "chat":
            self._require(model, "text generation")
            chat = self._validate(ChatCompletionRequest, body)
            return model, b.line_job("generate", chat_job(chat, model).model_dump(mode="json"), {})
        if self.kind == "completions":
            self._require(model, "text generation")
            completion = self._validate(CompletionRequest, body)
            payload = completion_job(completion, model).model_dump(mode="json")
            return model, b.line_job("generate", payload, {})
        if self.kind == "embeddings":
            self._require(model, "embeddings")
            embed = self._validate(EmbeddingRequest, body)
            job = embedding_job(embed, model, self.registry.models.get(model))
            options = {"encoding_format": embed.encoding_format, "dimensions": embed.dimensions}
            payload = job.model_dump(mode="json")
            return model, b.line_job("embed", payload, options)
        self._require(model, "rerank")
        rerank = self._validate(RerankRequest, body)
        options = {
            "top_n": rerank.top_n,
            "return_documents": rerank.return_documents,
            "texts": rerank.texts(),
        }
        payload = rerank_job(rerank, model).model_dump(mode="json")
        return model, b.line_job("embed", payload, options)


def parse(raw_lines: Iterable[bytes], endpoint: str, reader: LineReader) -> Parsed:
    parsed = Parsed()
    seen: set[str] = set()
    index = 0
    for number, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        if index >= b.MAX_LINES:
            parsed.error(number, "too_many_requests", f"a batch holds at most {b.MAX_LINES} lines")
            break
        try:
            item = json.loads(raw)
        except ValueError:
            parsed.error(number, "invalid_json_line", "this line is not valid JSON")
            continue
        if not isinstance(item, dict):
            parsed.error(number, "invalid_request", "a line must be a JSON object")
            continue
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            parsed.error(number, "missing_custom_id", "custom_id must be a non-empty string")
            continue
        if "\x00" in custom_id or len(custom_id) > 512:
            parsed.error(
                number,
                "invalid_custom_id",
                "custom_id may hold at most 512 characters and no NUL",
                "custom_id",
            )
            continue
        if custom_id in seen:
            parsed.error(
                number, "duplicate_custom_id", f"custom_id {custom_id!r} appears twice", "custom_id"
            )
            continue
        seen.add(custom_id)
        if item.get("method") != "POST":
            parsed.error(number, "invalid_method", "method must be POST", "method")
            continue
        if item.get("url") != endpoint:
            parsed.error(
                number,
                "mismatched_url",
                f"url must be the batch's endpoint, {endpoint} (got {item.get('url')!r})",
                "url",
            )
            continue
        body = item.get("body")
        if not isinstance(body, dict):
            parsed.error(number, "invalid_body", "body must be a JSON object", "body")
            continue
        request_id = f"batch_req_{uuid.uuid4().hex}"
        try:
            model, job = reader.job(body)
            parsed.lines.append(Line(index, custom_id, request_id, model, job))
        except APIError as exc:
            named = body.get("model")
            model = named.replace("\x00", "")[:255] if isinstance(named, str) else ""
            parsed.lines.append(Line(index, custom_id, request_id, model, None, _line_error(exc)))
        index += 1
    if not parsed.lines and not parsed.errors:
        parsed.error(None, "empty_file", "the input file holds no requests")
    return parsed


def reported(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The Batch object's `errors`."""
    data = errors[:MAX_REPORTED_ERRORS]
    if len(errors) > MAX_REPORTED_ERRORS:
        data.append(
            {
                "code": "more_errors",
                "message": f"{len(errors) - MAX_REPORTED_ERRORS} more errors not listed",
                "param": None,
                "line": None,
            }
        )
    return {"object": "list", "data": data}
