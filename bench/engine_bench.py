"""System (a): inferq's continuous-batching engine in process, no HTTP, no queue.

Same workload and metrics as bench.loadgen: C driver threads each submit an
EngineRequest, wait for it to finish and submit the next; one warm-up round
per level. TTFT is from submit() to the moment the engine hands the first
non-empty token event to its EventSink (prompts are tokenized beforehand,
as a worker does before it submits).

    python -m bench.engine_bench --model models/gemma-3-270m-q4_k_m.gguf --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a file (python bench/engine_bench.py): make `bench` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp

from bench.sysload import LoadMonitor
from bench.workload import (
    LEVELS,
    Job,
    LevelResult,
    RequestResult,
    level_plan,
    log_level,
    print_levels,
)
from schemas.events import TOKEN_PREFIX, Done
from workers.engine.llama.engine import LlamaEngine
from workers.engine.llama.model import ContextOptions, LlamaModel
from workers.engine.types import EngineRequest, Sampling

log = logging.getLogger("bench.engine")

# inferq will grow `ignore_eos`; until Sampling has the field, requests stop
# at EOS and the token count is what was actually generated.
SAMPLING_HAS_IGNORE_EOS = "ignore_eos" in {f.name for f in dataclasses.fields(Sampling)}


class TimingSink:
    """Records when each request's first non-empty token event arrives and
    how many token events it got. Called from the engine thread only."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.chunks: dict[str, int] = {}

    def publish(self, events: Sequence[tuple[str, bytes]]) -> None:
        now = time.perf_counter()
        for request_id, payload in events:
            # b'T0:""' would be an empty token; the engine never sends one, but
            # TTFT must mean visible text, as it does for the HTTP systems.
            if payload[:1] == TOKEN_PREFIX and not payload.endswith(b':""'):
                self.chunks[request_id] = self.chunks.get(request_id, 0) + 1
                self.first.setdefault(request_id, now)


class EngineBench:
    def __init__(self, model_path: Path, n_slots: int, n_ctx_per_slot: int, threads: int) -> None:
        self.model = LlamaModel(
            model_path,
            ContextOptions(n_slots=n_slots, n_ctx_per_slot=n_ctx_per_slot, n_threads=threads),
        )
        self.sink = TimingSink()
        self.engine = LlamaEngine(self.model, self.sink)

    def tokenize(self, prompt: str) -> list[int]:
        # What workers.generate.build_prompt does for a completion without a template.
        return self.model.tokenize(prompt, add_special=self.model.add_bos, parse_special=True)

    def run_one(self, job: Job, tokens: list[int]) -> RequestResult:
        extra: dict[str, Any] = {"ignore_eos": True} if SAMPLING_HAS_IGNORE_EOS else {}
        sampling = Sampling(
            temperature=job.temperature, seed=job.seed, max_tokens=job.max_tokens, **extra
        )
        request_id = f"bench-{job.index}"
        request = EngineRequest(request_id, tokens, sampling, stream=True)
        sent = time.perf_counter()
        self.engine.submit(request)
        result = request.wait()
        duration = time.perf_counter() - sent
        first = self.sink.first.pop(request_id, None)
        chunks = self.sink.chunks.pop(request_id, 0)
        if not isinstance(result, Done):
            message = result.message if result else "no result"
            return RequestResult(job.index, None, duration, chunks, 0, error=message)
        return RequestResult(
            index=job.index,
            ttft_s=None if first is None else first - sent,
            duration_s=duration,
            chunks=chunks,
            completion_tokens=result.usage.completion_tokens,
            prompt_tokens=result.usage.prompt_tokens,
            usage_reported=True,
            finish_reason=result.choices[0].finish_reason if result.choices else None,
        )

    def closed_loop(
        self, jobs: Sequence[Job], concurrency: int
    ) -> tuple[list[RequestResult], float]:
        tokens = {job.index: self.tokenize(job.prompt) for job in jobs}
        queue = list(reversed(jobs))
        lock = threading.Lock()
        results: list[RequestResult] = []

        def user() -> None:
            while True:
                with lock:
                    if not queue:
                        return
                    job = queue.pop()
                outcome = self.run_one(job, tokens[job.index])
                with lock:
                    results.append(outcome)

        users = [threading.Thread(target=user, name=f"user-{i}") for i in range(concurrency)]
        started = time.perf_counter()
        for t in users:
            t.start()
        for t in users:
            t.join()
        wall = time.perf_counter() - started
        return sorted(results, key=lambda r: r.index), wall

    def close(self) -> None:
        self.engine.close()


def run_levels(
    bench: EngineBench, levels: Sequence[int], rounds: int, min_requests: int
) -> list[LevelResult]:
    # The same prompt indices, in the same order, as bench.loadgen.run_levels.
    monitor = LoadMonitor(lambda: [os.getpid()])
    out: list[LevelResult] = []
    for concurrency, warmup, jobs in level_plan(levels, rounds, min_requests):
        bench.closed_loop(warmup, concurrency)
        with monitor.measure() as load:
            results, wall = bench.closed_loop(jobs, concurrency)
        level = LevelResult("engine", concurrency, wall, results, len(warmup), dict(load))
        log_level(log, level)
        out.append(level)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/gemma-3-270m-q4_k_m.gguf"))
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--ctx-per-slot", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=16)
    parser.add_argument("--json", type=Path, help="write the raw results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    bench = EngineBench(args.model, args.slots, args.ctx_per_slot, args.threads)
    try:
        results = run_levels(
            bench, [int(x) for x in args.levels.split(",")], args.rounds, args.min_requests
        )
    finally:
        bench.close()
    meta = {
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "ignore_eos": SAMPLING_HAS_IGNORE_EOS,
        "slots": args.slots,
        "ctx_per_slot": args.ctx_per_slot,
        "threads": args.threads,
    }
    payload = json.dumps({"meta": meta, "levels": [r.to_dict() for r in results]}, indent=1)
    if args.json:
        args.json.write_text(payload)
    print_levels(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
