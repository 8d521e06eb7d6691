"""The route class of every inferq router: request bodies parsed as strict
JSON. Python's parser accepts NaN, Infinity and 1e400 (as infinity), which
no other JSON parser, Postgres or llama.cpp's grammar builder accepts; here
they are a 400 like any other malformed body."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from schemas.bounds import loads_strict


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            # A JSONDecodeError here is FastAPI's 400 `json_invalid`; a
            # RecursionError (hostile nesting) its generic 400.
            self._json = loads_strict(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict
