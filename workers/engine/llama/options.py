"""The llama.cpp engine's one mapping of a job's SamplingOptions to its
resolved Sampling (workers.engine.options.resolve), JSON schemas and
function calls turned into GBNF."""

from __future__ import annotations

import json

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from schemas.jobs import GenerateJob
from schemas.registry import ModelConfig
from workers.engine.llama.limits import check_grammar_text
from workers.engine.llama.model import LlamaModel
from workers.engine.llama.sampling import check_grammar
from workers.engine.options import SamplingError, call_or_free_text, resolve, tool_call_schema
from workers.engine.types import Sampling

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


def tool_call_grammar(job: GenerateJob) -> str | None:
    """GBNF for function calling: the call's JSON object ("required"), or that
    or free text that does not open a JSON object ("auto")."""
    schema = tool_call_schema(job)
    if schema is None:
        return None
    call = schema_to_gbnf(schema, "tools")
    return call if job.tool_mode == "required" else call_or_free_text(call)


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


def resolve_sampling(job: GenerateJob, config: ModelConfig, model: LlamaModel) -> Sampling:
    return resolve(job, config, model, grammar=_grammar(job, model))
