"""The llama.cpp engine's one mapping of a job's SamplingOptions to its
resolved Sampling: request first, then the model's configured defaults, then
llama-server's. Token strings in logit_bias are tokenized; JSON schemas
become GBNF."""

from __future__ import annotations

import json
import math
import re
from typing import Any, TypeVar

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from schemas.jobs import GenerateJob
from schemas.registry import ModelConfig, Parameters
from schemas.sampling import SHARED_FIELDS
from workers.engine.llama.limits import check_grammar_text
from workers.engine.llama.model import LlamaModel
from workers.engine.llama.sampling import check_grammar
from workers.engine.types import Sampling

T = TypeVar("T")


class SamplingError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


# llama.cpp's JSON-schema converter writes a length or count bound out as that
# many grammar elements: `"minLength": 1000000000` asks it for gigabytes. The
# bounds of one schema may add up to this many before the schema is refused.
MAX_SCHEMA_REPEATS = 100_000
_REPEAT_KEYS = frozenset(
    {"minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"}
)


def _schema_repeats(node: object) -> int:
    """The sum of the length and count bounds anywhere in a JSON schema."""
    total = 0
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key in _REPEAT_KEYS and isinstance(value, int | float):
                    total += max(0, int(min(value, 2**62)))
                else:
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)
    return total


def schema_to_gbnf(schema: object, param: str) -> str:
    """GBNF for a JSON schema, or the 400 that says why not."""
    repeats = _schema_repeats(schema)
    if repeats > MAX_SCHEMA_REPEATS:
        raise SamplingError(
            f"the schema's length and count bounds (minLength, maxItems, ...) add up to "
            f"{repeats}; at most {MAX_SCHEMA_REPEATS} can be enforced",
            param,
        )
    try:
        grammar: str = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:
        reason = str(exc) or type(exc).__name__
        raise SamplingError(f"{param} cannot be used: {reason}", param) from exc
    return grammar


def _first(*values: T | None) -> T:
    for value in values:
        if value is not None:
            return value
    return values[-1]  # type: ignore[return-value]


def _logit_bias(job: GenerateJob, model: LlamaModel) -> tuple[tuple[int, float], ...]:
    out: list[tuple[int, float]] = []
    for key, bias in job.sampling.logit_bias:
        if bias is True:
            raise SamplingError("logit_bias: a bias is a number, or false to ban", "logit_bias")
        value = -math.inf if bias is False else float(bias)
        if bias is not False and not math.isfinite(value):
            raise SamplingError(
                f"logit_bias: the bias of {key!r} must be a finite number (false bans)",
                "logit_bias",
            )
        if isinstance(key, str):
            tokens = model.tokenize(key, add_special=False, parse_special=False)
        else:
            tokens = [key]
        for token in tokens:
            if not 0 <= token < model.n_vocab:
                raise SamplingError(
                    f"logit_bias: token {token} is not in the vocabulary", "logit_bias"
                )
            out.append((token, value))
    return tuple(out)


def tool_call_grammar(job: GenerateJob) -> str | None:
    """GBNF for function calling: a JSON object {"name", "arguments"} naming
    one of the allowed tools ("required"), or that or free text ("auto")."""
    if not job.tools or job.tool_mode == "none":
        return None
    allowed = set(job.tool_names)
    calls = []
    for tool in job.tools:
        function = tool.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(function, dict) or not isinstance(name, str):
            raise SamplingError("every tool needs a function with a name", "tools")
        if allowed and name not in allowed:
            continue
        calls.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": name},
                    "arguments": function.get("parameters") or {"type": "object"},
                },
                "required": ["name", "arguments"],
            }
        )
    if not calls:
        raise SamplingError("tool_choice names no tool of this request", "tool_choice")
    schema = calls[0] if len(calls) == 1 else {"oneOf": calls}
    call = schema_to_gbnf(schema, "tools")
    if job.tool_mode == "required":
        return call
    # "auto": the same call, or any text that does not open a JSON object.
    call = re.sub(r"^root ::=", "tool-call ::=", call, flags=re.MULTILINE)
    return call + "\nroot ::= tool-call | free-text\nfree-text ::= [^{ \\t\\n] [^\\x00]*\n"


def _grammar(job: GenerateJob, model: LlamaModel) -> str | None:
    options = job.sampling
    grammar = options.grammar or tool_call_grammar(job)
    if options.json_schema is not None:
        if grammar:
            raise SamplingError("give either grammar or json_schema, not both", "grammar")
        if options.json_schema:
            grammar = schema_to_gbnf(options.json_schema, "json_schema")
        else:
            grammar = JSON_GBNF
    if grammar:
        param = "json_schema" if options.json_schema is not None else "grammar"
        try:
            # What would crash llama.cpp's parser is refused before it runs.
            check_grammar_text(grammar)
            check_grammar(model.vocab, grammar, model.n_vocab)
        except ValueError as exc:
            raise SamplingError(str(exc), param) from exc
    return grammar


# The shared knobs Sampling holds as they are, each resolved by one rule: the
# request's value, else the model's configured default where its config has
# that key (temperature, top_p, top_k), else llama-server's (Sampling's
# default). grammar and json_schema become one GBNF grammar (_grammar).
_KNOBS = SHARED_FIELDS - {"grammar", "json_schema"}
_CONFIGURED = _KNOBS & Parameters.model_fields.keys()


def resolve_sampling(job: GenerateJob, config: ModelConfig, model: LlamaModel) -> Sampling:
    req, defaults = job.sampling, config.parameters
    base = Sampling()
    knobs: dict[str, Any] = {
        name: _first(
            getattr(req, name),
            getattr(defaults, name) if name in _CONFIGURED else None,
            getattr(base, name),
        )
        for name in _KNOBS
    }
    return Sampling(
        **knobs,
        max_tokens=_first(req.max_tokens, defaults.max_tokens, None),
        stop=tuple(dict.fromkeys([*req.stop, *config.stopwords])),
        logit_bias=_logit_bias(job, model),
        grammar=_grammar(job, model),
        logprobs=req.logprobs,
        n=job.beam.width if job.beam else req.n,
        beam=job.beam is not None,
        length_penalty=job.beam.length_penalty if job.beam else 1.0,
        early_stopping=job.beam.early_stopping if job.beam else False,
        samplers=tuple(req.samplers) if req.samplers is not None else None,
    )
