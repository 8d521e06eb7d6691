"""The servers a benchmark starts: how to start one, wait for its /health,
and stop it with its children; `inferq up` in a directory of its own."""

from __future__ import annotations

import argparse
import logging
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
import psutil

log = logging.getLogger("bench.services")
REPO = Path(__file__).resolve().parent.parent
MODEL_NAME = "gemma-3-270m"
# Everything that would point `inferq up` at shared services or another tree.
INFERQ_ENV_DROP = (
    "REDIS_URL",
    "DATABASE_URL",
    "INFERQ_REDIS_URL",
    "INFERQ_DATABASE_URL",
    "INFERQ_MODELS_DIR",
    "INFERQ_DATA_DIR",
    "INFERQ_HOST",
    "INFERQ_PORT",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_health(url: str, proc: subprocess.Popen[bytes], timeout: float) -> float:
    """Poll GET url/health until it answers 200; return the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before /health")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health not 200 after {timeout:.0f} s")


def stop(proc: subprocess.Popen[bytes], sig: signal.Signals, timeout: float) -> None:
    """Signal the process and wait; past the timeout kill it and every
    descendant (inferq up starts its children in sessions of their own)."""
    if proc.poll() is not None:
        return
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
        return
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop in %.0f s after %s; killing it", proc.args, timeout, sig.name)
    for child in [psutil.Process(proc.pid), *tree]:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            continue
    proc.wait()


@dataclass(frozen=True)
class Service:
    """A server under test: how to start it and how to stop it."""

    cmd: list[str]
    port: int
    log_path: Path
    health_timeout: float
    stop_signal: signal.Signals
    stop_timeout: float
    cwd: Path | None = None
    env: dict[str, str] | None = None
    # A session of its own, so a SIGINT reaches the supervisor only, as
    # Ctrl-C in its terminal would.
    own_session: bool = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def serve(service: Service) -> Iterator[tuple[subprocess.Popen[bytes], float]]:
    """The service's process, once /health answers, and the seconds that
    took; stopped when the block ends."""
    with service.log_path.open("wb") as sink:
        proc = subprocess.Popen(
            service.cmd,
            cwd=service.cwd,
            env=service.env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=service.own_session,
        )
    try:
        yield proc, wait_health(service.url, proc, timeout=service.health_timeout)
    finally:
        stop(proc, service.stop_signal, timeout=service.stop_timeout)


def inferq_up(home: Path, log_path: Path, *, drop: Sequence[str], **extra: str) -> Service:
    """`inferq up` in `home` on a free port, its environment without the
    variables in `drop` (which would point it at shared services or another
    tree) and with `extra`; stopped with SIGINT, as Ctrl-C would."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    env["INFERQ_PORT"] = str(port)
    return Service(
        [sys.executable, "-m", "inferq", "up"],
        port,
        log_path,
        health_timeout=300,
        stop_signal=signal.SIGINT,
        stop_timeout=90,
        cwd=home,
        env=env,
    )


def inferq_home(home: Path, model: Path, config: str) -> Path:
    """`home` set up for `inferq up`: models/ with a symlink to the GGUF and
    the model's config (`config`, one line of YAML)."""
    models = home / "models"
    models.mkdir(parents=True)
    (models / model.name).symlink_to(model.resolve())
    (models / f"{MODEL_NAME}.yaml").write_text(config + "\n")
    return home


def add_model_args(parser: argparse.ArgumentParser, *, ctx_per_slot: int = 2048) -> None:
    """--model, --slots, --ctx-per-slot and --threads: the engine every
    benchmark of inferq alone runs (see inferq_config)."""
    parser.add_argument("--model", type=Path, default=REPO / "models/gemma-3-270m-q4_k_m.gguf")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--ctx-per-slot", type=int, default=ctx_per_slot)
    parser.add_argument("--threads", type=int, default=2)


def inferq_config(model: Path, args: argparse.Namespace) -> str:
    """The model's config as one line of YAML flow style, so the report can
    quote the file as is. No stopwords and no template: the prompt goes to
    the model as is, as llama-server's /v1/completions sends it."""
    return (
        f"{{name: {MODEL_NAME}, backend: llama-cpp, parameters: {{model: {model.name}}}, "
        f"context_size: {args.ctx_per_slot}, parallel: {args.slots}, threads: {args.threads}}}"
    )
