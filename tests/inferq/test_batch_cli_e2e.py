"""`inferq batch` against the real stack."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inferq.cli import main
from tests.support.batches import chat_line, jsonl
from tests.support.procs import free_port
from tests.support.stack import Stack


def _batch(stack: Stack, *args: str) -> int:
    return main(["batch", "--base-url", stack.url, *args])


def test_submit_wait_download_status_list(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(jsonl([chat_line(f"c{i}", f"hi {i}", max_tokens=4) for i in range(6)]))
    out = tmp_path / "out.jsonl"
    # No --endpoint: it comes from the first line's url.
    code = _batch(stack, "submit", str(source), "--wait", "--output", str(out), "--metadata", "k=v")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    batch_id = captured.out.strip().splitlines()[0]
    assert batch_id.startswith("batch_")
    # Progress went to stderr (not a terminal here: plain lines) with the counts.
    assert "6/6 done, 0 failed" in captured.err and "completed" in captured.err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == [f"c{i}" for i in range(6)]

    assert _batch(stack, "status", batch_id, "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["status"] == "completed" and status["metadata"] == {"k": "v"}
    assert _batch(stack, "list", "--limit", "50") == 0
    assert batch_id in capsys.readouterr().out
    again = tmp_path / "again.jsonl"
    assert _batch(stack, "download", batch_id, "--output", str(again)) == 0
    assert again.read_bytes() == out.read_bytes()


def test_cancel_and_errors(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "slow.jsonl"
    lines = [chat_line(f"s{i}", "story", max_tokens=200, ignore_eos=True) for i in range(40)]
    source.write_bytes(jsonl(lines))
    assert _batch(stack, "submit", str(source)) == 0
    batch_id = capsys.readouterr().out.strip()
    assert _batch(stack, "cancel", batch_id) == 0
    assert "cancel" in capsys.readouterr().out

    assert _batch(stack, "status", "batch_nope") == 1
    assert "No batch found" in capsys.readouterr().err
    unreachable = f"http://127.0.0.1:{free_port()}"
    assert main(["batch", "--base-url", unreachable, "list"]) == 1
    assert "not reachable" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        _batch(stack, "frobnicate")
    assert exc.value.code == 2
