"""Reading the workers' heartbeats (keys.WORKERS: one JSON entry per worker,
written by workers/presence.Heartbeat): who is alive, for which model, with
how many slots (interactive, and for batch lines). One reader for the
catalog, the worker watch, backpressure and the batch scheduler."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Beat:
    worker_id: str
    model: str
    slots: int
    expires_at: float
    # Sequences the worker runs for batch lines (older workers: its slots).
    bulk_slots: int = 0

    def alive(self, now: float) -> bool:
        return self.expires_at > now


def read_beats(values: Iterable[bytes | str]) -> list[Beat]:
    """The entries that parse; a malformed one (another version, a stray
    write) is skipped rather than failing whoever reads the hash."""
    beats = []
    for value in values:
        try:
            info = json.loads(value)
            beats.append(
                Beat(
                    worker_id=str(info["worker_id"]),
                    model=str(info["model"]),
                    slots=int(info.get("slots", 1)),
                    expires_at=float(info.get("expires_at", 0)),
                    bulk_slots=int(info.get("bulk_slots", info.get("slots", 1))),
                )
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return beats


def live_slots(values: Iterable[bytes | str], now: float, *, bulk: bool = False) -> dict[str, int]:
    """Slots of the live workers, per model (`bulk`: their batch-line sequences)."""
    slots: dict[str, int] = {}
    for beat in read_beats(values):
        if beat.alive(now):
            slots[beat.model] = slots.get(beat.model, 0) + (beat.bulk_slots if bulk else beat.slots)
    return slots
