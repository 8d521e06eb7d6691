"""Nothing a request carries aborts llama.cpp, and one failing request never
takes the others with it (real llama.cpp engine, tiny model)."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest

from schemas.events import Done, ErrorEvent
from tests.workers.conftest import RecordingSink, prompt_tokens, run, text_of
from workers.engine.llama.beam import length_score
from workers.engine.llama.engine import LlamaEngine
from workers.engine.llama.limits import UnsafeValue, safe_sampling
from workers.engine.llama.sampling import GrammarError, check_grammar
from workers.engine.types import EngineRequest, Sampling

Engine = tuple[LlamaEngine, RecordingSink]
GREEDY = Sampling(temperature=0.0, max_tokens=16)
HOT = Sampling(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=24, seed=4242)


def _terminal(sink: RecordingSink, request: EngineRequest) -> list[object]:
    return [e for e in sink.events.get(request.request_id, []) if isinstance(e, Done | ErrorEvent)]


def _still_serves(eng: Engine) -> None:
    engine, sink = eng
    [request] = run(engine, ["hello world"], GREEDY)
    assert isinstance(request.result, Done)
    assert request.result.choices[0].finish_reason == "length"
    assert text_of(request, sink)


def _ids_with_piece(engine: LlamaEngine, piece: bytes) -> list[int]:
    return [t for t in range(engine.model.n_vocab) if engine.model.piece(t) == piece]


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_a_complete_grammar_ends_the_sequence_even_with_ignore_eos(
    engine: Engine, ignore_eos: bool
) -> None:
    sampling = Sampling(grammar='root ::= "a"', ignore_eos=ignore_eos, max_tokens=8)
    [request] = run(engine[0], ["x"], sampling, stream=False)
    assert isinstance(request.result, Done)
    choice = request.result.choices[0]
    assert (choice.finish_reason, choice.stop_type, choice.text) == ("stop", "eos", "a")
    _still_serves(engine)


def test_ignore_eos_still_continues_a_grammar_that_allows_more(engine: Engine) -> None:
    sampling = Sampling(grammar='root ::= "a"+', ignore_eos=True, max_tokens=6, temperature=0.0)
    [request] = run(engine[0], ["x"], sampling, stream=False)
    assert isinstance(request.result, Done)
    choice = request.result.choices[0]
    assert choice.finish_reason == "length"
    assert choice.text and set(choice.text) == {"a"}


def test_a_json_schema_grammar_with_ignore_eos_ends_with_the_object(engine: Engine) -> None:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    schema = '{"type": "object", "properties": {"a": {"const": 1}}, "required": ["a"]}'
    grammar = json_schema_to_gbnf(schema)
    sampling = Sampling(grammar=grammar, ignore_eos=True, max_tokens=200, temperature=0.0)
    [request] = run(engine[0], ["x"], sampling, stream=False)
    assert isinstance(request.result, Done)
    choice = request.result.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text is not None and choice.text.replace(" ", "").startswith('{"a":1')
    _still_serves(engine)


def test_banning_every_token_the_grammar_allows_ends_cleanly(engine: Engine) -> None:
    banned = _ids_with_piece(engine[0], b"a")
    assert banned
    sampling = Sampling(
        grammar='root ::= "a"', logit_bias=tuple((t, -math.inf) for t in banned), max_tokens=8
    )
    [request] = run(engine[0], ["x"], sampling, stream=False)
    assert isinstance(request.result, Done)
    choice = request.result.choices[0]
    assert (choice.finish_reason, choice.text) == ("stop", "")
    _still_serves(engine)


@pytest.mark.parametrize(
    ("grammar", "why"),
    [
        ("   ", "empty"),
        ('foo ::= "a"', "no `root` rule"),
        ("root ::= foo", "`foo`, which is not defined"),
        ('root ::= "abc', "never closed"),
        ("root ::= [a-", "never closed"),
        ('root ::= root "a" | "a"', "left-recursive"),
        ('root ::= "\\q"', "rejected its syntax"),
    ],
)
def test_a_grammar_that_does_not_parse_says_why(engine: Engine, grammar: str, why: str) -> None:
    with pytest.raises(GrammarError, match="could not be parsed") as info:
        check_grammar(engine[0].model.vocab, grammar)
    assert why in str(info.value)


@pytest.mark.parametrize(
    "grammar",
    [
        "root ::= " + "(" * 5000 + '"a"' + ")" * 5000,
        'root ::= "a\x00"',
        'root ::= "\ud800"',
        'root ::= "' + "a" * 300_000 + '"',
    ],
    ids=["deep", "nul", "surrogate", "huge"],
)
def test_grammars_that_would_crash_the_parser_are_refused_first(grammar: str) -> None:
    with pytest.raises(UnsafeValue) as info:
        safe_sampling(Sampling(grammar=grammar), n_vocab=100, n_ctx=512)
    assert info.value.param == "grammar"


def test_a_grammar_that_allows_no_token_ends_at_once(engine: Engine) -> None:
    # [z-a] parses but matches nothing: llama.cpp would otherwise accept a
    # token it rejected and abort.
    [request] = run(engine[0], ["x"], Sampling(grammar="root ::= [z-a]", max_tokens=4))
    assert isinstance(request.result, Done)
    assert request.result.choices[0].finish_reason == "stop"
    _still_serves(engine)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", math.nan),
        ("top_p", math.inf),
        ("min_p", -math.inf),
        ("typical_p", math.nan),
        ("repeat_penalty", math.inf),
        ("presence_penalty", math.nan),
        ("frequency_penalty", math.inf),
        ("mirostat_tau", math.nan),
        ("mirostat_eta", math.inf),
        ("length_penalty", math.nan),
        ("mirostat", 3),
        ("n", 0),
        ("repeat_last_n", -2),
        ("logit_bias", ((1, math.nan),)),
        ("logit_bias", ((1, math.inf),)),
        ("logit_bias", ((10**9, 1.0),)),
        ("logit_bias", ((-1, 1.0),)),
    ],
)
def test_values_llama_cpp_cannot_take_are_refused(field: str, value: object) -> None:
    sampling = dataclasses.replace(Sampling(), **{field: value})  # type: ignore[arg-type]
    with pytest.raises(UnsafeValue) as info:
        safe_sampling(sampling, n_vocab=100, n_ctx=512)
    assert info.value.param == field


def test_counts_beyond_the_model_are_clamped() -> None:
    sampling = Sampling(top_k=2**40, min_keep=-5, repeat_last_n=-1, logprobs=10**12)
    safe = safe_sampling(sampling, n_vocab=100, n_ctx=512)
    assert (safe.top_k, safe.min_keep, safe.repeat_last_n, safe.logprobs) == (100, 0, 512, 100)
    safe = safe_sampling(dataclasses.replace(sampling, repeat_last_n=2**31), n_vocab=100, n_ctx=512)
    assert safe.repeat_last_n == 512


def test_clamped_extremes_generate(engine: Engine) -> None:
    engine_, _ = engine
    n_vocab = engine_.model.n_vocab
    extreme = Sampling(
        top_k=2**31 - 1,
        min_keep=2**40,
        repeat_penalty=1.5,
        repeat_last_n=2**31 - 1,
        seed=2**70,
        logprobs=10**9,
        max_tokens=4,
    )
    safe = safe_sampling(extreme, n_vocab=n_vocab, n_ctx=engine_.n_ctx_per_slot)
    [request] = run(engine_, ["hello"], safe, stream=False)
    assert isinstance(request.result, Done)
    logprobs = request.result.choices[0].logprobs
    assert logprobs and len(logprobs[0]["top_logprobs"]) == n_vocab


def test_more_alternatives_than_the_vocabulary_never_raise(engine: Engine) -> None:
    engine_, _ = engine
    # Straight into the engine, unclamped: argpartition would raise here.
    sampling = Sampling(temperature=0.0, max_tokens=3, logprobs=engine_.model.n_vocab + 7)
    [request] = run(engine_, ["hello"], sampling, stream=False)
    assert isinstance(request.result, Done)
    assert request.result.choices[0].finish_reason == "length"


def test_beam_scores_never_overflow() -> None:
    assert length_score(-5.0, 10, 2000) == pytest.approx(0.0, abs=1e-300)
    assert length_score(-5.0, 10, -2000) < -1e300
    assert length_score(-5.0, 10, 1.0) == pytest.approx(-0.5)


@pytest.mark.parametrize("penalty", [2000.0, -2000.0, 1e308])
def test_extreme_length_penalties_fail_nothing(engine: Engine, penalty: float) -> None:
    engine_, _ = engine
    beam = Sampling(beam=True, n=2, length_penalty=penalty, max_tokens=6, temperature=0.0)
    beams = EngineRequest(f"beam-{time.monotonic_ns()}", prompt_tokens(engine_, "hi"), beam)
    other = EngineRequest(f"other-{time.monotonic_ns()}", prompt_tokens(engine_, "yes"), GREEDY)
    engine_.submit(beams, other)
    assert isinstance(beams.wait(30), Done)
    assert isinstance(other.wait(30), Done)
    assert beams.result is not None and len(beams.result.choices) == 2


def test_one_failing_request_fails_alone(engine: Engine) -> None:
    """A request that raises while sampling (a stop string that is no string,
    as a job from elsewhere might carry), one that raises at admission (a
    grammar llama.cpp rejects, which prepare would have refused) and one
    that raises in the beam step run beside healthy requests: each ends with
    one 500 error event; the others finish normally."""
    engine_, sink = engine
    bad = [
        dataclasses.replace(GREEDY, stop=(5,)),  # type: ignore[arg-type]
        dataclasses.replace(GREEDY, grammar="root ::= nothing"),
        dataclasses.replace(GREEDY, beam=True, n=2, stop=(5,)),  # type: ignore[arg-type]
    ]
    messages: list[str] = []
    for sampling in bad:
        failing = EngineRequest(
            f"bad-{time.monotonic_ns()}", prompt_tokens(engine_, "a b"), sampling
        )
        healthy = [
            EngineRequest(f"ok{i}-{time.monotonic_ns()}", prompt_tokens(engine_, "hello"), GREEDY)
            for i in range(2)
        ]
        engine_.submit(failing, *healthy)
        result = failing.wait(30)
        assert isinstance(result, ErrorEvent), result
        messages.append(result.message)
        assert result.status == 500
        assert "inference failed" in result.message or "could not start" in result.message
        for request in healthy:
            assert isinstance(request.wait(30), Done)
            assert len(_terminal(sink, request)) == 1
        assert len(_terminal(sink, failing)) == 1
    assert [m.split(":")[0] for m in messages] == [
        "inference failed while sampling",
        "the request could not start",
        "inference failed while beam search",
    ]
    assert sorted(engine_._slots.free) == list(range(engine_.n_slots))
    _still_serves(engine)


def test_wait_is_bounded_and_expiry_is_an_error_event(engine: Engine) -> None:
    engine_, sink = engine
    long = dataclasses.replace(GREEDY, max_tokens=400, ignore_eos=True)
    request = EngineRequest(f"slow-{time.monotonic_ns()}", prompt_tokens(engine_, "hi"), long)
    engine_.submit(request)
    started = time.monotonic()
    result = engine_.wait(request, queue_timeout=0.0, prompt_token_s=0.0, token_s=0.0)
    assert time.monotonic() - started < 5
    assert isinstance(result, ErrorEvent)
    assert (result.status, result.code) == (504, "timeout")
    assert _terminal(sink, request) == [result]
    # Within its budget the same call simply returns the answer.
    ok = EngineRequest(f"ok-{time.monotonic_ns()}", prompt_tokens(engine_, "hi"), GREEDY)
    engine_.submit(ok)
    assert isinstance(engine_.wait(ok, queue_timeout=30), Done)


def test_seeded_requests_ignore_the_cache_and_repeat_exactly(engine: Engine) -> None:
    engine_, sink = engine
    prefix = "the quick brown fox jumps over the lazy dog " * 6
    texts, cached = [], []
    for i in range(3):
        # Warm the slots with prompts sharing the seeded prompt's prefix.
        run(engine_, [prefix + f"other {i}"], GREEDY)
        [request] = run(engine_, [prefix + "question"], HOT, stream=False)
        assert isinstance(request.result, Done)
        texts.append(text_of(request, sink))
        cached.append(request.result.tokens_cached)
    assert len(set(texts)) == 1 and texts[0]
    assert cached == [0, 0, 0]
    # Unseeded, the same prompt does reuse the cache.
    [unseeded] = run(engine_, [prefix + "question"], dataclasses.replace(HOT, seed=None))
    assert isinstance(unseeded.result, Done) and unseeded.result.tokens_cached > 0


def test_requests_after_close_end_at_once(tiny_gguf) -> None:  # type: ignore[no-untyped-def]
    from workers.engine.llama.model import ContextOptions, LlamaModel

    sink = RecordingSink()
    model = LlamaModel(tiny_gguf, ContextOptions(n_slots=1, n_ctx_per_slot=256, n_batch=32))
    engine_ = LlamaEngine(model, sink)
    running = EngineRequest(
        "running",
        prompt_tokens(engine_, "hi"),
        dataclasses.replace(GREEDY, max_tokens=200, ignore_eos=True),
    )
    queued = EngineRequest("queued", prompt_tokens(engine_, "hi"), GREEDY)
    engine_.submit(running, queued)
    engine_.close()
    late = EngineRequest("late", [1, 2, 3], GREEDY)
    engine_.submit(late)
    for request in (running, queued, late):
        result = request.wait(5)
        assert result is not None, request.request_id
        assert len(_terminal(sink, request)) == 1
    assert isinstance(late.result, ErrorEvent) and late.result.status == 503


def _names(chain: object) -> list[str]:
    import llama_cpp

    return [
        llama_cpp.llama_sampler_name(llama_cpp.llama_sampler_chain_get(chain, i)).decode()
        for i in range(llama_cpp.llama_sampler_chain_n(chain))
    ]


def test_the_infill_sampler_never_sees_a_whole_large_vocabulary(engine: Engine) -> None:
    """llama.cpp's infill sampler is quadratic in its candidates: over a 262k
    vocabulary one draw takes hours. It gets at most INFILL_CANDIDATES."""
    import llama_cpp

    from workers.engine.llama.sampling import INFILL_CANDIDATES, build_chain

    vocab = engine[0].model.vocab

    def chain_of(sampling: Sampling) -> list[str]:
        chain = build_chain(sampling, vocab=vocab, n_vocab=262_144, seed=1, history=[], banned=[])
        try:
            return _names(chain)
        finally:
            llama_cpp.llama_sampler_free(chain)

    alone = Sampling(samplers=("infill", "temperature"), top_k=0)
    assert chain_of(alone) == ["top-k", "infill", "temp", "dist"]
    after_top_k = Sampling(samplers=("top_k", "infill"), top_k=INFILL_CANDIDATES // 2)
    assert chain_of(after_top_k) == ["top-k", "infill", "dist"]
    # And it generates (on the tiny model) like any other chain.
    [request] = run(engine[0], ["x"], dataclasses.replace(alone, max_tokens=4, seed=3))
    assert isinstance(request.result, Done)
