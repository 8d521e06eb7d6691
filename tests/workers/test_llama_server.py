"""What llama-server compatibility needs from the engine and the worker: why a
choice stopped, the slot it ran on (and id_slot pinning), prompt timing,
n_predict 0, a sampler order, and prompts as token ids or FIM layouts."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.events import ChoiceResult, Done
from schemas.jobs import GenerateJob, InfillChunk, InfillInput
from tests.support.tinymodel import BOS_TOKEN, BOS_TOKEN_ID, FIM_TOKENS
from tests.workers.conftest import RecordingSink, prompt_tokens, run, text_of
from workers.engine.llama.engine import LlamaEngine
from workers.engine.llama.model import ContextOptions, LlamaModel
from workers.engine.types import EngineRequest, InvalidSlot, Sampling
from workers.llama_server import (
    LlamaPromptError,
    completion_tokens,
    detokenize,
    infill_tokens,
    llama_tokens,
)

Engine = tuple[LlamaEngine, RecordingSink]
GREEDY = Sampling(temperature=0.0, max_tokens=12)
HOT = Sampling(temperature=1.5, top_k=1, top_p=1.0, min_p=0.0, max_tokens=12, seed=3)


def _choice(request: EngineRequest) -> ChoiceResult:
    assert isinstance(request.result, Done)
    return request.result.choices[0]


@pytest.mark.parametrize("stream", [True, False])
def test_choices_say_why_they_stopped(engine: Engine, stream: bool) -> None:
    eng, sink = engine
    [limited] = run(eng, ["hello world"], GREEDY, stream=stream)
    assert (_choice(limited).stop_type, _choice(limited).stopping_word) == ("limit", None)
    text = text_of(limited, sink)
    stop = text.split()[3]
    [worded] = run(eng, ["hello world"], dataclasses.replace(GREEDY, stop=("zzz", stop)), stream)
    choice = _choice(worded)
    assert (choice.finish_reason, choice.stop_type, choice.stopping_word) == ("stop", "word", stop)
    assert text_of(worded, sink) == text[: text.index(stop)]
    # Once the grammar is complete only an end-of-generation token may follow.
    grammar = dataclasses.replace(GREEDY, grammar='root ::= " hello world"')
    [ended] = run(eng, ["hello world"], grammar, stream)
    assert (_choice(ended).finish_reason, _choice(ended).stop_type) == ("stop", "eos")
    assert text_of(ended, sink) == " hello world"


def test_the_result_names_the_slot_and_the_prompt_time(engine: Engine) -> None:
    eng, _ = engine
    [request] = run(eng, ["the big dog " * 20], GREEDY)
    assert isinstance(request.result, Done)
    done = request.result
    assert done.choices[0].slot in range(eng.n_slots)
    assert done.prompt_ms is not None and done.ttft_ms is not None
    assert 0 < done.prompt_ms <= done.ttft_ms <= done.duration_ms


def test_id_slot_runs_there_and_waits_for_it_alone(engine: Engine) -> None:
    eng, _ = engine
    tokens = prompt_tokens(eng, "hello")
    long = EngineRequest("long", tokens, Sampling(temperature=0.0, max_tokens=400), id_slot=2)
    pinned = EngineRequest("pinned", tokens, GREEDY, id_slot=2)
    free = EngineRequest("free", tokens, GREEDY)
    eng.submit(long)
    eng.submit(pinned)
    eng.submit(free)
    # The unpinned request is not held up by the one waiting for slot 2.
    assert free.wait(timeout=30) is not None
    assert not pinned.finished.is_set()
    assert _choice(free).slot != 2
    assert pinned.wait(timeout=60) is not None and long.finished.is_set()
    assert _choice(long).slot == 2 and _choice(pinned).slot == 2
    with pytest.raises(InvalidSlot):
        eng.submit(EngineRequest("bad", tokens, GREEDY, id_slot=eng.n_slots))


def test_n_predict_zero_evaluates_the_prompt_only(engine: Engine) -> None:
    eng, sink = engine
    [request] = run(eng, ["hello world"], dataclasses.replace(GREEDY, max_tokens=0))
    assert isinstance(request.result, Done)
    assert request.result.usage.completion_tokens == 0
    assert _choice(request).stop_type == "limit" and text_of(request, sink) == ""


def _texts(eng: Engine, sampling: Sampling, seeds: range) -> set[str]:
    engine, sink = eng
    out = set()
    for seed in seeds:
        [request] = run(engine, ["hello world"], dataclasses.replace(sampling, seed=seed))
        out.add(text_of(request, sink))
    return out


def test_samplers_run_in_the_given_order_and_only_those(engine: Engine) -> None:
    [greedy] = _texts(engine, GREEDY, range(1))
    # top_k=1 makes any temperature greedy: when top_k is in the chain...
    assert _texts(
        engine, dataclasses.replace(HOT, samplers=("top_k", "temperature")), range(3)
    ) == {greedy}
    assert _texts(engine, HOT, range(3)) == {greedy}
    # ...and not when the chain leaves it out.
    unranked = _texts(engine, dataclasses.replace(HOT, samplers=("temperature",)), range(3))
    assert len(unranked) == 3 and greedy not in unranked
    # Temperature 0 in the chain keeps only the likeliest token.
    cold = dataclasses.replace(HOT, temperature=0.0, top_k=0, samplers=("temperature",))
    assert _texts(engine, cold, range(2)) == {greedy}


def test_prompt_parts_tokenize_like_llama_server(engine: Engine) -> None:
    model = engine[0].model
    plain = model.tokenize("hello world", add_special=True)
    assert plain[0] == BOS_TOKEN_ID
    # SentencePiece adds the word-boundary space itself: "world" is "▁world".
    world = model.tokenize("world", add_special=False)
    # A leading string gets the BOS; token ids go in as they are.
    assert completion_tokens(model, ["hello", *world]) == plain
    assert completion_tokens(model, plain) == plain
    assert completion_tokens(model, plain[1:]) == plain[1:]
    # A prompt that writes its BOS itself gets no second one.
    assert completion_tokens(model, [BOS_TOKEN + "hello world"]) == plain
    assert detokenize(model, plain) == BOS_TOKEN + " hello world"


def _job(**fields: object) -> GenerateJob:
    return GenerateJob.model_validate(
        {"request_id": "r", "model": "tiny", "endpoint": "llama.completion", **fields}
    )


def test_bad_prompts_and_slots_are_rejected(engine: Engine) -> None:
    eng, _ = engine
    with pytest.raises(LlamaPromptError, match="not in the vocabulary") as bad:
        llama_tokens(eng, _job(prompt_parts=[1, 10**6]))
    assert bad.value.param == "prompt"
    with pytest.raises(LlamaPromptError, match="id_slot 9") as slot:
        llama_tokens(eng, _job(prompt_parts=["hi"], id_slot=9))
    assert slot.value.param == "id_slot"
    with pytest.raises(LlamaPromptError) as no_fim:
        llama_tokens(eng, _job(infill=InfillInput(input_prefix=["a"])))
    assert no_fim.value.code == "infill_not_supported"


@pytest.fixture
def fim_engine(tiny_fim_gguf: Path) -> Iterator[LlamaEngine]:
    model = LlamaModel(tiny_fim_gguf, ContextOptions(n_slots=2, n_ctx_per_slot=1024, n_threads=1))
    engine = LlamaEngine(model, RecordingSink())
    yield engine
    engine.close()


def test_infill_layout(fim_engine: LlamaEngine) -> None:
    model = fim_engine.model

    def special(text: str) -> int:
        [token] = model.tokenize(text, add_special=False, parse_special=True)
        return token

    pre, suf, mid, _, repo, sep = (special(t) for t in FIM_TOKENS)

    def words(text: str) -> list[int]:
        return model.tokenize(text, add_special=False, parse_special=False)

    infill = InfillInput(
        input_prefix=["the big"],
        input_suffix=["the end"],
        input_extra=[InfillChunk(filename="a.txt", text="one two")],
        prompt=" dog",
    )
    tokens = infill_tokens(model, infill, n_batch=512, n_ctx=1024, n_predict=16)
    extra = [repo, *words("myproject\n"), sep, *words("a.txt\n"), *words("one two")]
    extra += [sep, *words("filename\n")]
    middle = [BOS_TOKEN_ID, pre, *words("the big"), *words(" dog"), suf, *words("the end"), mid]
    assert tokens == extra + middle
    # Only the end of a long prefix and the start of a long suffix are kept.
    long = InfillInput(input_prefix=["one " * 200], input_suffix=["two " * 200])
    cut = infill_tokens(model, long, n_batch=64, n_ctx=64, n_predict=-1)
    # Extra context gets what the context leaves: 64 - 64 + 2 tokens here.
    assert cut[:2] == [sep, *words("filename\n")][-2:]
    assert cut[2:4] == [BOS_TOKEN_ID, pre] and cut[-1] == mid
    assert cut[4 : cut.index(suf)] == words("one " * 200)[-48:]  # 3/4 of a batch
    assert cut[cut.index(suf) + 1 : -1] == words("two " * 200)[: 16 - 2]  # 1/4, less 2
    # The whole job goes through the engine and generates.
    job = _job(endpoint="llama.infill", infill=infill)
    request = EngineRequest("infill", llama_tokens(fim_engine, job), GREEDY)
    fim_engine.submit(request)
    assert isinstance(request.wait(timeout=30), Done)
    assert _choice(request).stop_type == "limit"
