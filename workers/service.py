"""Runs one generate job: template, tokenize, check the context, hand the
request to the engine, wait, account. Plain functions; Celery only calls them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis
from sqlalchemy import Engine

from schemas import keys
from schemas.events import Accepted, Done, ErrorEvent, encode
from schemas.jobs import CHAT_ENDPOINTS, LLAMA_ENDPOINTS, GenerateJob
from schemas.registry import ModelConfig
from workers.engine.llama_engine import LlamaEngine
from workers.engine.types import ContextLengthExceeded, EngineRequest, Sampling, TooManyChoices
from workers.llama_server import LlamaPromptError, accepted, llama_tokens
from workers.sampling_options import SamplingError, resolve_sampling
from workers.templates import PromptBuilder, PromptError
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
    request is invalid for this model (template, context length, n, sampling)."""
    try:
        sampling = resolve_sampling(job, runtime.config, runtime.engine.model)
        tokens = build_prompt(runtime, job)
        runtime.engine.check_fits(len(tokens), sampling.max_tokens, sampling.n)
    except (PromptError, ContextLengthExceeded, TooManyChoices, SamplingError) as exc:
        code, param = "invalid_request_error", None
        if isinstance(exc, ContextLengthExceeded):
            code = "context_length_exceeded"
        elif isinstance(exc, TooManyChoices):
            param = "n"
        elif isinstance(exc, SamplingError):
            param = exc.param
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
    return tokens, sampling


def run_generate(runtime: WorkerRuntime, payload: dict[str, object]) -> None:
    job = GenerateJob.model_validate(payload)
    try:
        _run_generate(runtime, job)
    except Exception as exc:
        # Whatever broke, the client waiting on the channel hears of it.
        log.exception("job %s failed", job.request_id)
        _publish(runtime, job.request_id, ErrorEvent(message=f"inference failed: {exc}"))
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

    if runtime.redis.exists(keys.cancel_key(job.request_id)):
        log.info("job %s was cancelled while queued", job.request_id)
        account("cancelled", 0, 0, None)
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
        _publish(runtime, job.request_id, accepted(runtime.engine, job, sampling, tokens))
    else:
        _publish(runtime, job.request_id, Accepted(prompt_tokens=len(tokens)))
    runtime.running[job.request_id] = request
    try:
        runtime.engine.submit(request)
        result = request.wait()
    finally:
        runtime.running.pop(job.request_id, None)
    if isinstance(result, Done):
        reason = result.choices[0].finish_reason if result.choices else "stop"
        status = "cancelled" if reason == "cancelled" else "completed"
        account(status, result.usage.prompt_tokens, result.usage.completion_tokens, result.ttft_ms)
    else:
        account("failed", len(tokens), 0, None)
