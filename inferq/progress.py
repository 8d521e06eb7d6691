"""A progress bar for long jobs: redrawn in place on a terminal, a plain line
every so often (and on each status change) anywhere else, such as a log."""

from __future__ import annotations

import shutil
import time
from collections import deque
from collections.abc import Callable
from typing import IO


def format_duration(seconds: float) -> str:
    """42s, 3m05s, 1h02m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Counts of a job of `total` items, drawn on `stream`.

    The rate is measured over the last `window` seconds, so a slow start (a
    batch still validating) or a change of pace does not skew the ETA for long.
    """

    def __init__(
        self,
        stream: IO[str],
        *,
        tty: bool | None = None,
        every: float = 10.0,
        window: float = 30.0,
        width: int = 30,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.every = every
        self.window = window
        self.width = width
        self.clock = clock
        self.samples: deque[tuple[float, int]] = deque()
        self.last_print: float | None = None
        self.last_status: str | None = None
        self.drawn = False  # a bar is on the terminal's current line

    def rate(self) -> float:
        """Items per second over the recent samples (0 until it moves)."""
        if len(self.samples) < 2:
            return 0.0
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def line(self, status: str, total: int, completed: int, failed: int, columns: int = 0) -> str:
        """The bar and counts; with `columns`, a bar narrowed to fit that many."""
        done = completed + failed
        fraction = min(done / total, 1.0) if total else 0.0
        rate = self.rate()
        if total and done >= total:
            eta = "0s"
        elif rate > 0 and total:
            eta = format_duration((total - done) / rate)
        else:
            eta = "?"
        text = (
            f" {fraction:4.0%} {done}/{total} done, {failed} failed, "
            f"{rate:.1f} lines/s, ETA {eta} ({status})"
        )
        width = self.width
        if columns:
            width = max(10, min(width, columns - 1 - len(text) - 2))
        filled = int(width * fraction)
        line = "[" + "#" * filled + "-" * (width - filled) + "]" + text
        # A line that wraps could not be redrawn in place.
        return line[: columns - 1] if columns else line

    def update(self, status: str, total: int, completed: int, failed: int) -> None:
        now = self.clock()
        self.samples.append((now, completed + failed))
        while len(self.samples) > 2 and now - self.samples[0][0] > self.window:
            self.samples.popleft()
        changed = status != self.last_status
        self.last_status = status
        due = self.last_print is None or now - self.last_print >= self.every
        if not (self.tty or changed or due):
            return
        self.last_print = now
        if self.tty:
            columns = max(shutil.get_terminal_size().columns, 40)
            text = self.line(status, total, completed, failed, columns)
            self.stream.write("\r" + text + "\x1b[K")
            self.drawn = True
        else:
            self.stream.write(self.line(status, total, completed, failed) + "\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        """A line of its own, above the bar."""
        self.close()
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line (the next output starts on a fresh one)."""
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False
