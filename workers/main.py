"""`inferq worker`: load one model, then consume its Celery queue.

The one place that builds a model's engines (llama.cpp's here, vLLM's in
workers.vllm_runtime, by the model's `backend`): everything it hands them to
(workers.generate, workers.embed, workers.bulk) sees only the interfaces of
workers.engine.interface."""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import sys
import uuid
from typing import TYPE_CHECKING

from schemas import keys
from schemas.db import make_engine
from schemas.queue import make_celery
from schemas.redis_client import sync_client
from schemas.registry import PREFIX_ENTRIES, load_registry
from schemas.settings import get_settings

if TYPE_CHECKING:
    from collections.abc import Callable

    from workers.embed import EmbedRuntime
    from workers.engine.llama.engine import LlamaEngine
    from workers.engine.types import EngineRequest
    from workers.generate import Loading, WorkerRuntime

log = logging.getLogger("inferq.worker")


def run_worker(model_name: str, *, gpu: str | None = None) -> int:
    if gpu is not None:
        # Before llama.cpp is imported: the CUDA runtime reads it once.
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    settings = get_settings()
    registry = load_registry(settings.models_dir)
    config = registry.models.get(model_name)
    if config is None:
        known = ", ".join(sorted(registry.models)) or "none"
        log.error("model %r is not in %s (models: %s)", model_name, settings.models_dir, known)
        return 2
    # Imported here so that CUDA_VISIBLE_DEVICES is set first.
    from workers.presence import CancelListener, Heartbeat
    from workers.tasks import register

    # Bounded Redis waits: through an outage every thread of the worker
    # (consumer, engine sink, heartbeat, cancel listener) retries and recovers.
    client = sync_client(settings)
    worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    db = make_engine(settings.database_url)
    path = config.model_path(settings.models_dir)
    # The models are loaded here, in the main process before the consumer
    # starts, not in worker_process_init (Celery kills that after 4 s).
    from workers.sink import RedisSink

    running: dict[str, EngineRequest] = {}

    def stop_orphan(request_id: str) -> None:
        # Nobody listens to this request any more: stop it at the next step.
        # (Requests only run once the runtime below exists.)
        request = running.get(request_id)
        if request is not None and not request.cancelled and runtime is not None:
            log.info("request %s has no listener left; stopping it", request_id)
            runtime.engine.cancel(request)

    sink = RedisSink(client, on_orphan=stop_orphan)
    runtime: WorkerRuntime | None = None
    embed_runtime: EmbedRuntime | None = None
    from workers.generate import Loading

    loading = Loading(config, path, client, db, worker_id, sink, running)
    if config.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        log.error(
            "model %s runs on vLLM, which this Python (%s) does not have: start its worker "
            "from the vLLM environment (`./run vllm` creates .venv-vllm; then "
            ".venv-vllm/bin/inferq worker --model %s)",
            config.name,
            sys.executable,
            config.name,
        )
        return 2
    try:
        if config.backend == "vllm":
            from workers.vllm_runtime import vllm_runtimes

            runtime, embed_runtime, announce = vllm_runtimes(loading)
        else:
            runtime, embed_runtime, announce = _llama_runtimes(loading)
    except Exception as exc:
        # A model that cannot load (a bad setting, weights it cannot read) is
        # the operator's to fix: say why, once, instead of a traceback loop.
        log.error("%s: model %s could not be loaded: %s", config.source, config.name, exc)
        log.debug("loading %s failed", config.name, exc_info=True)
        return 2
    from workers.bulk import BulkRunner

    bulk = BulkRunner(
        db=db,
        worker_id=worker_id,
        model=config.name,
        lease=settings.batch_lease,
        runtime=runtime,
        embed_runtime=embed_runtime,
    )
    app = make_celery(settings, name=f"inferq-worker-{config.name}")
    register(app, runtime, embed_runtime, bulk, model=config.name)

    # What llama-server's GET /props reports, for the API to read.
    announce()

    def cancel(request_id: str) -> None:
        if request_id.startswith(keys.BATCH_CANCEL_PREFIX):
            bulk.cancel_batch(request_id.removeprefix(keys.BATCH_CANCEL_PREFIX))
            return
        request = runtime.running.get(request_id) if runtime is not None else None
        if request is not None and runtime is not None:
            runtime.engine.cancel(request)

    from workers.stats import StatsReporter

    engines = [r.engine for r in (runtime, embed_runtime) if r is not None]
    stats = StatsReporter(engines, lines=lambda: bulk.lines_written)
    listener = CancelListener(client, model=config.name, on_cancel=cancel)
    listener.start()
    heartbeat = Heartbeat(
        client,
        model=config.name,
        worker_id=worker_id,
        interval=settings.heartbeat_interval,
        slots=config.parallel,
        # The scheduler keeps this many batch lines per sequence in flight.
        bulk_slots=config.bulk_parallel if runtime is not None else config.parallel,
        # Redis came back empty (restarted): announce the props again.
        on_register=announce,
        # Requests whose events a Redis outage swallowed hear of it.
        after_beat=sink.flush,
        # What GET /metrics sums over the model's workers.
        stats=stats,
    )
    heartbeat.start()
    log.info(
        "worker %s ready: model %s (%s)",
        worker_id,
        config.name,
        ", ".join(
            part
            for part, on in (
                (f"{config.parallel} generation slots", runtime is not None),
                ("embeddings", config.embeddings),
                ("rerank", config.reranking),
            )
            if on
        ),
    )
    try:
        worker = app.Worker(
            hostname=f"{config.name}@{worker_id}",
            # Bulk chunks come from their own queue; the engine, not the
            # consumer, keeps them behind interactive requests.
            queues=[keys.model_queue(config.name), keys.bulk_queue(config.name)],
            pool="threads",
            # One consumer thread per slot: every slot can hold a job while the
            # engine batches them all; embedding jobs wait on packed decodes.
            concurrency=config.parallel if runtime is not None else max(config.parallel, 16),
            without_mingle=True,
            without_gossip=True,
            without_heartbeat=True,
            loglevel=settings.log_level,
            quiet=True,
        )
        worker.start()
        return int(getattr(worker, "exitcode", 0) or 0)
    finally:
        heartbeat.stop()
        listener.stop()
        if runtime is not None:
            runtime.engine.close()
        if embed_runtime is not None:
            embed_runtime.engine.close()
        # After the engines: lines they gave back go to pending before exit.
        bulk.close()
        sys.stdout.flush()


