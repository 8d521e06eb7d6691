"""What a worker says about its work in its heartbeat: the "stats" object of
its keys.WORKERS entry (written by workers/presence.Heartbeat, read by the
API's GET /metrics, api/metrics/collector.py).

Counters are cumulative since the worker started; the `recent_*` fields are
the same four counters' growth over the worker's last minute, so that a
throughput gauge says how fast the engine runs now, not since it started.
An entry without "stats" (an older worker) or with a malformed one is read
as no stats at all: every field is optional on the wire."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

# The key of the stats object in a heartbeat entry.
FIELD = "stats"


@dataclass(frozen=True, slots=True)
class WorkStats:
    # Prompt tokens evaluated (not those reused from a slot's KV cache), and
    # the time spent on them: each sequence with a prompt chunk in a step
    # adds that step's duration (llama.cpp's t_prompt_processing, per slot).
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    # Tokens generated, and each generating sequence's share of the steps it
    # took part in (llama.cpp's t_token_generation, per slot).
    predicted_tokens: int = 0
    predicted_seconds: float = 0.0
    # llama_decode calls, and the busy slots summed over them.
    decodes: int = 0
    busy_slots: int = 0
    # Gauges: tokens held in the KV cache and the cache's size in tokens;
    # requests in slots, and requests waiting for one.
    kv_tokens: int = 0
    kv_capacity: int = 0
    processing: int = 0
    deferred: int = 0
    # Batch lines whose result this worker wrote.
    lines_done: int = 0
    lines_failed: int = 0
    lines_cancelled: int = 0
    # Growth of the four throughput counters over the last minute or so.
    recent_prompt_tokens: int = 0
    recent_prompt_seconds: float = 0.0
    recent_predicted_tokens: int = 0
    recent_predicted_seconds: float = 0.0

    def __add__(self, other: WorkStats) -> WorkStats:
        return WorkStats(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )

    def replace(self, **changes: float) -> WorkStats:
        return WorkStats(**{**asdict(self), **changes})

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> WorkStats | None:
        """The stats of a heartbeat entry's "stats" value; unknown keys are
        ignored (a newer worker), a missing one is 0 (an older one), and
        anything that is not a finite non-negative number spoils the whole
        entry (None), rather than one bad worker's figure skewing a sum."""
        if not isinstance(data, dict):
            return None
        values: dict[str, float] = {}
        for f in fields(cls):
            value = data.get(f.name, 0)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return None
            if not math.isfinite(value) or value < 0:
                return None
            values[f.name] = int(value) if f.type == "int" else float(value)
        return cls(**values)  # type: ignore[arg-type]
