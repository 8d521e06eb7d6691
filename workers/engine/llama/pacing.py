"""How much bulk work a step may carry while interactive requests run.

Strict priority has to hold for every token, not only at admission: a step
decoding 32 bulk sequences beside one interactive stream makes that stream's
every token several times slower. So while interactive sequences generate,
bulk work may add to a step only what keeps it within `slowdown` times what
the interactive tokens alone would take. The engine learns its own step
times (they differ by machine, model and batch size) as a least-squares fit
of recent decodes: a fixed part, a cost per token whose logits are computed
(a generating sequence's token: the output layer, over the whole vocabulary,
is most of a small model's work) and a cost per prompt token (no logits;
several times cheaper). A bulk step then gets a budget in seconds, spent on
its generating sequences and prompt chunks at their own prices. With no
interactive work, bulk fills the step again at once.

An interactive request that arrives while a bulk-only step is decoding
aborts that step (llama.cpp's abort callback, checked between graph nodes;
the step's cells are rolled back and its tokens decoded again next step),
so its prompt waits for about one graph node rather than a whole step."""

from __future__ import annotations

import collections
import ctypes
import math
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np

# Decodes the step-time fit is made from.
WINDOW = 256
# Until the engine has timed steps of several sizes, bulk work gets this
# many tokens per step beside interactive ones.
COLD_SHARE = 1


@dataclass(frozen=True)
class StepCost:
    """A decode's seconds: `fixed` + `per_output` per token with logits +
    `per_input` per other token."""

    fixed: float
    per_output: float
    per_input: float

    def of(self, outputs: int, inputs: int) -> float:
        return self.fixed + self.per_output * outputs + self.per_input * inputs


@dataclass(frozen=True)
class Share:
    """What bulk work may add to one step: `seconds` of decode time, each
    generating sequence costing `per_output` and each prompt token `per_input`."""

    seconds: float
    per_output: float
    per_input: float

    def prompt_tokens(self, seconds: float) -> int:
        """Prompt tokens that `seconds` of the budget pays for."""
        if self.per_input <= 0:
            return 1 << 30
        # The epsilon: a share that fits exactly must not round down a token.
        return max(int(seconds / self.per_input + 1e-6), 0)


# No interactive token in the step: bulk may fill it.
UNBOUNDED = Share(math.inf, 0.0, 0.0)
COLD = Share(float(COLD_SHARE), 1.0, 1.0)


class StepTimes:
    def __init__(self) -> None:
        # (tokens, outputs, seconds) of recent decodes.
        self._samples: collections.deque[tuple[int, int, float]] = collections.deque(maxlen=WINDOW)
        self._cost: StepCost | None = None
        self._dirty = 0

    def record(self, tokens: int, outputs: int, seconds: float) -> None:
        self._samples.append((tokens, outputs, seconds))
        self._dirty += 1

    def cost(self) -> StepCost | None:
        """The fitted step cost, refitted every 16 samples; None until steps
        of at least two sizes were timed."""
        if self._dirty >= 16 or (self._cost is None and self._dirty):
            self._dirty = 0
            fitted = _fit(np.asarray(self._samples, dtype=np.float64))
            if fitted is not None:
                self._cost = fitted
        return self._cost

    def bulk_share(self, interactive: int, slowdown: float) -> Share:
        """What bulk work may add to a step with `interactive` generating
        interactive sequences so that it takes at most `slowdown` times as
        long as without it."""
        cost = self.cost()
        if cost is None:
            return COLD
        alone = cost.of(interactive, 0)
        return Share(max(slowdown - 1.0, 0.0) * alone, cost.per_output, cost.per_input)


def _fit(data: np.ndarray) -> StepCost | None:
    """Least squares of seconds on (1, outputs, other tokens). With too little
    variety to tell the two token kinds apart (a window of pure generation,
    say), one price for every token; None when even that cannot be told or
    comes out negative."""
    if len(data) < 2:
        return None
    tokens, outputs, seconds = data[:, 0], data[:, 1], data[:, 2]
    inputs = tokens - outputs
    ones = np.ones_like(tokens)
    x = np.column_stack([ones, outputs, inputs])
    if np.linalg.matrix_rank(x) == 3:
        coef = np.linalg.lstsq(x, seconds, rcond=None)[0]
        fixed, per_output, per_input = (float(c) for c in coef)
        if per_output > 0 and per_input > 0 and all(map(math.isfinite, coef)):
            return StepCost(max(fixed, 0.0), per_output, per_input)
    if len(set(tokens.tolist())) < 2:
        return None
    slope, intercept = np.polyfit(tokens, seconds, 1)
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope <= 0:
        return None
    return StepCost(max(float(intercept), 0.0), float(slope), float(slope))


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
