"""Request schemas and job builders under hostile values: whatever a body
holds, building its job raises only a pydantic ValidationError or an
APIError (a 400/404 for the client, a line error for a batch), never a
TypeError, ValueError, OverflowError, UnicodeError or RecursionError."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from api.embeddings import protocol as embeddings
from api.embeddings import requests as embedding_requests
from api.errors import APIError
from api.generate import protocol as generate
from api.llama import protocol as llama_server
from api.openai import protocol as openai
from api.openai import requests
from schemas.bounds import MAX_DEPTH, check_value, loads_strict
from schemas.registry import ModelConfig, Parameters
from schemas.settings import Settings

CONFIG = ModelConfig(name="m", parameters=Parameters(model="m.gguf"), parallel=2)
LIMITS = Settings()
MESSAGES = [{"role": "user", "content": "hi"}]

# Values a careless or hostile client sends, for any field.
EDGE = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, 1, 2**31, -(2**31) - 1, 2**32, 2**63, -(2**64), 10**30]),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "²", "٣", "\ud800", "a\x00b", "-5", "1e5", "NaN", "x" * 600]),
    st.text(max_size=20),
)
# Object keys too: logit_bias maps them to token ids.
KEYS = st.one_of(
    st.text(max_size=8), st.sampled_from(["²", "-5", "7", "\ud800", "99999999999", "role"])
)
JSON = st.recursive(
    EDGE,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=12,
)
FIELDS = [
    "max_tokens", "n_predict", "temperature", "top_p", "top_k", "min_p", "typical_p",
    "min_keep", "repeat_penalty", "repeat_last_n", "presence_penalty", "frequency_penalty",
    "mirostat", "mirostat_tau", "mirostat_eta", "seed", "stop", "logit_bias", "grammar",
    "json_schema", "response_format", "n_probs", "n", "top_logprobs", "logprobs",
    "max_completion_tokens", "tools", "tool_choice", "id_slot", "n_keep", "samplers",
    "best_of", "length_penalty", "use_beam_search", "early_stopping", "prompt", "messages",
    "input", "content", "tokens", "documents", "query", "top_n", "dimensions",
]  # fmt: skip


def _chat(body: dict[str, Any]) -> object:
    request = openai.ChatCompletionRequest.model_validate({"messages": MESSAGES, **body})
    return requests.chat_job(request, "m", CONFIG, LIMITS)


def _completion(body: dict[str, Any]) -> object:
    request = openai.CompletionRequest.model_validate({"prompt": "x", **body})
    return requests.completion_job(request, "m", CONFIG, LIMITS)


def _generate(body: dict[str, Any]) -> object:
    return generate.GenerateRequest.model_validate({"prompt": "x", **body}).sampling()


def _llama(body: dict[str, Any]) -> object:
    request = llama_server.LlamaCompletionRequest.model_validate(body)
    return request.sampling(), request.prompt_parts()


def _embedding(body: dict[str, Any]) -> object:
    request = embeddings.EmbeddingRequest.model_validate({"input": "x", **body})
    return embedding_requests.embedding_job(request, "m", CONFIG)


def _rerank(body: dict[str, Any]) -> object:
    request = embeddings.RerankRequest.model_validate({"query": "q", "documents": ["d"], **body})
    return embedding_requests.rerank_job(request, "m")


BUILDERS: list[Callable[[dict[str, Any]], object]] = [
    _chat,
    _completion,
    _generate,
    _llama,
    _embedding,
    _rerank,
]


@pytest.mark.parametrize("build", BUILDERS, ids=lambda b: b.__name__)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=4))
def test_only_validation_errors_escape(
    build: Callable[[dict[str, Any]], object], body: Any
) -> None:
    try:
        built = build(body)
    except (ValidationError, APIError):
        return
    # What was accepted serializes as strict JSON (Postgres, Celery, workers).
    dumped = json.dumps(built, default=lambda o: o.model_dump(mode="json"), allow_nan=False)
    dumped.encode("utf-8")


def test_logit_bias_key_that_is_a_unicode_digit() -> None:
    # issue 10: "²".isdigit() is True but int("²") raises.
    with pytest.raises(ValidationError) as caught:
        openai.ChatCompletionRequest.model_validate({"messages": MESSAGES, "logit_bias": {"²": 1}})
    assert caught.value.errors()[0]["loc"] == ("logit_bias",)
    # llama-server's form: a non-integer key is text to tokenize.
    text = llama_server.LlamaCompletionRequest.model_validate({"logit_bias": {"²": 1, "7": False}})
    assert text.bias_list() == [("²", 1.0), (7, False)]


@pytest.mark.parametrize(
    "value",
    [
        math.nan,
        {"a": [math.inf]},
        "\ud800",
        {"k\x00": 1},
        json.loads('{"a":' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1)),
    ],
)
def test_check_value_refuses(value: Any) -> None:
    with pytest.raises(ValueError):
        check_value(value)


def test_check_value_survives_any_depth() -> None:
    deep: Any = 1
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ValueError, match="nested deeper"):
        check_value(deep)


@pytest.mark.parametrize("raw", ["NaN", "[Infinity]", '{"a": -Infinity}', "1e400", "-1e999"])
def test_strict_json_refuses_non_finite_numbers(raw: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        loads_strict(raw)
    assert loads_strict("[1.5, 2, 1e300]") == [1.5, 2, 1e300]


def test_limits_from_settings() -> None:
    limits = Settings(max_stop=2, max_messages=3, max_embedding_inputs=2)
    body = openai.ChatCompletionRequest.model_validate({"messages": MESSAGES, "stop": ["a"] * 3})
    with pytest.raises(APIError) as caught:
        requests.chat_job(body, "m", None, limits)
    assert caught.value.param == "stop"
    many = openai.ChatCompletionRequest.model_validate({"messages": MESSAGES * 4})
    with pytest.raises(APIError) as caught:
        requests.chat_job(many, "m", None, limits)
    assert caught.value.param == "messages"
    wide = openai.ChatCompletionRequest.model_validate({"messages": MESSAGES, "n": 3})
    with pytest.raises(APIError) as caught:
        requests.chat_job(wide, "m", CONFIG, limits)
    assert caught.value.param == "n"
    with pytest.raises(APIError) as caught:
        embedding_requests.check_inputs(3, "input", limits)
    assert caught.value.param == "input"
