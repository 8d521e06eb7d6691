"""Fault and hostile-input tests: real processes, Redis, Postgres and llama.cpp.

The session-wide end-to-end stack is shared with tests/api; tests that kill or
starve processes build stacks of their own."""

from __future__ import annotations

from tests.reliability.batch_bench import Bench, bench
from tests.reliability.fuzz_stack import FuzzStack, fuzz_stack
from tests.support.stack import Stack

__all__ = ["Bench", "FuzzStack", "Stack", "bench", "fuzz_stack"]
