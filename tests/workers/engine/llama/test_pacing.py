"""The bulk share of a step follows the engine's own step times, pricing a
token with logits and a prompt token apart."""

from __future__ import annotations

import itertools

import pytest

from workers.engine.llama.batch import plan
from workers.engine.llama.pacing import COLD, UNBOUNDED, Share, StepCost, StepTimes
from workers.engine.llama.sequence import Group, Sequence
from workers.engine.types import BULK, EngineRequest, Sampling

# 12 ms a step, 4 ms a token with logits, 1 ms a prompt token.
COST = StepCost(0.012, 0.004, 0.001)


def _timed(times: StepTimes, cost: StepCost, sizes: list[tuple[int, int]]) -> None:
    for outputs, inputs in sizes:
        times.record(outputs + inputs, outputs, cost.of(outputs, inputs))


MIXED = [(o, i) for o, i in itertools.product((1, 4, 8, 32), (0, 16, 100))] * 2


def test_cold_engine_gives_bulk_a_token_a_step() -> None:
    times = StepTimes()
    assert times.bulk_share(1, 1.5) == COLD
    times.record(8, 8, 0.02)
    times.record(8, 8, 0.021)  # one batch size: no line through it yet
    assert times.bulk_share(1, 1.5) == COLD


def test_fit_tells_outputs_from_prompt_tokens() -> None:
    times = StepTimes()
    _timed(times, COST, MIXED)
    fitted = times.cost()
    assert fitted is not None
    assert fitted.fixed == pytest.approx(COST.fixed)
    assert fitted.per_output == pytest.approx(COST.per_output)
    assert fitted.per_input == pytest.approx(COST.per_input)


def test_pure_generation_prices_every_token_alike() -> None:
    times = StepTimes()
    for outputs in (1, 4, 8, 32) * 4:  # no prompt token in the window
        times.record(outputs, outputs, COST.of(outputs, 0))
    fitted = times.cost()
    assert fitted is not None
    assert fitted.per_output == pytest.approx(COST.per_output)
    assert fitted.per_input == pytest.approx(COST.per_output)


@pytest.mark.parametrize("slowdown", [1.0, 1.5, 2.0])
def test_share_keeps_an_interactive_step_within_the_slowdown(slowdown: float) -> None:
    times = StepTimes()
    _timed(times, COST, MIXED)
    share = times.bulk_share(1, slowdown)
    alone = COST.of(1, 0)  # 16 ms
    assert share.seconds == pytest.approx((slowdown - 1) * alone)
    # Whatever mix the share buys, the step stays within the slowdown.
    outputs = int(share.seconds / share.per_output + 1e-9)
    assert COST.of(1 + outputs, 0) <= slowdown * alone + 1e-9
    assert COST.of(1, share.prompt_tokens(share.seconds)) <= slowdown * alone + 1e-9
    if slowdown == 1.5:  # 8 ms: two generating sequences, or eight prompt tokens
        assert (outputs, share.prompt_tokens(share.seconds)) == (2, 8)


def test_step_times_follow_the_recent_decodes() -> None:
    times = StepTimes()
    _timed(times, StepCost(0.0, 0.01, 0.005), MIXED * 8)
    slow = times.bulk_share(1, 1.5)
    _timed(times, COST, MIXED * 16)  # the machine got less busy
    fast = times.bulk_share(1, 1.5)
    assert fast.per_output < slow.per_output


# -- what plan() puts in a step beside interactive work ----------------------


def _seq(slot: int, *, bulk: bool, prompt: int, evaluated: int) -> Sequence:
    request = EngineRequest(
        f"r{slot}", list(range(prompt)), Sampling(max_tokens=8), priority=BULK if bulk else 0
    )
    group = Group(request)
    seq = Sequence(group=group, index=0, slot=slot, sampler=None, max_tokens=8, text=None)  # type: ignore[arg-type]
    seq.n_evaluated = evaluated
    return seq


def _generating(slot: int, *, bulk: bool) -> Sequence:
    return _seq(slot, bulk=bulk, prompt=4, evaluated=4)


def test_plan_spends_the_share_on_generating_bulk_lines_at_their_price() -> None:
    interactive = _generating(0, bulk=False)
    bulk = [_generating(8 + i, bulk=True) for i in range(6)]
    share = Share(seconds=0.008, per_output=0.004, per_input=0.001)
    step = plan([interactive, *bulk], 512, lambda n: share)
    assert interactive in step.stepping
    assert sum(1 for s in step.stepping if s in bulk) == 2
    assert not step.bulk_only


def test_plan_gives_a_bulk_prompt_the_tokens_the_share_pays_for() -> None:
    interactive = _generating(0, bulk=False)
    prefilling = _seq(8, bulk=True, prompt=100, evaluated=0)
    share = Share(seconds=0.008, per_output=0.004, per_input=0.001)
    step = plan([interactive, prefilling], 512, lambda n: share)
    assert step.chunks[id(prefilling)] == 8


def test_plan_fills_the_batch_without_interactive_work() -> None:
    bulk = [_generating(8 + i, bulk=True) for i in range(6)]
    prefilling = _seq(20, bulk=True, prompt=1000, evaluated=0)
    step = plan([*bulk, prefilling], 512, lambda n: Share(0.0, 1.0, 1.0))
    assert step.bulk_only
    assert all(s in step.stepping for s in bulk)
    assert step.chunks[id(prefilling)] == 512 - 6
    assert UNBOUNDED.prompt_tokens(UNBOUNDED.seconds) >= 512
