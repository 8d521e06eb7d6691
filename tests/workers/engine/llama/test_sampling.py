"""Every sampling option has an observable effect (real llama.cpp, tiny model)."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest

from schemas.events import Done
from tests.workers.conftest import RecordingSink, prompt_tokens, run, text_of
from workers.engine.llama.engine import LlamaEngine
from workers.engine.llama.sampling import GrammarError, check_grammar
from workers.engine.llama.sequence import common_prefix
from workers.engine.types import EngineRequest, Sampling

Engine = tuple[LlamaEngine, RecordingSink]
GREEDY = Sampling(temperature=0.0, max_tokens=24)
HOT = Sampling(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=24, seed=1)


def _texts(eng: Engine, sampling: Sampling, prompt: str = "hello world", k: int = 1) -> list[str]:
    engine, sink = eng
    return [text_of(r, sink) for r in run(engine, [prompt] * k, sampling)]


def _seeds(eng: Engine, sampling: Sampling, seeds: range) -> set[str]:
    return {_texts(eng, dataclasses.replace(sampling, seed=s))[0] for s in seeds}


def test_temperature_zero_is_greedy_and_heat_varies(engine: Engine) -> None:
    greedy = _texts(engine, GREEDY)[0]
    assert _texts(engine, GREEDY)[0] == greedy
    assert len(_seeds(engine, HOT, range(4))) == 4
    assert greedy not in _seeds(engine, HOT, range(4))


@pytest.mark.parametrize(
    "narrow",
    [
        {"top_k": 1},
        {"top_p": 0.0001},
        {"min_p": 1.0},
    ],
)
def test_truncation_samplers_narrow_to_the_top_token(
    engine: Engine, narrow: dict[str, float]
) -> None:
    greedy = _texts(engine, GREEDY)[0]
    narrowed = dataclasses.replace(HOT, **narrow)  # type: ignore[arg-type]
    assert _seeds(engine, narrowed, range(3)) == {greedy}


def test_typical_p_keeps_one_token_whatever_the_seed(engine: Engine) -> None:
    typical = dataclasses.replace(HOT, typical_p=0.0001)
    assert len(_seeds(engine, typical, range(3))) == 1
    assert len(_seeds(engine, HOT, range(3))) == 3


def test_min_keep_keeps_candidates_that_top_p_would_drop(engine: Engine) -> None:
    narrow = dataclasses.replace(HOT, top_p=0.0001)
    assert len(_seeds(engine, narrow, range(3))) == 1
    assert len(_seeds(engine, dataclasses.replace(narrow, min_keep=50), range(3))) == 3


def _repeats(text: str) -> int:
    words = text.split()
    return len(words) - len(set(words))


@pytest.mark.parametrize(
    "penalty",
    [
        {"repeat_penalty": 3.0, "repeat_last_n": 64},
        {"presence_penalty": 2.0},
        {"frequency_penalty": 2.0},
    ],
)
def test_penalties_reduce_repetition(engine: Engine, penalty: dict[str, float]) -> None:
    long = dataclasses.replace(GREEDY, max_tokens=60)
    plain = _texts(engine, long)[0]
    assert _repeats(plain) > 5  # the tiny model loops without a penalty
    penalised = _texts(engine, dataclasses.replace(long, **penalty))[0]  # type: ignore[arg-type]
    assert _repeats(penalised) < _repeats(plain)


def test_repeat_last_n_zero_disables_the_penalty(engine: Engine) -> None:
    long = dataclasses.replace(GREEDY, max_tokens=60)
    off = dataclasses.replace(long, repeat_penalty=3.0, repeat_last_n=0)
    assert _texts(engine, off)[0] == _texts(engine, long)[0]


@pytest.mark.parametrize("mode", [1, 2])
def test_mirostat_is_seeded_and_differs_from_plain_sampling(engine: Engine, mode: int) -> None:
    miro = dataclasses.replace(HOT, mirostat=mode, mirostat_tau=3.0, mirostat_eta=0.2)
    first = _texts(engine, miro)[0]
    assert _texts(engine, miro)[0] == first
    assert first != _texts(engine, HOT)[0]
    low = dataclasses.replace(miro, mirostat_tau=0.01)
    # A tiny target surprise leaves (almost) only the top token: near greedy.
    assert _texts(engine, low)[0].split()[:3] == _texts(engine, GREEDY)[0].split()[:3]


def test_logit_bias_bans_and_forces_tokens(engine: Engine) -> None:
    eng, _ = engine
    greedy = _texts(engine, GREEDY)[0]
    first_word = greedy.split()[0]
    first_tokens = eng.model.tokenize(first_word, add_special=False)
    banned = dataclasses.replace(GREEDY, logit_bias=tuple((t, -math.inf) for t in first_tokens))
    assert _texts(engine, banned)[0].split()[0] != first_word
    # SentencePiece adds the leading space itself: "world" is the piece " world".
    [forced_token] = eng.model.tokenize("world", add_special=False)
    forced = dataclasses.replace(GREEDY, max_tokens=5, logit_bias=((forced_token, 50.0),))
    assert _texts(engine, forced)[0] == " world" * 5


def test_ignore_eos_keeps_generating_past_the_end_token(engine: Engine) -> None:
    eng, sink = engine
    eos = eng.model.eog_tokens()
    assert eos
    to_eos = dataclasses.replace(GREEDY, logit_bias=tuple((t, 100.0) for t in eos))
    [stops] = run(eng, ["hello"], to_eos)
    assert isinstance(stops.result, Done)
    assert stops.result.choices[0].finish_reason == "stop"
    assert stops.result.usage.completion_tokens == 0
    [keeps] = run(eng, ["hello"], dataclasses.replace(to_eos, ignore_eos=True))
    assert isinstance(keeps.result, Done)
    assert keeps.result.choices[0].finish_reason == "length"
    assert keeps.result.usage.completion_tokens == 24
    assert text_of(keeps, sink)


def test_grammar_constrains_the_output(engine: Engine) -> None:
    grammar = 'root ::= ("yes" | "no") ", " ("red" | "blue") "."'
    sampling = dataclasses.replace(HOT, grammar=grammar, max_tokens=40)
    for text in _seeds(engine, sampling, range(4)):
        assert re.fullmatch(r"(yes|no), (red|blue)\.", text), text
    with pytest.raises(GrammarError):
        check_grammar(engine[0].model.vocab, "root ::= (")


def test_json_schema_output_parses(engine: Engine) -> None:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    schema = {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "color": {"enum": ["red", "green"]},
            "tag": {"type": "string", "maxLength": 4},
        },
        "required": ["ok", "color", "tag"],
    }
    grammar = json_schema_to_gbnf(json.dumps(schema))
    sampling = dataclasses.replace(HOT, grammar=grammar, max_tokens=120)
    engine_, sink = engine
    for request in run(engine_, ["hello"] * 3, sampling):
        assert isinstance(request.result, Done)
        assert request.result.choices[0].finish_reason == "stop"
        value = json.loads(text_of(request, sink))
        assert set(value) == {"ok", "color", "tag"}
        assert value["color"] in ("red", "green") and len(value["tag"]) <= 4


def test_logprobs_of_chosen_and_alternative_tokens(engine: Engine) -> None:
    eng, _ = engine
    [request] = run(
        eng, ["hello"], dataclasses.replace(GREEDY, max_tokens=6, logprobs=3), stream=False
    )
    assert isinstance(request.result, Done)
    entries = request.result.choices[0].logprobs
    assert entries is not None and len(entries) == 6
    assert "".join(e["token"] for e in entries) == request.result.choices[0].text
    for entry in entries:
        assert entry["logprob"] <= 0
        top = entry["top_logprobs"]
        assert len(top) == 3
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        # Greedy picks the most likely token.
        assert top[0]["id"] == entry["id"]
        assert math.isclose(top[0]["logprob"], entry["logprob"])
    [plain] = run(eng, ["hello"], dataclasses.replace(GREEDY, max_tokens=6), stream=False)
    assert isinstance(plain.result, Done) and plain.result.choices[0].logprobs is None


def test_n_choices_share_one_prompt_evaluation(engine: Engine) -> None:
    eng, sink = engine
    prompt = "the big dog " * 5
    n_prompt = len(prompt_tokens(eng, prompt))
    before = eng.stats.prompt_tokens_evaluated
    sampling = dataclasses.replace(HOT, n=3, max_tokens=10, cache_prompt=False)
    request = EngineRequest("n3", prompt_tokens(eng, prompt), sampling)
    eng.submit(request)
    result = request.wait(30)
    assert isinstance(result, Done)
    assert eng.stats.prompt_tokens_evaluated - before == n_prompt
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert result.usage.prompt_tokens == n_prompt
    assert result.usage.completion_tokens == 30
    texts = {
        "".join(e.text for e in sink.events["n3"] if getattr(e, "index", -1) == i) for i in range(3)
    }
    assert len(texts) == 3  # seeds seed+0, seed+1, seed+2


def test_cached_prefix_is_not_evaluated_again(engine: Engine) -> None:
    eng, _ = engine
    prompt = " ".join(["the big dog"] * 10)
    longer = prompt + " and the cat"
    a, b = prompt_tokens(eng, prompt), prompt_tokens(eng, longer)
    shared = common_prefix(a, b)
    assert shared >= len(a) - 1
    run(eng, [prompt], GREEDY)
    before = eng.stats.prompt_tokens_evaluated
    [second] = run(eng, [longer], GREEDY)
    assert isinstance(second.result, Done)
    assert second.result.tokens_cached == shared
    assert eng.stats.prompt_tokens_evaluated - before == len(b) - shared
    before = eng.stats.prompt_tokens_evaluated
    [third] = run(eng, [longer], dataclasses.replace(GREEDY, cache_prompt=False))
    assert isinstance(third.result, Done) and third.result.tokens_cached == 0
    assert eng.stats.prompt_tokens_evaluated - before == len(b)


def test_same_prompt_again_reuses_all_but_the_last_token(engine: Engine) -> None:
    eng, sink = engine
    prompt = " ".join(["one two"] * 8)
    [first] = run(eng, [prompt], GREEDY)
    [again] = run(eng, [prompt], GREEDY)
    assert isinstance(again.result, Done)
    assert again.result.tokens_cached == len(prompt_tokens(eng, prompt)) - 1
    # Reusing the cache does not change what greedy decoding produces.
    assert text_of(again, sink) == text_of(first, sink)
