"""What every request meets before routing: CORS preflights, the refusal of
cross-site form posts, the JSON content type curl forgets, and the body size
limit."""

from __future__ import annotations

from collections.abc import Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import APIError, APIHTTPError

_JSON = b"application/json"
_NO_BODY = ("GET", "HEAD", "OPTIONS")
ALLOWED_METHODS = "GET, POST, DELETE, OPTIONS"


def parse_origins(value: str) -> list[str]:
    """INFERQ_CORS_ORIGINS: comma-separated origins, `*` for any, empty: none."""
    return [o.strip().rstrip("/") for o in value.split(",") if o.strip()]


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((v for k, v in scope["headers"] if k == name), None)


def _origin_allowed(origin: bytes, allowed: Collection[str]) -> bool:
    return "*" in allowed or origin.decode("latin-1").rstrip("/") in allowed


class AssumeJSONBody:
    """Treat a POST body as JSON unless it says it is multipart.

    `curl -d '{...}'` labels its body application/x-www-form-urlencoded, and
    many scripts send no content type at all; llama.cpp's server and OpenAI
    read such bodies as JSON, so inferq does too. Multipart (file uploads)
    keeps its own type.

    Only for the curl case: a browser sends form, text and multipart bodies
    cross-site without a CORS preflight, so any web page a user visits could
    drive the API with them. A request that carries an `Origin` (browsers
    always send one cross-site) from an origin CORS does not allow must be
    JSON, which browsers only send after a preflight: anything else is a 415."""

    def __init__(self, app: ASGIApp, allowed_origins: Collection[str] = ()) -> None:
        self.app = app
        self.allowed_origins = frozenset(allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in _NO_BODY:
            current = _header(scope, b"content-type") or b""
            is_json = current.lower().startswith(_JSON)
            origin = _header(scope, b"origin")
            if (
                origin is not None
                and not is_json
                and not _origin_allowed(origin, self.allowed_origins)
            ):
                error = APIError(
                    415,
                    "a request from a web page (with an Origin header) must send "
                    "Content-Type: application/json",
                    code="unsupported_media_type",
                )
                await error.response()(scope, receive, send)
                return
            if scope["method"] == "POST" and not is_json and not current.startswith(b"multipart/"):
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", _JSON)]}
        await self.app(scope, receive, send)


class AnswerPreflight:
    """OPTIONS without a 405. A CORS preflight from an origin that is not
    allowed gets a 204 without any Access-Control-Allow-* header, so the
    browser blocks the real request; an allowed one goes on to Starlette's
    CORSMiddleware. A plain OPTIONS gets the methods inferq answers."""

    def __init__(self, app: ASGIApp, allowed_origins: Collection[str] = ()) -> None:
        self.app = app
        self.allowed_origins = frozenset(allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "OPTIONS":
            await self.app(scope, receive, send)
            return
        origin = _header(scope, b"origin")
        preflight = _header(scope, b"access-control-request-method") is not None
        if preflight and origin is not None and _origin_allowed(origin, self.allowed_origins):
            await self.app(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 204,
                "headers": [(b"allow", ALLOWED_METHODS.encode()), (b"vary", b"Origin")],
            }
        )
        await send({"type": "http.response.body", "body": b""})


def too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is larger than the {limit}-byte limit (INFERQ_MAX_BODY_BYTES)",
        code="request_too_large",
    )


class LimitBody:
    """Refuse request bodies over `limit` bytes with a 413: at once when the
    Content-Length says so, else while the body is read (chunked uploads),
    before it is ever whole in memory. Paths in `exempt` have limits of their
    own (file uploads: INFERQ_MAX_FILE_BYTES)."""

    def __init__(self, app: ASGIApp, limit: int, exempt: Collection[str] = ()) -> None:
        self.app = app
        self.limit = limit
        self.exempt = frozenset(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] in _NO_BODY
            or scope["path"].rstrip("/") in self.exempt
        ):
            await self.app(scope, receive, send)
            return
        declared = (_header(scope, b"content-length") or b"").strip()
        if declared.isdigit() and int(declared) > self.limit:
            await too_large(self.limit).response()(scope, receive, send)
            return
        total = 0

        async def limited() -> Message:
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.limit:
                    # An HTTP exception: FastAPI re-raises those from its body
                    # reading (anything else becomes a bare 400), and the
                    # handler answers it in the envelope.
                    raise APIHTTPError(too_large(self.limit))
            return message

        await self.app(scope, limited, send)
