"""Every POST route the request fuzzer covers: a valid seed body, the model
whose worker it reaches, the fields a mutation may insert, and the route's
catalogue of hostile field combinations (the issue's examples first), plus
the hypothesis strategy that mutates a seed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from tests.reliability.hostile import (
    CHAT_MODEL,
    EMBED_MODEL,
    N_VOCAB,
    TOKEN_IDS,
    Pairs,
    Raw,
    dumps,
    edge_values,
    hostile_text,
    similar,
)

# Fields a sampling request may carry, to insert where a seed lacks them.
SAMPLING_FIELDS = (
    "max_tokens",
    "n_predict",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "typical_p",
    "min_keep",
    "repeat_penalty",
    "repeat_last_n",
    "presence_penalty",
    "frequency_penalty",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
    "seed",
    "stop",
    "logit_bias",
    "grammar",
    "json_schema",
    "response_format",
    "n_probs",
    "ignore_eos",
    "cache_prompt",
    "n",
    "stream",
    "stream_options",
    "samplers",
    "id_slot",
    "n_keep",
    "logprobs",
    "top_logprobs",
    "best_of",
    "use_beam_search",
    "length_penalty",
    "early_stopping",
    "tools",
    "tool_choice",
    "max_completion_tokens",
    "user",
    "model",
)

_GRAMMAR_A = 'root ::= "a"'
_SCHEMA_CONST = {"type": "object", "properties": {"a": {"const": 1}}, "required": ["a"]}

# Hostile combinations of fields: each is merged into a route's seed. The
# first is the issue's /completion example that aborted the worker.
GENERATION_PATCHES: tuple[dict[str, Any], ...] = (
    {"grammar": _GRAMMAR_A, "ignore_eos": True, "n_predict": 8},
    {"grammar": _GRAMMAR_A, "ignore_eos": True, "max_tokens": 8},
    {"json_schema": _SCHEMA_CONST, "ignore_eos": True, "max_tokens": 32},
    {"grammar": _GRAMMAR_A, "logit_bias": [["a", False]], "max_tokens": 4},
    {"grammar": _GRAMMAR_A, "logit_bias": {"97": -100}, "max_tokens": 4},
    {"grammar": "root ::= ("},
    {"grammar": "this is not a grammar"},
    {"grammar": "root ::= root"},
    {"grammar": "root ::= x\nx ::= root"},
    {"grammar": 'root ::= "a"{0,100000}', "max_tokens": 2},
    {"grammar": "root ::= [\\U0010FFFF-\\x00]"},
    {"grammar": "root ::= undefined_rule"},
    {"grammar": '\x00root ::= "a"'},
    {"json_schema": {"type": "bogus"}},
    {"json_schema": {"$ref": "#/nope"}},
    {"json_schema": {"type": "string", "pattern": "("}},
    {"json_schema": {"type": "array", "minItems": 2**31}},
    {"json_schema": {"type": "string", "minLength": 10**9}, "max_tokens": 4},
    {"json_schema": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}},
    {"logit_bias": {"²": 1}},
    {"logit_bias": {"999999999": 1}},
    {"logit_bias": {"-1": 1}},
    {"logit_bias": {str(N_VOCAB): 1}},
    {"logit_bias": {"18446744073709551616": 1}},
    {"logit_bias": {"5": Raw(b"NaN")}},
    {"logit_bias": {"5": Raw(b"-Infinity")}},
    {"logit_bias": {"5": 1e308}},
    {"logit_bias": [[999999, 1]]},
    {"logit_bias": [[-5, 1]]},
    {"logit_bias": [["</s>", 1], ["", 2]]},
    {"logit_bias": {"": 1}},
    {"logit_bias": {"\ud800": 1}},
    {"n_probs": 10**6},
    {"n_probs": 2**31},
    {"n_probs": N_VOCAB + 5, "max_tokens": 2},
    {"logprobs": True, "top_logprobs": 10**6},
    {"logprobs": 10**6},
    {"logprobs": True, "top_logprobs": 20, "max_tokens": 2},
    {"n": 10**6},
    {"n": 64, "max_tokens": 2},
    {"best_of": 64, "n": 1, "max_tokens": 2},
    {"use_beam_search": True, "length_penalty": 2000, "best_of": 2, "max_tokens": 4},
    {"use_beam_search": True, "length_penalty": 1e308, "best_of": 2, "max_tokens": 4},
    {"use_beam_search": True, "length_penalty": -2000, "best_of": 2, "max_tokens": 4},
    {"use_beam_search": True, "length_penalty": Raw(b"NaN"), "best_of": 2},
    {"stop": ["x"] * 100_000},
    {"stop": ["a" * 100_000]},
    {"stop": [""]},
    {"stop": ["\ud800"]},
    {"max_tokens": 2**31},
    {"max_tokens": 2**63},
    {"max_tokens": 0},
    {"n_predict": 2**31},
    {"n_predict": -2},
    {"seed": 2**64},
    {"seed": -(2**63) - 1},
    {"seed": 2**63},
    {"temperature": Raw(b"NaN")},
    {"temperature": Raw(b"Infinity")},
    {"temperature": 1e308},
    {"top_k": 2**31},
    {"top_k": -(2**31) - 1},
    {"top_p": Raw(b"NaN")},
    {"min_keep": 2**31},
    {"repeat_last_n": 2**31},
    {"repeat_penalty": 1e-300},
    {"mirostat": 2, "mirostat_tau": Raw(b"Infinity"), "mirostat_eta": 1e308},
    {"mirostat": 1, "mirostat_tau": 1e-300},
    {"samplers": ["infill"]},
    {"samplers": "xyz"},
    {"samplers": []},
    {"id_slot": 2**31 - 1},
    {"id_slot": 99},
    {"n_keep": 2**31 - 1},
    {"stream": True, "stream_options": {"include_usage": True}, "max_tokens": 4},
    {"stream": True, "grammar": _GRAMMAR_A, "ignore_eos": True, "max_tokens": 8},
    {"stream": True, "n": 2, "max_tokens": 2},
    {"response_format": {"type": "json_object"}, "ignore_eos": True, "max_tokens": 16},
    {
        "response_format": {"type": "json_schema", "json_schema": {"schema": _SCHEMA_CONST}},
        "ignore_eos": True,
        "max_tokens": 32,
    },
    {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}}},
    {"response_format": {"type": "bogus"}},
)
CHAT_PATCHES: tuple[dict[str, Any], ...] = (
    {"messages": []},
    {"messages": [{"role": "bogus", "content": "x"}]},
    {"messages": [{"role": "user"}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
    {"messages": [{"role": "user", "content": "hi"}] * 10_000},
    {"messages": [{"role": "tool", "content": "x"}]},
    {"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "function": {}}]}]},
    {
        "messages": [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{"}}
                ],
            }
        ]
    },
    {
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
        "tool_choice": "required",
        "max_tokens": 8,
    },
    {
        "tools": [{"type": "function", "function": {"name": "f", "parameters": _SCHEMA_CONST}}],
        "tool_choice": "required",
        "ignore_eos": True,
        "max_tokens": 32,
    },
    {"tools": [], "tool_choice": {"type": "function", "function": {"name": "missing"}}},
    {"tools": [{"type": "function", "function": {"name": "x" * 65}}]},
)
PROMPT_PATCHES: tuple[dict[str, Any], ...] = (
    *({"prompt": [t]} for t in TOKEN_IDS),
    {"prompt": [[-5]]},
    {"prompt": [[N_VOCAB, "x"]]},
    {"prompt": ["x", 2**63, "y"]},
    {"prompt": [0] * 5_000},
    {"prompt": [[1], [2]]},
    {"prompt": []},
    {"prompt": [[]]},
    {"prompt": "<|im_start|>" * 3000},
)


@dataclass(frozen=True)
class Route:
    path: str
    seed: dict[str, Any]
    # Model whose worker the route reaches (probed after every request).
    model: str
    patches: tuple[dict[str, Any], ...] = ()
    fields: tuple[str, ...] = ()


_USER = [{"role": "user", "content": "Hello there"}]
_GEN = GENERATION_PATCHES
ROUTES: tuple[Route, ...] = (
    Route(
        "/v1/chat/completions",
        {"model": CHAT_MODEL, "messages": _USER, "max_tokens": 4},
        CHAT_MODEL,
        _GEN + CHAT_PATCHES,
        (*SAMPLING_FIELDS, "messages"),
    ),
    Route(
        "/v1/completions",
        {"model": CHAT_MODEL, "prompt": "Once upon a time", "max_tokens": 4},
        CHAT_MODEL,
        _GEN + PROMPT_PATCHES,
        (*SAMPLING_FIELDS, "prompt", "echo", "suffix"),
    ),
    Route(
        "/v1/edits",
        {"model": CHAT_MODEL, "instruction": "Fix it", "input": "teh cat", "max_tokens": 4},
        CHAT_MODEL,
        _GEN,
        (*SAMPLING_FIELDS, "instruction", "input"),
    ),
    Route(
        "/v1/generate",
        {"model": CHAT_MODEL, "prompt": "Once upon a time", "max_tokens": 4},
        CHAT_MODEL,
        (*_GEN, {"messages": _USER, "prompt": None}, {"mock_response": "\ud800", "n": 64}),
        (*SAMPLING_FIELDS, "prompt", "messages", "repetition_penalty", "mock_response"),
    ),
    Route(
        "/completion",
        {"model": CHAT_MODEL, "prompt": "Once upon a time", "n_predict": 4},
        CHAT_MODEL,
        _GEN + PROMPT_PATCHES,
        (*SAMPLING_FIELDS, "prompt"),
    ),
    Route(
        "/infill",
        {
            "model": CHAT_MODEL,
            "input_prefix": "def f(",
            "input_suffix": "):\n    return 1\n",
            "n_predict": 4,
        },
        CHAT_MODEL,
        (
            *_GEN,
            {"input_prefix": [-1], "input_suffix": [10**6]},
            {"input_prefix": [2**63]},
            {"input_extra": [{"filename": "\ud800", "text": "x" * 100_000}]},
            {"input_extra": [{"text": "x"}] * 5_000},
            {"input_extra": "x"},
        ),
        (*SAMPLING_FIELDS, "input_prefix", "input_suffix", "input_extra", "prompt"),
    ),
    Route(
        "/tokenize",
        {"model": CHAT_MODEL, "content": "Hello there"},
        CHAT_MODEL,
        (
            *({"content": ["x", t]} for t in TOKEN_IDS),
            {"content": "x" * 1_000_000, "with_pieces": True},
            {"content": "<|im_start|>" * 10_000, "parse_special": True},
            {"content": "\ud800", "with_pieces": True},
        ),
        ("content", "add_special", "parse_special", "with_pieces", "model"),
    ),
    Route(
        "/detokenize",
        {"model": CHAT_MODEL, "tokens": [5, 6, 7]},
        CHAT_MODEL,
        (
            *({"tokens": [5, t]} for t in TOKEN_IDS),
            {"tokens": list(range(N_VOCAB)) * 100},
            {"tokens": [1.5]},
        ),
        ("tokens", "model"),
    ),
    Route(
        "/apply-template",
        {"model": CHAT_MODEL, "messages": _USER},
        CHAT_MODEL,
        CHAT_PATCHES,
        ("messages", "model", "tools", "add_generation_prompt"),
    ),
    Route(
        "/v1/embeddings",
        {"model": EMBED_MODEL, "input": "Hello there"},
        EMBED_MODEL,
        (
            *({"input": [[t]]} for t in TOKEN_IDS),
            {"input": [5, -1]},
            {"input": ["x"] * 100_000},
            {"input": "x" * 1_000_000},
            {"input": "x" * 1_000_000, "truncate": True},
            {"input": "hi", "dimensions": 2**31},
            {"input": "hi", "dimensions": 100_000},
            {"input": "hi", "encoding_format": "bogus"},
            {"input": "\ud800"},
            {"model": CHAT_MODEL},
        ),
        ("input", "model", "encoding_format", "dimensions", "truncate", "user"),
    ),
    Route(
        "/embedding",
        {"model": EMBED_MODEL, "content": "Hello there"},
        EMBED_MODEL,
        (
            *({"content": [[t]]} for t in TOKEN_IDS),
            {"content": ["x"] * 100_000},
            {"content": "\ud800"},
        ),
        ("content", "model", "truncate"),
    ),
    Route(
        "/v1/rerank",
        {"model": EMBED_MODEL, "query": "cats", "documents": ["a cat", "a dog"]},
        EMBED_MODEL,
        (
            {"documents": ["x"] * 100_000},
            {"documents": ["x" * 1_000_000]},
            {"top_n": 2**63},
            {"query": "\ud800"},
            {"documents": [{"text": 1}]},
            {"documents": [{}]},
            {"model": CHAT_MODEL},
        ),
        ("query", "documents", "top_n", "return_documents", "truncate", "model"),
    ),
)
ROUTE_IDS = [r.path for r in ROUTES]


def merged(seed: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """`seed` with `patch` applied; a patch value of None removes the field."""
    out = {**seed, **patch}
    return {k: v for k, v in out.items() if v is not None or k not in patch}


@st.composite
def mutated_body(draw: st.DrawFn, route: Route) -> bytes:
    """A route's seed with one to four mutations: a field given a hostile
    value of its own type (which passes validation and reaches the engine)
    or of any type, a field added, deleted or repeated, a hostile patch
    applied, a message's role, content or name replaced; sometimes the
    bytes are damaged after encoding."""
    body: dict[str, Any] = dict(route.seed)
    repeated: list[tuple[str, Any]] = []

    def some_key() -> str:
        # Mostly not `model`: a broken model name is refused before any
        # other field is looked at, so it would hide everything else.
        keys = sorted(body)
        if "model" in keys and len(keys) > 1 and draw(st.integers(0, 7)):
            keys.remove("model")
        return draw(st.sampled_from(keys))

    # Mostly one mutation, so that most fields are also tried alone.
    for _ in range(draw(st.sampled_from((1, 1, 1, 2, 3, 4)))):
        action = draw(
            st.sampled_from(
                ("tweak", "tweak", "insert", "insert", "set", "patch", "patch", "delete", "repeat")
            )
        )
        if action == "tweak" and body:
            key = some_key()
            body[key] = draw(similar(body[key]))
        elif action == "set" and body:
            body[some_key()] = draw(edge_values)
        elif action == "insert":
            key = draw(st.sampled_from(route.fields) | hostile_text)
            body[key] = draw(edge_values)
        elif action == "delete" and body:
            del body[some_key()]
        elif action == "patch" and route.patches:
            body = merged(body, draw(st.sampled_from(route.patches)))
        elif action == "repeat" and body:
            repeated.append((some_key(), draw(edge_values)))
    messages = body.get("messages")
    if isinstance(messages, list) and messages and draw(st.booleans()):
        message: dict[str, Any] = {"role": "user", "content": "x"}
        field = draw(st.sampled_from(("role", "content", "name")))
        message[field] = draw(similar("x") if draw(st.booleans()) else edge_values)
        body["messages"] = [*messages[:-1], message]
    raw = dumps(Pairs((*body.items(), *repeated)))
    damage = draw(st.sampled_from(("none",) * 8 + ("truncate", "insert")))
    if damage == "truncate" and raw:
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif damage == "insert":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:]
    return raw
