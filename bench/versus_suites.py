"""The three suites of bench.versus. Each function measures one system once
(started, warmed, measured, stopped) and returns its flat metrics plus the
raw results; the driver alternates the systems A B A B."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai

from bench import run as bench_run
from bench import services
from bench import versus_systems as vs
from bench.loadgen import closed_loop, stream_one
from bench.sysload import LoadMonitor
from bench.workload import MAX_TOKENS, Job, LevelResult, RequestResult, make_prompt, percentile

log = logging.getLogger("bench.versus")
Metrics = dict[str, float | None]
Run = dict[str, Any]  # {"metrics": Metrics, "raw": ..., "load": ...}


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def level_metrics(prefix: str, level: LevelResult) -> Metrics:
    return {
        f"{prefix} tok/s": round(level.tokens_per_s, 1),
        f"{prefix} TTFT p50 ms": _ms(level.ttft(50)),
        f"{prefix} ITL p50 ms": _ms(level.itl(50)),
        f"{prefix} errors": level.errors,
    }


def _client(concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=64)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0, connect=10.0))


def distinct(service: services.Service, system: str, args: argparse.Namespace) -> Run:
    with services.serve(service) as (proc, took):
        log.info("%s healthy after %.1f s", system, took)
        monitor = LoadMonitor(lambda: [proc.pid], loadgen_pid=os.getpid())
        levels = asyncio.run(bench_run.levels(args, service.url, system, monitor))
    metrics: Metrics = {}
    for level in levels:
        metrics.update(level_metrics(f"c={level.concurrency}", level))
    best = max(levels, key=lambda r: r.tokens_per_s)
    metrics["best tok/s"] = round(best.tokens_per_s, 1)
    metrics["best at c"] = best.concurrency
    return {"metrics": metrics, "raw": [r.to_dict() for r in levels]}


PREFIX_CASES = (("1 prefix", 1), ("4 prefixes", 4))


async def _prefix_levels(
    url: str, system: str, args: argparse.Namespace, monitor: LoadMonitor
) -> list[tuple[str, LevelResult]]:
    out = []
    offset = vs.PREFIX_OFFSET
    async with _client(max(args.prefix_levels)) as client:
        for name, prompts in PREFIX_CASES:
            for concurrency in args.prefix_levels:
                count = args.prefix_requests_per_slot * concurrency
                # The warm-up round puts the system prompts in the cache, as a
                # running service would have them.
                warm = vs.prefix_jobs(offset, concurrency, prompts, seed=offset)
                jobs = vs.prefix_jobs(offset + concurrency, count, prompts, seed=offset + 1)
                offset += concurrency + count
                target = url + "/v1/completions"
                await closed_loop(client, target, warm, concurrency, services.MODEL_NAME, True)
                with monitor.measure() as load:
                    results, wall = await closed_loop(
                        client, target, jobs, concurrency, services.MODEL_NAME, True
                    )
                level = LevelResult(system, concurrency, wall, results, len(warm), dict(load))
                log.info("%s %s c=%d: %.1f tok/s", system, name, concurrency, level.tokens_per_s)
                out.append((f"{name} c={concurrency}", level))
    return out


def prefix(service: services.Service, system: str, args: argparse.Namespace) -> Run:
    with services.serve(service) as (proc, took):
        log.info("%s healthy after %.1f s", system, took)
        counts = {
            "system prompt tokens": vs.count_tokens(service.url, vs.system_prompt(0)),
            "question tokens": vs.count_tokens(service.url, vs.question(0)),
        }
        log.info("%s token counts: %s", system, counts)
        monitor = LoadMonitor(lambda: [proc.pid], loadgen_pid=os.getpid())
        levels = asyncio.run(_prefix_levels(service.url, system, args, monitor))
    metrics: Metrics = {k: float(v) if v is not None else None for k, v in counts.items()}
    for name, level in levels:
        metrics.update(level_metrics(name, level))
        del metrics[f"{name} ITL p50 ms"]
        metrics[f"{name} cached tokens"] = level.cached_tokens()
        metrics[f"{name} prompt tokens"] = sum(r.prompt_tokens or 0 for r in level.ok)
    raw = [{"case": name, **level.to_dict()} for name, level in levels]
    return {"metrics": metrics, "raw": raw}


def engine(args: argparse.Namespace, work: Path, tag: str) -> Run:
    """inferq's engine in process at --engine-seqs, via bench.engine_bench."""
    out = work / f"{tag}.json"
    seqs = args.engine_seqs
    cmd = [sys.executable, "-m", "bench.engine_bench", f"--model={args.model}"]
    cmd += [f"--slots={seqs}", f"--levels={seqs}", f"--ctx-per-slot={args.ctx_per_slot}"]
    cmd += [f"--threads={args.threads}", "--rounds=2", f"--min-requests={2 * seqs}"]
    cmd += [f"--json={out}"]
    log.info("engine: %s", " ".join(cmd[1:]))
    subprocess.run(cmd, cwd=services.REPO, check=True, stdout=subprocess.DEVNULL)
    data = json.loads(out.read_text())
    level = LevelResult.from_dict(data["levels"][0])
    return {"metrics": {"tok/s": round(level.tokens_per_s, 1)}, "raw": data}


