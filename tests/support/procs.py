"""Start inferq processes for end-to-end tests and wait on them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def inferq(
    args: list[str],
    env: dict[str, str],
    log: Path,
    *,
    cwd: Path | None = None,
    python: str | Path | None = None,
) -> subprocess.Popen[bytes]:
    """`inferq ARGS` as a process of its own, in this Python or `python` (the
    vLLM environment's, for a vLLM worker)."""
    handle = log.open("ab")
    return subprocess.Popen(
        [str(python or sys.executable), "-m", "inferq", *args],
        cwd=cwd,
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_status(url: str, status: int, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(url, timeout=2).status_code
            if last == status:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise AssertionError(f"{url} never answered {status} (last: {last})\n{tail}")


def base_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("INFERQ_") and k not in ("REDIS_URL", "DATABASE_URL")
    }
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_models_ready(base: str, models: Sequence[str], log: Path, timeout: float = 90) -> None:
    """Until /v1/models says every one of `models` is ready (its worker is up)."""
    deadline = time.monotonic() + timeout
    for model in models:
        while True:
            data = httpx.get(base + "/v1/models", timeout=5).json()["data"]
            if any(m["id"] == model and m["ready"] for m in data):
                break
            if time.monotonic() > deadline:
                raise AssertionError(log.read_text(errors="replace")[-3000:])
            time.sleep(0.2)


@dataclass
class Up:
    """A running `inferq up`."""

    process: subprocess.Popen[bytes]
    url: str
    cwd: Path
    log: Path
    env: dict[str, str]


@contextmanager
def inferq_up(root: Path, *, models: Sequence[str] = (), **settings: str) -> Iterator[Up]:
    """`inferq up` in `root` (its configs in root/models) on a free port, with
    `settings` in its environment: running, once /health answers and every one
    of `models` is ready; stopped as Ctrl-C would when the block ends."""
    port = free_port()
    env = base_env(INFERQ_PORT=str(port), **settings)
    log = root / "up.log"
    process = inferq(["up"], env, log, cwd=root)
    up = Up(process, f"http://127.0.0.1:{port}", root, log, env)
    try:
        wait_status(up.url + "/health", 200, 90, log)
        # Every model's worker is up, not just the first.
        wait_models_ready(up.url, models, log)
        yield up
    finally:
        stop(process, signal.SIGINT, timeout=40)
