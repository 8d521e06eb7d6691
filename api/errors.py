"""One error envelope everywhere: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.events import ErrorEvent
from schemas.openai import error_body

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
    ) -> None:
        super().__init__(message)
        default_type, default_code = _STATUS_TYPES.get(status, ("server_error", "internal_error"))
        self.status = status
        self.message = message
        self.code = code or default_code
        self.type = type or default_type
        self.param = param

    def response(self) -> JSONResponse:
        return JSONResponse(
            error_body(self.message, type=self.type, code=self.code, param=self.param),
            status_code=self.status,
        )


def from_event(event: ErrorEvent) -> APIError:
    """A worker's error event as the HTTP error to answer with."""
    return APIError(
        event.status, event.message, code=event.code, type=event.error_type, param=event.param
    )


def describe_validation(errors: list[Any]) -> tuple[str, str | None]:
    parts = []
    param = None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        if param is None and where:
            param = where
        msg = err.get("msg", "invalid value")
        if err.get("type") == "json_invalid":
            msg = "the request body is not valid JSON"
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid request", param


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
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return APIError(500, "internal server error").response()
