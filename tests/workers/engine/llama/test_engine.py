"""The batching engine on a real llama.cpp context (tiny random model)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from schemas.events import Done
from tests.workers.conftest import RecordingSink, prompt_tokens, run, text_of
from workers.engine.llama.engine import LlamaEngine
from workers.engine.llama.model import ContextOptions, LlamaModel
from workers.engine.types import ContextLengthExceeded, EngineRequest, Sampling

GREEDY = Sampling(temperature=0.0, max_tokens=24)


def test_generates_until_max_tokens_and_counts_usage(
    engine: tuple[LlamaEngine, RecordingSink],
) -> None:
    eng, sink = engine
    [request] = run(eng, ["hello world"], GREEDY)
    result = request.result
    assert isinstance(result, Done)
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 24
    assert result.usage.prompt_tokens == len(prompt_tokens(eng, "hello world"))
    assert result.ttft_ms is not None and result.ttft_ms <= result.duration_ms
    text = text_of(request, sink)
    assert len(text.split()) >= 10
    # The done event is the last thing on the channel.
    assert isinstance(sink.events[request.request_id][-1], Done)


def test_non_streamed_request_gets_one_final_event(
    engine: tuple[LlamaEngine, RecordingSink],
) -> None:
    eng, sink = engine
    [streamed] = run(eng, ["the cat"], GREEDY)
    [whole] = run(eng, ["the cat"], GREEDY, stream=False)
    assert [type(e) for e in sink.events[whole.request_id]] == [Done]
    assert text_of(whole, sink) == text_of(streamed, sink)


def test_output_does_not_depend_on_the_other_sequences(
    engine: tuple[LlamaEngine, RecordingSink],
) -> None:
    eng, sink = engine
    first = run(eng, ["hello world", "the sun is big", "one two", "we can go"], GREEDY)
    second = run(eng, ["hello world", "a long time", "my old way", "what is it"], GREEDY)
    assert text_of(first[0], sink) == text_of(second[0], sink)
    # ...and the batch partners really were different.
    assert text_of(first[1], sink) != text_of(second[1], sink)


def test_batched_steps_decode_all_sequences_together(
    engine: tuple[LlamaEngine, RecordingSink],
) -> None:
    eng, sink = engine
    before = sink.steps
    run(eng, ["a", "b", "c", "d"], Sampling(temperature=0.0, max_tokens=20))
    # Four sequences of 20 tokens in about 20 steps, not 80.
    assert sink.steps - before <= 25


def test_stop_string_across_a_token_boundary(engine: tuple[LlamaEngine, RecordingSink]) -> None:
    eng, sink = engine
    [plain] = run(eng, ["hello world"], GREEDY)
    pieces = sink.pieces(plain.request_id)
    full = "".join(pieces)
    # The end of the 5th piece plus the start of the 6th.
    boundary = len("".join(pieces[:5]))
    stop = full[boundary - 2 : boundary + 2]
    assert stop not in full[: boundary - 2]
    [stopped] = run(eng, ["hello world"], Sampling(temperature=0.0, max_tokens=24, stop=(stop,)))
    result = stopped.result
    assert isinstance(result, Done) and result.choices[0].finish_reason == "stop"
    streamed = sink.pieces(stopped.request_id)
    assert "".join(streamed) == full[: boundary - 2]
    # No partial stop string ever went out.
    assert all(stop[:2] not in p for p in streamed[-2:])


def test_seed_makes_sampling_reproducible(engine: tuple[LlamaEngine, RecordingSink]) -> None:
    eng, sink = engine
    sampling = Sampling(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=24, seed=7)
    a, b = run(eng, ["hello", "hello"], sampling)
    [c] = run(eng, ["hello"], dataclasses.replace(sampling, seed=8))
    assert text_of(a, sink) == text_of(b, sink)
    assert text_of(a, sink) != text_of(c, sink)


def test_top_k_one_equals_greedy(engine: tuple[LlamaEngine, RecordingSink]) -> None:
    eng, sink = engine
    [greedy] = run(eng, ["hello"], GREEDY)
    [top1] = run(eng, ["hello"], Sampling(temperature=1.5, top_k=1, max_tokens=24, seed=3))
    [hot] = run(
        eng, ["hello"], Sampling(temperature=1.5, top_k=0, top_p=1.0, max_tokens=24, seed=3)
    )
    assert text_of(top1, sink) == text_of(greedy, sink)
    assert text_of(hot, sink) != text_of(greedy, sink)


def test_long_prompt_is_evaluated_in_chunks(engine: tuple[LlamaEngine, RecordingSink]) -> None:
    eng, sink = engine
    long_prompt = " ".join(["the big dog"] * 60)
    tokens = prompt_tokens(eng, long_prompt)
    assert len(tokens) > 64 * 2  # more than two batches of 64
    before = sink.steps
    [request] = run(eng, [long_prompt], Sampling(temperature=0.0, max_tokens=4))
    assert isinstance(request.result, Done)
    assert request.result.usage.prompt_tokens == len(tokens)
    assert sink.steps - before >= 3


def test_prompt_that_does_not_fit_is_rejected(engine: tuple[LlamaEngine, RecordingSink]) -> None:
    eng, _ = engine
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 512"):
        eng.check_fits(600, None)
    with pytest.raises(ContextLengthExceeded):
        eng.check_fits(100, 500)
    eng.check_fits(100, 412)


def test_cancel_frees_the_slot_for_a_waiting_request(tiny_gguf: Path) -> None:
    sink = RecordingSink()
    model = LlamaModel(tiny_gguf, ContextOptions(n_slots=1, n_ctx_per_slot=4096, n_threads=1))
    eng = LlamaEngine(model, sink)
    try:
        long = EngineRequest("long", prompt_tokens(eng, "hello"), Sampling(temperature=0.0))
        short = EngineRequest(
            "short", prompt_tokens(eng, "world"), Sampling(temperature=0.0, max_tokens=5)
        )
        eng.submit(long)
        eng.submit(short)
        time.sleep(0.2)
        assert not short.finished.is_set()  # the only slot is busy
        long.cancel()
        assert isinstance(long.wait(timeout=10), Done)
        assert long.result is not None and long.result.choices[0].finish_reason == "cancelled"
        assert isinstance(short.wait(timeout=10), Done)
        assert short.result is not None and short.result.choices[0].finish_reason == "length"
    finally:
        eng.close()
