"""`inferq up`: the embedded all-in-one stack."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.deploy import poll_usage
from tests.support.procs import Up, base_env, inferq_up


@pytest.fixture
def workdir(tmp_path: Path, tiny_gguf: Path) -> Path:
    (tmp_path / "models").mkdir()
    # A bare GGUF registers under its file stem.
    (tmp_path / "models" / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    return tmp_path


@pytest.fixture
def up(workdir: Path) -> Iterator[Up]:
    with inferq_up(workdir) as up:
        yield up


def _chat(url: str, model: str = "any-name-at-all") -> dict[str, object]:
    response = httpx.post(
        url + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def test_up_serves_with_private_redis_and_sqlite_then_stops_cleanly(up: Up) -> None:
    children = psutil.Process(up.process.pid).children(recursive=True)
    names = " ".join(" ".join(c.cmdline()) for c in children)
    assert "redis-server" in names
    assert "inferq api" in names and "inferq worker --model tiny" in names

    # With one model, any model name routes to it.
    body = _chat(up.url)
    assert body["model"] == "tiny"
    db = up.cwd / "data" / "inferq.db"
    deadline = time.monotonic() + 10
    rows: list[tuple[object, ...]] = []
    while not rows and time.monotonic() < deadline:
        with sqlite3.connect(db) as conn:
            rows = conn.execute(
                "SELECT status, completion_tokens FROM usage WHERE request_id = ?", (body["id"],)
            ).fetchall()
        time.sleep(0.1)
    assert rows == [("completed", 5)]

    # A second `inferq up` in the same place says so instead of fighting.
    second = subprocess.run(
        [sys.executable, "-m", "inferq", "up"],
        cwd=up.cwd,
        env=up.env,
        capture_output=True,
        timeout=30,
    )
    assert second.returncode == 1
    assert b"already running" in second.stderr

    up.process.send_signal(signal.SIGINT)
    assert up.process.wait(40) == 0
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []
    with pytest.raises(httpx.HTTPError):
        httpx.get(up.url + "/health", timeout=2)


def test_busy_port_is_reported(workdir: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "inferq", "up"],
            cwd=workdir,
            env=base_env(INFERQ_PORT=str(port)),
            capture_output=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert f"port {port}".encode() in result.stderr


def test_up_uses_given_redis_and_postgres(workdir: Path, other_redis_url: str, pg_url: str) -> None:
    with inferq_up(workdir, REDIS_URL=other_redis_url, DATABASE_URL=pg_url) as up:
        children = psutil.Process(up.process.pid).children(recursive=True)
        assert not any("redis-server" in " ".join(c.cmdline()) for c in children)
        body = _chat(up.url, "tiny")
        rows = poll_usage(
            database_url=pg_url, where="request_id = :r", params={"r": body["id"]}, until=bool
        )
        assert len(rows) == 1
        assert not (workdir / "data" / "inferq.db").exists()


def test_a_vllm_model_starts_in_the_vllm_environment(tmp_path: Path) -> None:
    from inferq.embedded import worker_command
    from schemas.registry import ModelConfig, Parameters
    from schemas.settings import Settings

    llama = ModelConfig(name="g", parameters=Parameters(model="g.gguf"))
    vllm = ModelConfig(name="v", backend="vllm", parameters=Parameters(model="dir"))
    python = tmp_path / "python"
    python.write_text("")
    settings = Settings(vllm_python=python)
    assert worker_command(llama, settings) == [
        sys.executable,
        "-m",
        "inferq",
        "worker",
        "--model",
        "g",
    ]
    assert worker_command(vllm, settings) == [str(python), "-m", "inferq", "worker", "--model", "v"]
    # No vLLM environment: no worker for that model (inferq up says how to make one).
    assert worker_command(vllm, Settings(vllm_python=tmp_path / "missing")) is None
