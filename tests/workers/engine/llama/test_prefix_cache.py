"""Shared prompt prefixes are evaluated once and reused across requests and
batch lines, within a bounded cache (real llama.cpp, tiny model)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.events import Done
from tests.workers.conftest import RecordingSink, prompt_tokens, run, text_of
from workers.engine.llama.engine import LlamaEngine
from workers.engine.llama.model import ContextOptions, LlamaModel
from workers.engine.llama.sequence import common_prefix
from workers.engine.types import BULK, EngineRequest, Sampling

Engine = tuple[LlamaEngine, RecordingSink]
GREEDY = Sampling(temperature=0.0, max_tokens=8, ignore_eos=True)
SYSTEM = " ".join(["you are a helpful house cat who likes the sun and the rain"] * 8)


def _done(request: EngineRequest) -> Done:
    assert isinstance(request.result, Done), request.result
    return request.result


def test_requests_sharing_a_system_prompt_evaluate_it_once(engine: Engine) -> None:
    eng, sink = engine
    questions = [f"{SYSTEM} what is {w}" for w in ("red", "blue", "green", "the sky", "a tree")]
    tokens = [prompt_tokens(eng, q) for q in questions]
    shared = min(common_prefix(tokens[0], t) for t in tokens[1:])
    assert shared > 100
    # Submitted together: the first evaluates the prefix, the others wait
    # for it and share its cells.
    requests = run(eng, questions, GREEDY)
    evaluated = eng.stats.prompt_tokens_evaluated
    assert evaluated == sum(len(t) for t in tokens) - sum(_done(r).tokens_cached for r in requests)
    assert evaluated < shared + sum(len(t) - shared for t in tokens) + 8
    cached = sorted(_done(r).tokens_cached for r in requests)
    assert cached[0] == 0 and all(c >= shared for c in cached[1:])
    # The reused cells give the same greedy text as evaluating all of it.
    again = run(eng, questions, dataclasses.replace(GREEDY, cache_prompt=False))
    assert all(_done(r).tokens_cached == 0 for r in again)
    for first, second in zip(requests, again, strict=True):
        assert text_of(first, sink) == text_of(second, sink)


def test_batch_lines_share_a_prefix_with_each_other_and_with_chat(engine: Engine) -> None:
    eng, _ = engine
    [chat] = run(eng, [f"{SYSTEM} hello"], GREEDY)
    before = eng.stats.prompt_tokens_evaluated
    lines = [
        EngineRequest(
            f"line-{i}",
            prompt_tokens(eng, f"{SYSTEM} line {i}"),
            GREEDY,
            stream=False,
            priority=BULK,
            publish=False,
        )
        for i in range(6)
    ]
    eng.submit(*lines)
    for line in lines:
        assert line.wait(30) is not None
    system = len(prompt_tokens(eng, SYSTEM))
    assert all(_done(line).tokens_cached >= system for line in lines)
    # Only what follows the system prompt was evaluated for the lines.
    assert eng.stats.prompt_tokens_evaluated - before <= 6 * 4
    assert _done(chat).tokens_cached == 0


def test_cache_is_bounded_and_gives_up_the_least_recently_used(tiny_gguf: Path) -> None:
    # Room for about two of these prompts with what they generate.
    options = ContextOptions(n_slots=2, n_ctx_per_slot=256, n_batch=64, n_threads=1)
    eng = LlamaEngine(LlamaModel(tiny_gguf, options), RecordingSink(), prefix_cache_tokens=100)
    try:
        words = {"a": "the cat sat on", "b": "blue green red sky", "c": "water house tree"}
        prompts = {k: " ".join([w] * 10) for k, w in words.items()}

        def cached(key: str) -> int:
            [request] = run(eng, [prompts[key]], GREEDY)
            assert eng.cache.tokens <= 100
            return _done(request).tokens_cached

        assert cached("a") == 0 and cached("b") <= 1
        assert cached("a") > 30  # a hit makes it the most recently used
        assert cached("c") <= 1  # which evicts b, not a
        assert eng.cache.evicted >= 1
        assert cached("a") > 30
        assert cached("b") <= 1
    finally:
        eng.close()


def test_a_prefix_longer_than_the_cache_is_not_kept(tiny_gguf: Path) -> None:
    options = ContextOptions(n_slots=1, n_ctx_per_slot=512, n_batch=64, n_threads=1)
    eng = LlamaEngine(LlamaModel(tiny_gguf, options), RecordingSink(), prefix_cache_tokens=0)
    try:
        run(eng, [SYSTEM], GREEDY)
        [again] = run(eng, [SYSTEM], GREEDY)
        assert _done(again).tokens_cached == 0 and eng.cache.tokens == 0
    finally:
        eng.close()


@pytest.fixture
def aborting(engine: Engine) -> Iterator[tuple[Engine, list[int]]]:
    """The engine, with every bulk-only step aborted at its first graph node
    while the list holds a positive count (as an interactive arrival would)."""
    eng, _ = engine
    left = [0]
    arm = eng._abort.arm

    def arm_and_fire() -> None:
        arm()
        if left[0] > 0:
            left[0] -= 1
            eng._abort.fire()

    eng._abort.arm = arm_and_fire  # type: ignore[method-assign]
    yield engine, left


def test_an_aborted_bulk_step_is_decoded_again_unchanged(
    aborting: tuple[Engine, list[int]],
) -> None:
    (eng, _), left = aborting
    sampling = Sampling(temperature=0.0, max_tokens=20, ignore_eos=True)

    def line(name: str) -> EngineRequest:
        tokens = prompt_tokens(eng, "the rain in the house " * 12)
        return EngineRequest(name, tokens, sampling, priority=BULK, publish=False, stream=False)

    plain = line("plain")
    eng.submit(plain)
    assert plain.wait(30) is not None
    left[0] = 6  # the prompt's step and the first tokens' steps
    aborted = line("aborted")
    eng.submit(aborted)
    assert aborted.wait(30) is not None
    assert left[0] == 0 and eng.stats.aborted >= 6
    assert _done(aborted).choices[0].text == _done(plain).choices[0].text
    assert _done(aborted).usage.completion_tokens == 20
