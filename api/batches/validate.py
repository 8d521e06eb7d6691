"""Reads a batch's input file into lines.

Two kinds of problems. A file that is not a batch (a line that is not JSON,
lacks a `custom_id`, names another endpoint, repeats a `custom_id`, or too many
lines) fails the whole batch, with `errors` naming each line and why, as
OpenAI does. A well-formed line whose request is bad (a parameter out of
range, an unknown model) fails alone: it gets the 400/404 the same request
would get on its own, in the error file, and its neighbours run.

Nothing a line holds may raise out of `parse`: not JSON that is nested too
deeply, not invalid UTF-8, not an exception the request models or job
builders did not foresee (that line fails with a 400 naming the exception),
not a value the database cannot store (NUL in text, unpaired surrogates,
Infinity and NaN in json: a 400 for that line)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from api.catalog import pick_model, require_feature
from api.embeddings.protocol import EmbeddingRequest, RerankRequest
from api.embeddings.requests import embedding_job, rerank_job
from api.errors import APIError, describe_validation
from api.openai.protocol import ChatCompletionRequest, CompletionRequest
from api.openai.requests import chat_job, completion_job
from schemas import batches as b
from schemas.accounts import JobAccount
from schemas.batch_lines import Line
from schemas.bounds import text_problem
from schemas.events import error_body
from schemas.jobs import EmbedJob, GenerateJob
from schemas.registry import Registry

log = logging.getLogger("inferq.batches")

# Errors listed per failed batch; past this, one more says how many were left out.
MAX_REPORTED_ERRORS = 100


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

    def __init__(
        self,
        endpoint: str,
        registry: Registry,
        live_models: set[str],
        owner: str | None = None,
        models: Collection[str] | None = None,
    ) -> None:
        self.kind = b.ENDPOINTS[endpoint]
        self.registry = registry
        self.names = set(registry.models) | live_models
        # The key the batch belongs to: every line's job is charged to it,
        # so its usage rows carry that key.
        self.account = JobAccount(key_id=owner) if owner else None
        # The models that key may use (None: all); a line naming another
        # fails as if the model did not exist, as the HTTP routes answer.
        self.allowed = set(models) if models is not None else None

    def _payload(self, job: GenerateJob | EmbedJob) -> dict[str, Any]:
        job.account = self.account
        return job.model_dump(mode="json")

    def _model(self, name: object) -> str:
        if name is not None and not isinstance(name, str):
            raise APIError(400, "model must be a string", param="model")
        model = pick_model(name, self.names)
        if self.allowed is not None and model not in self.allowed:
            raise APIError(
                404, f"The model '{model}' does not exist", code="model_not_found", param="model"
            )
        return model

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
            return model, b.line_job("generate", self._payload(chat_job(chat, model)), {})
        if self.kind == "completions":
            self._require(model, "text generation")
            completion = self._validate(CompletionRequest, body)
            payload = self._payload(completion_job(completion, model))
            return model, b.line_job("generate", payload, {})
        if self.kind == "embeddings":
            self._require(model, "embeddings")
            embed = self._validate(EmbeddingRequest, body)
            job = embedding_job(embed, model, self.registry.models.get(model))
            options = {"encoding_format": embed.encoding_format, "dimensions": embed.dimensions}
            payload = self._payload(job)
            return model, b.line_job("embed", payload, options)
        self._require(model, "rerank")
        rerank = self._validate(RerankRequest, body)
        options = {
            "top_n": rerank.top_n,
            "return_documents": rerank.return_documents,
            "texts": rerank.texts(),
        }
        payload = self._payload(rerank_job(rerank, model))
        return model, b.line_job("embed", payload, options)


# How often (in lines) a long validation calls its keepalive: the scheduler
# renews its leader lock there, and learns early when it lost it.
KEEPALIVE_LINES = 500


def json_problem(value: object) -> str | None:
    """Why `value` cannot be stored in a JSON column and read back as it was
    written, or None. Postgres refuses Infinity and NaN in json; an unpaired
    surrogate is stored but comes back as text no tokenizer can encode."""
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        return "holds an unpaired surrogate (such as \\ud800), which is not valid Unicode"
    except ValueError:
        return "holds a number that is not finite (Infinity or NaN, or one beyond a double)"
    except RecursionError:
        return "is nested too deeply"
    return None


def safe_text(value: str, limit: int = 2000) -> str:
    """`value` made storable (for messages of our own that may quote input)."""
    cleaned = value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    return cleaned[:limit]


def _json_line(raw: bytes) -> tuple[Any, str | None]:
    """(the parsed line, None) or (None, why it is not JSON)."""
    try:
        return json.loads(raw), None
    except RecursionError:
        return None, "this line is nested too deeply to be read"
    except UnicodeDecodeError:
        return None, "this line is not valid UTF-8"
    except ValueError as exc:
        # Includes integers beyond Python's 4300-digit conversion limit.
        return None, safe_text(f"this line is not valid JSON: {exc}", 300)


def _rejected(
    index: int, custom_id: str, request_id: str, body: dict[str, Any], exc: APIError
) -> Line:
    named = body.get("model")
    model = named.replace("\x00", "")[:255] if isinstance(named, str) else ""
    if text_problem(model):
        model = ""
    exc.message = safe_text(exc.message)
    return Line(index, custom_id, request_id, model, None, _line_error(exc))


def read_request(reader: LineReader, index: int, custom_id: str, body: dict[str, Any]) -> Line:
    """One well-formed line's request as a Line: its job, or the 4xx it gets.
    Whatever goes wrong while building the job (a bug included) fails this
    line alone; nothing raised here may stop the batch or the scheduler."""
    request_id = f"batch_req_{uuid.uuid4().hex}"
    try:
        model, job = reader.job(body)
        problem = json_problem(job) or text_problem(model)
        if problem:
            raise APIError(400, f"the request {problem}", param="body")
        return Line(index, custom_id, request_id, model, job)
    except APIError as exc:
        return _rejected(index, custom_id, request_id, body, exc)
    except RecursionError:
        error = APIError(400, "the request is nested too deeply", param="body")
        return _rejected(index, custom_id, request_id, body, error)
    except Exception as exc:
        # Not foreseen by the request models (the same body sent to the
        # endpoint directly may fare no better): the line fails with a 400
        # that says what broke, and the cause is logged.
        log.warning(
            "batch line %d (%s): request could not be read", index, custom_id, exc_info=True
        )
        message = f"the request could not be read: {type(exc).__name__}: {exc}"
        return _rejected(index, custom_id, request_id, body, APIError(400, message, param="body"))


def _structure(
    item: Any, number: int, endpoint: str, seen: set[str], parsed: Parsed
) -> tuple[str, dict[str, Any]] | None:
    """(custom_id, body) of a line that is a batch line; else its error is
    recorded and None returned."""
    if not isinstance(item, dict):
        parsed.error(number, "invalid_request", "a line must be a JSON object")
        return None
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        parsed.error(number, "missing_custom_id", "custom_id must be a non-empty string")
        return None
    if len(custom_id) > 512 or text_problem(custom_id):
        parsed.error(
            number,
            "invalid_custom_id",
            "custom_id may hold at most 512 characters, no NUL and only valid Unicode",
            "custom_id",
        )
        return None
    if custom_id in seen:
        parsed.error(
            number, "duplicate_custom_id", f"custom_id {custom_id!r} appears twice", "custom_id"
        )
        return None
    seen.add(custom_id)
    if item.get("method") != "POST":
        parsed.error(number, "invalid_method", "method must be POST", "method")
        return None
    if item.get("url") != endpoint:
        got = safe_text(repr(item.get("url")), 200)
        parsed.error(
            number,
            "mismatched_url",
            f"url must be the batch's endpoint, {endpoint} (got {got})",
            "url",
        )
        return None
    body = item.get("body")
    if not isinstance(body, dict):
        parsed.error(number, "invalid_body", "body must be a JSON object", "body")
        return None
    return custom_id, body


def parse(
    raw_lines: Iterable[bytes],
    endpoint: str,
    reader: LineReader,
    keepalive: Callable[[], None] | None = None,
) -> Parsed:
    """Every line of a batch file. Never raises for anything a line holds:
    a line that is not a batch line is an error of the file, naming it; a
    batch line whose request is bad fails alone. `keepalive` is called every
    KEEPALIVE_LINES lines (and may raise to abandon the validation)."""
    parsed = Parsed()
    seen: set[str] = set()
    index = 0
    for number, raw in enumerate(raw_lines, start=1):
        if keepalive is not None and number % KEEPALIVE_LINES == 0:
            keepalive()
        if not raw.strip():
            continue
        if index >= b.MAX_LINES:
            parsed.error(number, "too_many_requests", f"a batch holds at most {b.MAX_LINES} lines")
            break
        item, why = _json_line(raw)
        if why is not None:
            parsed.error(number, "invalid_json_line", why)
            continue
        try:
            found = _structure(item, number, endpoint, seen, parsed)
            if found is None:
                continue
            line = read_request(reader, index, *found)
        except Exception:
            # Last resort: nothing a line holds may escape validation.
            log.warning("batch file line %d could not be read", number, exc_info=True)
            parsed.error(number, "invalid_request", "this line could not be read as a batch line")
            continue
        parsed.lines.append(line)
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
