"""The runtimes of a `backend: vllm` model: vLLM's AsyncLLM in this process
(on its own loop thread), as a generation engine or, for an embedding or
reranking model, an embedder. Imported only in the vLLM environment."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from schemas.jobs import GenerateJob
from schemas.settings import get_settings
from schemas.templates import PromptBuilder
from workers.embed import EmbedRuntime
from workers.generate import Loading, WorkerRuntime
from workers.props import model_props, publish

log = logging.getLogger("inferq.worker")


def vllm_runtimes(
    loading: Loading,
) -> tuple[WorkerRuntime | None, EmbedRuntime | None, Callable[[], None]]:
    """The runtime serving the model and what publishes its /props."""
    config, path = loading.config, loading.path
    import torch

    from workers.engine.vllm.runner import Runner
    from workers.engine.vllm.settings import engine_kwargs

    cpu = not torch.cuda.is_available()
    if cpu:
        # A busy vLLM engine on CPU keeps two processes at full speed (its
        # scheduler and its model runner, which inherit this niceness). At a
        # lower priority they still take every idle cycle, while Redis, the
        # API and the heartbeats, which need little but need it at once, are
        # not starved: on a 2-core machine they were, for seconds.
        _lower_priority(get_settings().vllm_cpu_nice)
    kwargs = engine_kwargs(config, path, cpu=cpu)
    log.info("starting vLLM for %s from %s (%s)", config.name, path, "CPU" if cpu else "GPU")
    runner = Runner(kwargs)
    if not config.generates:
        from workers.engine.vllm.embedding import VllmEmbedder

        embedder = VllmEmbedder(
            runner, rank=config.cross_encoder, max_input=config.embedding_max_tokens
        )
        return None, loading.embed_runtime(embedder), lambda: None

    from workers.engine.vllm.engine import VllmEngine

    engine = VllmEngine(
        runner,
        loading.sink,
        n_slots=config.parallel,
        max_seqs=int(kwargs["max_num_seqs"]),
        bulk_seqs=config.bulk_parallel,
    )
    tokenizer = engine.tokenizer
    prompts = PromptBuilder(
        config,
        tokenizer_template=tokenizer.chat_template,
        bos_token=tokenizer.bos_text,
        eos_token=tokenizer.eos_text,
    )
    runtime = loading.runtime(engine, prompts)

    def props() -> dict[str, Any]:
        job = GenerateJob(request_id="props", model=config.name, endpoint="completions")
        described = model_props(
            config,
            path=path,
            n_ctx=engine.n_ctx_per_slot,
            sampling=engine.sampling_for(job, config),
            tokenizer=tokenizer,
            tokenizer_template=tokenizer.chat_template,
            build_info=f"inferq (vLLM {_vllm_version()})",
            infill=False,
        )
        return {**described, "backend": "vllm"}

    return runtime, None, lambda: publish(loading.redis, config, props)


def _lower_priority(niceness: int) -> None:
    """This process and the engine processes it starts at `niceness`. Where
    the kernel groups processes by session (autogroup), a process's own
    niceness only ranks it within its session, so the session's group is
    lowered too."""
    os.nice(niceness)
    try:
        with open("/proc/self/autogroup", "w") as group:
            group.write(str(niceness))
    except OSError:
        pass  # no autogroup scheduling here: niceness alone counts


def _vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))
