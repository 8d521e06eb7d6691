"""Reading a batch input file: what fails the batch, what fails a line alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from api.batches.validate import KEEPALIVE_LINES, LineReader, parse, reported, split_lines
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


def _raw(custom_id: str, body: object) -> bytes:
    item = {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}
    return json.dumps(item).encode()


def _chat(content: object, **extra: object) -> dict[str, object]:
    return {"model": "chat", "messages": [{"role": "user", "content": content}], **extra}


def _nested(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = {"a": [value]}
    return value


# Lines that are batch lines but whose request no endpoint can run: each fails
# alone with a 400 in the envelope; none may raise out of parse().
HOSTILE_REQUESTS: dict[str, bytes] = {
    # int("²") raised ValueError out of the request model and wedged the scheduler.
    "superscript_bias": _raw("superscript_bias", _chat("hi", logit_bias={"²": 1})),
    "surrogate": _raw("surrogate", _chat("\ud800")),
    "surrogate_model": _raw("surrogate_model", {"model": "x\udfff", "messages": []}),
    "infinite": b'{"custom_id": "infinite", "method": "POST", "url": "'
    + CHAT.encode()
    + b'", "body": {"model": "chat", "messages": [{"role": "user", "content": "hi"}],'
    b' "temperature": 1e400}}',
    "nan": b'{"custom_id": "nan", "method": "POST", "url": "'
    + CHAT.encode()
    + b'", "body": {"model": "chat", "messages": [{"role": "user", "content": "hi"}],'
    b' "top_p": NaN}}',
    "deep_body": _raw("deep_body", _chat("hi", response_format=_nested(200))),
}


def test_hostile_requests_fail_alone(tmp_path: Path) -> None:
    raw = [_line("ok"), *HOSTILE_REQUESTS.values(), _line("after")]
    parsed = parse(raw, CHAT, _reader(tmp_path))
    assert parsed.errors == []
    by_id = {line.custom_id: line for line in parsed.lines}
    assert by_id["ok"].state == b.PENDING and by_id["after"].state == b.PENDING
    for custom_id in HOSTILE_REQUESTS:
        line = by_id[custom_id]
        assert line.state == b.FAILED and line.result is not None, custom_id
        # An unknown model is a 404, as on its own; everything else a 400.
        expected = 404 if custom_id == "surrogate_model" else 400
        assert line.result["status_code"] == expected, (custom_id, line.result)
        error = line.result["body"]["error"]
        assert isinstance(error["message"], str) and isinstance(error["code"], str)
        # What is stored must be storable: valid UTF-8, no NUL, finite numbers.
        json.dumps(line.result, allow_nan=False).encode("utf-8")
        assert "\x00" not in line.model
        line.model.encode("utf-8")


def test_hostile_lines_fail_the_file_naming_them(tmp_path: Path) -> None:
    raw = [
        _line("ok"),
        b"[" * 100_000 + b"]" * 100_000,  # RecursionError in json.loads
        b'{"custom_id": "\xff\xfe", "method": "POST"}',  # not UTF-8
        b'"just a string"',
        b"[1, 2, 3]",
        _raw("\ud800", _chat("hi")),  # a custom_id that is not Unicode
        _raw("x" * 600, _chat("hi")),
        b'{"custom_id": "big", "method": "POST", "n": ' + b"9" * 5000 + b"}",
    ]
    parsed = parse(raw, CHAT, _reader(tmp_path))
    assert [e["line"] for e in parsed.errors] == [2, 3, 4, 5, 6, 7, 8]
    for error in parsed.errors:
        assert isinstance(error["code"], str) and error["message"]
        json.dumps(error, allow_nan=False).encode("utf-8")
    assert parsed.errors[0]["message"] == "this line is nested too deeply to be read"
    assert parsed.errors[1]["message"] == "this line is not valid UTF-8"


def test_keepalive_is_called_and_may_stop_validation(tmp_path: Path) -> None:
    calls = []

    class Lost(Exception):
        pass

    def keepalive() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise Lost

    raw = (_line(f"id{i}") for i in range(3 * KEEPALIVE_LINES))
    try:
        parse(raw, CHAT, _reader(tmp_path), keepalive)
    except Lost:
        pass
    else:
        raise AssertionError("the keepalive's exception was swallowed")
    assert len(calls) == 2


def test_any_exception_building_a_job_fails_that_line(tmp_path: Path) -> None:
    """Whatever the request models let through or raise (a bug of ours
    included), the line fails alone and nothing unstorable is kept."""
    base = _reader(tmp_path)

    class Faulty(LineReader):
        def job(self, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
            fault = body.get("fault")
            if fault == "value":
                raise ValueError("invalid literal for int() with base 10: '²'")
            if fault == "recursion":
                raise RecursionError("maximum recursion depth exceeded")
            if fault == "key":
                raise KeyError("tokens")
            model, job = super().job({k: v for k, v in body.items() if k != "fault"})
            if fault == "infinite":
                job["payload"]["sampling"]["temperature"] = float("inf")
            elif fault == "surrogate":
                job["payload"]["messages"][0]["content"] = "\udc80"
            elif fault == "model":
                model = "bad\x00model"
            return model, job

    reader = Faulty(CHAT, base.registry, set())
    faults = ["value", "recursion", "key", "infinite", "surrogate", "model"]
    raw = [_line("ok"), *(_line(f, fault=f) for f in faults), _line("after")]
    parsed = parse(raw, CHAT, reader)
    assert parsed.errors == []
    by_id = {line.custom_id: line for line in parsed.lines}
    assert by_id["ok"].state == b.PENDING and by_id["after"].state == b.PENDING
    for fault in faults:
        line = by_id[fault]
        assert line.state == b.FAILED and line.job is None and line.result is not None, fault
        assert line.result["status_code"] == 400
        assert line.result["body"]["error"]["type"] == "invalid_request_error"
        json.dumps(line.result, allow_nan=False).encode("utf-8")
        assert "\x00" not in line.model
    assert "ValueError" in by_id["value"].result["body"]["error"]["message"]  # type: ignore[index]
