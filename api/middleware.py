"""Request normalisation ahead of routing."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

_JSON = b"application/json"


class AssumeJSONBody:
    """Treat a POST body as JSON unless it says it is multipart.

    `curl -d '{...}'` labels its body application/x-www-form-urlencoded, and
    many scripts send no content type at all; llama.cpp's server and OpenAI
    read such bodies as JSON, so inferq does too. Multipart (file uploads)
    keeps its own type."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            current = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
            if not current.startswith(b"multipart/") and not current.startswith(_JSON):
                scope = {**scope, "headers": [*headers, (b"content-type", _JSON)]}
        await self.app(scope, receive, send)
