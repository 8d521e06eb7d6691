"""Runs one generate job: shape the prompt, check the context, hand the
request to the engine, wait, account. Plain functions; Celery only calls them.
The engine is seen through workers.engine.interface only."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Engine

from schemas.events import Done, ErrorEvent
from schemas.jobs import CHAT_ENDPOINTS, GenerateJob
from schemas.registry import ModelConfig
from schemas.settings import get_settings
from schemas.templates import PromptBuilder, PromptError
from workers.embed import EmbedRuntime
from workers.engine.interface import Embedder, GenerationEngine, InvalidRequest
from workers.engine.types import (
    ContextLengthExceeded,
    EngineRequest,
    EventSink,
    Sampling,
    TooManyChoices,
)
from workers.job import Claim, accounting, claim_job, publish, run_job
from workers.prompts import PromptShaper, TemplateShaper
from workers.sink import bad_request

log = logging.getLogger(__name__)


@dataclass
class WorkerRuntime:
    config: ModelConfig
    engine: GenerationEngine
    prompts: PromptBuilder
    redis: redis.Redis
    db: Engine
    # Requests running here, by id, so a cancel message can reach them.
    running: dict[str, EngineRequest]
    worker_id: str = ""
    # The shaper of each endpoint not shaped by the model's templates
    # (llama-server's /completion and /infill), by endpoint.
    shapers: Mapping[str, PromptShaper] = field(default_factory=dict)

    def shaper(self, endpoint: str) -> PromptShaper:
        shaper = self.shapers.get(endpoint)
        if shaper is None:
            return TemplateShaper(self.prompts, self.engine.tokenizer)
        return shaper


@dataclass(frozen=True)
class Loading:
    """What building a model's runtimes takes from its worker (workers.main)."""

    config: ModelConfig
    # The model's weights: a GGUF file, or vLLM's model directory.
    path: Path
    redis: redis.Redis
    db: Engine
    worker_id: str
    sink: EventSink
    # The requests running, by id (WorkerRuntime.running).
    running: dict[str, EngineRequest]

    def runtime(
        self,
        engine: GenerationEngine,
        prompts: PromptBuilder,
        shapers: Mapping[str, PromptShaper] | None = None,
    ) -> WorkerRuntime:
        return WorkerRuntime(
            self.config,
            engine,
            prompts,
            self.redis,
            self.db,
            self.running,
            self.worker_id,
            shapers or {},
        )

    def embed_runtime(self, embedder: Embedder) -> EmbedRuntime:
        return EmbedRuntime(self.config, embedder, self.redis, self.db, self.worker_id)


def build_prompt(runtime: WorkerRuntime, job: GenerateJob) -> list[int]:
    return runtime.shaper(job.endpoint).tokens(job)


class Rejected(Exception):
    """A job that cannot run as asked: the 400 to answer with."""

    def __init__(self, event: ErrorEvent) -> None:
        super().__init__(event.message)
        self.event = event


# The refusals prepare() knows besides InvalidRequest (which names its own
# code and field): their code, and the field they name; _PROMPT is the
# prompt's own field, `messages` for chat and `prompt` otherwise.
_PROMPT = "<prompt>"
_REFUSALS: tuple[tuple[type[Exception], str, str], ...] = (
    (ContextLengthExceeded, "context_length_exceeded", _PROMPT),
    (TooManyChoices, "invalid_request_error", "n"),
    (PromptError, "invalid_request_error", _PROMPT),
    (UnicodeError, "invalid_request_error", _PROMPT),
)


def refusal(exc: Exception, job: GenerateJob) -> ErrorEvent | None:
    """The 400 answering `exc` raised while `job` was prepared; None when
    `exc` is none of the known refusals."""
    if isinstance(exc, InvalidRequest):
        return bad_request(str(exc), code=exc.code, param=exc.param)
    for kind, code, param in _REFUSALS:
        if isinstance(exc, kind):
            if param == _PROMPT:
                param = "messages" if job.endpoint in CHAT_ENDPOINTS else "prompt"
            message = str(exc)
            if isinstance(exc, UnicodeError):
                message = f"the prompt is not valid Unicode: {exc}"
            return bad_request(message, code=code, param=param)
    return None


def prepare(runtime: WorkerRuntime, job: GenerateJob) -> tuple[list[int], Sampling]:
    """The prompt tokens and sampling settings of a job; Rejected when the
    request is invalid for this model (template, context length, n, sampling).
    The engine checks everything it will be handed: whatever the API let
    through, a job can be refused but never abort the worker."""
    engine = runtime.engine
    try:
        sampling = engine.sampling_for(job, runtime.config)
        tokens = build_prompt(runtime, job)
        engine.check_fits(len(tokens), sampling.max_tokens, sampling.n)
    except Exception as exc:
        event = refusal(exc, job)
        if event is None:
            # Preparing reads only the request: anything else it raises is
            # still this request's problem (say a template tripping over odd
            # content), answered as a 400 instead of failing the job.
            log.warning("job %s could not be prepared", job.request_id, exc_info=True)
            event = bad_request(f"the request could not be prepared: {type(exc).__name__}: {exc}")
        raise Rejected(event) from exc
    return tokens, sampling


def run_generate(runtime: WorkerRuntime, payload: dict[str, Any]) -> None:
    def work(job: GenerateJob) -> None:
        _run_generate(runtime, job)

    run_job(runtime, payload, GenerateJob, work, log=log, label="job", failure="inference failed")


def _run_generate(runtime: WorkerRuntime, job: GenerateJob) -> None:
    usage = accounting(
        runtime, request_id=job.request_id, endpoint=job.endpoint, account=job.account
    )
    claim = claim_job(runtime, job.request_id)
    if claim is Claim.REQUEUED:
        # Nothing to account: the copy queued again does.
        log.info("dropping job %s: it was queued again under another id", job.request_id)
        return
    if claim is Claim.CANCELLED:
        log.info("job %s was cancelled while queued", job.request_id)
        usage("cancelled", 0, 0, None)
        return
    if claim is Claim.DUPLICATE:
        log.warning("dropping job %s: a copy of it started already", job.request_id)
        return
    try:
        tokens, sampling = prepare(runtime, job)
    except Rejected as exc:
        publish(runtime, job.request_id, exc.event)
        usage("rejected", 0, 0, None)
        return
    request = EngineRequest(
        job.request_id, tokens, sampling, stream=job.stream, id_slot=job.id_slot
    )
    event = runtime.shaper(job.endpoint).accepted(job, sampling, tokens)
    # The API follows this worker's heartbeat from here on, instead of a timeout.
    publish(runtime, job.request_id, replace(event, worker_id=runtime.worker_id))
    runtime.running[job.request_id] = request
    try:
        runtime.engine.submit(request)
        # Bounded: request_timeout for a slot, then a generous time per token.
        result = runtime.engine.wait(request, queue_timeout=get_settings().request_timeout)
    finally:
        runtime.running.pop(job.request_id, None)
    if isinstance(result, Done):
        reason = result.choices[0].finish_reason if result.choices else "stop"
        status = "cancelled" if reason == "cancelled" else "completed"
        usage(
            status,
            result.usage.prompt_tokens,
            result.usage.completion_tokens,
            result.ttft_ms,
            cached=result.tokens_cached,
        )
    else:
        usage("failed", len(tokens), 0, None)
