"""Authentication on every route: which requests an API with keys refuses
(401 in the OpenAI envelope, before any work), how a key may be sent, and
what needs an admin key."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import httpx
import pytest
import redis
from starlette.routing import Route

from api.accounts.store import announce, revoke_key
from api.main import create_app
from schemas.db import make_engine
from schemas.settings import Settings
from tests.support.accounts import accounts, as_key, http_as, new_key
from tests.support.deploy import MODEL
from tests.support.fleet import Fleet

__all__ = ["accounts"]

# What answers without a key: health checks and the API's own description.
OPEN = {"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
# llama-server's routes (some hidden from the OpenAPI document) that the
# enumeration must find; a sign it still sees the whole app.
LLAMA_SERVER = {
    ("POST", "/completion"),
    ("POST", "/completions"),
    ("POST", "/infill"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/props"),
    ("POST", "/props"),
    ("POST", "/apply-template"),
    ("POST", "/embedding"),
}
CHAT = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


def _concrete(path: str) -> str:
    # Any value will do for a path parameter: the key is refused first.
    return re.sub(r"\{[^}]+\}", "x1", path)


def all_routes(fleet: Fleet) -> set[tuple[str, str]]:
    """(method, path) of every route: those the live API's OpenAPI document
    lists, and every route of the app itself (aliases hidden from the
    document included), so a new route is covered without naming it here."""
    document = httpx.get(fleet.url + "/openapi.json", timeout=30)
    assert document.status_code == 200
    routes = {
        (method.upper(), path)
        for path, operations in document.json()["paths"].items()
        for method in operations
        if method in {"get", "post", "put", "patch", "delete"}
    }
    routes |= _app_routes(create_app(Settings()).routes, "")
    return {(m, p) for m, p in routes if p not in OPEN}


def _app_routes(found: Iterable[object], prefix: str) -> set[tuple[str, str]]:
    """(method, path) of routes, into included routers (which this FastAPI
    keeps nested, each with its own prefix)."""
    out: set[tuple[str, str]] = set()
    for route in found:
        if isinstance(route, Route) and route.methods:
            out |= {(m, prefix + route.path) for m in route.methods if m != "HEAD"}
            continue
        included = getattr(route, "original_router", None)
        if included is not None:
            context = getattr(route, "include_context", None)
            more = getattr(context, "prefix", "") or ""
            out |= _app_routes(included.routes, prefix + more)
    return out


def _request(
    client: httpx.Client, method: str, path: str, headers: dict[str, str]
) -> httpx.Response:
    body: Any = {} if method in {"POST", "PUT", "PATCH"} else None
    return client.request(method, _concrete(path), headers=headers, json=body)


def _key_id(token: str) -> str:
    return token.removeprefix("sk-inferq-").split("_")[0]


def _revoke(fleet: Fleet, token: str) -> None:
    """Revoke the key as `inferq keys revoke` does: in the database, then
    announced to the API processes."""
    engine = make_engine(fleet.database_url)
    client = redis.Redis.from_url(fleet.env["REDIS_URL"])
    try:
        assert revoke_key(engine, key_id=_key_id(token)) is not None
        announce(client)
    finally:
        engine.dispose()
        client.close()


def _expect_401(response: httpx.Response, secret: str | None = None) -> None:
    assert response.status_code == 401, (response.request.url, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_api_key"
    assert error["type"] == "authentication_error"
    if secret:
        assert secret not in response.text


def test_every_route_refuses_bad_keys(accounts: Fleet) -> None:
    good = new_key(accounts, "good")
    revoked = new_key(accounts, "revoked")
    expiring = new_key(accounts, "expiring", expires_in=timedelta(seconds=2))
    made = time.monotonic()
    with http_as(accounts, expiring) as client:
        assert client.get("/v1/models").status_code == 200
    _revoke(accounts, revoked)
    time.sleep(max(0.0, made + 2.5 - time.monotonic()))

    routes = all_routes(accounts)
    assert routes >= LLAMA_SERVER, LLAMA_SERVER - routes
    assert {("GET", "/v1/files/{file_id}/content"), ("POST", "/v1/batches")} <= routes
    refused: dict[str, dict[str, str]] = {
        "missing": {},
        "bearer without key": {"Authorization": "Bearer"},
        "not bearer": {"Authorization": "Basic dXNlcjpwYXNz"},
        "malformed": {"Authorization": "Bearer sk-inferq-short"},
        "malformed x-api-key": {"x-api-key": "not a key at all"},
        "unknown": {"Authorization": "Bearer sk-inferq-aaaaaaaaaaaa_" + "b" * 43},
        "wrong secret": as_key(f"sk-inferq-{_key_id(good)}_{'c' * 43}"),
        "model name": as_key(MODEL),
        "revoked": as_key(revoked),
        "expired": {"x-api-key": expiring},
    }
    with httpx.Client(base_url=accounts.url, timeout=30) as client:
        for method, path in sorted(routes):
            for why, headers in refused.items():
                response = _request(client, method, path, headers)
                assert response.status_code == 401, (why, method, path, response.text)
                presented = next(iter(headers.values()), "").removeprefix("Bearer ").strip()
                # A key-sized secret never comes back (short ones are words).
                _expect_401(response, secret=presented if len(presented) > 16 else None)
        # What stays open answers without a key.
        assert client.get("/health").status_code == 200
        assert client.get("/openapi.json").status_code == 200
        # The refusals are the key's doing: a good one gets past
        # authentication (whatever the route then says of the made-up id).
        for method, path in sorted(r for r in routes if r[0] == "GET"):
            assert _request(client, method, path, as_key(good)).status_code != 401, (method, path)


def test_x_api_key_is_the_same_key_as_bearer(accounts: Fleet) -> None:
    token = new_key(accounts, "x-api-key")
    with httpx.Client(base_url=accounts.url, timeout=60) as client:
        chat = client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": token})
        assert chat.status_code == 200, chat.text
        uploaded = client.post(
            "/v1/files",
            files={"file": ("a.jsonl", b'{"x": 1}\n')},
            data={"purpose": "batch"},
            headers={"x-api-key": token},
        )
        assert uploaded.status_code == 200, uploaded.text
        file_id = uploaded.json()["id"]
        # The same owner whichever header carried the key.
        listed = client.get("/v1/files", headers=as_key(token)).json()["data"]
        assert file_id in [f["id"] for f in listed]
        assert client.get(f"/v1/files/{file_id}", headers=as_key(token)).status_code == 200
        other = new_key(accounts, "someone else")
        assert client.get(f"/v1/files/{file_id}", headers={"x-api-key": other}).status_code == 404


def test_revoked_key_is_refused_on_the_very_next_request(accounts: Fleet) -> None:
    token = new_key(accounts, "to revoke")
    with http_as(accounts, token) as http:
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert http.get("/v1/files").status_code == 200
        _revoke(accounts, token)
        refused = http.get("/v1/files")
        _expect_401(refused, secret=token)
        assert "revoked" in refused.json()["error"]["message"]
        _expect_401(http.post("/v1/chat/completions", json=CHAT), secret=token)


def test_a_model_name_is_not_a_key_once_auth_is_on(accounts: Fleet) -> None:
    new_key(accounts, "turns auth on")
    response = httpx.post(
        accounts.url + "/v1/chat/completions",
        json={k: v for k, v in CHAT.items() if k != "model"},
        headers=as_key(MODEL),
        timeout=30,
    )
    _expect_401(response)


@pytest.mark.parametrize("admin", [False, True])
def test_setting_props_needs_an_admin_key(accounts: Fleet, admin: bool) -> None:
    token = new_key(accounts, "props", admin=admin)
    with http_as(accounts, token) as http:
        # Reading is for every key.
        assert http.get("/props").status_code == 200
        response = http.post("/props", json={"temperature": 0.5})
    assert response.status_code == 403
    error = response.json()["error"]
    if admin:
        # Past the admin check: refused only because this API was started
        # without INFERQ_PROPS_WRITABLE.
        assert error["code"] == "props_read_only"
    else:
        assert error["code"] == "permission_denied"
