"""Bulk lines on a worker.

A chunk message names lines in the database. The worker claims the ones still
queued for that chunk, hands them to its engine at bulk priority (they only
take slots no interactive request is waiting for) and returns at once, so a
chunk never holds a Celery thread. Results are written by one writer thread
in batched transactions, and only while the line is still this chunk's and
running: a line whose lease ran out and was handed to another worker is
written once, by whoever holds it now; its usage row goes in the same
transaction, under the same condition. The same thread renews the leases of
the lines this worker holds; a worker that dies stops renewing, and the
scheduler puts its lines back. While the database is away, results are kept
and retried and leases renewed as soon as it answers; a result the database
refuses fails its own line instead of holding the others up."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from sqlalchemy import Engine
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError

from schemas import batch_lines
from schemas import batches as b
from schemas.events import Done, Embeddings, ErrorEvent
from schemas.jobs import EmbedJob, GenerateJob
from schemas.tables import utcnow
from workers.embed import EmbedRuntime, InputError, build_inputs, make_answer
from workers.engine.types import BULK, EmbedRequest, EngineRequest
from workers.generate import Rejected, WorkerRuntime, prepare
from workers.usage import insert_usage

log = logging.getLogger(__name__)

# Errors that say the worker went away rather than that the line is bad: the
# line goes back to pending and runs again.
SHUTTING_DOWN = "worker shutting down"


@dataclass(eq=False)
class Held:
    """A line this worker claimed and has not written back yet."""

    batch_id: str
    line: int
    chunk: str
    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    request: EngineRequest | EmbedRequest | None = None
    # Embedding lines: what shaping the answer needs.
    embed: tuple[EmbedJob, list[list[int]], bool] | None = None
    # The API key the line's batch belongs to (its usage row's key_id).
    key_id: str | None = None


@dataclass
class Outcome:
    held: Held
    state: str
    result: dict[str, Any] | None = None
    # A finished generation, shaped into `result` on the writer thread.
    done: Done | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


# The database being away, not a line being bad: the whole write is retried.
OUTAGES = (OperationalError, InterfaceError, DisconnectionError, SATimeoutError)


def _event(event: Done | ErrorEvent | Embeddings) -> dict[str, Any]:
    # Through orjson, as the interactive answer goes out: a -inf logprob
    # (a banned token) becomes null, which Postgres' json accepts.
    raw = asdict(event)
    try:
        data: dict[str, Any] = orjson.loads(orjson.dumps(raw))
    except TypeError:
        # Unpaired surrogates (not UTF-8, so neither orjson nor the database
        # takes them): each becomes "?" first.
        text = json.dumps(raw, ensure_ascii=False).encode("utf-8", "replace")
        data = orjson.loads(orjson.dumps(json.loads(text)))
    return b.worker_result(data)


class BulkRunner:
    def __init__(
        self,
        *,
        db: Engine,
        worker_id: str,
        model: str,
        lease: float,
        runtime: WorkerRuntime | None,
        embed_runtime: EmbedRuntime | None,
    ) -> None:
        self.db = db
        self.worker_id = worker_id
        self.model = model
        self.lease = lease
        self.runtime = runtime
        self.embed_runtime = embed_runtime
        self._outcomes: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self._held: dict[tuple[str, int], Held] = {}
        # Results written by this worker, by final state (its heartbeat's stats).
        self.lines_written = {b.DONE: 0, b.FAILED: 0, b.CANCELLED: 0}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write_loop, name="bulk-writer", daemon=True)
        self._thread.start()

    # -- called from Celery threads -------------------------------------------

    def run_chunk(self, chunk: str) -> int:
        """Claim the chunk's queued lines and start them; returns how many."""
        rows = batch_lines.claim_lines(
            self.db, chunk=chunk, worker=self.worker_id, lease=self.lease
        )
        for batch_id, line, job in sorted(rows, key=lambda r: (r[0], r[1])):
            held = Held(batch_id, line, chunk, endpoint="")
            with self._lock:
                self._held[(batch_id, line)] = held
            try:
                self._start(held, job)
            except Exception as exc:  # one bad line never takes its neighbours down
                log.exception("bulk line %s:%d could not start", batch_id, line)
                self._fail(held, ErrorEvent(message=f"inference failed: {exc}"))
        return len(rows)

    def cancel_batch(self, batch_id: str) -> None:
        """Drop the batch's lines that have not reached a slot; running ones
        finish and keep their results."""
        with self._lock:
            held = [h for (bid, _), h in self._held.items() if bid == batch_id]
        if self.runtime is None:  # no generation engine: embedding inputs run as handed over
            return
        for h in held:
            if isinstance(h.request, EngineRequest) and not h.request.admitted:
                self.runtime.engine.cancel(h.request)

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    # -- starting lines ---------------------------------------------------------

    def _start(self, held: Held, job: dict[str, Any]) -> None:
        payload = job["payload"]
        # Read before the payload is validated, so that even a line that
        # cannot start is charged to its batch's key.
        account = payload.get("account") if isinstance(payload, dict) else None
        if isinstance(account, dict) and isinstance(account.get("key_id"), str):
            held.key_id = account["key_id"]
        if job["task"] == "embed":
            self._start_embed(held, EmbedJob.model_validate(payload))
        else:
            self._start_generate(held, GenerateJob.model_validate(payload))

    def _unsupported(self, held: Held, what: str) -> None:
        message = f"model '{self.model}' does not serve {what}"
        self._fail(
            held,
            ErrorEvent(
                message,
                error_type="invalid_request_error",
                code="unsupported_model",
                status=400,
                param="model",
            ),
        )

    def _start_generate(self, held: Held, job: GenerateJob) -> None:
        held.endpoint = job.endpoint
        if self.runtime is None:
            self._unsupported(held, "text generation")
            return
        try:
            tokens, sampling = prepare(self.runtime, job)
        except Rejected as exc:
            self._fail(held, exc.event)
            return
        request = EngineRequest(
            job.request_id,
            tokens,
            sampling,
            stream=False,
            priority=BULK,
            publish=False,
            on_finish=lambda r: self._generated(held, r),
        )
        held.request = request
        self.runtime.engine.submit(request)

    def _start_embed(self, held: Held, job: EmbedJob) -> None:
        held.endpoint = "rerank" if job.kind == "rerank" else "embeddings"
        if self.embed_runtime is None:
            self._unsupported(held, held.endpoint)
            return
        try:
            inputs, pairs = build_inputs(self.embed_runtime, job)
        except InputError as exc:
            self._fail(
                held,
                ErrorEvent(
                    str(exc), error_type="invalid_request_error", status=400, param=exc.param
                ),
            )
            return
        held.embed = (job, inputs, pairs)
        request = EmbedRequest(
            inputs,
            normalize=job.normalize,
            priority=BULK,
            on_finish=lambda r: self._embedded(held, r),
        )
        held.request = request
        self.embed_runtime.engine.submit(request)

    # -- engine threads: record and move on (the writer does the rest) ------

    def _fail(self, held: Held, event: ErrorEvent) -> None:
        if event.message == SHUTTING_DOWN:
            self._outcomes.put(Outcome(held, b.PENDING))
        else:
            self._outcomes.put(Outcome(held, b.FAILED, _event(event)))

    def _generated(self, held: Held, request: EngineRequest) -> None:
        result = request.result
        if isinstance(result, ErrorEvent) or result is None:
            self._fail(held, result or ErrorEvent(message="inference failed"))
            return
        if any(c.finish_reason == "cancelled" for c in result.choices):
            self._outcomes.put(Outcome(held, b.CANCELLED))
            return
        usage = result.usage
        self._outcomes.put(
            Outcome(
                held,
                b.DONE,
                None,
                result,
                usage.prompt_tokens,
                usage.completion_tokens,
                result.tokens_cached,
            )
        )

    def _embedded(self, held: Held, request: EmbedRequest) -> None:
        if request.error:
            self._fail(held, ErrorEvent(message=request.error))
            return
        self._outcomes.put(Outcome(held, b.DONE))

    # -- writer thread ------------------------------------------------------------

    def _write_loop(self) -> None:
        renew_at = time.monotonic() + self.lease / 3
        backlog: list[Outcome] = []
        failing_since: float | None = None
        while True:
            try:
                backlog.append(self._outcomes.get(timeout=0.2))
                while len(backlog) < 500:
                    backlog.append(self._outcomes.get_nowait())
            except queue.Empty:
                pass
            if backlog:
                try:
                    self._write_all(backlog)
                    backlog = []
                    if failing_since is not None:
                        log.warning(
                            "bulk results written again after %.1f s",
                            time.monotonic() - failing_since,
                        )
                        failing_since = None
                except Exception:
                    # Kept and retried (the database may be away); the leases
                    # are renewed as soon as it answers again, so the lines
                    # are not put back meanwhile unless it stays away longer
                    # than a lease.
                    if failing_since is None:
                        failing_since = time.monotonic()
                        log.exception("writing %d bulk results failed; retrying", len(backlog))
                    renew_at = 0.0
                    time.sleep(1.0)
            if time.monotonic() >= renew_at:
                ok = self._renew()
                renew_at = time.monotonic() + (self.lease / 3 if ok else 1.0)
            if self._stop.is_set() and not backlog and self._outcomes.empty():
                return

    def _write_all(self, outcomes: list[Outcome]) -> None:
        """Write a backlog; when something other than an outage breaks it,
        line by line, and a line whose result cannot be stored fails with
        the reason instead of holding up the others forever. Rewriting a
        line already written is a no-op (it is no longer running)."""
        try:
            self._write(outcomes)
            return
        except OUTAGES:
            raise
        except Exception:
            log.exception("writing %d bulk results failed; line by line", len(outcomes))
        for outcome in outcomes:
            try:
                self._write([outcome])
            except OUTAGES:
                raise
            except Exception as exc:
                held = outcome.held
                log.exception("bulk line %s:%d: result not storable", held.batch_id, held.line)
                event = ErrorEvent(message=f"the result could not be stored: {exc}"[:500])
                self._write([Outcome(held, b.FAILED, _event(event))])

    def _shape(self, outcome: Outcome) -> None:
        held = outcome.held
        if outcome.state != b.DONE or outcome.result is not None:
            return
        if held.embed is not None and isinstance(held.request, EmbedRequest):
            job, inputs, pairs = held.embed
            answer = make_answer(job, held.request, inputs, pairs)
            outcome.prompt_tokens = answer.prompt_tokens
            outcome.result = _event(answer)
        elif outcome.done is not None:
            outcome.result = _event(outcome.done)

    def _write(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            self._shape(outcome)
        now = utcnow()
        results = []
        usage = []
        for o in outcomes:
            h = o.held
            results.append(batch_lines.Result(h.batch_id, h.line, h.chunk, o.state, o.result))
            if o.state in (b.DONE, b.FAILED):
                usage.append(
                    {
                        "_key": (h.batch_id, h.line),
                        "created_at": now,
                        "request_id": f"{h.batch_id}:{h.line}",
                        "model": self.model,
                        "endpoint": f"batch:{h.endpoint}",
                        "prompt_tokens": o.prompt_tokens,
                        "completion_tokens": o.completion_tokens,
                        "ttft_ms": None,
                        "duration_ms": (time.perf_counter() - h.started) * 1000,
                        "status": "completed" if o.state == b.DONE else "failed",
                        "worker": self.worker_id,
                        "key_id": h.key_id,
                        "cached_tokens": o.cached_tokens,
                        "batch_id": h.batch_id,
                    }
                )
        with self.db.begin() as conn:
            # Only the lines this worker still holds are written, and only
            # their usage rows: written with the result, in this transaction,
            # so each line result is accounted once.
            owned = batch_lines.write_results(conn, results=results, now=now)
            insert_usage(conn, [u for u in usage if u.pop("_key") in owned])
        with self._lock:
            for o in outcomes:
                self._held.pop((o.held.batch_id, o.held.line), None)
                if o.state in self.lines_written and (o.held.batch_id, o.held.line) in owned:
                    self.lines_written[o.state] += 1

    def _renew(self) -> bool:
        """Extend the leases of every line this worker runs; False when the
        database could not be reached."""
        with self._lock:
            if not self._held:
                return True
        try:
            batch_lines.renew_leases(self.db, worker=self.worker_id, lease=self.lease)
        except Exception as exc:
            log.warning("renewing bulk leases failed: %s", exc)
            return False
        return True
