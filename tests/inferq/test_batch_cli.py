"""`inferq batch` over real HTTP against a small in-test Files + Batches API
(FastAPI under uvicorn in a thread), which moves a batch one step on each poll:
validating -> in_progress (two lines a poll) -> finalizing -> completed."""

from __future__ import annotations

import io
import itertools
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import pytest
import uvicorn
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response

from inferq.cli import main
from inferq.progress import Progress, format_duration
from tests.support.procs import free_port

LINES_PER_POLL = 2


def _error(status: int, message: str, code: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None}}
    body["error"]["code"] = code
    return JSONResponse(body, status_code=status)


@dataclass
class FakeAPI:
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    inputs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    created: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)
    list_queries: list[dict[str, str]] = field(default_factory=list)
    unavailable: int = 0  # answer this many batch polls with a 503
    ids: Iterator[int] = field(default_factory=itertools.count)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_file(self, data: bytes, purpose: str, name: str) -> str:
        file_id = f"file-{next(self.ids)}"
        self.files[file_id] = {"purpose": purpose, "filename": name, "data": data}
        return file_id

    def _finish(self, batch: dict[str, Any], status: str) -> None:
        """Write the output and error files and end the batch as `status`."""
        ok, bad = [], []
        for i, line in enumerate(self.inputs[batch["id"]]):
            ran = i < batch["request_counts"]["completed"] + batch["request_counts"]["failed"]
            if ran and not line["body"].get("fail"):
                body = {"object": "chat.completion", "echo": line["body"].get("text", "")}
                response = {"status_code": 200, "request_id": f"req_{i}", "body": body}
                ok.append({"id": f"batch_req_{i}", "custom_id": line["custom_id"],
                           "response": response, "error": None})  # fmt: skip
            else:
                code = "bad_line" if ran else "batch_cancelled"
                error = {"code": code, "message": f"line {i} did not run"}
                bad.append({"id": f"batch_req_{i}", "custom_id": line["custom_id"],
                            "response": None, "error": error})  # fmt: skip
        for key, rows in (("output_file_id", ok), ("error_file_id", bad)):
            if rows:
                data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
                batch[key] = self.add_file(data, "batch_output", f"{batch['id']}_{key}.jsonl")
        batch["request_counts"]["failed"] = len(bad)
        batch["status"] = status
        batch[f"{status}_at"] = int(time.time())

    def step(self, batch: dict[str, Any]) -> None:
        counts, mode = batch["request_counts"], (batch["metadata"] or {}).get("mode")
        now = int(time.time())
        if batch["status"] == "validating":
            if mode == "fail":
                batch["errors"] = {"object": "list", "data": [
                    {"code": "invalid_json", "message": "not JSON", "param": None, "line": 2}
                ]}  # fmt: skip
                batch.update(status="failed", failed_at=now)
            else:
                batch.update(status="in_progress", in_progress_at=now)
        elif batch["status"] == "in_progress" and mode != "hold":
            lines = self.inputs[batch["id"]]
            for _ in range(LINES_PER_POLL):
                done = counts["completed"] + counts["failed"]
                if done < counts["total"]:
                    counts["failed" if lines[done]["body"].get("fail") else "completed"] += 1
            if counts["completed"] + counts["failed"] == counts["total"]:
                batch.update(status="finalizing", finalizing_at=now)
        elif batch["status"] == "finalizing":
            self._finish(batch, "completed")
        elif batch["status"] == "cancelling":
            self._finish(batch, "cancelled")

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def record_auth(request: Request, call_next: Any) -> Response:
            self.auth.append(request.headers.get("authorization"))
            response: Response = await call_next(request)
            return response

        @app.post("/v1/files")
        async def upload(
            file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
        ) -> dict[str, Any]:
            data = await file.read()
            file_id = self.add_file(data, purpose, file.filename or "")
            return {"id": file_id, "object": "file", "bytes": len(data), "purpose": purpose}

        @app.get("/v1/files/{file_id}/content")
        def content(file_id: str) -> Response:
            if file_id not in self.files:
                return _error(404, f"No such File object: {file_id}", "not_found")
            return Response(self.files[file_id]["data"], media_type="application/octet-stream")

        @app.post("/v1/batches")
        def create(body: dict[str, Any]) -> Any:
            self.created.append(body)
            if body["endpoint"] not in ("/v1/chat/completions", "/v1/embeddings"):
                return _error(400, f"unsupported endpoint {body['endpoint']}", "invalid_value")
            data = self.files[body["input_file_id"]]["data"]
            lines = [json.loads(line) for line in data.splitlines() if line.strip()]
            batch_id = f"batch_{next(self.ids)}"
            now = int(time.time())
            with self.lock:
                self.inputs[batch_id] = lines
                self.batches[batch_id] = {
                    "id": batch_id, "object": "batch", "endpoint": body["endpoint"],
                    "errors": None, "input_file_id": body["input_file_id"],
                    "completion_window": body["completion_window"], "status": "validating",
                    "output_file_id": None, "error_file_id": None, "created_at": now,
                    "in_progress_at": None, "expires_at": now + 86400, "finalizing_at": None,
                    "completed_at": None, "failed_at": None, "expired_at": None,
                    "cancelling_at": None, "cancelled_at": None,
                    "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                    "metadata": body.get("metadata"),
                }  # fmt: skip
            return self.batches[batch_id]

        @app.get("/v1/batches/{batch_id}")
        def retrieve(batch_id: str) -> Any:
            with self.lock:
                if self.unavailable > 0:
                    self.unavailable -= 1
                    return _error(503, "restarting", "service_unavailable")
                if batch_id not in self.batches:
                    return _error(404, f"No batch found with id '{batch_id}'", "batch_not_found")
                batch = self.batches[batch_id]
                answer = json.loads(json.dumps(batch))
                self.step(batch)
                return answer

        @app.get("/v1/batches")
        def listing(request: Request, after: str | None = None, limit: int = 20) -> Any:
            self.list_queries.append(dict(request.query_params))
            ids = sorted(self.batches, key=lambda b: int(b.split("_")[1]), reverse=True)
            if after is not None:
                ids = ids[ids.index(after) + 1 :]
            data = [self.batches[i] for i in ids[:limit]]
            return {"object": "list", "data": data, "has_more": len(ids) > limit,
                    "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None}  # fmt: skip

        @app.post("/v1/batches/{batch_id}/cancel")
        def cancel(batch_id: str) -> Any:
            batch = self.batches[batch_id]
            if batch["status"] not in ("validating", "in_progress", "finalizing"):
                message = f"batch '{batch_id}' is {batch['status']} and can no longer be cancelled"
                return _error(409, message, "batch_not_cancellable")
            batch.update(status="cancelling", cancelling_at=int(time.time()))
            return batch

        @app.get("/html/v1/batches/{batch_id}")
        def not_inferq(batch_id: str) -> HTMLResponse:
            return HTMLResponse("<html>hello</html>")

        return app


@dataclass
class Server:
    url: str
    api: FakeAPI


@pytest.fixture
def server() -> Iterator[Server]:
    api = FakeAPI()
    port = free_port()
    config = uvicorn.Config(api.app(), host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert time.monotonic() < deadline, "the fake API did not start"
        time.sleep(0.01)
    yield Server(f"http://127.0.0.1:{port}", api)
    uv.should_exit = True
    thread.join(10)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("INFERQ_URL", "INFERQ_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def _jsonl(
    path: Path, n: int, url: str = "/v1/chat/completions", fail: frozenset[int] = frozenset()
) -> Path:
    rows = [
        {"custom_id": f"c{i}", "method": "POST", "url": url,
         "body": {"model": "tiny", "text": f"héllo {i} ✓", "fail": i in fail}}
        for i in range(n)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _batch(server: Server, *args: str) -> int:
    return main(["batch", "--base-url", server.url, *args])


def test_submit_wait_downloads_output_and_errors(
    server: Server,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INFERQ_API_KEY", "sk-secret-123")
    source = _jsonl(tmp_path / "in.jsonl", 6, url="/v1/embeddings", fail=frozenset({4}))
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    args = ["submit", str(source), "--wait", "--interval", "0.01", "--output", str(out)]
    code = _batch(server, *args, "--errors", str(errors), "--metadata", "team=search", "run=7")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    batch_id = captured.out.strip()
    batch = server.api.batches[batch_id]
    assert batch["status"] == "completed"
    # The endpoint came from the first line's url; metadata and window went along.
    assert server.api.created == [{"input_file_id": batch["input_file_id"],
        "endpoint": "/v1/embeddings", "completion_window": "24h",
        "metadata": {"team": "search", "run": "7"}}]  # fmt: skip
    upload = server.api.files[batch["input_file_id"]]
    assert upload["data"] == source.read_bytes()
    assert (upload["purpose"], upload["filename"]) == ("batch", "in.jsonl")
    # Progress on stderr, a plain line per status change (not a terminal here).
    assert "\r" not in captured.err
    assert "0/6 done, 0 failed, 0.0 lines/s, ETA ? (in_progress)" in captured.err
    assert "6/6 done, 1 failed" in captured.err and "lines/s" in captured.err
    assert "ETA" in captured.err
    assert f"{batch_id} completed" in captured.err and "5 completed, 1 failed" in captured.err
    # Both files, byte for byte (UTF-8 included).
    assert out.read_bytes() == server.api.files[batch["output_file_id"]]["data"]
    assert errors.read_bytes() == server.api.files[batch["error_file_id"]]["data"]
    assert "héllo 0 ✓" in out.read_text()
    assert [json.loads(line)["custom_id"] for line in errors.read_text().splitlines()] == ["c4"]
    assert f"written to {out}" in captured.err
    # The key went as a bearer token and was never shown.
    assert set(server.api.auth) == {"Bearer sk-secret-123"}
    assert "sk-secret-123" not in captured.out + captured.err


def test_submit_wait_without_output_says_where_results_are(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _jsonl(tmp_path / "in.jsonl", 3)
    code = _batch(server, "submit", str(source), "--wait", "--interval", "0.01")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    batch_id = captured.out.strip()  # stdout is just the id, for $(...)
    batch = server.api.batches[batch_id]
    assert f"output: file {batch['output_file_id']}" in captured.err
    assert f"inferq batch download {batch_id} --output FILE" in captured.err
    assert "errors:" not in captured.err
    assert server.api.auth[0] is None  # no key configured: no header


def test_submit_wait_on_a_terminal_redraws_in_place(
    server: Server,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    source = _jsonl(tmp_path / "in.jsonl", 4)
    assert _batch(server, "submit", str(source), "--wait", "--interval", "0.01") == 0
    drawn = terminal.getvalue()
    bars = drawn.split("\n")[0].split("\r")[1:]
    assert len(bars) >= 4 and all(bar.endswith("\x1b[K") for bar in bars)
    assert "4/4 done, 0 failed" in bars[-1] and "100%" in bars[-1]
    # The duration is the machine's (0s, or more on a loaded one); the rest is fixed.
    assert re.search(r"completed in \d+s: 4 completed, 0 failed$", drawn.split("\n")[1])


def test_submit_wait_failed_batch_exits_1_with_its_errors(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _jsonl(tmp_path / "in.jsonl", 3)
    args = ["submit", str(source), "--wait", "--interval", "0.01", "--metadata", "mode=fail"]
    assert _batch(server, *args) == 1
    err = capsys.readouterr().err
    assert (
        "batch_1 failed in 0s: 0 completed, 0 failed" in err
        and "line 2: not JSON (invalid_json)" in err
    )


def test_follow_waits_out_a_short_outage_but_not_a_long_one(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _jsonl(tmp_path / "in.jsonl", 2)
    server.api.unavailable = 3
    assert _batch(server, "submit", str(source), "--wait", "--interval", "0.01") == 0
    err = capsys.readouterr().err
    assert err.count("server answered 503: restarting; retrying") == 1
    server.api.unavailable = 10**6
    args = ["submit", str(source), "--wait", "--interval", "0.01", "--patience", "0.2"]
    assert _batch(server, *args) == 1
    assert capsys.readouterr().err.endswith("inferq batch: server answered 503: restarting\n")


def test_status_list_download(
    server: Server, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    source = _jsonl(tmp_path / "in.jsonl", 2)
    ids = []
    for i in range(3):
        assert _batch(server, "submit", str(source), "--metadata", f"n={i}") == 0
        ids.append(capsysbinary.readouterr().out.decode().strip())
    first = ids[0]
    assert _batch(server, "download", first) == 1
    assert f"{first} is validating: no results yet" in capsysbinary.readouterr().err.decode()
    while server.api.batches[first]["status"] != "completed":
        assert _batch(server, "status", first) == 0

    capsysbinary.readouterr()
    assert _batch(server, "status", first) == 0
    text = capsysbinary.readouterr().out.decode()
    assert text.startswith(f"{first}: completed\n") and "2/2 done: 2 completed, 0 failed" in text
    assert "metadata      n=0" in text
    assert _batch(server, "status", first, "--json") == 0
    assert json.loads(capsysbinary.readouterr().out) == server.api.batches[first]

    # Newest first, pages through --after; --base-url also after the action.
    assert main(["batch", "list", "--limit", "2", "--base-url", server.url]) == 0
    page = capsysbinary.readouterr()
    assert [line.split()[0] for line in page.out.decode().splitlines()] == [ids[2], ids[1]]
    assert f"inferq batch list --after {ids[1]}" in page.err.decode()
    assert _batch(server, "list", "--after", ids[1], "--json") == 0
    assert [b["id"] for b in json.loads(capsysbinary.readouterr().out)["data"]] == [first]
    assert server.api.list_queries == [{"limit": "2"}, {"limit": "20", "after": ids[1]}]

    # The output file to stdout, byte for byte; or to files.
    output = server.api.files[server.api.batches[first]["output_file_id"]]["data"]
    assert _batch(server, "download", first) == 0
    assert capsysbinary.readouterr().out == output
    target = tmp_path / "o.jsonl"
    assert _batch(server, "download", first, "--output", str(target)) == 0
    assert target.read_bytes() == output and not (tmp_path / "o.jsonl.part").exists()
    # No line failed: no error file, and an empty one for scripts.
    assert _batch(server, "download", first, "--errors", str(tmp_path / "e.jsonl")) == 0
    captured = capsysbinary.readouterr()
    assert captured.out == output and (tmp_path / "e.jsonl").read_bytes() == b""
    assert captured.err.decode() == f"inferq batch: {first} has no error file\n"


def test_cancel(server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _jsonl(tmp_path / "in.jsonl", 4)
    assert _batch(server, "submit", str(source), "--metadata", "mode=hold") == 0
    batch_id = capsys.readouterr().out.strip()
    assert _batch(server, "status", batch_id) == 0  # validating -> in_progress
    capsys.readouterr()
    assert _batch(server, "cancel", batch_id) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{batch_id}  cancelling") and "0/4 done" in out
    assert _batch(server, "status", batch_id) == 0  # cancelling -> cancelled
    assert _batch(server, "status", batch_id, "--json") == 0
    captured = capsys.readouterr().out
    assert json.loads(captured[captured.index("{") :])["status"] == "cancelled"
    assert _batch(server, "cancel", batch_id) == 1
    err = capsys.readouterr().err
    assert err == (
        f"inferq batch: server answered 409: batch '{batch_id}' is cancelled "
        "and can no longer be cancelled\n"
    )


def test_server_errors_exit_1_with_the_message(
    server: Server,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _batch(server, "status", "batch_nope") == 1
    captured = capsys.readouterr()
    assert (
        captured.err == "inferq batch: server answered 404: No batch found with id 'batch_nope'\n"
    )
    assert captured.out == ""
    source = _jsonl(tmp_path / "in.jsonl", 1, url="/v1/nope")
    assert _batch(server, "submit", str(source)) == 1
    assert "server answered 400: unsupported endpoint /v1/nope" in capsys.readouterr().err
    # Something that is not inferq; the address from INFERQ_URL, keys from OPENAI_API_KEY.
    monkeypatch.setenv("INFERQ_URL", server.url + "/html")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-other")
    assert main(["batch", "status", "batch_1"]) == 1
    assert "/html/v1/batches/batch_1 did not answer with a JSON object" in capsys.readouterr().err
    assert server.api.auth[-1] == "Bearer sk-other"
    assert main(["batch", "--api-key", "sk-flag", "status", "batch_1"]) == 1
    assert server.api.auth[-1] == "Bearer sk-flag"


def test_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["batch", "--base-url", url, "list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"inferq batch: the inferq server is not reachable at {url} (")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit"], "the following arguments are required: FILE.jsonl"),
        (["submit", "{dir}/missing.jsonl"], "missing.jsonl is not a file"),
        (["submit", "{dir}/in.jsonl", "--metadata", "novalue"], "KEY=VALUE pairs, not 'novalue'"),
        (["submit", "{dir}/in.jsonl", "--output", "x"], "--output and --errors need --wait"),
        (["submit", "{dir}/blank.jsonl"], "first line has no url"),
        (["list", "--limit", "0"], "a number from 1 to 100"),
        (["--base-url", "localhost:8080", "list"], "must start with http:// or https://"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: action"),
    ],
)
def test_usage_errors_exit_2(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _jsonl(tmp_path / "in.jsonl", 1)
    (tmp_path / "blank.jsonl").write_text("\n{}\n")
    with pytest.raises(SystemExit) as exc:
        main(["batch", *(arg.format(dir=tmp_path) for arg in args)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_progress_plain_lines_rate_and_eta() -> None:
    now = [0.0]
    stream = io.StringIO()
    progress = Progress(stream, every=10, window=30, clock=lambda: now[0])
    for second, done in [(0, 0), (1, 10), (5, 50), (10, 100), (11, 110), (40, 300)]:
        now[0] = second
        progress.update("in_progress", 1000, done - done // 10, done // 10)
    now[0] = 41
    progress.update("completed", 1000, 900, 100)
    lines = stream.getvalue().splitlines()
    # The first update, every 10 s after, and a status change.
    assert [line.split("] ")[1] for line in lines] == [
        "  0% 0/1000 done, 0 failed, 0.0 lines/s, ETA ? (in_progress)",
        " 10% 100/1000 done, 10 failed, 10.0 lines/s, ETA 1m30s (in_progress)",
        " 30% 300/1000 done, 30 failed, 6.7 lines/s, ETA 1m45s (in_progress)",
        "100% 1000/1000 done, 100 failed, 29.7 lines/s, ETA 0s (completed)",
    ]
    assert lines[1].startswith("[###------")
    assert [format_duration(s) for s in (0, 59.6, 61, 3600 * 2 + 125)] == [
        "0s",
        "1m00s",
        "1m01s",
        "2h02m",
    ]
