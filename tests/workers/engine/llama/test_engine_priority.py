"""Bulk work yields to interactive requests, in both engines (real llama.cpp)."""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from schemas.events import Done
from tests.support.tinybert import write_tiny_bert
from tests.workers.conftest import RecordingSink, prompt_tokens
from workers.engine.llama import sequence as seqs
from workers.engine.llama.admission import next_request, preempt_for_interactive
from workers.engine.llama.embedding import EmbeddingEngine, EmbedRequest, cosine
from workers.engine.llama.engine import LlamaEngine
from workers.engine.llama.model import ContextOptions, LlamaModel
from workers.engine.llama.prefix_cache import PrefixCache
from workers.engine.llama.slots import Slots
from workers.engine.llama.text import TextAssembler
from workers.engine.types import BULK, INTERACTIVE, ContextLengthExceeded, EngineRequest, Sampling

LONG = Sampling(temperature=0.0, max_tokens=300, ignore_eos=True)
SHORT = Sampling(temperature=0.0, max_tokens=5, ignore_eos=True)


class StepSink(RecordingSink):
    """Also notes the engine step of each request's first event. Tests ask for
    one token, so that event is the Done sent with the first sampled token (a
    token event could lag a step: text is held until it is valid UTF-8)."""

    def __init__(self, engine: LlamaEngine) -> None:
        super().__init__()
        self.engine = engine
        self.first_step: dict[str, int] = {}

    def publish(self, events: Sequence[tuple[str, bytes]]) -> None:
        for request_id, _ in events:
            self.first_step.setdefault(request_id, self.engine.stats.steps)
        super().publish(events)


def _bulk(engine: LlamaEngine, i: int, finished: list[str]) -> EngineRequest:
    return EngineRequest(
        f"bulk-{i}",
        prompt_tokens(engine, f"bulk line {i}"),
        LONG,
        stream=False,
        priority=BULK,
        publish=False,
        on_finish=lambda r: finished.append(r.request_id),
    )


def _until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_interactive_request_preempts_bulk_and_bulk_still_completes(
    engine: tuple[LlamaEngine, RecordingSink],
) -> None:
    eng, _ = engine
    sink = StepSink(eng)
    eng.sink = sink
    finished: list[str] = []
    # Each line reserves its prompt and 300 tokens of KV cells: one more line
    # than the cache holds, so the cache is full and a line waits.
    per_line = len(prompt_tokens(eng, "bulk line 0")) + LONG.max_tokens
    lines = eng.model.kv_cells // per_line + 1
    bulk = [_bulk(eng, i, finished) for i in range(lines)]
    eng.submit(*bulk)
    _until(lambda: eng.stats.tokens_generated >= 8 * (lines - 1))
    assert sum(r.admitted for r in bulk) == lines - 1

    # Needs as many cells as a line: only a preempted line can give them.
    interactive = EngineRequest("chat", prompt_tokens(eng, "hello there"), LONG)
    with eng._wake:  # the engine finishes at most the step under way
        before = eng.stats.steps
        eng.submit(interactive)
    assert isinstance(interactive.wait(30), Done)
    # Admitted at the next step: its first token comes with the first or
    # second step after it was submitted (one may have been under way).
    assert sink.first_step["chat"] - before <= 2
    assert eng.stats.preempted >= 1

    for request in bulk:
        result = request.wait(60)
        assert isinstance(result, Done)
        assert result.choices[0].finish_reason == "length"
        assert result.usage.completion_tokens == 300
        assert result.choices[0].text
        assert not request.admitted
    # Nothing of the bulk requests reached the sink; each ended exactly once.
    assert not any(r.request_id in sink.events for r in bulk)
    assert sorted(finished) == sorted(r.request_id for r in bulk)


