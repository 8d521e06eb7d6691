"""Beam search on the real engine (tiny model)."""

from __future__ import annotations

import dataclasses

from schemas.events import Done
from tests.workers.conftest import RecordingSink, run
from workers.engine.llama.engine import LlamaEngine
from workers.engine.types import Sampling

Engine = tuple[LlamaEngine, RecordingSink]
BEAM = Sampling(temperature=0.0, max_tokens=8, n=3, beam=True, early_stopping="never")


def test_beams_are_ranked_distinct_and_beat_greedy(engine: Engine) -> None:
    eng, _ = engine
    [request] = run(eng, ["hello world"], BEAM, stream=False)
    result = request.result
    assert isinstance(result, Done)
    assert len(result.choices) == 3
    texts = [c.text for c in result.choices]
    assert len(set(texts)) == 3
    scores = [c.cumulative_logprob for c in result.choices]
    assert all(s is not None for s in scores)
    assert scores == sorted(scores, reverse=True)  # type: ignore[type-var]
    assert all(c.finish_reason == "length" for c in result.choices)
    assert result.usage.completion_tokens == 3 * 8
    # The best beam is at least as likely as the greedy continuation.
    [greedy] = run(
        eng, ["hello world"], Sampling(temperature=0.0, max_tokens=8, logprobs=0), stream=False
    )
    assert isinstance(greedy.result, Done) and greedy.result.choices[0].logprobs
    greedy_score = sum(e["logprob"] for e in greedy.result.choices[0].logprobs)
    assert scores[0] >= greedy_score - 1e-3  # type: ignore[operator]


def test_beam_search_is_deterministic_and_one_beam_is_greedy(engine: Engine) -> None:
    eng, _ = engine
    [a] = run(eng, ["the big dog"], BEAM, stream=False)
    [b] = run(eng, ["the big dog"], BEAM, stream=False)
    assert isinstance(a.result, Done) and isinstance(b.result, Done)
    assert [c.text for c in a.result.choices] == [c.text for c in b.result.choices]
    one = dataclasses.replace(BEAM, n=1)
    [single] = run(eng, ["the big dog"], one, stream=False)
    [greedy] = run(eng, ["the big dog"], Sampling(temperature=0.0, max_tokens=8), stream=False)
    assert isinstance(single.result, Done) and isinstance(greedy.result, Done)
    assert single.result.choices[0].text == greedy.result.choices[0].text


def test_beam_search_uses_parallel_slots_and_frees_them(engine: Engine) -> None:
    eng, _ = engine
    before = eng.stats.steps
    [request] = run(eng, ["one two"], dataclasses.replace(BEAM, n=4, max_tokens=6), stream=False)
    assert isinstance(request.result, Done)
    # Prompt + 6 tokens for 4 beams: a handful of steps, not 4 x 6.
    assert eng.stats.steps - before <= 8
    # All four slots are free again: four plain requests run at once.
    follow = run(eng, ["a", "b", "c", "d"], Sampling(temperature=0.0, max_tokens=2))
    assert all(isinstance(r.result, Done) for r in follow)


def test_beams_that_leave_no_continuation_are_dropped(engine: Engine) -> None:
    eng, _ = engine
    # Most words hold one of these letters: most candidates end as finished
    # hypotheses, leaving fewer live continuations than beams.
    stops = ("e", "a", "o")
    [request] = run(
        eng,
        ["hello world"],
        dataclasses.replace(BEAM, n=4, max_tokens=6, stop=stops),
        stream=False,
    )
    result = request.result
    assert isinstance(result, Done), result
    texts = [c.text for c in result.choices if c.text]
    assert texts and all(not any(s in t for s in stops) for t in texts)
    # The engine is still healthy afterwards.
    [after] = run(eng, ["one two"], Sampling(temperature=0.0, max_tokens=3))
    assert isinstance(after.result, Done)
