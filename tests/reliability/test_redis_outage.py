"""Redis stopped under a running API and worker, then started again (empty,
as a restarted Redis without persistence is): open streams end with an error
event, requests answer 503 in the envelope within seconds, /health says so,
and once Redis is back the same API and worker processes serve again."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.fleet import LONG_STREAM, MODEL, Fleet, fleet, long_chat_stream

# Seconds a request may take to fail while Redis is down (INFERQ_REDIS_TIMEOUT
# is 3 s; a refused connection fails faster).
FAIL_S = 5.0
# Celery's consumer reconnects with a backoff (2 s, then 4, 6, ...).
RECOVER_S = 45.0

pytestmark = pytest.mark.timeout(240)
log = logging.getLogger(__name__)


@pytest.fixture
def deploy(tmp_path: Path, tiny_gguf: Path, pg_server_url: str) -> Iterator[Fleet]:
    with fleet(tmp_path, tiny_gguf, pg_server_url) as stack:
        stack.start_api()
        stack.start_worker("a")
        yield stack


def _envelope(response: httpx.Response) -> dict[str, object]:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["code"], str)
    return dict(error)


def _skip_to_content(lines: Iterator[str]) -> None:
    """Read the stream until its first content: generation is under way."""
    for line in lines:
        if '"content"' in line:
            break


def test_redis_outage_then_recovery(deploy: Fleet) -> None:
    # A stream open when Redis goes: it ends with an error event and [DONE].
    with long_chat_stream(deploy.url) as (response, lines):
        assert response.status_code == 200
        _skip_to_content(lines)
        deploy.stop_redis()
        gone = time.monotonic()
        rest = [line for line in lines if line.startswith("data: ")]
        ended = time.monotonic() - gone
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][6:])["error"]
    assert error["code"] == "redis_unavailable" and isinstance(error["message"], str)
    assert ended < FAIL_S, ended
    log.info("open stream ended %.2f s after Redis stopped", ended)

    # While Redis is down: 503 in the envelope, fast, streamed or not.
    for path, payload in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": "hi", "stream": True}),
    ):
        started = time.monotonic()
        response = httpx.post(deploy.url + path, json={"model": MODEL, **payload}, timeout=30)
        took = time.monotonic() - started
        log.info("%s with Redis down: %d in %.2f s", path, response.status_code, took)
        assert took < FAIL_S
        assert response.status_code == 503, response.text
        assert _envelope(response)["code"] == "redis_unavailable"
        assert response.headers["retry-after"].isdigit()
    health = httpx.get(deploy.url + "/health", timeout=30)
    assert health.status_code == 503
    assert _envelope(health)["code"] == "redis_unavailable"

    # Back, empty: the same processes serve again without a restart.
    time.sleep(2.0)
    deploy.start_redis()
    back = time.monotonic()
    while True:
        response = deploy.chat("are you back?", max_tokens=8, timeout=30)
        if response.status_code == 200:
            break
        assert response.status_code == 503, response.text
        assert time.monotonic() - back < RECOVER_S, deploy.log.read_text()[-3000:]
        time.sleep(0.5)
    assert response.json()["usage"]["completion_tokens"] == 8
    log.info("served again %.2f s after Redis came back", time.monotonic() - back)
    assert httpx.get(deploy.url + "/health", timeout=10).status_code == 200
    with httpx.stream(
        "POST",
        deploy.url + "/v1/chat/completions",
        json={**LONG_STREAM, "max_tokens": 8},
        timeout=30,
    ) as streamed:
        assert streamed.status_code == 200
        data = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]" and '"finish_reason":"length"' in data[-2]
    assert deploy.api is not None and deploy.api.poll() is None
    assert deploy.workers["a"].poll() is None


def test_pubsub_connection_cut_ends_open_streams(deploy: Fleet) -> None:
    """Redis stays up but drops the API's pub/sub connection (CLIENT KILL, what
    a proxy or a network blip does): redis-py reconnects on its own, and the
    events published meanwhile are gone, so the open stream must end with an
    error rather than go on with a hole in it (or wait for an end it missed)."""
    with long_chat_stream(deploy.url) as (response, lines):
        assert response.status_code == 200
        _skip_to_content(lines)
        killed = deploy.redis().client_kill_filter(_type="pubsub")
        assert killed >= 1
        cut = time.monotonic()
        rest = [line for line in lines if line.startswith("data: ")]
        ended = time.monotonic() - cut
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][6:])["error"]
    assert error["code"] == "redis_unavailable"
    assert not any('"finish_reason":"length"' in line for line in rest)
    assert ended < FAIL_S, ended
    log.info("stream ended %.2f s after its pub/sub connection was cut", ended)
    # Nothing else needed: the next request is served.
    response = deploy.chat("still there?", max_tokens=8)
    assert response.status_code == 200, response.text
