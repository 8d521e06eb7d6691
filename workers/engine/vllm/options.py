"""A job's sampling for vLLM: the shared resolution (workers.engine.options),
refusals of what vLLM cannot honour (400 unsupported_parameter, never
ignored), and the resolved Sampling as vLLM's SamplingParams."""

from __future__ import annotations

import json
from typing import Any

from schemas.jobs import LLAMA_ENDPOINTS, GenerateJob
from schemas.registry import ModelConfig
from schemas.sampling import DEFAULT_SAMPLERS
from workers.engine.interface import Tokenizer
from workers.engine.options import SamplingError, call_or_free_text, resolve, tool_call_schema
from workers.engine.types import Sampling

UNSUPPORTED = "unsupported_parameter"
# vLLM clamps a logit bias to this; a ban (-inf) is the strongest bias it takes.
MAX_BIAS = 100.0

# Knobs of llama.cpp's samplers that vLLM has no equivalent of: a request
# that sets one to anything but its neutral value is refused.
_NEUTRAL: dict[str, Any] = {"typical_p": 1.0, "mirostat": 0, "min_keep": 0}


def _refuse(param: str, why: str) -> SamplingError:
    message = f"{param} is not supported by this model's engine (vLLM): {why}"
    return SamplingError(message, param, code=UNSUPPORTED)


def check_supported(job: GenerateJob) -> None:
    """Refuse what the job asks that vLLM cannot do."""
    if job.endpoint in LLAMA_ENDPOINTS:
        raise SamplingError(
            f"model '{job.model}' runs on vLLM: llama.cpp's /{job.endpoint.split('.')[1]} is not "
            "served for it (use /v1/completions)",
            "model",
            code="unsupported_model",
        )
    if job.id_slot is not None:
        raise _refuse("id_slot", "vLLM has no slots to pin a request to")
    req = job.sampling
    for name, neutral in _NEUTRAL.items():
        value = getattr(req, name)
        if value is not None and value != neutral:
            raise _refuse(name, "vLLM has no such sampler")
    penalised = req.repeat_penalty is not None and req.repeat_penalty != 1.0
    if penalised and req.repeat_last_n not in (None, -1):
        raise _refuse("repeat_last_n", "vLLM's repetition penalty spans the whole context (-1)")
    if req.samplers is not None and tuple(req.samplers) != DEFAULT_SAMPLERS:
        raise _refuse("samplers", "vLLM's sampler order is fixed")
    if job.beam is not None and job.beam.early_stopping is True:
        raise _refuse(
            "early_stopping", "vLLM's beam search runs every beam to its end (use false or never)"
        )
    if job.beam is not None and req.stop:
        raise _refuse("stop", "vLLM's beam search has no stop strings")


def structured_output(job: GenerateJob) -> tuple[str | None, str | None]:
    """(JSON schema as text, grammar) constraining the output; xgrammar, vLLM's
    default backend, reads GBNF grammars. A function call is its JSON schema
    ("required"), or that schema or free text ("auto", as a grammar)."""
    options = job.sampling
    call = tool_call_schema(job)
    if options.json_schema is not None:
        if options.grammar or call is not None:
            raise SamplingError("give either grammar or json_schema, not both", "grammar")
        return json.dumps(options.json_schema or {"type": "object"}), None
    if options.grammar:
        if call is not None:
            raise SamplingError("give either grammar or tools, not both", "grammar")
        return None, options.grammar
    if call is None:
        return None, None
    if job.tool_mode == "required":
        return json.dumps(call), None
    import xgrammar

    return None, call_or_free_text(str(xgrammar.Grammar.from_json_schema(json.dumps(call))))


def resolve_sampling(job: GenerateJob, config: ModelConfig, tokenizer: Tokenizer) -> Sampling:
    check_supported(job)
    schema, grammar = structured_output(job)
    return resolve(job, config, tokenizer, grammar=grammar, json_schema=schema)


def sampling_params(sampling: Sampling, *, max_tokens: int) -> Any:
    """vLLM's SamplingParams for one request, its output streamed as deltas."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

    structured = None
    if sampling.json_schema is not None:
        structured = StructuredOutputsParams(json=sampling.json_schema)
    elif sampling.grammar is not None:
        structured = StructuredOutputsParams(grammar=sampling.grammar)
    bias: dict[int, float] = {}
    for token, value in sampling.logit_bias:
        bias[token] = max(-MAX_BIAS, min(MAX_BIAS, value))
    return SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        # llama.cpp's top_k <= 0 is vLLM's 0: off.
        top_k=max(sampling.top_k, 0),
        min_p=sampling.min_p,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        repetition_penalty=sampling.repeat_penalty,
        seed=sampling.seed,
        stop=list(sampling.stop) or None,
        max_tokens=max_tokens,
        logprobs=sampling.logprobs,
        logit_bias=bias or None,
        ignore_eos=sampling.ignore_eos,
        structured_outputs=structured,
        output_kind=RequestOutputKind.DELTA,
    )
