"""What every engine's mapping of a job's SamplingOptions shares: the request's
value first, then the model's configured default, then llama-server's (the
defaults of workers.engine.types.Sampling, whichever engine runs); token
texts in logit_bias tokenized; the JSON schema of a function call. Each
engine turns the result into its own sampler (for llama.cpp,
workers/engine/llama/options.py; for vLLM, workers/engine/vllm/options.py)."""

from __future__ import annotations

import math
import re
from typing import Any, TypeVar

from schemas.jobs import GenerateJob
from schemas.registry import ModelConfig, Parameters
from schemas.sampling import SHARED_FIELDS
from workers.engine.interface import Tokenizer
from workers.engine.types import Sampling

T = TypeVar("T")


class SamplingError(ValueError):
    def __init__(self, message: str, param: str, *, code: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def first(*values: T | None) -> T:
    for value in values:
        if value is not None:
            return value
    return values[-1]  # type: ignore[return-value]


# The shared knobs Sampling holds as they are, each resolved by one rule: the
# request's value, else the model's configured default where its config has
# that key (temperature, top_p, top_k), else llama-server's (Sampling's
# default). grammar and json_schema are each engine's own.
KNOBS = SHARED_FIELDS - {"grammar", "json_schema"}
_CONFIGURED = KNOBS & Parameters.model_fields.keys()


def resolve(job: GenerateJob, config: ModelConfig, tokenizer: Tokenizer, **extra: Any) -> Sampling:
    """The job's Sampling for this model, every knob resolved; `extra` holds
    what the engine resolves itself (its grammar)."""
    req, defaults = job.sampling, config.parameters
    base = Sampling()
    knobs: dict[str, Any] = {
        name: first(
            getattr(req, name),
            getattr(defaults, name) if name in _CONFIGURED else None,
            getattr(base, name),
        )
        for name in KNOBS
    }
    return Sampling(
        **knobs,
        max_tokens=first(req.max_tokens, defaults.max_tokens, None),
        stop=tuple(dict.fromkeys([*req.stop, *config.stopwords])),
        logit_bias=logit_bias(job, tokenizer),
        logprobs=req.logprobs,
        n=job.beam.width if job.beam else req.n,
        beam=job.beam is not None,
        length_penalty=job.beam.length_penalty if job.beam else 1.0,
        early_stopping=job.beam.early_stopping if job.beam else False,
        samplers=tuple(req.samplers) if req.samplers is not None else None,
        **extra,
    )


def logit_bias(job: GenerateJob, tokenizer: Tokenizer) -> tuple[tuple[int, float], ...]:
    """(token id, bias) pairs; a text key biases each of its tokens, and a
    bias of false (-inf) bans them."""
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
            tokens = tokenizer.tokenize(key, add_special=False, parse_special=False)
        else:
            tokens = [key]
        for token in tokens:
            if not 0 <= token < tokenizer.n_vocab:
                raise SamplingError(
                    f"logit_bias: token {token} is not in the vocabulary", "logit_bias"
                )
            out.append((token, value))
    return tuple(out)


def tool_call_schema(job: GenerateJob) -> dict[str, Any] | None:
    """The JSON schema of a function call, {"name", "arguments"}, naming one
    of the allowed tools; None when the job calls no tool. Whether free text
    may stand instead is `job.tool_mode` ("auto") for the engine to add."""
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
    return calls[0] if len(calls) == 1 else {"oneOf": calls}


def call_or_free_text(call: str) -> str:
    """A GBNF grammar whose `root` is a function call, widened for
    tool_choice "auto": that call, or any text that does not open a JSON
    object. Both llama.cpp's grammar sampler and vLLM's xgrammar read it."""
    call = re.sub(r"^root ::=", "tool-call ::=", call, flags=re.MULTILINE)
    return call + "\nroot ::= tool-call | free-text\nfree-text ::= [^{ \\t\\n] [^\\x00]*\n"