def test_bulk_lines_run_on_more_sequences_than_slots(
    engine: tuple[LlamaEngine, RecordingSink],
) -> None:
    eng, _ = engine
    finished: list[str] = []
    few = Sampling(temperature=0.0, max_tokens=40, ignore_eos=True)
    bulk = [
        EngineRequest(
            f"line-{i}", prompt_tokens(eng, f"line {i}"), few, priority=BULK, publish=False
        )
        for i in range(3 * eng.n_slots)
    ]
    eng.submit(*bulk)
    most = 0

    def count() -> bool:
        nonlocal most
        most = max(most, sum(r.admitted for r in bulk))
        return all(r.finished.is_set() for r in bulk)

    _until(count)
    # bulk_parallel sequences, not the `parallel` interactive slots.
    assert most > eng.n_slots
    assert all(isinstance(r.result, Done) for r in bulk)
    assert not finished


def test_bulk_starts_at_once_on_free_slots(engine: tuple[LlamaEngine, RecordingSink]) -> None:
    eng, _ = engine
    finished: list[str] = []
    bulk = _bulk(eng, 0, finished)
    eng.submit(bulk)
    _until(lambda: eng.stats.steps >= 1)
    # 300 tokens take far more than one step: it holds its slot now.
    assert bulk.admitted and not bulk.finished.is_set()
    bulk.cancel()
    assert isinstance(bulk.wait(30), Done)
    assert finished == [bulk.request_id]


def test_bulk_line_does_not_wait_for_busy_interactive_slots(
    engine: tuple[LlamaEngine, RecordingSink],
) -> None:
    eng, _ = engine
    sink = StepSink(eng)
    eng.sink = sink
    busy = Sampling(temperature=0.0, max_tokens=60, ignore_eos=True)
    running = [
        EngineRequest(f"run-{i}", prompt_tokens(eng, f"busy {i}"), busy) for i in range(eng.n_slots)
    ]
    # Streamed and published, so its first token shows when it started.
    bulk = EngineRequest("bulk", prompt_tokens(eng, "later"), SHORT, priority=BULK)
    backlog = [
        EngineRequest(f"chat-{i}", prompt_tokens(eng, f"chat {i}"), SHORT)
        for i in range(eng.n_slots)
    ]
    eng.submit(*running)
    _until(lambda: all(r.admitted for r in running))
    eng.submit(bulk)
    for request in backlog:
        eng.submit(request)
    for request in [*running, bulk, *backlog]:
        assert isinstance(request.wait(30), Done)
    # Interactive work holds every slot and the backlog waits for one; the
    # bulk line runs on a sequence of its own meanwhile, taking nothing the
    # backlog waits for: nothing is preempted.
    assert eng.stats.preempted == 0
    assert sink.first_step["bulk"] < min(sink.first_step[r.request_id] for r in backlog)


def test_bulk_prompt_does_not_delay_an_interactive_first_token(tiny_gguf: Path) -> None:
    # Small batches: the bulk prompt needs dozens of steps to be evaluated.
    model = LlamaModel(
        tiny_gguf, ContextOptions(n_slots=2, n_ctx_per_slot=1024, n_batch=8, n_threads=1)
    )
    eng = LlamaEngine(model, RecordingSink())
    sink = StepSink(eng)
    eng.sink = sink
    try:
        tokens = prompt_tokens(eng, " ".join(["the big dog"] * 400))[:900]
        bulk = EngineRequest("bulk", tokens, SHORT, priority=BULK)
        eng.submit(bulk)
        _until(lambda: eng.stats.steps >= 1)
        chat = EngineRequest("chat", prompt_tokens(eng, "hi"), SHORT)
        with eng._wake:  # the engine finishes at most the step under way
            before = eng.stats.steps
            assert eng.stats.prompt_tokens_evaluated + 2 * model.n_batch < len(tokens)
            eng.submit(chat)
        assert isinstance(chat.wait(30), Done) and isinstance(bulk.wait(60), Done)
        # A free slot: no preemption, but its prompt went into the batch ahead
        # of the bulk prompt's chunks.
        assert sink.first_step["chat"] - before <= 2
        assert sink.first_step["bulk"] > sink.first_step["chat"]
        assert eng.stats.preempted == 0
    finally:
        eng.close()


