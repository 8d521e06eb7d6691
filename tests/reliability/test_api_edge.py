"""The HTTP edge: body size limit (413, also chunked), cross-site form posts
(415), CORS (closed by default, explicit when set), OPTIONS preflights, and
llama-server's routes without the /v1 prefix. A second `inferq api` with
its own settings shares the session stack's Redis, database and worker."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.support.procs import free_port, inferq, stop, wait_status
from tests.support.stack import MODEL, Stack

pytestmark = pytest.mark.timeout(120)

ALLOWED = "https://ok.example"
EVIL = "https://evil.example"
LIMIT = 64 * 1024
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def edge_url(stack: Stack) -> Iterator[str]:
    port = free_port()
    env = {
        **stack.env,
        "INFERQ_PORT": str(port),
        "INFERQ_BATCH_SCHEDULER": "false",
        "INFERQ_CORS_ORIGINS": ALLOWED,
        "INFERQ_MAX_BODY_BYTES": str(LIMIT),
        # A model without a worker, so answers show the setting was used.
        "INFERQ_DEFAULT_MODEL": "other",
    }
    api = inferq(["api"], env, stack.log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_status(url + "/health", 200, 30, stack.log)
        yield url
    finally:
        stop(api)


def _envelope(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text[:300]
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code and isinstance(error["message"], str)
    return error


def _served(url: str) -> None:
    response = httpx.post(url + "/v1/chat/completions", json=BODY, timeout=30)
    assert response.status_code == 200, response.text


def test_body_over_the_limit_is_a_413(edge_url: str) -> None:
    big = b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"x" * LIMIT + b'"}]}'
    started = time.monotonic()
    declared = httpx.post(
        edge_url + "/v1/chat/completions",
        content=big,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    _envelope(declared, 413, "request_too_large")

    def chunks() -> Iterator[bytes]:
        # No Content-Length: chunked transfer, caught while it is read.
        for start in range(0, len(big), 4096):
            yield big[start : start + 4096]

    chunked = httpx.post(
        edge_url + "/v1/chat/completions",
        content=chunks(),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    _envelope(chunked, 413, "request_too_large")
    assert time.monotonic() - started < 10
    _served(edge_url)


def test_cross_site_form_post_is_a_415(edge_url: str, stack: Stack) -> None:
    raw = httpx.Request("POST", "/", json=BODY).content
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for url in (edge_url, stack.url):
        path = url + "/v1/chat/completions"
        # A page on another site can send a form or text body without a
        # preflight: refused.
        refused = httpx.post(path, content=raw, headers={**form, "Origin": EVIL}, timeout=30)
        _envelope(refused, 415, "unsupported_media_type")
        text = httpx.post(
            path, content=raw, headers={"Content-Type": "text/plain", "Origin": EVIL}, timeout=30
        )
        _envelope(text, 415, "unsupported_media_type")
        # curl -d (form type, no Origin) keeps working.
        curl = httpx.post(path, content=raw, headers=form, timeout=30)
        assert curl.status_code == 200, curl.text
    # An origin CORS allows may post what it likes.
    allowed = httpx.post(
        edge_url + "/v1/chat/completions",
        content=raw,
        headers={**form, "Origin": ALLOWED},
        timeout=30,
    )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ALLOWED


def _preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(
        url + "/v1/chat/completions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
        timeout=10,
    )


def test_cors_is_closed_by_default_and_explicit_when_set(edge_url: str, stack: Stack) -> None:
    closed = _preflight(stack.url, ALLOWED)
    assert closed.status_code == 204
    assert "access-control-allow-origin" not in closed.headers
    answer = httpx.get(stack.url + "/v1/models", headers={"Origin": ALLOWED}, timeout=10)
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers

    opened = _preflight(edge_url, ALLOWED)
    assert opened.status_code == 200
    assert opened.headers["access-control-allow-origin"] == ALLOWED
    other = _preflight(edge_url, EVIL)
    assert other.status_code == 204 and "access-control-allow-origin" not in other.headers
    plain = httpx.options(stack.url + "/v1/models", timeout=10)
    assert plain.status_code == 204 and "POST" in plain.headers["allow"]


def test_llama_server_routes_without_v1(stack: Stack) -> None:
    chat = httpx.post(stack.url + "/chat/completions", json=BODY, timeout=30)
    assert chat.status_code == 200 and chat.json()["object"] == "chat.completion"
    listed = httpx.get(stack.url + "/models", timeout=10)
    assert listed.status_code == 200 and MODEL in {m["id"] for m in listed.json()["data"]}
    one = httpx.get(stack.url + f"/models/{MODEL}", timeout=10)
    assert one.status_code == 200 and one.json()["id"] == MODEL
    # /completions stays llama-server's own completion endpoint.
    native = httpx.post(stack.url + "/completions", json={"prompt": "x", "n_predict": 2})
    assert native.status_code == 200 and "content" in native.json()


def test_unknown_model_among_several_is_a_404(stack: Stack) -> None:
    """The session stack has two text-generation models (`tiny`, `other`):
    a name that is neither stays a 404."""
    with pytest.raises(openai.NotFoundError) as caught:
        stack.client().chat.completions.create(
            model="gpt-3.5-turbo", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert caught.value.status_code == 404
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "model_not_found"


def test_default_model_setting(edge_url: str, stack: Stack) -> None:
    """Model-less llama-server routes: the first generation model with a live
    worker, unless INFERQ_DEFAULT_MODEL names another."""
    assert httpx.get(stack.url + "/props", timeout=10).json()["model_alias"] == MODEL
    props = httpx.get(edge_url + "/props", timeout=10)
    error = _envelope(props, 503, "no_worker_ready")
    assert "'other'" in error["message"]
    # A model named in the request still wins.
    named = httpx.get(edge_url + "/props", params={"model": MODEL}, timeout=10)
    assert named.status_code == 200 and named.json()["model_alias"] == MODEL
