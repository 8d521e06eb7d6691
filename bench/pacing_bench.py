"""Interactive requests beside a bulk backlog, in process: the engine's pacing alone.

    .venv/bin/python -m bench.pacing_bench [--lines 200] [--probes 8] [--slowdown 1.5]

One LlamaEngine (no HTTP, no queue) on the demo model. First `--probes`
interactive requests one at a time on the idle engine; then `--lines` bulk
requests (seeded, distinct ~100-token prompts, 64 tokens, ignore_eos) are
submitted at once and interactive requests run one at a time, `--pause`
seconds apart, while they last (all of the batch with `--continuous`, else
the first `--probes`). Reports time to first token and inter-token latency
p50 idle and busy, the bulk requests' generated tokens per second, and the
step cost the pacing fitted (workers.engine.llama.pacing). Markdown, not a
test."""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.services import add_model_args
from bench.workload import make_prompt
from schemas.events import TOKEN_PREFIX, Done
from workers.engine.llama.engine import LlamaEngine
from workers.engine.llama.model import ContextOptions, LlamaModel
from workers.engine.types import BULK, EngineRequest, Sampling

log = logging.getLogger("bench.pacing")

PROBE_OFFSET = 100_000


class TokenTimes:
    """When each interactive token event reached the sink (engine thread only)."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}

    def publish(self, events: Sequence[tuple[str, bytes]]) -> None:
        now = time.perf_counter()
        for request_id, payload in events:
            if payload[:1] == TOKEN_PREFIX:
                self.times.setdefault(request_id, []).append(now)


def probe(engine: LlamaEngine, sink: TokenTimes, model: LlamaModel, i: int) -> tuple[float, float]:
    """One streamed interactive request: (TTFT, median inter-token latency) in s."""
    request_id = f"probe-{i}"
    tokens = model.tokenize(make_prompt(PROBE_OFFSET + i), add_special=model.add_bos)
    sampling = Sampling(temperature=1.0, max_tokens=64, ignore_eos=True)
    request = EngineRequest(request_id, tokens, sampling, stream=True)
    sent = time.perf_counter()
    engine.submit(request)
    request.wait()
    times = sink.times.pop(request_id)
    return times[0] - sent, statistics.median(b - a for a, b in itertools.pairwise(times))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--lines", type=int, default=200)
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--continuous", action="store_true", help="probe while the batch lasts")
    p.add_argument("--pause", type=float, default=1.0)
    p.add_argument("--slowdown", type=float, default=1.5)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    options = ContextOptions(
        n_slots=args.slots, n_ctx_per_slot=args.ctx_per_slot, n_threads=args.threads
    )
    model = LlamaModel(args.model, options)
    sink = TokenTimes()
    engine = LlamaEngine(model, sink, interactive_slowdown=args.slowdown)
    try:
        idle = [probe(engine, sink, model, i) for i in range(args.probes)]
        bulk = [
            EngineRequest(
                f"line-{i}",
                model.tokenize(make_prompt(i), add_special=model.add_bos),
                Sampling(temperature=1.0, seed=i, max_tokens=64, ignore_eos=True),
                stream=False,
                publish=False,
                priority=BULK,
            )
            for i in range(args.lines)
        ]
        started = time.perf_counter()
        engine.submit(*bulk)
        busy: list[tuple[float, float]] = []
        while not bulk[-1].finished.is_set() and (args.continuous or len(busy) < args.probes):
            time.sleep(args.pause)
            busy.append(probe(engine, sink, model, args.probes + len(busy)))
        for request in bulk:
            request.wait()
        took = time.perf_counter() - started
        generated = sum(
            r.result.usage.completion_tokens for r in bulk if isinstance(r.result, Done)
        )
        cost = engine.step_cost
    finally:
        engine.close()

    fitted = "n/a"
    if cost is not None:
        fitted = f"{cost.fixed * 1e3:.1f}, {cost.per_output * 1e3:.2f}, {cost.per_input * 1e3:.2f}"

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:.1f}"

    print(
        f"| slowdown | idle TTFT p50 ms | busy TTFT p50 ms | idle ITL p50 ms | busy ITL p50 ms "
        f"| busy/idle ITL | busy probes | bulk tok/s | fitted step cost ms (fixed, per "
        f"output, per prompt token) |\n|---|---|---|---|---|---|---|---|---|\n"
        f"| {args.slowdown} | {ms([t for t, _ in idle])} | {ms([t for t, _ in busy])} "
        f"| {ms([i for _, i in idle])} | {ms([i for _, i in busy])} "
        f"| {statistics.median(i for _, i in busy) / statistics.median(i for _, i in idle):.2f} "
        f"| {len(busy)} | {generated / took:.1f} "
        f"| {fitted} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
