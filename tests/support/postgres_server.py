"""A private PostgreSQL cluster for the test suite (see tests/support/servers.py):
initdb as an unprivileged user when this process is root."""

from __future__ import annotations

import atexit
import functools
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psycopg

from tests.support.servers import (
    PG_SUPERUSER,
    START_TIMEOUT_S,
    UNPRIVILEGED_USER,
    Server,
    _is_executable,
    _make_workdir,
    _package_dir,
    _pick,
    _RunAs,
    _start,
    _tail,
    _unprivileged,
)

log = logging.getLogger(__name__)


def _has_pg_tools(bindir: Path) -> bool:
    return _is_executable(bindir / "initdb") and _is_executable(bindir / "postgres")


def _version_key(bindir: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin: newest first.
    parts = bindir.parent.name.split(".")
    return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else (-1,)


def _pg_on_path() -> Path | None:
    candidates: list[Path] = []
    for tool in ("initdb", "postgres", "pg_ctl"):
        found = shutil.which(tool)
        if found:
            # Unresolved first (a real bin dir), then the symlink target
            # (e.g. /usr/local/bin/initdb -> /usr/lib/postgresql/15/bin).
            candidates += [Path(found).parent, Path(found).resolve().parent]
    # Debian/Ubuntu keep the server binaries off PATH.
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    return next((c for c in candidates if _has_pg_tools(c)), None)


def _pg_in_wheel() -> Path | None:
    pkg = _package_dir("pgserver")
    if pkg is None:
        return None
    bindir = pkg / "pginstall" / "bin"
    return bindir if _has_pg_tools(bindir) else None


def _pg_answers(datadir: Path, port: int) -> bool:
    try:
        with psycopg.connect(
            host="127.0.0.1", port=port, user=PG_SUPERUSER, dbname="postgres",
            connect_timeout=2,
        ) as conn:  # fmt: skip
            row = conn.execute("SHOW data_directory").fetchone()
    except psycopg.Error:
        # Refused while starting, or "the database system is starting up".
        return False
    # Make sure it is our cluster, not another server that took the port.
    return row is not None and os.path.samefile(row[0], datadir)


def start_postgres(*, prefer_wheel: bool = False) -> Server:
    """initdb a fresh cluster in a temp dir and start it on 127.0.0.1.

    Uses initdb/postgres from PATH or /usr/lib/postgresql/*/bin, else the
    install in the ``pgserver`` wheel (the other way round with
    ``prefer_wheel``).  Auth is ``trust``; the URL is
    ``postgresql+psycopg://inferq@127.0.0.1:PORT/postgres``.
    """
    bindir = _pick(prefer_wheel, _pg_on_path, _pg_in_wheel)
    if bindir is None:
        raise RuntimeError(
            "no PostgreSQL found (initdb/postgres on PATH or in /usr/lib/postgresql/*/bin) "
            "and the pgserver wheel is not installed"
        )
    started = time.monotonic()
    run_as = _unprivileged()
    origin = bindir
    if not _reachable(bindir, run_as):
        bindir = _staged(bindir)
    workdir = _make_workdir("inferq-pg-")
    datadir = workdir / "data"
    logfile = workdir / "postgres.log"
    try:
        if run_as.uid is not None and run_as.gid is not None:
            # The unprivileged user must own the dir: initdb creates data/
            # inside it, postgres demands to own data/ and puts its socket here.
            os.chown(workdir, run_as.uid, run_as.gid)
        _initdb(bindir, datadir, workdir=workdir, logfile=logfile, run_as=run_as)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise

    def argv(port: int) -> list[str]:
        # fsync & co. off: crash safety is pointless for a throwaway
        # cluster and costs seconds per test run.  The unix socket goes
        # into our temp dir (the compiled-in default, e.g.
        # /var/run/postgresql, may not exist or be writable).
        return [
            str(bindir / "postgres"), "-D", str(datadir), "-p", str(port),
            "-h", "127.0.0.1", "-k", str(workdir),
            "-c", "fsync=off", "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off", "-c", "logging_collector=off",
        ]  # fmt: skip

    server = _start(
        "postgres",
        name="postgres",
        url_for_port=lambda port: f"postgresql+psycopg://{PG_SUPERUSER}@127.0.0.1:{port}/postgres",
        executable=bindir / "postgres",
        argv_for_port=argv,
        is_ready=lambda proc, port: _pg_answers(datadir, port),
        workdir=workdir,
        run_as=run_as,
        stop_signal=signal.SIGINT,  # "fast" shutdown, like pg_ctl stop -m fast
        origin=origin,
    )
    log.info(
        "started postgres %s on port %d in %.2fs", bindir, server.port, time.monotonic() - started
    )
    return server


def _reachable(bindir: Path, run_as: _RunAs) -> bool:
    """Whether the account that runs Postgres can execute the binaries: as
    root it is `nobody`, which cannot reach a virtual environment inside a
    private directory (a checkout in root's 0700 home is the common case)."""
    if run_as.uid is None:
        return True
    probe = subprocess.run(
        ["/bin/sh", "-c", 'test -x "$1/initdb" && test -r "$1/../share"', "-", str(bindir)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=START_TIMEOUT_S,
        check=False,
        user=run_as.uid,
        group=run_as.gid,
        extra_groups=run_as.extra_groups,
    )
    return probe.returncode == 0


@functools.cache
def _staged(bindir: Path) -> Path:
    """A world-readable copy of a Postgres install (the bin directory's
    parent, which holds lib/ and share/ too), made once per test process and
    removed at exit. A wheel's install finds its shared libraries through an
    RPATH relative to itself (pgserver: `$ORIGIN/../../../pgserver.libs`), so
    the copy keeps the package layout and the `*.libs` directories beside it."""
    install = bindir.parent
    package = install.parent
    stage = _make_workdir("inferq-pginstall-")
    target = stage / package.name / install.name
    shutil.copytree(install, target, symlinks=True)
    for libs in package.parent.glob(f"{package.name}*.libs"):
        shutil.copytree(libs, stage / libs.name, symlinks=True)
    for path in [stage, *stage.rglob("*")]:
        if not path.is_symlink():
            mode = path.stat().st_mode
            path.chmod(mode | 0o444 | (0o111 if path.is_dir() or mode & 0o100 else 0))
    atexit.register(shutil.rmtree, stage, ignore_errors=True)
    log.info("staged %s at %s for the unprivileged user", install, target)
    return target / bindir.name


def _initdb(bindir: Path, datadir: Path, *, workdir: Path, logfile: Path, run_as: _RunAs) -> None:
    argv = [
        str(bindir / "initdb"), "-D", str(datadir), "-U", PG_SUPERUSER,
        "--auth=trust", "--encoding=UTF8", "--locale=C",
        # No fsync of the fresh cluster: it is thrown away after the run.
        "--no-sync",
    ]  # fmt: skip
    with logfile.open("ab") as out:
        try:
            result = subprocess.run(
                argv,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=START_TIMEOUT_S,
                check=False,
                user=run_as.uid,
                group=run_as.gid,
                extra_groups=run_as.extra_groups,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"initdb did not finish within {START_TIMEOUT_S:g}s; log:\n{_tail(logfile)}"
            ) from None
    if result.returncode != 0:
        hint = ""
        if run_as.uid is not None:
            hint = (
                f" (ran as {UNPRIVILEGED_USER!r} because we are root: it needs to "
                f"traverse {workdir.parent} and read/execute {bindir})"
            )
        raise RuntimeError(
            f"initdb failed with code {result.returncode}{hint}; log:\n{_tail(logfile)}"
        )
