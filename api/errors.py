"""One error envelope everywhere: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.events import ErrorEvent, error_body

log = logging.getLogger(__name__)

_STATUS_TYPES = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    422: ("invalid_request_error", "invalid_request_error"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    503: ("unavailable_error", "service_unavailable"),
    504: ("timeout_error", "timeout"),
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        type: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        default_type, default_code = _STATUS_TYPES.get(status, ("server_error", "internal_error"))
        self.status = status
        self.message = message
        self.code = code or default_code
        self.type = type or default_type
        self.param = param
        # Retry-After on a 503 that says "not now" (backpressure).
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(
            error_body(self.message, type=self.type, code=self.code, param=self.param),
            status_code=self.status,
            headers=self.headers,
        )


class APIHTTPError(StarletteHTTPException):
    """An APIError raised where FastAPI only lets HTTP exceptions through
    (while it reads the request body: anything else becomes a bare 400)."""

    def __init__(self, error: APIError) -> None:
        super().__init__(error.status, error.message)
        self.error = error


def from_event(event: ErrorEvent) -> APIError:
    """A worker's error event as the HTTP error to answer with. A 503 (its
    worker was lost, Redis dropped its events) may be retried at once."""
    return APIError(
        event.status,
        event.message,
        code=event.code,
        type=event.error_type,
        param=event.param,
        headers={"Retry-After": "1"} if event.status == 503 else None,
    )


# pydantic names the member of a union it tried in `loc` ("str",
# "list[int]", "function-after[...]"): not a parameter name.
_TYPE_PARTS = frozenset({"str", "int", "float", "bool", "list", "dict", "tuple", "none"})


def _is_type_part(part: str) -> bool:
    return part in _TYPE_PARTS or "[" in part or part.startswith("constrained-")


def describe_validation(errors: list[Any]) -> tuple[str, str | None]:
    parts = []
    param = None
    for err in errors:
        if err.get("type") == "json_invalid":
            # The position FastAPI reports is not a parameter.
            msg = "the request body is not valid JSON"
            detail = (err.get("ctx") or {}).get("error")
            parts.append(f"{msg} ({detail})" if detail else msg)
            continue
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(p for p in loc if not _is_type_part(p))
        if param is None and where:
            param = where
        msg = err.get("msg", "invalid value")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid request", param


@contextlib.contextmanager
def bad_request() -> Iterator[None]:
    """Job fields are checked again as the job is built: a value a request
    schema let through but the job refuses is still a 400, never a 500."""
    try:
        yield
    except ValidationError as exc:
        message, param = describe_validation(list(exc.errors()))
        raise APIError(400, message, param=param) from None


def db_unavailable(exc: BaseException) -> APIError:
    """Postgres refused or dropped the connection: a 503 to retry, not a 500."""
    log.warning("database unavailable: %s", getattr(exc, "orig", None) or exc)
    return APIError(
        503,
        "the database is unavailable; try again shortly",
        code="database_unavailable",
        headers={"Retry-After": "5"},
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI answers bad parameters with 400, not FastAPI's 422.
        message, param = describe_validation(list(exc.errors()))
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, APIHTTPError):
            return exc.error.response()
        headers = dict(exc.headers) if exc.headers else None
        return APIError(exc.status_code, str(exc.detail), headers=headers).response()

    # An outage is a 503 the client may retry, not a 500: Postgres (files,
    # batches) refused or dropped the connection. Redis: api/streaming/hub.py.
    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database_down(_: Request, exc: DBAPIError) -> JSONResponse:
        return db_unavailable(exc).response()

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return APIError(500, "internal server error").response()
