"""vLLM's AsyncLLM on an asyncio loop of its own thread, and the one thread
that publishes what the loop produces. The worker's other threads (Celery's
consumers, the heartbeat) hand coroutines to the loop; the loop never blocks
on Redis: its events go out through the Outbox."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import subprocess
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from workers.engine.types import EngineRequest, EventSink
from workers.engine.vllm.settings import prepare_environment

log = logging.getLogger("inferq.vllm")
T = TypeVar("T")

# Seconds vLLM may take to load a model and start its engine core.
START_TIMEOUT_S = 1800.0


class Runner:
    """An event loop thread and the AsyncLLM built on it from `kwargs`
    (AsyncEngineArgs' fields)."""

    def __init__(self, kwargs: dict[str, Any], *, name: str = "vllm-loop") -> None:
        prepare_environment()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        known = set(AsyncEngineArgs.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"this vLLM release has no engine setting {', '.join(unknown)}")
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

        async def build() -> Any:
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

        try:
            self.llm = self.call(build(), timeout=START_TIMEOUT_S)
        except BaseException:
            self._stop_loop()
            raise
        self._reaper = _watch_engine()

    def call(self, coro: Coroutine[Any, Any, T], *, timeout: float | None = None) -> T:
        """Run `coro` on the loop and wait for its result (from another thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def soon(self, callback: Callable[[], None]) -> None:
        self.loop.call_soon_threadsafe(callback)

    def close(self) -> None:
        try:
            self.llm.shutdown()
        except Exception:
            log.exception("shutting vLLM down failed")
        self._stop_loop()
        if self._reaper is not None:
            self._reaper.kill()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)


def _watch_engine() -> subprocess.Popen[bytes] | None:
    """A reaper (workers.engine.vllm.reaper) for the engine processes vLLM
    just started under this one."""
    import psutil

    from workers.engine.vllm import reaper

    engine = psutil.Process().children(recursive=True)
    if not engine:
        return None
    try:
        return reaper.start(engine)
    except OSError:
        log.warning("could not start the engine's reaper", exc_info=True)
        return None


class Outbox:
    """Events the loop produced, published by one thread: whatever gathered
    while the last publish ran goes out in one pipeline, after which the
    requests that ended with it are marked finished (a waiter that wakes
    finds its answer already published)."""

    def __init__(self, sink: EventSink, finish: Callable[[EngineRequest], None]) -> None:
        self._sink = sink
        self._finish = finish
        self._events: list[tuple[str, bytes]] = []
        self._ended: list[EngineRequest] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="vllm-outbox", daemon=True)
        self._thread.start()

    def put(self, events: list[tuple[str, bytes]], ended: EngineRequest | None = None) -> None:
        with self._lock:
            self._events.extend(events)
            if ended is not None:
                self._ended.append(ended)
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                events, self._events = self._events, []
                ended, self._ended = self._ended, []
                stopping = self._stopping
            if events:
                try:
                    self._sink.publish(events)
                except Exception:
                    log.exception("publishing %d events failed", len(events))
            for request in ended:
                self._finish(request)
            if stopping:
                return

    def close(self) -> None:
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