async def _probe(
    client: httpx.AsyncClient, url: str, start: int, stop: Any, args: argparse.Namespace
) -> list[RequestResult]:
    """One interactive user at concurrency 1 with a pause between requests,
    until `stop()` is true or --probes requests when stop is None."""
    out: list[RequestResult] = []
    i = start
    while (stop is None and len(out) < args.probes) or (stop is not None and not stop()):
        job = Job(i, make_prompt(i), seed=i)
        out.append(await stream_one(client, url, job, services.MODEL_NAME, True))
        i += 1
        await asyncio.sleep(args.probe_pause)
    return out


def _probe_metrics(prefix: str, results: list[RequestResult]) -> Metrics:
    ttft = [r.ttft_s for r in results if r.error is None and r.ttft_s is not None]
    itl = [r.itl_s for r in results if r.error is None and r.itl_s is not None]
    return {
        f"{prefix} TTFT p50 ms": _ms(percentile(ttft, 50)) if ttft else None,
        f"{prefix} ITL p50 ms": _ms(percentile(itl, 50)) if itl else None,
        f"{prefix} requests": len(results),
    }


def submit_and_wait(url: str, n_lines: int, state: dict[str, Any]) -> None:
    """An n-line batch through the official openai client; fills `state`."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    lines = "".join(
        json.dumps(vs.batch_line(vs.BATCH_OFFSET + i, MAX_TOKENS)) + "\n" for i in range(n_lines)
    )
    file = client.files.create(file=("versus.jsonl", io.BytesIO(lines.encode())), purpose="batch")
    state["submitted"] = time.perf_counter()
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/completions", completion_window="24h"
    )
    while batch.status not in ("finalizing", "completed", "failed", "expired", "cancelled"):
        if batch.status == "in_progress" and "running" not in state:
            state["running"] = time.perf_counter()
        time.sleep(0.25)
        batch = client.batches.retrieve(batch.id)
    state["ended"] = time.perf_counter()
    state.setdefault("running", state["submitted"])
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.25)
        batch = client.batches.retrieve(batch.id)
    state["status"] = batch.status
    output = client.files.content(batch.output_file_id or "").text.splitlines()
    state["lines"] = len(output)
    state["tokens"] = sum(
        json.loads(line)["response"]["body"]["usage"]["completion_tokens"] for line in output
    )


async def _batch(url: str, args: argparse.Namespace, monitor: LoadMonitor) -> Run:
    target = url + "/v1/completions"
    state: dict[str, Any] = {}
    async with _client(4) as client:
        warm = [Job(vs.PROBE_OFFSET + i, make_prompt(vs.PROBE_OFFSET + i), i) for i in range(2)]
        await closed_loop(client, target, warm, 1, services.MODEL_NAME, True)
        idle = await _probe(client, target, vs.PROBE_OFFSET + 10, None, args)
        with monitor.measure() as load:
            waiter = asyncio.create_task(
                asyncio.to_thread(submit_and_wait, url, args.batch_lines, state)
            )
            while "running" not in state and not waiter.done():
                await asyncio.sleep(0.2)
            busy = await _probe(
                client, target, vs.PROBE_OFFSET + 10_000, lambda: waiter.done(), args
            )
            await waiter
    if state.get("status") != "completed":
        raise RuntimeError(f"batch ended {state.get('status')}")
    running = state["ended"] - state["running"]
    metrics: Metrics = {
        "batch lines": state["lines"],
        "batch tokens": state["tokens"],
        "batch running s": round(running, 1),
        "batch tok/s": round(state["tokens"] / running, 1) if running > 0 else None,
        "batch tok/s from submit": round(
            state["tokens"] / (state["ended"] - state["submitted"]), 1
        ),
    }
    metrics.update(_probe_metrics("idle", idle))
    metrics.update(_probe_metrics("busy", busy))
    for key in ("TTFT", "ITL"):
        a, b = metrics[f"busy {key} p50 ms"], metrics[f"idle {key} p50 ms"]
        metrics[f"busy/idle {key}"] = round(a / b, 2) if a and b else None
    raw = {"idle": [vars(r) for r in idle], "busy": [vars(r) for r in busy], "load": dict(load)}
    return {"metrics": metrics, "raw": raw}


def batch(service: services.Service, system: str, args: argparse.Namespace) -> Run:
    with services.serve(service) as (proc, took):
        log.info("%s healthy after %.1f s", system, took)
        monitor = LoadMonitor(lambda: [proc.pid], loadgen_pid=os.getpid())
        return asyncio.run(_batch(service.url, args, monitor))