def _llama_runtimes(
    loading: Loading,
) -> tuple[WorkerRuntime | None, EmbedRuntime | None, Callable[[], None]]:
    """The runtimes of a llama.cpp model, and what publishes its /props."""
    config, path = loading.config, loading.path
    runtime: WorkerRuntime | None = None
    llama: LlamaEngine | None = None
    if config.generates:
        runtime, llama = _generation_runtime(loading)
    embed_runtime = None
    if config.embeddings or config.reranking:
        from workers.engine.llama.embedding import EmbeddingEngine

        log.info("loading %s for embeddings from %s", config.name, path)
        embedder = EmbeddingEngine(
            path,
            pooling=config.pooling,
            n_batch=config.embedding_batch,
            n_seq=config.embedding_seqs,
            max_input=config.embedding_max_tokens,
            n_threads=config.threads or os.cpu_count(),
            gpu_layers=config.gpu_layers,
        )
        embed_runtime = loading.embed_runtime(embedder)

    def announce() -> None:
        if llama is not None:
            from workers.llama_server import publish_props

            publish_props(loading.redis, config, llama, path)

    return runtime, embed_runtime, announce


def _generation_runtime(
    loading: Loading,
) -> tuple[WorkerRuntime, LlamaEngine]:
    """The generation runtime on a llama.cpp engine, and that engine (for
    what only llama.cpp models announce: llama-server's /props)."""
    config, path = loading.config, loading.path
    from schemas.templates import PromptBuilder
    from workers.engine.llama.engine import LlamaEngine
    from workers.engine.llama.model import ContextOptions, LlamaModel
    from workers.llama_server import shapers

    log.info("loading %s from %s", config.name, path)
    model = LlamaModel(
        path,
        ContextOptions(
            n_slots=config.parallel,
            n_ctx_per_slot=config.context_size,
            n_bulk=config.bulk_parallel,
            kv_cells=config.kv_cells,
            n_holders=PREFIX_ENTRIES,
            n_threads=config.threads,
            gpu_layers=config.gpu_layers,
            f16_kv=config.f16,
        ),
    )
    prompts = PromptBuilder(
        config,
        tokenizer_template=model.metadata("tokenizer.chat_template"),
        bos_token=model.bos_text,
        eos_token=model.eos_text,
    )
    engine = LlamaEngine(
        model,
        loading.sink,
        prefix_cache_tokens=config.prefix_cache_tokens,
        interactive_slowdown=config.interactive_slowdown,
    )
    # llama-server's endpoints shape their prompts themselves.
    table = shapers(engine)
    return loading.runtime(engine, prompts, table), engine
