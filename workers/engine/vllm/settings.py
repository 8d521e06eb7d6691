"""A `backend: vllm` model's YAML as vLLM's engine arguments. Plain data: no
vLLM import, so the main environment can check a config too."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from schemas.registry import ModelConfig

# What vLLM needs from the environment before it is imported: never reach a
# model hub (weights are local), bind its internal sockets to loopback, and
# on a CPU a KV cache size in GiB (vLLM's own default is 4).
ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def prepare_environment() -> None:
    """Set ENVIRONMENT's variables the operator has not set."""
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def engine_kwargs(config: ModelConfig, path: Path, *, cpu: bool) -> dict[str, Any]:
    """AsyncEngineArgs' keyword arguments for `config`, whose weights are at
    `path`. Unset vLLM options are left out (vLLM's defaults apply)."""
    options = config.vllm
    kwargs: dict[str, Any] = {
        "model": str(path),
        "tokenizer": str(path),
        "dtype": options.dtype,
        "tensor_parallel_size": options.tensor_parallel_size,
        "trust_remote_code": options.trust_remote_code,
        # vLLM's CPU build has no CUDA graphs to capture.
        "enforce_eager": options.enforce_eager or cpu,
        # Interactive requests go first (priority 0), batch lines after
        # (workers.engine.types.BULK), preempted when interactive ones need room.
        "scheduling_policy": "priority",
        "enable_log_requests": False,
    }
    if config.generates or "context_size" in config.model_fields_set:
        # The context the API checks requests against; an embedding model
        # left unset keeps its own (often 512 tokens, below inferq's default).
        kwargs["max_model_len"] = config.context_size
    if config.generates:
        # Interactive slots plus the batch lines the scheduler keeps in flight.
        kwargs["max_num_seqs"] = config.parallel + config.bulk_parallel
        kwargs["enable_prefix_caching"] = config.prefix_cache_tokens > 0
    else:
        kwargs["runner"] = "pooling"
        kwargs["convert"] = "classify" if config.cross_encoder else "embed"
        kwargs["max_num_seqs"] = config.embedding_seqs
    for name in ("quantization", "gpu_memory_utilization", "swap_space"):
        value = getattr(options, name)
        if value is not None:
            kwargs[name] = value
    return kwargs
