"""The engine-neutral sampling options of a generate job, with their bounds:
declared once here. Each protocol (OpenAI, llama-server, /v1/generate) maps
its wire names to them; each engine maps them to its own sampler."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.bounds import (
    Bias,
    Int32,
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

class SamplingOptions(BaseModel):
    """Per-request sampling; None means the model's (then llama-server's) default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # 0 (llama.cpp's n_predict 0) evaluates the prompt into the cache only.
    max_tokens: NonNegInt32 | None = None
    temperature: NonNegFloat32 | None = None
    top_p: Probability | None = None
    top_k: Int32 | None = None
    min_p: Probability | None = None
    typical_p: Probability | None = None
    min_keep: NonNegInt32 | None = None
    repeat_penalty: PositiveFloat32 | None = None
    repeat_last_n: MinusOneInt32 | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    mirostat: Literal[0, 1, 2] | None = None
    mirostat_tau: PositiveFloat32 | None = None
    mirostat_eta: PositiveFloat32 | None = None
    seed: Seed | None = None
    stop: list[str] = Field(default_factory=list)
    # (token id or text, bias); a bias of False bans the token(s).
    logit_bias: list[tuple[TokenId | str, Bias]] = Field(default_factory=list)
    grammar: str | None = None
    # A JSON schema the output must follow; {} means any JSON object.
    json_schema: dict[str, Any] | None = None
    # Log-probabilities of the chosen tokens and this many alternatives.
    logprobs: LogprobCount | None = None
    ignore_eos: bool = False
    n: Width = 1
    cache_prompt: bool = True
    # llama-server's sampler chain order (canonical names: "penalties",
    # "top_k", "typ_p", "top_p", "min_p", "temperature", ...); None: its default.
    samplers: list[str] | None = None
