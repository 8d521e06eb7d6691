"""The vLLM GenerationEngine (workers.engine.interface): each request is one
coroutine on the Runner's loop that feeds vLLM's AsyncLLM and folds its
outputs into the worker's events. Continuous batching, paged attention and
prefix caching are vLLM's own; interactive requests go before batch lines
through vLLM's priority scheduling (workers.engine.types: INTERACTIVE 0,
BULK 1, vLLM runs lower values first)."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
from typing import Any

from schemas.events import ChoiceResult, Done, ErrorEvent, encode
from schemas.jobs import GenerateJob
from schemas.registry import ModelConfig
from schemas.worker_stats import WorkStats
from workers.engine.interface import InvalidRequest
from workers.engine.lifecycle import SHUTTING_DOWN, abandon, cancelled_answer, error, wait_bounded
from workers.engine.options import SamplingError
from workers.engine.types import (
    BULK,
    PROMPT_TOKEN_BUDGET_S,
    TOKEN_BUDGET_S,
    EngineRequest,
    EventSink,
    Sampling,
    check_fits,
)
from workers.engine.vllm.outputs import Progress, RequestFailed
from workers.engine.vllm.runner import Outbox, Runner
from workers.engine.vllm.tokenizer import HfTokenizer

log = logging.getLogger("inferq.vllm")


class VllmEngine:
    def __init__(
        self, runner: Runner, sink: EventSink, *, n_slots: int, max_seqs: int, bulk_seqs: int
    ) -> None:
        self._runner = runner
        self.sink = sink
        self.n_slots = n_slots
        self._max_seqs = max_seqs
        llm = runner.llm
        self.n_ctx_per_slot = int(llm.model_config.max_model_len)
        self._tokenizer = HfTokenizer.of(llm)
        self._outbox = Outbox(sink, EngineRequest.done)
        # Requests in the engine, and the coroutine serving each (loop only).
        self._running: dict[EngineRequest, asyncio.Task[None]] = {}
        # Batch lines wait here while `bulk_seqs` of their sequences are in
        # vLLM: its priority scheduling preempts lower priorities only when
        # the KV cache runs out, never for a sequence slot (max_num_seqs), so
        # batch lines beyond their share would hold the slots interactive
        # requests need until they finish.
        self._bulk_seqs = bulk_seqs
        self._bulk_in_engine = 0
        self._bulk_waiting: collections.deque[EngineRequest] = collections.deque()
        self._prompt_tokens = 0
        self._prompt_seconds = 0.0
        self._generated = 0
        self._generate_seconds = 0.0
        self._closed = False
        self._dead = False
        self._warm_up()

    def _warm_up(self) -> None:
        """One token with log-probabilities before the first request: vLLM's
        first such request spends seconds setting up (measured: 2 s on a
        CPU), which would otherwise land on a user's time to first token."""
        from vllm.sampling_params import SamplingParams

        async def once() -> None:
            params = SamplingParams(max_tokens=1, logprobs=1, temperature=0)
            prompt = {"prompt_token_ids": self._tokenizer.tokenize("Hello", add_special=True)}
            async for _ in self._runner.llm.generate(prompt, params, "warm-up"):
                pass

        try:
            self._runner.call(once(), timeout=300)
        except Exception:
            log.warning("the warm-up request failed", exc_info=True)

    # -- GenerationEngine -------------------------------------------------

    @property
    def tokenizer(self) -> HfTokenizer:
        return self._tokenizer

    def sampling_for(self, job: GenerateJob, config: ModelConfig) -> Sampling:
        from workers.engine.vllm.options import resolve_sampling

        try:
            return resolve_sampling(job, config, self._tokenizer)
        except SamplingError as exc:
            raise InvalidRequest(str(exc), param=exc.param, code=exc.code) from exc

    def check_fits(self, prompt_tokens: int, max_tokens: int | None, n: int = 1) -> None:
        check_fits(prompt_tokens, max_tokens, n, n_ctx=self.n_ctx_per_slot, n_slots=self._max_seqs)

    def submit(self, *requests: EngineRequest) -> None:
        for request in requests:
            if self._closed:
                abandon(self.sink, [request], SHUTTING_DOWN, 503)
                continue
            self._runner.soon(lambda r=request: self._start(r))  # type: ignore[misc]

    def wait(self, request: EngineRequest, *, queue_timeout: float) -> Done | ErrorEvent:
        return wait_bounded(
            self,
            request,
            queue_timeout=queue_timeout,
            prompt_token_s=PROMPT_TOKEN_BUDGET_S,
            token_s=TOKEN_BUDGET_S,
        )

    def cancel(self, request: EngineRequest) -> None:
        request.cancel()
        self._runner.soon(lambda: self._stop(request))

    def expire(self, request: EngineRequest, reason: str) -> None:
        request.expired = reason
        self._runner.soon(lambda: self._stop(request))

    def metrics(self) -> WorkStats:
        return WorkStats(
            prompt_tokens=self._prompt_tokens,
            prompt_seconds=self._prompt_seconds,
            predicted_tokens=self._generated,
            predicted_seconds=self._generate_seconds,
            processing=len(self._running),
            deferred=len(self._bulk_waiting),
        )

    def close(self) -> None:
        self._closed = True
        try:
            self._runner.call(self._stop_all(), timeout=30)
        except Exception:
            log.exception("stopping the requests in vLLM failed")
        self._outbox.close()
        self._runner.close()

    # -- on the loop --------------------------------------------------------

    def _start(self, request: EngineRequest) -> None:
        waits = self._bulk_waiting or not self._bulk_fits(request)
        if request.priority == BULK and waits:
            self._bulk_waiting.append(request)
            return
        self._launch(request)

    def _bulk_fits(self, request: EngineRequest) -> bool:
        # A line wider than the whole share still runs, alone.
        in_engine = self._bulk_in_engine
        return in_engine == 0 or in_engine + request.sampling.n <= self._bulk_seqs

    def _launch(self, request: EngineRequest) -> None:
        if request.priority == BULK:
            self._bulk_in_engine += request.sampling.n
        progress = Progress(request)
        task = self._runner.loop.create_task(self._serve(request, progress))
        self._running[request] = task
        task.add_done_callback(lambda _: self._settled(request, progress))

    def _stop(self, request: EngineRequest) -> None:
        task = self._running.get(request)
        if task is not None:
            # generate() aborts the request in vLLM when its consumer is cancelled.
            task.cancel()
        elif request in self._bulk_waiting:
            self._bulk_waiting.remove(request)
            self._end(request, self._interrupted(request, Progress(request)))

    def _next_bulk(self) -> None:
        """Batch lines into vLLM while their sequences fit their share."""
        while self._bulk_waiting and self._bulk_fits(self._bulk_waiting[0]):
            self._launch(self._bulk_waiting.popleft())

    async def _stop_all(self) -> None:
        while self._bulk_waiting:
            self._stop(self._bulk_waiting[0])
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, request: EngineRequest, progress: Progress) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            if request.cancelled or request.expired is not None:
                raise asyncio.CancelledError
            result: Done | ErrorEvent = await self._generate(request, progress)
        except asyncio.CancelledError:
            result = self._interrupted(request, progress)
        except EngineDeadError:
            result = error("the vLLM engine stopped; the worker restarts", 503)
            self._engine_died()
        except Exception as exc:
            result = self._failure(request, progress, exc)
        self._end(request, result)

    async def _generate(self, request: EngineRequest, progress: Progress) -> Done:
        from workers.engine.vllm.options import sampling_params

        sampling = request.sampling
        prompt = len(request.prompt_tokens)
        limit = self.n_ctx_per_slot - prompt
        max_tokens = limit if sampling.max_tokens is None else min(sampling.max_tokens, limit)
        if max_tokens <= 0:
            # llama.cpp's n_predict 0: nothing to generate.
            return _empty(request, progress)
        llm = self._runner.llm
        tokens: dict[str, Any] = {"prompt_token_ids": list(request.prompt_tokens)}
        if sampling.beam:
            from workers.engine.vllm.beam import beam_search

            progress.take_beams(await beam_search(llm, request, max_tokens))
        else:
            params = sampling_params(sampling, max_tokens=max_tokens)
            async for output in llm.generate(
                tokens, params, request.request_id, priority=request.priority
            ):
                events = progress.take(output)
                if events:
                    self._outbox.put(events)
        done = progress.result()
        self._count(done)
        return done

    def _count(self, done: Done) -> None:
        self._prompt_tokens += max(done.usage.prompt_tokens - done.tokens_cached, 0)
        self._generated += done.usage.completion_tokens
        if done.ttft_ms is not None:
            self._prompt_seconds += done.ttft_ms / 1000
            self._generate_seconds += max(done.duration_ms - done.ttft_ms, 0.0) / 1000

    def _interrupted(self, request: EngineRequest, progress: Progress) -> Done | ErrorEvent:
        if request.expired is not None:
            return error(request.expired, 504)
        if self._closed:
            return error(SHUTTING_DOWN, 503)
        return cancelled_answer(request, progress.result())

    def _failure(self, request: EngineRequest, progress: Progress, exc: Exception) -> ErrorEvent:
        from vllm.exceptions import VLLMClientError

        cause = exc.__cause__ if exc.__cause__ is not None else exc
        constrained = request.sampling.grammar or request.sampling.json_schema
        if isinstance(cause, RequestFailed) and constrained and progress.n_generated == 0:
            cause = ValueError("its grammar could not be compiled")
        if progress.n_generated == 0 and isinstance(cause, VLLMClientError | ValueError):
            # vLLM refused the request before running it (a grammar it cannot
            # compile, say): the client's mistake, a 400.
            sampling = request.sampling
            param = "json_schema" if sampling.json_schema else None
            param = "grammar" if sampling.grammar else param
            return ErrorEvent(
                message=f"the request was refused by vLLM: {cause}",
                error_type="invalid_request_error",
                code="invalid_request_error",
                status=400,
                param=param,
            )
        log.error("request %s failed in vLLM", request.request_id, exc_info=exc)
        return error(f"inference failed: {type(cause).__name__}: {cause}")

    def _engine_died(self) -> None:
        if self._dead:
            return
        self._dead = True
        # Nothing more can run here: stop the worker (a warm shutdown hands
        # its queued jobs back) so that its supervisor starts a new one.
        log.critical("the vLLM engine core died; stopping the worker")
        os.kill(os.getpid(), signal.SIGTERM)

    def _end(self, request: EngineRequest, result: Done | ErrorEvent) -> None:
        if not request.settle(result):
            return
        if request.publish:
            self._outbox.put([(request.request_id, encode(result))], ended=request)
        else:
            request.done()

    def _settled(self, request: EngineRequest, progress: Progress) -> None:
        """The request's coroutine is done: forget it. One cancelled before it
        ever ran never reached _serve's handlers and ends here."""
        self._running.pop(request, None)
        if request.result is None:
            self._end(request, self._interrupted(request, progress))
        if request.priority == BULK:
            self._bulk_in_engine -= request.sampling.n
            self._next_bulk()


def _empty(request: EngineRequest, progress: Progress) -> Done:
    """The answer of a request with nothing to generate (max_tokens 0)."""
    choices = [
        ChoiceResult(
            index=i,
            finish_reason="length",
            text=None if request.streams else "",
            logprobs=None if request.streams or request.sampling.logprobs is None else [],
            stop_type="limit",
        )
        for i in range(request.sampling.n)
    ]
    done = progress.result()
    return Done(choices, done.usage, done.ttft_ms, done.duration_ms)
