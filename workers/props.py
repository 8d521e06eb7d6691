"""llama-server's /props and generation_settings, whichever engine serves the
model: every worker publishes its model's properties to Redis when it starts
(the API may have no copy of the model) in llama-server's format."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from schemas import keys
from schemas.registry import ModelConfig
from schemas.sampling import DEFAULT_SAMPLERS
from workers.engine.interface import Tokenizer
from workers.engine.types import Sampling

log = logging.getLogger(__name__)

# llama.cpp's LLAMA_DEFAULT_SEED: the seed llama-server reports for "random".
RANDOM_SEED = 0xFFFFFFFF


def generation_settings(sampling: Sampling, *, n_ctx: int, model: str) -> dict[str, Any]:
    """The resolved Sampling mapped back to llama-server's reporting format,
    `generation_settings`: what this request runs with, under llama-server's
    names and in its key order. The samplers inferq does not implement (dry,
    xtc, top_n_sigma, dynamic temperature) are reported with llama-server's
    defaults, which turn them off."""
    n_predict = -1 if sampling.max_tokens is None else sampling.max_tokens
    return {
        "n_ctx": n_ctx,
        "model": model,
        "n_predict": n_predict,
        "max_tokens": n_predict,
        "seed": RANDOM_SEED if sampling.seed is None else sampling.seed,
        "temperature": sampling.temperature,
        "dynatemp_range": 0.0,
        "dynatemp_exponent": 1.0,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "min_p": sampling.min_p,
        "top_n_sigma": -1.0,
        "xtc_probability": 0.0,
        "xtc_threshold": 0.1,
        "typical_p": sampling.typical_p,
        "repeat_last_n": sampling.repeat_last_n,
        "repeat_penalty": sampling.repeat_penalty,
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "dry_multiplier": 0.0,
        "dry_base": 1.75,
        "dry_allowed_length": 2,
        "dry_penalty_last_n": -1,
        "mirostat": sampling.mirostat,
        "mirostat_tau": sampling.mirostat_tau,
        "mirostat_eta": sampling.mirostat_eta,
        "stop": list(sampling.stop),
        "ignore_eos": sampling.ignore_eos,
        # A ban (-inf) is null, as llama-server's JSON writes it.
        "logit_bias": [
            {"bias": bias if math.isfinite(bias) else None, "token": token}
            for token, bias in sampling.logit_bias
        ],
        "n_probs": sampling.logprobs or 0,
        "min_keep": sampling.min_keep,
        "grammar": sampling.grammar or "",
        "samplers": list(sampling.samplers if sampling.samplers is not None else DEFAULT_SAMPLERS),
        "cache_prompt": sampling.cache_prompt,
    }


def model_props(
    config: ModelConfig,
    *,
    path: Path,
    n_ctx: int,
    sampling: Sampling,
    tokenizer: Tokenizer,
    tokenizer_template: str | None,
    build_info: str,
    infill: bool,
) -> dict[str, Any]:
    """What GET /props reports about a model, whichever engine serves it:
    its default generation settings (`sampling`) and its vocabulary's
    template and special tokens (the YAML's chat template first)."""
    return {
        "model": config.name,
        "model_path": str(path),
        "n_ctx": n_ctx,
        "params": generation_settings(sampling, n_ctx=n_ctx, model=config.name),
        "chat_template": config.template.chat or tokenizer_template or "",
        "bos_token": tokenizer.bos_text,
        "eos_token": tokenizer.eos_text,
        "build_info": build_info,
        "infill": infill,
    }


def publish(client: redis.Redis, config: ModelConfig, props: Callable[[], dict[str, Any]]) -> None:
    """Store what GET /props reports about `config`'s model. Informational:
    a failure (building or storing it) only logs."""
    try:
        client.set(keys.model_props(config.name), json.dumps(props()))
    except Exception:
        log.warning("could not publish the properties of %s", config.name, exc_info=True)
