"""The bulk share of a step follows the engine's own step times."""

from __future__ import annotations

import pytest

from workers.engine.llama.pacing import COLD_SHARE, StepTimes


def test_cold_engine_gives_bulk_a_token_a_step() -> None:
    times = StepTimes()
    assert times.bulk_share(1, 1.5) == COLD_SHARE
    times.record(8, 0.02)
    times.record(8, 0.021)  # one batch size: no line through it yet
    assert times.bulk_share(1, 1.5) == COLD_SHARE


@pytest.mark.parametrize(("slowdown", "share"), [(1.0, 0), (1.5, 6), (2.0, 13)])
def test_share_keeps_an_interactive_step_within_the_slowdown(slowdown: float, share: int) -> None:
    times = StepTimes()
    # 12 ms a step plus 1 ms a token.
    for tokens in (1, 2, 4, 8, 16, 32) * 3:
        times.record(tokens, 0.012 + 0.001 * tokens)
    assert times.predict(10) == pytest.approx(0.022)
    # One interactive token: 13 ms alone; the share adds at most
    # (slowdown - 1) x 13 ms of tokens.
    assert times.bulk_share(1, slowdown) == share
    predicted = times.predict(1 + share)
    alone = times.predict(1)
    assert predicted is not None and alone is not None
    assert predicted <= slowdown * alone + 1e-9


def test_step_times_follow_the_recent_decodes() -> None:
    times = StepTimes()
    for tokens in (1, 8) * 20:
        times.record(tokens, 0.01 * tokens)
    slow = times.bulk_share(1, 1.5)
    for tokens in (1, 8) * 200:  # the machine got less busy: 1 ms a token
        times.record(tokens, 0.01 + 0.001 * tokens)
    assert times.bulk_share(1, 1.5) > slow
