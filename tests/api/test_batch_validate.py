"""Reading a batch input file: what fails the batch, what fails a line alone."""

from __future__ import annotations

import json
from pathlib import Path

from api.batches.validate import LineReader, parse, reported, split_lines
from schemas import batches as b
from schemas.registry import load_registry

CHAT = "/v1/chat/completions"


def _reader(tmp_path: Path, endpoint: str = CHAT) -> LineReader:
    (tmp_path / "chat.gguf").write_bytes(b"GGUF")
    (tmp_path / "chat.yaml").write_text("name: chat\nparameters:\n  model: chat.gguf\n")
    (tmp_path / "emb.yaml").write_text(
        "name: emb\nparameters:\n  model: chat.gguf\nembeddings: true\npooling: mean\n"
    )
    return LineReader(endpoint, load_registry(tmp_path), set())


def _line(custom_id: str, **body: object) -> bytes:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], **body}
    item = {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}
    return json.dumps(item).encode()


def test_lines_across_chunks() -> None:
    assert list(split_lines([b'{"a":', b' 1}\n{"b"', b": 2}\n", b'{"c": 3}'])) == [
        b'{"a": 1}',
        b'{"b": 2}',
        b'{"c": 3}',
    ]


def test_good_and_bad_requests(tmp_path: Path) -> None:
    raw = [
        _line("ok", max_tokens=3),
        b"",
        _line("hot", top_p=5),
        _line("ghost", model="ghost"),
        _line("embedder", model="emb"),
        _line("streamed", stream=True),
    ]
    parsed = parse(raw, CHAT, _reader(tmp_path))
    assert parsed.errors == []
    by_id = {line.custom_id: line for line in parsed.lines}
    assert [line.line for line in parsed.lines] == [0, 1, 2, 3, 4]  # blank lines skipped
    ok = by_id["ok"]
    assert ok.state == b.PENDING and ok.job is not None and ok.model == "chat"
    assert ok.job["task"] == "generate" and ok.job["payload"]["sampling"]["max_tokens"] == 3
    expected = {
        "hot": (400, "top_p"),
        "ghost": (404, "model"),
        "embedder": (400, "model"),
        "streamed": (400, "stream"),
    }
    for custom_id, (status, param) in expected.items():
        line = by_id[custom_id]
        assert line.state == b.FAILED and line.job is None and line.result is not None
        assert line.result["status_code"] == status
        assert line.result["body"]["error"]["param"] == param, custom_id


def test_structural_problems_fail_the_batch(tmp_path: Path) -> None:
    raw = [
        _line("a"),
        b"[1, 2]",
        b"{not json",
        _line("a"),
        json.dumps({"custom_id": "u", "method": "GET", "url": CHAT, "body": {}}).encode(),
        json.dumps({"custom_id": "v", "method": "POST", "url": "/v1/x", "body": {}}).encode(),
        json.dumps({"method": "POST", "url": CHAT, "body": {}}).encode(),
        _line("nul\x00byte"),
    ]
    parsed = parse(raw, CHAT, _reader(tmp_path))
    assert [(e["line"], e["code"]) for e in parsed.errors] == [
        (2, "invalid_request"),
        (3, "invalid_json_line"),
        (4, "duplicate_custom_id"),
        (5, "invalid_method"),
        (6, "mismatched_url"),
        (7, "missing_custom_id"),
        (8, "invalid_custom_id"),
    ]
    assert reported(parsed.errors)["object"] == "list"


def test_empty_and_oversized_files(tmp_path: Path) -> None:
    reader = _reader(tmp_path)
    assert [e["code"] for e in parse([b"", b"  "], CHAT, reader).errors] == ["empty_file"]
    many = (_line(f"id{i}") for i in range(b.MAX_LINES + 1))
    parsed = parse(many, CHAT, reader)
    assert [e["code"] for e in parsed.errors] == ["too_many_requests"]


def test_window_parsing() -> None:
    assert b.window_seconds("24h") == 86400 and b.window_seconds("90s") == 90
    assert b.window_seconds(" 2d ") == 172800
    for bad in ("24", "h", "0h", "-1h", "1w", "31d"):
        try:
            b.window_seconds(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")
