"""Runs one generate job: template, tokenize, check the context, hand the
request to the engine, wait, account. Plain functions; Celery only calls them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import redis
from pydantic import ValidationError
from sqlalchemy import Engine

from schemas import keys
from schemas.events import Accepted, Done, ErrorEvent, encode
from schemas.jobs import CHAT_ENDPOINTS, LLAMA_ENDPOINTS, GenerateJob
from schemas.registry import ModelConfig
from schemas.settings import get_settings
from workers.engine.llama.limits import UnsafeValue, safe_sampling
from workers.engine.llama.engine import LlamaEngine
from workers.engine.types import ContextLengthExceeded, EngineRequest, Sampling, TooManyChoices
from workers.llama_server import LlamaPromptError, accepted, llama_tokens
from workers.presence import claim
from workers.engine.llama.options import SamplingError, resolve_sampling
from workers.sink import reject_payload, report_failure
from schemas.templates import PromptBuilder, PromptError
from workers.usage import record_usage

log = logging.getLogger(__name__)


@dataclass
class WorkerRuntime:
    config: ModelConfig
    engine: LlamaEngine
    prompts: PromptBuilder
    redis: redis.Redis
    db: Engine
    # Requests running here, by id, so a cancel message can reach them.
    running: dict[str, EngineRequest]
    worker_id: str = ""


def _publish(runtime: WorkerRuntime, request_id: str, event: Accepted | Done | ErrorEvent) -> None:
    runtime.redis.publish(keys.stream_channel(request_id), encode(event))


def build_prompt(runtime: WorkerRuntime, job: GenerateJob) -> list[int]:
    engine = runtime.engine
    if job.endpoint in LLAMA_ENDPOINTS:
        # llama-server's /completion and /infill evaluate their prompt verbatim.
        return llama_tokens(engine, job)
    if job.endpoint in CHAT_ENDPOINTS:
        tools = job.tools if job.tool_mode != "none" else None
        text = runtime.prompts.chat(job.messages or [], tools=tools)
    elif job.endpoint == "generate":
        # /v1/generate takes its prompt already formatted.
        text = job.prompt or ""
    else:
        text = runtime.prompts.completion(job.prompt or "")
    # Templates usually write the BOS token themselves; never add a second one.
    bos = engine.model.bos_text
    add_special = engine.model.add_bos and not (bos and text.startswith(bos))
    return engine.model.tokenize(text, add_special=add_special, parse_special=True)


class Rejected(Exception):
    """A job that cannot run as asked: the 400 to answer with."""

    def __init__(self, event: ErrorEvent) -> None:
        super().__init__(event.message)
        self.event = event


def prepare(runtime: WorkerRuntime, job: GenerateJob) -> tuple[list[int], Sampling]:
    """The prompt tokens and sampling settings of a job; Rejected when the
    request is invalid for this model (template, context length, n, sampling).
    Everything llama.cpp will be handed is checked here (workers.engine.llama.limits):
    whatever the API let through, a job can be refused but never abort the worker."""
    engine = runtime.engine
    try:
        sampling = resolve_sampling(job, runtime.config, engine.model)
        sampling = safe_sampling(
            sampling, n_vocab=engine.model.n_vocab, n_ctx=engine.n_ctx_per_slot
        )
        tokens = build_prompt(runtime, job)
        engine.check_fits(len(tokens), sampling.max_tokens, sampling.n)
    except (
        PromptError,
        ContextLengthExceeded,
        TooManyChoices,
        SamplingError,
        UnsafeValue,
        UnicodeError,
    ) as exc:
        code, param = "invalid_request_error", None
        if isinstance(exc, ContextLengthExceeded):
            code = "context_length_exceeded"
        elif isinstance(exc, TooManyChoices):
            param = "n"
        elif isinstance(exc, (SamplingError, UnsafeValue)):
            param = exc.param
        elif isinstance(exc, UnicodeError):
            exc = PromptError(f"the prompt is not valid Unicode: {exc}")
        if isinstance(exc, (PromptError, ContextLengthExceeded)):
            param = "messages" if job.endpoint in CHAT_ENDPOINTS else "prompt"
        if isinstance(exc, LlamaPromptError):
            code, param = exc.code, exc.param
        event = ErrorEvent(
            message=str(exc),
            error_type="invalid_request_error",
            code=code,
            status=400,
            param=param,
        )
        raise Rejected(event) from exc
    except Exception as exc:
        # Preparing reads only the request: anything else it raises is still
        # this request's problem (say a template tripping over odd content),
        # answered as a 400 instead of failing the job.
        log.warning("job %s could not be prepared", job.request_id, exc_info=True)
        event = ErrorEvent(
            message=f"the request could not be prepared: {type(exc).__name__}: {exc}",
            error_type="invalid_request_error",
            code="invalid_request_error",
            status=400,
        )
        raise Rejected(event) from exc
    return tokens, sampling


def run_generate(runtime: WorkerRuntime, payload: dict[str, object]) -> None:
    try:
        job = GenerateJob.model_validate(payload)
    except ValidationError as exc:
        reject_payload(runtime.redis, payload, exc)
        return
    try:
        _run_generate(runtime, job)
    except Exception as exc:
        log.exception("job %s failed", job.request_id)
        report_failure(runtime.redis, job.request_id, f"inference failed: {exc}")
        raise


def _run_generate(runtime: WorkerRuntime, job: GenerateJob) -> None:
    started = time.perf_counter()

    def account(status: str, prompt: int, completion: int, ttft: float | None) -> None:
        record_usage(
            runtime.db,
            request_id=job.request_id,
            model=runtime.config.name,
            endpoint=job.endpoint,
            prompt_tokens=prompt,
            completion_tokens=completion,
            ttft_ms=ttft,
            duration_ms=(time.perf_counter() - started) * 1000,
            status=status,
            worker=runtime.worker_id,
        )

    cancelled, first = claim(
        runtime.redis,
        job.request_id,
        runtime.worker_id,
        request_timeout=get_settings().request_timeout,
    )
    if cancelled == keys.CANCEL_REQUEUED:
        # Its worker died before the client got anything; the API queued it
        # again under another id, so this copy is nobody's (nothing to account).
        log.info("dropping job %s: it was queued again under another id", job.request_id)
        return
    if cancelled is not None:
        log.info("job %s was cancelled while queued", job.request_id)
        account("cancelled", 0, 0, None)
        return
    if not first:
        log.warning("dropping job %s: a copy of it started already", job.request_id)
        return
    try:
        tokens, sampling = prepare(runtime, job)
    except Rejected as exc:
        _publish(runtime, job.request_id, exc.event)
        account("rejected", 0, 0, None)
        return
    request = EngineRequest(
        job.request_id, tokens, sampling, stream=job.stream, id_slot=job.id_slot
    )
    if job.endpoint in LLAMA_ENDPOINTS:
        event = accepted(runtime.engine, job, sampling, tokens)
    else:
        event = Accepted(prompt_tokens=len(tokens))
    # The API follows this worker's heartbeat from here on, instead of a timeout.
    _publish(runtime, job.request_id, replace(event, worker_id=runtime.worker_id))
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
        account(status, result.usage.prompt_tokens, result.usage.completion_tokens, result.ttft_ms)
    else:
        account("failed", len(tokens), 0, None)
