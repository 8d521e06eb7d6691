"""The prefix cache stays correct on a model with sliding-window attention
(real llama.cpp, the tiny gemma3 of tests.support.tinygemma: five layers that
attend to the last N_SWA positions, one global layer).

llama.cpp keeps a sliding-window layer's cells only while they are inside the
window of the sequence that owns them, and may overwrite the others: a cached
prefix is usable only when its holder still has the N_SWA positions before
the point where the new request continues. Every request here is checked
against the same prompt evaluated from scratch on a fresh engine.

Evaluating a prompt from a cached prefix splits it into other ubatches than
evaluating it whole, which moves the logits by a few 1e-3 (measured; the same
happens without any cache between two chunkings, see _assert_same_greedy), so
the answers are compared on their log-probabilities as well as their tokens:
equal up to TOLERANCE, and where greedy decoding picks another token, only at
a near tie. A prefix whose window is missing or wrong changes them by far more.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest

from schemas.events import ChoiceResult, Done
from tests.support.llamacpp import load
from tests.support.tinygemma import write_tiny_gemma3
from tests.support.tinymodel import _WORDS
from tests.workers.conftest import RecordingSink
from workers.engine.llama.engine import LlamaEngine
from workers.engine.llama.model import ContextOptions, LlamaModel
from workers.engine.types import EngineRequest, Sampling

N_SWA = 32
OPTIONS = ContextOptions(n_slots=4, n_ctx_per_slot=512, n_batch=64, n_threads=1)
GREEDY = Sampling(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)
UNCACHED = dataclasses.replace(GREEDY, cache_prompt=False)
# Largest log-probability difference between a cached and an uncached
# evaluation of the same prompt taken for float noise (measured: <= 3.5e-3
# on this model, ~1e-2 between two chunkings of one prompt on the tiny llama).
TOLERANCE = 0.02


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gemma3(tmp_path_factory.mktemp("gemma") / "tiny-gemma3.gguf", n_swa=N_SWA)


def _engine(path: Path, prefix_cache_tokens: int | None = None) -> LlamaEngine:
    model = LlamaModel(path, OPTIONS)
    if prefix_cache_tokens is None:
        return LlamaEngine(model, RecordingSink())
    return LlamaEngine(model, RecordingSink(), prefix_cache_tokens=prefix_cache_tokens)


@pytest.fixture
def engine(gemma_gguf: Path) -> Iterator[LlamaEngine]:
    eng = _engine(gemma_gguf)
    try:
        yield eng
    finally:
        eng.close()


def _words(n: int, seed: int) -> str:
    """`n` words of the tiny vocabulary (one token each), the same for a seed."""
    rng = np.random.default_rng(seed)
    return " ".join(str(w) for w in rng.choice(np.asarray(_WORDS), n))


def _tokens(engine: LlamaEngine, text: str) -> list[int]:
    return engine.model.tokenize(text, add_special=True)


def _run(engine: LlamaEngine, tokens: list[int], sampling: Sampling = GREEDY) -> Done:
    """Run one request alone (nothing else in its batches) and return its answer."""
    request = EngineRequest(f"swa-{time.monotonic_ns()}", tokens, sampling, stream=False)
    engine.submit(request)
    result = request.wait(timeout=120)
    assert isinstance(result, Done), result
    return result


def _fresh(path: Path, tokens: list[int], sampling: Sampling = GREEDY) -> Done:
    """The answer with nothing cached: a new engine, the prompt evaluated whole."""
    eng = _engine(path)
    try:
        result = _run(eng, tokens, dataclasses.replace(sampling, cache_prompt=False))
    finally:
        eng.close()
    assert result.tokens_cached == 0
    return result


def _choice(done: Done) -> tuple[ChoiceResult, list[dict[str, Any]]]:
    [choice] = done.choices
    assert choice.logprobs is not None
    return choice, choice.logprobs


def _top(entry: dict[str, Any]) -> dict[int, float]:
    return {int(t["id"]): float(t["logprob"]) for t in entry["top_logprobs"]}


def _assert_same_greedy(got: Done, want: Done) -> None:
    """`got` (a run that may reuse cached cells) generated what `want` (the
    prompt evaluated from scratch) did: the same tokens with log-probabilities
    within TOLERANCE. Where the tokens part, both runs must have had a near
    tie between the two (each the other's runner-up, within TOLERANCE): a
    flip that float noise explains; what follows a flip is not compared."""
    (got_choice, got_lp), (want_choice, want_lp) = _choice(got), _choice(want)
    assert len(got_lp) == len(want_lp) == GREEDY.max_tokens
    for step, (g, w) in enumerate(zip(got_lp, want_lp, strict=True)):
        where = f"token {step}: got {got_choice.text!r}, uncached {want_choice.text!r}"
        if g["id"] == w["id"]:
            assert abs(g["logprob"] - w["logprob"]) <= TOLERANCE, (where, g, w)
            continue
        g_top, w_top = _top(g), _top(w)
        assert w["id"] in g_top and g["id"] in w_top, ("not a near tie", where, g, w)
        assert abs(g_top[g["id"]] - g_top[w["id"]]) <= TOLERANCE, ("not a near tie", where, g, w)
        assert abs(w_top[w["id"]] - w_top[g["id"]]) <= TOLERANCE, ("not a near tie", where, g, w)
        return
    assert got_choice.text == want_choice.text


def _holders(engine: LlamaEngine) -> range:
    """The sequence ids of the prefix cache's holders (after every slot)."""
    first = engine.model.n_slots + engine.model.n_bulk
    return range(first, first + engine.model.n_holders)


def _longest_holder_window(engine: LlamaEngine) -> tuple[int, int]:
    """The first and last position of the sliding-window cells of the holder
    with the most positions (read while the engine is idle: llama.cpp's
    sliding-window cache is what pos_min/pos_max report)."""
    mem = engine.model.memory
    spans = [
        (int(llama_cpp.llama_memory_seq_pos_min(mem, seq_id)), int(pos_max))
        for seq_id in _holders(engine)
        if (pos_max := llama_cpp.llama_memory_seq_pos_max(mem, seq_id)) >= 0
    ]
    assert spans, "the prefix cache holds nothing"
    return max(spans, key=lambda span: span[1])


def test_the_model_has_sliding_window_and_global_layers(
    engine: LlamaEngine, gemma_gguf: Path
) -> None:
    with load(gemma_gguf, n_ctx=256) as loaded:
        assert llama_cpp.llama_model_n_swa(loaded.model) == N_SWA
    assert engine.model.n_swa == N_SWA
    assert engine.model.metadata("general.architecture") == "gemma3"
    assert engine.model.metadata("gemma3.block_count") == "6"
    # A token farther back than five window layers reach (5 x 31 positions)
    # still changes the greedy continuation: the global layer sees it.
    changed = 0
    for seed in range(4):
        tokens = _tokens(engine, _words(300, seed))
        far = list(tokens)
        far[-200] = tokens[-199]
        changed += _run(engine, tokens, UNCACHED).choices[0].text != (
            _run(engine, far, UNCACHED).choices[0].text
        )
    assert changed > 0


def test_generation_reads_as_words_and_never_ends_early(engine: LlamaEngine) -> None:
    for prompt in ("Hello world", "The cat and the dog", "I think the sun is big"):
        done = _run(engine, _tokens(engine, prompt), Sampling(temperature=0.0, max_tokens=32))
        [choice] = done.choices
        assert done.usage.completion_tokens == 32, choice
        assert choice.text is not None and len(choice.text.split()) >= 16


def test_a_prompt_inside_the_window_is_reused_by_a_longer_one(
    engine: LlamaEngine, gemma_gguf: Path
) -> None:
    short = _words(20, seed=10)
    longer = _tokens(engine, short + " " + _words(60, seed=11))
    short_tokens = _tokens(engine, short)
    assert len(short_tokens) < N_SWA < len(longer)
    assert longer[: len(short_tokens)] == short_tokens
    _assert_same_greedy(_run(engine, short_tokens), _fresh(gemma_gguf, short_tokens))
    second = _run(engine, longer)
    assert 0 < second.tokens_cached <= len(short_tokens)
    _assert_same_greedy(second, _fresh(gemma_gguf, longer))


def test_long_prompt_then_long_and_short_shares(engine: LlamaEngine, gemma_gguf: Path) -> None:
    """A prompt of 4 x N_SWA and more, then requests sharing most of it and
    only its first 40 tokens (whose window the holder has from its start)."""
    long = _tokens(engine, _words(400, seed=20))
    assert len(long) > 4 * N_SWA
    most = long[:300] + _tokens(engine, " the cat and the dog")[1:]
    start = long[:40] + _tokens(engine, " where is the big red house")[1:]
    _assert_same_greedy(_run(engine, long), _fresh(gemma_gguf, long))
    second = _run(engine, most)
    assert N_SWA < second.tokens_cached <= 300
    _assert_same_greedy(second, _fresh(gemma_gguf, most))
    third = _run(engine, start)
    assert third.tokens_cached <= 40
    _assert_same_greedy(third, _fresh(gemma_gguf, start))


def test_a_holder_that_lost_its_first_window_cells(gemma_gguf: Path) -> None:
    """llama.cpp overwrites the holder's window cells of early positions: a
    short share of it must then be evaluated, a long one is still reused.

    How the cells get there: a small prefix cache evicts the first (short)
    entry, which leaves free cells before those of the long prompt's holder;
    the next prompt takes them and goes on into the holder's cells of the
    positions its window layers no longer see, which llama.cpp reuses."""
    eng = _engine(gemma_gguf, prefix_cache_tokens=500)
    try:
        first = _tokens(eng, _words(40, seed=30))
        long = _tokens(eng, _words(400, seed=20))
        most = long[:300] + _tokens(eng, " the cat and the dog")[1:]
        filler = _tokens(eng, _words(150, seed=31))
        start = long[:40] + _tokens(eng, " where is the big red house")[1:]
        most_again = long[:300] + _tokens(eng, " and the small bird")[1:]
        answers = [_run(eng, tokens) for tokens in (first, long, most, filler)]
        # The long prompt's holder (it ends past the prompt, with what it
        # generated) has the window cells only from a later position on:
        # enough for a 300-token share, too few for a 40-token one.
        window_start, window_end = _longest_holder_window(eng)
        assert window_end >= len(long) - 1
        assert 40 - N_SWA < window_start <= 300 - N_SWA, "the holder kept its whole window"
        answers += [_run(eng, start), _run(eng, most_again)]
    finally:
        eng.close()
    cached = [a.tokens_cached for a in answers]
    assert cached[2] > N_SWA, cached
    # Not from the long prompt's holder (at most a few tokens from another).
    assert cached[4] < 40 - N_SWA, cached
    assert cached[5] > N_SWA, cached
    for tokens, answer in zip((first, long, most, filler, start, most_again), answers, strict=True):
        _assert_same_greedy(answer, _fresh(gemma_gguf, tokens))


def test_a_follow_up_after_generating_past_the_window(
    engine: LlamaEngine, gemma_gguf: Path
) -> None:
    prompt = _words(100, seed=40)
    tokens = _tokens(engine, prompt)
    long_run = dataclasses.replace(GREEDY, max_tokens=200)
    done = _run(engine, tokens, long_run)
    [choice] = done.choices
    assert done.usage.completion_tokens == 200 and choice.text is not None
    follow = _tokens(engine, prompt + choice.text + " and the small bird")
    answer = _run(engine, follow)
    # It reuses the generated tokens too, past the window after the prompt.
    assert answer.tokens_cached > len(tokens) + N_SWA, (answer.tokens_cached, len(tokens))
    _assert_same_greedy(answer, _fresh(gemma_gguf, follow))
