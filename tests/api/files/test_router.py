"""/v1/files through the whole ASGI app (middleware, error handlers) on real
Postgres and Redis, with a small upload limit the shared e2e stack cannot
have: limits, rejected uploads and the error envelope."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.main import create_app
from inferq.migrate import upgrade
from schemas.db import make_engine
from schemas.settings import Settings
from schemas.tables import FileChunk, FileRecord

LIMIT = 10_000


@pytest.fixture
def app_db(pg_url: str) -> str:
    upgrade(pg_url)
    return pg_url


@pytest.fixture
def client(app_db: str, redis_url: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        REDIS_URL=redis_url,
        DATABASE_URL=app_db,
        models_dir=tmp_path,
        max_file_bytes=LIMIT,
        batch_scheduler=False,
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _rows(url: str) -> tuple[int, int]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            files = conn.execute(select(func.count()).select_from(FileRecord)).scalar_one()
            chunks = conn.execute(select(func.count()).select_from(FileChunk)).scalar_one()
        return int(files), int(chunks)
    finally:
        engine.dispose()


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["code"], str) and error["message"]
    return error


def _upload(client: TestClient, data: bytes, purpose: str = "batch") -> httpx.Response:
    return client.post("/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": purpose})


def test_upload_at_the_limit_round_trips(client: TestClient) -> None:
    data = bytes(range(256)) * (LIMIT // 256) + b"z" * (LIMIT % 256)
    response = _upload(client, data, purpose="user_data")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["bytes"] == LIMIT and body["purpose"] == "user_data"
    assert body["object"] == "file" and body["status"] == "processed"
    assert body["id"].startswith("file-") and len(body["id"]) == 5 + 24
    content = client.get(f"/v1/files/{body['id']}/content")
    assert content.status_code == 200
    assert content.headers["content-type"] == "application/octet-stream"
    assert content.content == data
    assert client.delete(f"/v1/files/{body['id']}").json() == {
        "id": body["id"],
        "object": "file",
        "deleted": True,
    }


def test_too_large_is_413_and_leaves_nothing(client: TestClient, app_db: str) -> None:
    # Over the limit but inside the multipart slack: refused while storing.
    error = _error(_upload(client, b"x" * (LIMIT + 1)), 413)
    assert error["code"] == "file_too_large" and error["param"] == "file"
    assert error["type"] == "invalid_request_error"
    # Far over it: refused by its Content-Length before the body is read.
    error = _error(_upload(client, b"x" * (LIMIT + 2 * 1024 * 1024)), 413)
    assert error["code"] == "file_too_large"
    assert _rows(app_db) == (0, 0)
    assert client.get("/v1/files").json()["data"] == []


def test_declared_length_alone_is_refused(client: TestClient) -> None:
    # The body is tiny, so only the declared length can have caused the 413.
    response = client.post(
        "/v1/files",
        content=b"--x--\r\n",
        headers={
            "content-type": "multipart/form-data; boundary=x",
            "content-length": str(50 * 1024 * 1024),
        },
    )
    assert _error(response, 413)["code"] == "file_too_large"


def test_bad_uploads_are_400_in_the_envelope(client: TestClient, app_db: str) -> None:
    error = _error(_upload(client, b"{}\n", purpose="fine-tune"), 400)
    assert error["param"] == "purpose" and "batch" in error["message"]
    assert _error(_upload(client, b""), 400)["param"] == "file"
    missing_file = client.post("/v1/files", data={"purpose": "batch"})
    assert _error(missing_file, 400)["param"] == "file"
    missing_purpose = client.post("/v1/files", files={"file": ("a.jsonl", b"{}\n")})
    assert _error(missing_purpose, 400)["param"] == "purpose"
    # A JSON body (no multipart at all) names what is missing too.
    assert _error(client.post("/v1/files", json={"purpose": "batch"}), 400)["param"]
    assert _rows(app_db) == (0, 0)


def test_listing_parameters_and_unknown_ids(client: TestClient) -> None:
    ids = [_upload(client, b"%d\n" % i).json()["id"] for i in range(3)]
    listed = client.get("/v1/files", params={"limit": 2}).json()
    assert [f["id"] for f in listed["data"]] == ids[::-1][:2] and listed["has_more"]
    assert listed["object"] == "list"
    assert (listed["first_id"], listed["last_id"]) == (ids[2], ids[1])
    rest = client.get("/v1/files", params={"after": listed["last_id"]}).json()
    assert [f["id"] for f in rest["data"]] == [ids[0]] and not rest["has_more"]
    asc = client.get("/v1/files", params={"order": "asc", "purpose": "batch"}).json()
    assert [f["id"] for f in asc["data"]] == ids
    assert client.get("/v1/files", params={"purpose": "user_data"}).json()["data"] == []
    assert _error(client.get("/v1/files", params={"limit": 0}), 400)["param"]
    assert _error(client.get("/v1/files", params={"order": "sideways"}), 400)["param"]

    for method, path in [
        ("GET", "/v1/files/file-nope"),
        ("GET", "/v1/files/file-nope/content"),
        ("DELETE", "/v1/files/file-nope"),
    ]:
        error = _error(client.request(method, path), 404)
        assert error["code"] == "file_not_found", (method, path)