def test_unpublished_request_sends_nothing_and_ends_once(
    engine: tuple[LlamaEngine, RecordingSink],
) -> None:
    eng, sink = engine
    tokens = prompt_tokens(eng, "the sun is big")
    published = EngineRequest("pub", tokens, SHORT, stream=False)
    eng.submit(published)
    assert isinstance(published.wait(30), Done)
    calls: list[tuple[str, bool]] = []
    # Even a streamed request: it sends no token events when unpublished.
    quiet = EngineRequest(
        "quiet",
        tokens,
        SHORT,
        stream=True,
        publish=False,
        on_finish=lambda r: calls.append((r.request_id, r.finished.is_set())),
    )
    eng.submit(quiet)
    result = quiet.wait(30)
    assert isinstance(result, Done) and isinstance(published.result, Done)
    assert result.choices[0].finish_reason == "length"
    assert result.choices[0].text and result.choices[0].text == published.result.choices[0].text
    _until(lambda: bool(calls))
    time.sleep(0.05)  # a second call would come within the same flush
    assert calls == [("quiet", True)]
    assert "quiet" not in sink.events and "pub" in sink.events


def test_a_failing_finish_callback_does_not_stop_the_engine(
    engine: tuple[LlamaEngine, RecordingSink],
) -> None:
    eng, _ = engine

    def explode(request: EngineRequest) -> None:
        raise RuntimeError("boom")

    first = EngineRequest("a", prompt_tokens(eng, "one"), SHORT, on_finish=explode)
    eng.submit(first)
    assert isinstance(first.wait(30), Done)
    second = EngineRequest("b", prompt_tokens(eng, "two"), SHORT)
    eng.submit(second)
    assert isinstance(second.wait(30), Done)


# -- the admission rules, on a real cache's accounting ------------------------


@pytest.fixture
def slots(tiny_gguf: Path) -> Iterator[Slots]:
    """Two interactive slots, three bulk sequences and 768 KV cells (llama.cpp
    rounds a cache up to a multiple of 256)."""
    options = ContextOptions(
        n_slots=2, n_ctx_per_slot=768, n_bulk=3, kv_cells=768, n_holders=2, n_threads=1
    )
    model = LlamaModel(tiny_gguf, options)
    assert model.kv_cells == 768
    try:
        yield Slots(model, PrefixCache(model, [5, 6], budget=256))
    finally:
        model.close()


