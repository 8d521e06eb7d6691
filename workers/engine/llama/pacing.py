"""How many bulk tokens a step may carry while interactive requests run.

Strict priority has to hold for every token, not only at admission: a step
decoding 32 bulk sequences beside one interactive stream makes that stream's
every token several times slower. So while interactive sequences generate,
the bulk share of a step is the largest that keeps the step within
`slowdown` times what the interactive tokens alone would take. The engine
learns its own step times (they differ by machine, model and batch size):
a least-squares line through recent (tokens, seconds) of its decodes. With
no interactive work, bulk fills the step again at once.

An interactive request that arrives while a bulk-only step is decoding
aborts that step (llama.cpp's abort callback, checked between graph nodes;
the step's cells are rolled back and its tokens decoded again next step),
so its prompt waits for about one graph node rather than a whole step."""

from __future__ import annotations

import collections
import ctypes
import math
from typing import Any

import llama_cpp
import numpy as np

# Decodes the step-time line is fitted to.
WINDOW = 256
# Until the engine has timed steps of several sizes, bulk work gets this
# many tokens per step beside interactive ones.
COLD_SHARE = 1


class StepTimes:
    def __init__(self) -> None:
        self._samples: collections.deque[tuple[int, float]] = collections.deque(maxlen=WINDOW)
        self._line: tuple[float, float] | None = None
        self._dirty = 0

    def record(self, tokens: int, seconds: float) -> None:
        self._samples.append((tokens, seconds))
        self._dirty += 1

    def _fit(self) -> tuple[float, float] | None:
        """(seconds per step, seconds per token), refitted every 16 samples."""
        if self._dirty >= 16 or (self._line is None and self._dirty):
            self._dirty = 0
            sizes = {n for n, _ in self._samples}
            if len(sizes) < 2:
                return self._line
            data = np.asarray(self._samples, dtype=np.float64)
            slope, intercept = np.polyfit(data[:, 0], data[:, 1], 1)
            if math.isfinite(slope) and math.isfinite(intercept) and slope > 0:
                self._line = (max(float(intercept), 0.0), float(slope))
        return self._line

    def predict(self, tokens: int) -> float | None:
        line = self._fit()
        return None if line is None else line[0] + line[1] * tokens

    def bulk_share(self, interactive: int, slowdown: float) -> int:
        """Bulk tokens a step with `interactive` interactive tokens may add so
        that it takes at most `slowdown` times as long as without them."""
        line = self._fit()
        if line is None:
            return COLD_SHARE
        fixed, per_token = line
        alone = fixed + per_token * interactive
        # The epsilon: a share that fits exactly must not round down a token.
        return max(int((slowdown - 1.0) * alone / per_token + 1e-6), 0)


class AbortFlag:
    """llama.cpp's abort callback over a one-byte flag, with no Python in it.

    ggml calls the callback after every graph node on its first compute
    thread. A Python callback would take the GIL there hundreds of times a
    step (and wait for it whenever another thread of the worker holds it), so
    the callback is libc's strlen over a two-byte buffer: 1 (abort) once the
    first byte is set, else 0. The return value is read as a C bool, whose
    ABI value is the low byte: 0 or 1 here."""

    def __init__(self, ctx: Any) -> None:
        self._buf = ctypes.create_string_buffer(2)
        strlen = ctypes.cast(ctypes.CDLL(None).strlen, ctypes.c_void_p).value
        assert strlen is not None
        self._callback = llama_cpp.ggml_abort_callback(strlen)
        # Installed once for the context's life (llama-cpp-python's binding
        # takes no NULL to remove it): while the flag is clear it costs one
        # strlen of an empty string per graph node.
        llama_cpp.llama_set_abort_callback(
            ctx, self._callback, ctypes.cast(self._buf, ctypes.c_void_p)
        )
        self.armed = False

    def arm(self) -> None:
        """Abort the next decode as soon as `fire` is called."""
        self._buf[0] = b"\x00"
        self.armed = True

    def disarm(self) -> None:
        self.armed = False
        self._buf[0] = b"\x00"

    def fire(self) -> None:
        # A one-byte store, read by the compute thread at its next node.
        self._buf[0] = b"\x01"
