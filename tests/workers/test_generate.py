"""prepare() refuses, as a 400, whatever llama.cpp cannot take: jobs are built
here without pydantic's checks, as a job from another API version (or a
batch line) could arrive (real llama.cpp vocabulary and grammar parser)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from schemas.jobs import GenerateJob
from schemas.sampling import SamplingOptions
from tests.workers.conftest import RecordingSink, make_runtime
from workers.engine.llama.engine import LlamaEngine
from workers.generate import Rejected, WorkerRuntime, prepare


@pytest.fixture
def runtime(engine: tuple[LlamaEngine, RecordingSink]) -> WorkerRuntime:
    return make_runtime(engine[0])


def _job(sampling: dict[str, Any], **fields: Any) -> GenerateJob:
    base = SamplingOptions().model_dump()
    options = SamplingOptions.model_construct(**{**base, **sampling})
    values = {
        "request_id": "r",
        "model": "tiny",
        "endpoint": "llama.completion",
        "prompt_parts": ["hello"],
        "messages": None,
        "prompt": None,
        "stream": False,
        "tools": None,
        "tool_mode": "none",
        "tool_names": [],
        "beam": None,
        "infill": None,
        "id_slot": None,
        "enqueued_at": 0.0,
        **fields,
        "sampling": options,
    }
    return GenerateJob.model_construct(**values)


@pytest.mark.parametrize(
    ("sampling", "param"),
    [
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": math.inf}, "top_p"),
        ({"min_p": -math.inf}, "min_p"),
        ({"typical_p": math.nan}, "typical_p"),
        ({"repeat_penalty": math.inf}, "repeat_penalty"),
        ({"presence_penalty": math.nan}, "presence_penalty"),
        ({"mirostat": 2, "mirostat_tau": math.nan}, "mirostat_tau"),
        ({"mirostat": 5}, "mirostat"),
        ({"n": 0}, "n"),
        ({"repeat_last_n": -9}, "repeat_last_n"),
        ({"logit_bias": [(1, math.nan)]}, "logit_bias"),
        ({"logit_bias": [(1, math.inf)]}, "logit_bias"),
        ({"logit_bias": [(1, True)]}, "logit_bias"),
        ({"logit_bias": [(10**12, 1.0)]}, "logit_bias"),
        ({"logit_bias": [(-3, False)]}, "logit_bias"),
        ({"grammar": "root ::= missing"}, "grammar"),
        ({"grammar": "root ::= " + "(" * 200 + '"a"' + ")" * 200}, "grammar"),
        ({"grammar": 'root ::= "\ud800"'}, "grammar"),
        ({"json_schema": {"$ref": "http://elsewhere"}}, "json_schema"),
        # The converter would write a billion grammar elements (gigabytes).
        ({"json_schema": {"type": "string", "minLength": 10**9}}, "json_schema"),
        (
            {"json_schema": {"type": "array", "items": {"maxLength": 60_000}, "maxItems": 60_000}},
            "json_schema",
        ),
    ],
)
def test_values_llama_cpp_cannot_take_are_a_400(
    runtime: WorkerRuntime, sampling: dict[str, Any], param: str
) -> None:
    with pytest.raises(Rejected) as info:
        prepare(runtime, _job(sampling))
    event = info.value.event
    assert (event.status, event.param, event.error_type) == (400, param, "invalid_request_error")
    # The message says why, not just where.
    assert not event.message.rstrip().endswith(":"), event.message


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt_parts": [10**9]},
        {"prompt_parts": ["hi", -1]},
        {"prompt_parts": ["\ud800"]},
        {"endpoint": "completions", "prompt": "bad \udfff text", "prompt_parts": None},
    ],
)
def test_prompts_llama_cpp_cannot_take_are_a_400(
    runtime: WorkerRuntime, fields: dict[str, Any]
) -> None:
    with pytest.raises(Rejected) as info:
        prepare(runtime, _job({}, **fields))
    assert (info.value.event.status, info.value.event.param) == (400, "prompt")


def test_a_tool_without_a_name_is_a_400(runtime: WorkerRuntime) -> None:
    job = _job(
        {},
        endpoint="chat.completions",
        prompt_parts=None,
        messages=[],
        tools=[{"type": "function", "function": {"parameters": {}}}],
        tool_mode="required",
    )
    with pytest.raises(Rejected) as info:
        prepare(runtime, job)
    assert (info.value.event.status, info.value.event.param) == (400, "tools")


def test_counts_beyond_the_model_are_clamped(runtime: WorkerRuntime) -> None:
    n_vocab = runtime.engine.model.n_vocab
    _, sampling = prepare(
        runtime,
        _job({"top_k": 2**31 - 1, "min_keep": 2**40, "repeat_last_n": -1, "logprobs": 10**6}),
    )
    assert (sampling.top_k, sampling.min_keep, sampling.logprobs) == (n_vocab, n_vocab, n_vocab)
    assert sampling.repeat_last_n == runtime.engine.n_ctx_per_slot
