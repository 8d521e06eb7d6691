"""Which shaper turns each endpoint's prompt into tokens (the table
workers.main wires), what each one's Accepted event says, and the 400 each
refusal met while preparing a job becomes."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.events import Accepted
from schemas.jobs import GenerateJob
from schemas.templates import PromptError
from tests.support.tinymodel import BOS_TOKEN, BOS_TOKEN_ID
from tests.workers.conftest import RecordingSink, make_runtime
from workers.engine.interface import InvalidRequest
from workers.engine.llama.engine import LlamaEngine
from workers.engine.types import ContextLengthExceeded, Sampling, TooManyChoices
from workers.generate import refusal
from workers.llama_server import LlamaPromptError, LlamaServerShaper
from workers.prompts import TemplateShaper


def _job(endpoint: str, **fields: Any) -> GenerateJob:
    return GenerateJob(request_id="r", model="tiny", endpoint=endpoint, **fields)  # type: ignore[arg-type]


def test_llama_server_endpoints_have_their_own_shaper(
    engine: tuple[LlamaEngine, RecordingSink],
) -> None:
    runtime = make_runtime(engine[0], wired=True)
    for endpoint in ("llama.completion", "llama.infill"):
        assert isinstance(runtime.shaper(endpoint), LlamaServerShaper)
    for endpoint in ("chat.completions", "completions", "generate"):
        assert isinstance(runtime.shaper(endpoint), TemplateShaper)


def test_without_a_table_every_endpoint_goes_through_the_templates(
    engine: tuple[LlamaEngine, RecordingSink],
) -> None:
    runtime = make_runtime(engine[0], wired=False)
    assert isinstance(runtime.shaper("llama.completion"), TemplateShaper)


def test_the_template_shaper_never_adds_a_second_bos(
    engine: tuple[LlamaEngine, RecordingSink],
) -> None:
    eng = engine[0]
    shaper = make_runtime(eng, wired=True).shaper("generate")
    plain = shaper.tokens(_job("generate", prompt="hello world"))
    assert plain == eng.model.tokenize("hello world", add_special=True)
    assert plain[0] == BOS_TOKEN_ID
    written = shaper.tokens(_job("generate", prompt=BOS_TOKEN + "hello world"))
    assert written.count(BOS_TOKEN_ID) == 1 and written[0] == BOS_TOKEN_ID


def test_only_llama_server_jobs_are_accepted_with_their_settings(
    engine: tuple[LlamaEngine, RecordingSink],
) -> None:
    runtime = make_runtime(engine[0], wired=True)
    sampling = Sampling(temperature=0.0, max_tokens=4)
    plain = runtime.shaper("completions").accepted(_job("completions"), sampling, [1, 2, 3])
    assert plain == Accepted(prompt_tokens=3)
    job = _job("llama.completion", prompt_parts=["hello"])
    tokens = runtime.shaper(job.endpoint).tokens(job)
    llama = runtime.shaper(job.endpoint).accepted(job, sampling, tokens)
    assert llama.prompt_tokens == len(tokens)
    assert llama.settings is not None and llama.settings["n_predict"] == 4
    assert llama.prompt is not None and "hello" in llama.prompt


@pytest.mark.parametrize(
    ("exc", "endpoint", "code", "param"),
    [
        (
            ContextLengthExceeded(prompt_tokens=9, max_tokens=None, n_ctx=4),
            "chat.completions",
            "context_length_exceeded",
            "messages",
        ),
        (
            ContextLengthExceeded(prompt_tokens=9, max_tokens=None, n_ctx=4),
            "completions",
            "context_length_exceeded",
            "prompt",
        ),
        (TooManyChoices(9, 4), "completions", "invalid_request_error", "n"),
        (PromptError("bad template"), "chat.completions", "invalid_request_error", "messages"),
        (InvalidRequest("no", param="top_k"), "completions", "invalid_request_error", "top_k"),
        (
            LlamaPromptError("no fim", param="model", code="infill_not_supported"),
            "llama.infill",
            "infill_not_supported",
            "model",
        ),
    ],
)
def test_each_refusal_is_a_400_naming_its_field(
    exc: Exception, endpoint: str, code: str, param: str
) -> None:
    event = refusal(exc, _job(endpoint))
    assert event is not None
    assert (event.status, event.code, event.param) == (400, code, param)
    assert event.message == str(exc)


def test_a_prompt_that_is_not_unicode_says_so() -> None:
    try:
        "\ud800".encode()
    except UnicodeError as exc:
        event = refusal(exc, _job("completions"))
    assert event is not None and event.param == "prompt"
    assert event.message.startswith("the prompt is not valid Unicode: ")


def test_other_exceptions_are_no_refusal() -> None:
    assert refusal(RuntimeError("boom"), _job("completions")) is None
