"""The engines' counters and gauges (what their heartbeat reports and
GET /metrics shows as llama.cpp's names), on real llama.cpp."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from schemas.events import Done
from tests.support.tinybert import write_tiny_bert
from tests.workers.conftest import RecordingSink, prompt_tokens, run
from workers.engine.llama.embedding import EmbeddingEngine, EmbedRequest
from workers.engine.llama.engine import LlamaEngine
from workers.engine.types import EngineRequest, Sampling

SHORT = Sampling(temperature=0.0, max_tokens=16, ignore_eos=True)
LONG = Sampling(temperature=0.0, max_tokens=400, ignore_eos=True)


def _until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)


def test_counters_add_up_to_what_the_requests_report(
    engine: tuple[LlamaEngine, RecordingSink],
) -> None:
    eng, _ = engine
    before = eng.metrics()
    started = time.perf_counter()
    requests = run(eng, ["hello world", "the sun is big today", "one two three"], SHORT)
    wall = time.perf_counter() - started
    after = eng.metrics()
    results = [r.result for r in requests]
    assert all(isinstance(r, Done) for r in results)
    done = [r for r in results if isinstance(r, Done)]
    completion = sum(r.usage.completion_tokens for r in done)
    evaluated = sum(r.usage.prompt_tokens - r.tokens_cached for r in done)
    assert completion == 3 * 16
    assert after.predicted_tokens - before.predicted_tokens == completion
    assert after.prompt_tokens - before.prompt_tokens == evaluated
    # Three sequences decoded together: about one decode per token, not three.
    decodes = after.decodes - before.decodes
    assert 16 <= decodes <= 24
    busy = (after.busy_slots - before.busy_slots) / decodes
    assert 1 < busy <= 3
    # Time is counted per sequence: positive, and never more than three
    # sequences' worth of the wall time the requests took.
    predicted = after.predicted_seconds - before.predicted_seconds
    prompt = after.prompt_seconds - before.prompt_seconds
    assert 0 < predicted <= 3 * wall
    assert 0 < prompt <= 3 * wall
    assert predicted + prompt <= 3 * wall
    # The slots keep their prompts and answers cached once the requests end.
    assert after.kv_capacity == eng.n_slots * eng.n_ctx_per_slot
    held = sum(r.usage.prompt_tokens + r.usage.completion_tokens for r in done)
    assert sum(r.usage.prompt_tokens for r in done) <= after.kv_tokens <= held
    assert after.processing == 0 and after.deferred == 0


def test_requests_processing_and_deferred_while_the_slots_are_full(
    engine: tuple[LlamaEngine, RecordingSink],
) -> None:
    eng, _ = engine
    assert eng.n_slots == 4
    # Two choices take two slots but are one request; two more fill the
    # slots, the last two wait.
    two = Sampling(temperature=0.8, max_tokens=400, ignore_eos=True, n=2)
    requests = [EngineRequest("both", prompt_tokens(eng, "pick two"), two)] + [
        EngineRequest(f"r{i}", prompt_tokens(eng, f"request {i}"), LONG) for i in range(4)
    ]
    eng.submit(*requests)
    try:
        _until(lambda: (eng.metrics().processing, eng.metrics().deferred) == (3, 2))
        # Four sequences in slots: every decode has all four busy.
        before = eng.metrics()
        _until(lambda: eng.metrics().decodes >= before.decodes + 5)
        after = eng.metrics()
        decodes = after.decodes - before.decodes
        assert (after.busy_slots - before.busy_slots) / decodes == 4
        assert after.kv_tokens > before.kv_tokens
        assert 0 < after.kv_tokens / after.kv_capacity < 1
    finally:
        for request in requests:
            eng.cancel(request)
        for request in requests:
            assert request.wait(timeout=60)
    _until(lambda: (eng.metrics().processing, eng.metrics().deferred) == (0, 0))


def test_embedding_engine_counts_tokens_and_decodes(tmp_path: Path) -> None:
    path = write_tiny_bert(tmp_path / "bert.gguf")
    embedder = EmbeddingEngine(path, pooling="mean", n_batch=512, n_seq=16, n_threads=1)
    try:
        before = embedder.metrics()
        inputs = [embedder.tokenize(t) for t in ("hello world", "the cat sat", "we go")]
        request = EmbedRequest(inputs)
        embedder.submit(request)
        assert request.wait(30) and request.error is None
        after = embedder.metrics()
        assert after.prompt_tokens - before.prompt_tokens == sum(len(i) for i in inputs)
        assert after.decodes - before.decodes == 1
        assert after.busy_slots - before.busy_slots == 3
        assert after.deferred == 0
        # It generates nothing.
        assert after.predicted_tokens == 0 and after.kv_capacity == 0
    finally:
        embedder.close()
