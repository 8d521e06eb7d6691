"""Reading the workers hash: live entries count, expired and malformed ones do not."""

from __future__ import annotations

import json

from schemas.heartbeats import live_slots, read_beats


def _entry(worker: str, model: str, slots: int, expires_at: float) -> bytes:
    info = {"worker_id": worker, "model": model, "slots": slots, "expires_at": expires_at}
    return json.dumps(info).encode()


def test_live_slots_per_model_skip_expired_and_malformed_entries() -> None:
    values = [
        _entry("a", "gemma", 8, 110.0),
        _entry("b", "gemma", 4, 120.0),
        _entry("c", "gemma", 8, 90.0),  # missed its beats
        _entry("d", "minilm", 16, 130.0),
        b"not json",
        b'{"model": "gemma"}',  # no worker id
        b'["a list"]',
    ]
    assert live_slots(values, now=100.0) == {"gemma": 12, "minilm": 16}
    beats = read_beats(values)
    assert [b.worker_id for b in beats] == ["a", "b", "c", "d"]
    assert [b.alive(100.0) for b in beats] == [True, True, False, True]


def test_batch_lines_count_the_bulk_sequences() -> None:
    def beat(worker: str, bulk: int | None) -> bytes:
        info = {"worker_id": worker, "model": "gemma", "slots": 4, "expires_at": 110.0}
        if bulk is not None:
            info["bulk_slots"] = bulk
        return json.dumps(info).encode()

    # A worker from before bulk_slots counts its interactive slots for both.
    values = [beat("a", 32), beat("b", None)]
    assert live_slots(values, now=100.0) == {"gemma": 8}
    assert live_slots(values, now=100.0, bulk=True) == {"gemma": 36}
