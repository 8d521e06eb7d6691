"""The "stats" of this worker's heartbeat (schemas/worker_stats.py): its
engines' figures added up, the batch lines it wrote, and the throughput
counters' growth over the last minute.

Called on the heartbeat thread once a beat: the engines only ever add to
their counters, so reading them costs the engine thread nothing."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from schemas import batches as b
from schemas.worker_stats import WorkStats

log = logging.getLogger(__name__)

# How far back the `recent_*` figures look.
WINDOW_S = 60.0


class _Counted(Protocol):
    def metrics(self) -> WorkStats: ...


# (when, prompt tokens, prompt seconds, predicted tokens, predicted seconds)
_Point = tuple[float, int, float, int, float]


class StatsReporter:
    """`reporter()` -> the JSON object of one heartbeat's stats. It never
    raises: a heartbeat must go out even when a figure cannot be read."""

    def __init__(
        self,
        engines: Iterable[_Counted],
        *,
        lines: Callable[[], Mapping[str, int]] | None = None,
        window: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engines = list(engines)
        self._lines = lines
        self._window = window
        self._clock = clock
        self._points: collections.deque[_Point] = collections.deque()
        self._failing = False

    def __call__(self) -> dict[str, float]:
        try:
            stats = self._collect()
        except Exception:
            # Logged once per stretch of failures, not once a beat.
            if not self._failing:
                log.exception("reading the engine's stats failed; the heartbeat goes without")
            self._failing = True
            return {}
        self._failing = False
        return stats.to_json()

    def _collect(self) -> WorkStats:
        total = WorkStats()
        for engine in self._engines:
            total = total + engine.metrics()
        if self._lines is not None:
            lines = dict(self._lines())
            total = total.replace(
                lines_done=lines.get(b.DONE, 0),
                lines_failed=lines.get(b.FAILED, 0),
                lines_cancelled=lines.get(b.CANCELLED, 0),
            )
        return self._recent(total)

    def _recent(self, total: WorkStats) -> WorkStats:
        """`total` with the growth since the oldest point still in the window
        (the first beats: since the first one)."""
        now = self._clock()
        point: _Point = (
            now,
            total.prompt_tokens,
            total.prompt_seconds,
            total.predicted_tokens,
            total.predicted_seconds,
        )
        self._points.append(point)
        # Keep the newest point at least a window old: the growth is then
        # over a window (or a little more), never over a few beats only.
        while len(self._points) > 1 and self._points[1][0] <= now - self._window:
            self._points.popleft()
        first = self._points[0]
        return total.replace(
            recent_prompt_tokens=point[1] - first[1],
            recent_prompt_seconds=point[2] - first[2],
            recent_predicted_tokens=point[3] - first[3],
            recent_predicted_seconds=point[4] - first[4],
        )
