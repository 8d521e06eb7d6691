"""`inferq worker`: load one model, then consume its Celery queue."""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid

import redis

from schemas import keys
from schemas.db import make_engine
from schemas.queue import make_celery
from schemas.registry import load_registry
from schemas.settings import get_settings

log = logging.getLogger("inferq.worker")


def run_worker(model_name: str, *, gpu: int | None = None) -> int:
    if gpu is not None:
        # Before llama.cpp is imported: the CUDA runtime reads it once.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    settings = get_settings()
    registry = load_registry(settings.models_dir)
    config = registry.models.get(model_name)
    if config is None:
        known = ", ".join(sorted(registry.models)) or "none"
        log.error("model %r is not in %s (models: %s)", model_name, settings.models_dir, known)
        return 2
    if config.backend != "llama-cpp":
        log.error("%s: backend %r is not served by this worker", config.source, config.backend)
        return 2

    # Imported here so that CUDA_VISIBLE_DEVICES is set first.
    from workers.engine.llama_engine import LlamaEngine
    from workers.engine.llama_model import ContextOptions, LlamaModel
    from workers.llama_server import publish_props
    from workers.presence import CancelListener, Heartbeat
    from workers.service import WorkerRuntime
    from workers.sink import RedisSink
    from workers.tasks import register
    from workers.templates import PromptBuilder

    client = redis.Redis.from_url(settings.redis_url)
    # The model is loaded here, in the main process before the consumer starts,
    # not in worker_process_init (Celery kills that after 4 s).
    log.info("loading %s from %s", config.name, config.model_path(settings.models_dir))
    model = LlamaModel(
        config.model_path(settings.models_dir),
        ContextOptions(
            n_slots=config.parallel,
            n_ctx_per_slot=config.context_size,
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
    engine = LlamaEngine(model, RedisSink(client))
    runtime = WorkerRuntime(
        config=config,
        engine=engine,
        prompts=prompts,
        redis=client,
        db=make_engine(settings.database_url),
        running={},
        worker_id=f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
    )
    app = make_celery(settings, name=f"inferq-worker-{config.name}")
    register(app, runtime)
    # What llama-server's GET /props reports, for the API to read.
    publish_props(client, config, engine, settings.models_dir)

    def cancel(request_id: str) -> None:
        request = runtime.running.get(request_id)
        if request is not None:
            request.cancel()

    worker_id = runtime.worker_id
    heartbeat = Heartbeat(
        client,
        model=config.name,
        worker_id=worker_id,
        interval=settings.heartbeat_interval,
        slots=config.parallel,
    )
    listener = CancelListener(client, model=config.name, on_cancel=cancel)
    listener.start()
    heartbeat.start()
    log.info(
        "worker %s ready: model %s, %d slots of %d tokens",
        worker_id,
        config.name,
        config.parallel,
        engine.n_ctx_per_slot,
    )
    try:
        worker = app.Worker(
            hostname=f"{config.name}@{worker_id}",
            queues=[keys.model_queue(config.name)],
            pool="threads",
            # One consumer thread per slot: every slot can hold a job while the
            # engine batches them all.
            concurrency=config.parallel,
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
        engine.close()
        sys.stdout.flush()
