"""The sampling options are bounded alike on every protocol (OpenAI chat and
completions, llama-server's /completion, /v1/generate), and each protocol
maps a valid request to the SamplingOptions a job carries."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from api.generate.protocol import GenerateRequest
from api.llama.protocol import WRITABLE_PROPS, LlamaCompletionRequest
from api.openai.protocol import ChatCompletionRequest, CompletionRequest
from schemas.sampling import SHARED_FIELDS, SamplingOptions, SharedSampling, bias_pairs

MESSAGES = [{"role": "user", "content": "hi"}]
INT32_OVER = 2**31
FLOAT32_OVER = 1e39


def _chat(body: dict[str, Any]) -> SamplingOptions:
    return ChatCompletionRequest.model_validate({"messages": MESSAGES, **body}).sampling()


def _completion(body: dict[str, Any]) -> SamplingOptions:
    return CompletionRequest.model_validate({"prompt": "x", **body}).sampling()


def _llama(body: dict[str, Any]) -> SamplingOptions:
    return LlamaCompletionRequest.model_validate({"prompt": "x", **body}).sampling()


def _generate(body: dict[str, Any]) -> SamplingOptions:
    return GenerateRequest.model_validate({"prompt": "x", **body}).sampling()


PROTOCOLS: list[Callable[[dict[str, Any]], SamplingOptions]] = [
    _chat,
    _completion,
    _llama,
    _generate,
]

# Refused by every protocol.
OUT_OF_BOUNDS: list[tuple[str, object]] = [
    ("top_k", -2),
    ("top_k", INT32_OVER),
    ("temperature", FLOAT32_OVER),
    ("top_p", -0.1),
    ("top_p", 1.1),
]
# Refused by the protocols that have the field: /v1/generate (vLLM's names)
# has neither, and ignores them as it ignores any unknown field.
OUT_OF_BOUNDS_LLAMA_KNOBS: list[tuple[str, object]] = [
    ("repeat_last_n", -2),
    ("repeat_last_n", INT32_OVER),
    ("min_keep", -1),
    ("min_keep", INT32_OVER),
]


REFUSALS = [(build, field, value) for build in PROTOCOLS for field, value in OUT_OF_BOUNDS] + [
    (build, field, value)
    for build in (_chat, _completion, _llama)
    for field, value in OUT_OF_BOUNDS_LLAMA_KNOBS
]


@pytest.mark.parametrize(
    ("build", "field", "value"),
    REFUSALS,
    ids=[f"{build.__name__}-{field}={value}" for build, field, value in REFUSALS],
)
def test_out_of_bounds_refused(
    build: Callable[[dict[str, Any]], SamplingOptions], field: str, value: object
) -> None:
    with pytest.raises(ValidationError) as caught:
        build({field: value})
    assert caught.value.errors()[0]["loc"][0] == field


@pytest.mark.parametrize("build", [_chat, _completion, _generate], ids=lambda b: b.__name__)
def test_negative_temperature_refused(build: Callable[[dict[str, Any]], SamplingOptions]) -> None:
    with pytest.raises(ValidationError):
        build({"temperature": -0.5})


def test_llama_server_negative_temperature_is_greedy() -> None:
    # llama-server's own meaning, the one knob it declares wider.
    assert _llama({"temperature": -0.5}).temperature == 0.0


def test_generate_refuses_top_p_zero() -> None:
    # vLLM refuses 0; the others keep it (no token but the first survives).
    with pytest.raises(ValidationError):
        _generate({"top_p": 0.0})
    assert _chat({"top_p": 0.0}).top_p == 0.0


@pytest.mark.parametrize("build", PROTOCOLS, ids=lambda b: b.__name__)
def test_edges_accepted(build: Callable[[dict[str, Any]], SamplingOptions]) -> None:
    options = build({"top_k": -1, "temperature": 0.0, "top_p": 1.0})
    assert options.temperature == 0.0 and options.top_p == 1.0
    # /v1/generate's "off" (-1) is 0 in the job; the others pass it on.
    assert options.top_k == (0 if build is _generate else -1)


KNOBS: dict[str, Any] = {
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 12,
    "min_p": 0.1,
    "typical_p": 0.95,
    "min_keep": 2,
    "repeat_penalty": 1.1,
    "repeat_last_n": 32,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "mirostat": 2,
    "mirostat_tau": 4.0,
    "mirostat_eta": 0.2,
    "seed": 9,
    "ignore_eos": True,
    "cache_prompt": False,
}


def test_chat_maps_to_options() -> None:
    body = {
        **KNOBS,
        "max_completion_tokens": 7,
        "max_tokens": 9,
        "stop": "END",
        "logit_bias": {"5": -1.5, "6": False},
        "response_format": {"type": "json_object"},
        "logprobs": True,
        "top_logprobs": 3,
        "n": 2,
    }
    assert _chat(body) == SamplingOptions(
        **KNOBS,
        max_tokens=7,
        stop=["END"],
        logit_bias=[(5, -1.5), (6, False)],
        json_schema={},
        logprobs=3,
        n=2,
    )


def test_completion_maps_to_options() -> None:
    body = {
        **KNOBS,
        "grammar": 'root ::= "a"',
        "stop": ["a", "b"],
        "logit_bias": [["text", 2.0], [7, False]],
        "logprobs": 1,
    }
    assert _completion(body) == SamplingOptions(
        **KNOBS,
        grammar='root ::= "a"',
        max_tokens=16,  # OpenAI's default for legacy completions
        stop=["a", "b"],
        logit_bias=[("text", 2.0), (7, False)],
        logprobs=1,
    )
    assert _completion({"n_predict": 5}).max_tokens == 5


def test_llama_completion_maps_to_options() -> None:
    body = {
        **KNOBS,
        "n_predict": 8,
        "stop": ["", "x"],
        "logit_bias": {"hello": 1.0, "3": False, "4": True},
        "json_schema": {"type": "object"},
        "n_probs": 2,
        "samplers": "kt",
    }
    assert _llama(body) == SamplingOptions(
        **KNOBS,
        max_tokens=8,
        stop=["x"],
        # A key that is not an integer is text; a bias of true is skipped.
        logit_bias=[("hello", 1.0), (3, False)],
        json_schema={"type": "object"},
        logprobs=2,
        samplers=["top_k", "temperature"],
    )
    # llama-server's "random" seeds, and a grammar that wins over a schema.
    both = _llama({"seed": -1, "grammar": 'root ::= "a"', "json_schema": {}})
    assert (both.seed, both.grammar, both.json_schema) == (None, 'root ::= "a"', None)
    assert _llama({"seed": 0xFFFFFFFF}).seed is None
    assert _llama({}).min_keep == 0


def test_generate_maps_to_options() -> None:
    body = {
        "max_tokens": 5,
        "temperature": 0.5,
        "top_p": 0.8,
        "top_k": -1,
        "min_p": 0.2,
        "repetition_penalty": 1.3,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
        "seed": 4,
        "stop": "\n",
        "ignore_eos": True,
        "n": 2,
        "best_of": 3,
    }
    assert _generate(body) == SamplingOptions(
        max_tokens=5,
        temperature=0.5,
        top_p=0.8,
        top_k=0,
        min_p=0.2,
        repeat_penalty=1.3,
        repeat_last_n=-1,
        presence_penalty=0.1,
        frequency_penalty=0.2,
        seed=4,
        stop=["\n"],
        ignore_eos=True,
        logprobs=0,
        n=3,
    )
    defaults = _generate({})
    assert (defaults.repeat_penalty, defaults.repeat_last_n, defaults.n) == (1.0, None, 1)


@pytest.mark.parametrize("model", [ChatCompletionRequest, CompletionRequest, SamplingOptions])
def test_shared_fields_declared_once(model: type[BaseModel]) -> None:
    # The OpenAI requests and the job inherit every shared knob as declared
    # (FieldInfo has no equality of its own: its repr shows type, bounds, default).
    for name in SHARED_FIELDS:
        assert repr(model.model_fields[name]) == repr(SharedSampling.model_fields[name]), name


def test_llama_server_overrides_only_its_own_knobs() -> None:
    differ = {
        name
        for name in SHARED_FIELDS
        if repr(LlamaCompletionRequest.model_fields[name])
        != repr(SharedSampling.model_fields[name])
    }
    assert differ == {"temperature", "min_keep"}


# What POST /props has always let a client set.
PROPS = {
    "temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty",
    "repeat_last_n", "presence_penalty", "frequency_penalty", "mirostat",
    "mirostat_tau", "mirostat_eta", "n_predict", "min_keep", "samplers", "stop",
    "seed", "ignore_eos", "n_probs",
}  # fmt: skip


def test_writable_props_derived_from_the_declaration() -> None:
    assert WRITABLE_PROPS == PROPS


def test_bias_pairs() -> None:
    assert bias_pairs(None, text_keys=False) == []
    assert bias_pairs([(1, 2.0)], text_keys=False) == [(1, 2.0)]
    assert bias_pairs({"-3": 1.0, "word": False}, text_keys=True) == [(-3, 1.0), ("word", False)]
    with pytest.raises(ValueError, match="token ids"):
        bias_pairs({"word": 1.0}, text_keys=False)
    with pytest.raises(ValueError, match="out of range"):
        bias_pairs({str(INT32_OVER): 1.0}, text_keys=True)