def _request(
    name: str,
    arrival: int,
    priority: int = BULK,
    id_slot: int | None = None,
    max_tokens: int = 300,
) -> EngineRequest:
    # Two prompt tokens: it reserves max_tokens + 2 cells.
    sampling = Sampling(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    request = EngineRequest(
        name, [1, 2], sampling, priority=priority, publish=False, id_slot=id_slot
    )
    request.arrival = arrival
    return request


def _running(
    slots: Slots, request: EngineRequest, generated: int, reserved: int
) -> list[seqs.Sequence]:
    group = seqs.Group(request, n_generated=generated)
    assert slots.reserve(reserved)
    group.reserved = reserved
    request.admitted = True
    slot = slots.take(request)
    return [seqs.Sequence(group, 0, slot, None, 300, TextAssembler(()))]


class Releaser:
    """Ends a group the way the engine does: its sequences leave `active`,
    its slot and cells go back."""

    def __init__(self, slots: Slots, active: list[seqs.Sequence]) -> None:
        self.slots = slots
        self.active = active
        self.released: list[str] = []

    def __call__(self, group: seqs.Group) -> None:
        for seq in [s for s in self.active if s.group is group]:
            self.active.remove(seq)
            self.slots.release(seq.slot)
        self.slots.unreserve(group.reserved)
        group.reserved = 0
        self.released.append(group.request.request_id)


def test_admission_order(slots: Slots) -> None:
    bulk = _request("b", 1, max_tokens=5)
    chat = _request("c", 2, INTERACTIVE)
    # A bulk request that came first still waits behind an interactive one.
    assert next_request(collections.deque([bulk, chat]), slots) is chat
    assert next_request(collections.deque([bulk]), slots) is bulk
    # Busy interactive slots hold up interactive requests only: bulk lines
    # have sequences of their own.
    active = [*_running(slots, _request("i1", 0, INTERACTIVE), 1, 10)]
    active += _running(slots, _request("i2", 0, INTERACTIVE), 1, 10)
    assert next_request(collections.deque([chat, bulk]), slots) is bulk
    # A request pinned to a busy slot holds up nobody (llama-server's id_slot).
    for seq in active:
        slots.release(seq.slot)
    active += _running(slots, _request("i3", 0, INTERACTIVE), 1, 10)
    pinned = _request("p", 3, INTERACTIVE, id_slot=active[-1].slot, max_tokens=5)
    other = _request("o", 4, INTERACTIVE, max_tokens=5)
    assert next_request(collections.deque([pinned, other]), slots) is other
    # An interactive request short of cells holds up every later request: a
    # bulk line never takes the cells it waits for.
    assert slots.reserve(slots.free_cells() - 100)
    assert next_request(collections.deque([chat, bulk]), slots) is None


def test_nothing_is_preempted_without_need(slots: Slots) -> None:
    chat = _request("c", 2, INTERACTIVE)
    bulk = _request("b", 1)
    released = Releaser(slots, [])
    # No interactive request waiting; one that fits; nothing preemptible.
    assert preempt_for_interactive(collections.deque([bulk]), [], slots, released) == 0
    assert preempt_for_interactive(collections.deque([chat]), [], slots, released) == 0
    running = _running(slots, _request("i", 0, INTERACTIVE), 5, 250)
    assert preempt_for_interactive(collections.deque([chat]), running, slots, released) == 0
    assert released.released == []


def test_preemption_takes_least_progress_first_and_requeues_by_arrival(slots: Slots) -> None:
    b1, b2, b3, b4 = (_request(f"b{i}", i) for i in range(1, 5))
    # 600 of 768 cells held by three bulk lines.
    active = [*_running(slots, b1, 40, 200), *_running(slots, b2, 10, 200)]
    active += _running(slots, b3, 20, 200)
    c1 = _request("c1", 6, INTERACTIVE, max_tokens=500)  # needs 502 cells, 168 are free
    c2 = _request("c2", 7, INTERACTIVE)
    waiting = collections.deque([b4, c1, c2])
    release = Releaser(slots, active)
    # The two lines that generated least give their cells up; the third
    # keeps running.
    assert preempt_for_interactive(waiting, active, slots, release) == 2
    assert release.released == ["b2", "b3"]
    assert not b2.admitted and not b3.admitted and b1.admitted
    assert list(waiting) == [b2, b3, b4, c1, c2]
    assert next_request(waiting, slots) is c1


def test_no_preemption_that_would_not_make_room(slots: Slots) -> None:
    # 602 cells: 268 are free, a bulk line holds 200 and an interactive
    # request (never preempted) 300. Preempting would only idle the cache.
    wide = _request("wide", 5, INTERACTIVE, max_tokens=600)
    interactive = _running(slots, _request("i", 0, INTERACTIVE), 5, 300)
    bulk = _running(slots, _request("b", 1), 5, 200)
    active = [*interactive, *bulk]
    release = Releaser(slots, active)
    assert preempt_for_interactive(collections.deque([wide]), active, slots, release) == 0
    # Once the interactive request ended, preempting the line makes room.
    release(interactive[0].group)
    assert preempt_for_interactive(collections.deque([wide]), active, slots, release) == 1
    assert release.released == ["i", "b"]


def test_a_request_the_cache_cannot_hold_is_refused(tiny_gguf: Path) -> None:
    # A cache smaller than a context per slot (kv_cache_size): 512 cells for
    # four slots of 512 tokens.
    options = ContextOptions(n_slots=4, n_ctx_per_slot=512, kv_cells=512, n_threads=1)
    eng = LlamaEngine(LlamaModel(tiny_gguf, options), RecordingSink())
    try:
        tokens = prompt_tokens(eng, "hello")
        # Each choice fits the context; together they need more than the cache.
        per_choice = 200
        wide = Sampling(temperature=0.0, max_tokens=per_choice, n=3, ignore_eos=True)
        with pytest.raises(ContextLengthExceeded, match="KV cache"):
            eng.submit(EngineRequest("wide", tokens, wide))
        with pytest.raises(ContextLengthExceeded, match="KV cache"):
            eng.check_fits(len(tokens), per_choice, 3)
        fits = EngineRequest("fits", tokens, dataclasses.replace(wide, n=2))
        eng.submit(fits)
        result = fits.wait(30)
        assert isinstance(result, Done)
        assert result.usage.completion_tokens == 2 * per_choice
    finally:
        eng.close()


def test_embedding_engine_packs_interactive_inputs_first(tmp_path: Path) -> None:
    engine = EmbeddingEngine(
        write_tiny_bert(tmp_path / "bert.gguf"), pooling="mean", n_seq=2, n_threads=1
    )
    try:
        order: list[str] = []
        texts = ["one two", "three four", "five six", "seven eight", "nine ten"]
        bulk = EmbedRequest(
            [engine.tokenize(t) for t in texts],
            priority=BULK,
            on_finish=lambda r: order.append("bulk"),
        )
        chat = EmbedRequest(
            [engine.tokenize("hello world")], on_finish=lambda r: order.append("chat")
        )
        # Both queued before the engine thread can take anything.
        with engine._wake:
            engine.submit(bulk)
            engine.submit(chat)
        assert bulk.wait(30) and chat.wait(30)
        # The chat input went into the first decode, ahead of the bulk inputs
        # queued before it (two per decode: the bulk request took three more).
        assert order == ["chat", "bulk"]
        assert engine.stats.decodes == 3
        for text, vector in zip(texts, bulk.vectors, strict=True):
            alone = EmbedRequest([engine.tokenize(text)])
            engine.submit(alone)
            assert alone.wait(30)
            assert cosine(alone.vectors[0], vector) > 0.9999
        alone = EmbedRequest([engine.tokenize("hello world")], priority=BULK)
        engine.submit(alone)
        assert alone.wait(30)
        assert cosine(alone.vectors[0], chat.vectors[0]) > 0.9999
    finally:
        engine.close()


def test_bulk_sits_out_while_an_interactive_prompt_is_evaluated(
    engine: tuple[LlamaEngine, RecordingSink],
) -> None:
    eng, _ = engine
    finished: list[str] = []
    bulk = [_bulk(eng, i, finished) for i in range(eng.n_slots - 1)]  # one slot free
    eng.submit(*bulk)
    _until(lambda: eng.stats.tokens_generated >= 4 * len(bulk))
    generated: dict[str, int] = {}

    class TokenSink(RecordingSink):
        def publish(self, events: Sequence[tuple[str, bytes]]) -> None:
            for request_id, _ in events:
                generated.setdefault(request_id, eng.stats.tokens_generated)
            super().publish(events)

    eng.sink = TokenSink()
    # About 240 prompt tokens: several steps at n_batch 64.
    long_prompt = prompt_tokens(eng, " ".join(["the cat sat on the mat"] * 40))
    assert len(long_prompt) > 3 * eng.model.n_batch
    # One token: the Done goes out in the step that samples it.
    chat = EngineRequest("long-chat", long_prompt, Sampling(temperature=0.0, max_tokens=1))
    with eng._wake:  # the engine finishes at most the step under way
        before = eng.stats.tokens_generated
        eng.submit(chat)
    assert isinstance(chat.wait(30), Done)
    # Bulk streams advanced during at most the step already under way (one
    # token each), not during each of the prompt's steps; +1: its own token.
    assert generated["long-chat"] - before <= len(bulk) + 1
    for request in bulk:
        assert isinstance(request.wait(60), Done)
