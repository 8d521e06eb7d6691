"""The engine-neutral sampling options of a generate job, with their bounds:
declared once here. Each protocol (OpenAI, llama-server, /v1/generate) maps
its wire names to them once; each engine maps them to its own sampler once.

SharedSampling declares the knobs every protocol that has them accepts under
the same name and meaning (the llama.cpp family's); the OpenAI and
llama-server request models inherit it, and SamplingOptions, what a job
carries, extends it. /v1/generate keeps vLLM's names and defaults but takes
its bounds from the aliases below."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.bounds import (
    Bias,
    LogprobCount,
    MinusOneInt32,
    NonNegFloat32,
    NonNegInt32,
    Penalty,
    PositiveFloat32,
    Probability,
    Seed,
    TokenId,
    Width,
    token_key,
)

# llama-server's default sampler order and every name it accepts. inferq runs
# penalties, top_k, typ_p, top_p, min_p, temperature and infill; the others
# are accepted and stay off (their parameters are llama-server's defaults,
# which turn them off).
DEFAULT_SAMPLERS = (
    "penalties",
    "dry",
    "top_n_sigma",
    "top_k",
    "typ_p",
    "top_p",
    "min_p",
    "xtc",
    "temperature",
)
SAMPLER_NAMES = frozenset((*DEFAULT_SAMPLERS, "infill", "adaptive_p", "tfs_z"))

# The bounds of the knobs /v1/generate declares again under vLLM's defaults:
# named once, so that every protocol refuses the same values.
Temperature = NonNegFloat32
TopP = Probability
# 0 and -1 both turn top-k off (llama.cpp: any value <= 0; vLLM: -1).
TopK = MinusOneInt32
MinP = Probability
RepeatPenalty = PositiveFloat32

# logit_bias on the wire: {"token id": bias}, or [[token id or text, bias]].
# A bias of false bans the token(s).
BiasMap = dict[str, Bias]
BiasPairs = list[tuple[TokenId | str, Bias]]
LogitBias = BiasMap | BiasPairs


class SharedSampling(BaseModel):
    """The knobs every protocol that has them accepts under these names, with
    this meaning and these bounds. None: the model's default, then
    llama-server's."""

    model_config = ConfigDict(allow_inf_nan=False)

    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    typical_p: Probability | None = None
    min_keep: NonNegInt32 | None = None
    repeat_penalty: RepeatPenalty | None = None
    # -1: the whole context; 0: no repetition penalty.
    repeat_last_n: MinusOneInt32 | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    mirostat: Literal[0, 1, 2] | None = None
    mirostat_tau: PositiveFloat32 | None = None
    mirostat_eta: PositiveFloat32 | None = None
    seed: Seed | None = None
    grammar: str | None = None
    # A JSON schema the output must follow; {} means any JSON object.
    json_schema: dict[str, Any] | None = None
    ignore_eos: bool = False
    cache_prompt: bool = True


SHARED_FIELDS = frozenset(SharedSampling.model_fields)


class SamplingOptions(SharedSampling):
    """Per-request sampling as a job carries it: the shared knobs, and what
    each protocol maps its own fields to."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # 0 (llama.cpp's n_predict 0) evaluates the prompt into the cache only.
    max_tokens: NonNegInt32 | None = None
    stop: list[str] = Field(default_factory=list)
    # (token id or text, bias); a bias of False bans the token(s).
    logit_bias: BiasPairs = Field(default_factory=list)
    # Log-probabilities of the chosen tokens and this many alternatives.
    logprobs: LogprobCount | None = None
    n: Width = 1
    # llama-server's sampler chain order (canonical names: "penalties",
    # "top_k", "typ_p", "top_p", "min_p", "temperature", ...); None: its default.
    samplers: list[str] | None = None


def sampling_options(body: SharedSampling, **mapped: Any) -> SamplingOptions:
    """The options of a request: its shared knobs copied by name, then what
    its protocol maps from its own names (`mapped`, which wins where both
    name a field). A ValidationError when a mapped value is out of bounds."""
    shared = {name: getattr(body, name) for name in SharedSampling.model_fields}
    return SamplingOptions.model_validate({**shared, **mapped})


def stop_list(stop: str | list[str] | None) -> list[str]:
    """`stop` as one string or several, as a list."""
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def bias_pairs(
    value: BiasMap | BiasPairs | None, *, text_keys: bool
) -> list[tuple[int | str, float | bool]]:
    """logit_bias as (token id or text, bias) pairs. The list form is taken
    as given. A map's keys are token ids written as ASCII integers; a key
    that is not one is text to tokenize when `text_keys` (llama-server),
    refused otherwise (OpenAI). ValueError for a refused key, or for an id
    outside int32."""
    if value is None:
        return []
    if not isinstance(value, dict):
        return list(value)
    pairs: list[tuple[int | str, float | bool]] = []
    for key, bias in value.items():
        token = token_key(key)
        if token is None and not text_keys:
            raise ValueError(f"keys must be token ids written as integers, not {key[:40]!r}")
        pairs.append((key if token is None else token, bias))
    return pairs
