"""Closed-loop streaming load generator for OpenAI-compatible /v1/completions.

At concurrency C, C asyncio tasks each send one streaming request, read it to
the end and send the next, so exactly C requests are in flight until the
level's requests run out. One warm-up round (C requests) runs first and is not
counted. Used for llama-server and for inferq end to end.

    python -m bench.loadgen --url http://127.0.0.1:8080 --levels 1,4,8,16
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):
    # Run as a file (python bench/loadgen.py): make `bench` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workload import (
    LEVELS,
    Job,
    LevelResult,
    RequestResult,
    level_plan,
    log_level,
    print_levels,
)

log = logging.getLogger("bench.loadgen")

# A level's load probe: entered around the measured part of each level; its
# result is stored in LevelResult.load.
LoadProbe = Callable[[], AbstractContextManager[dict[str, Any]]]


def request_body(job: Job, model: str, ignore_eos: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "prompt": job.prompt,
        "max_tokens": job.max_tokens,
        "temperature": job.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if job.seed is not None:
        body["seed"] = job.seed
    if ignore_eos:
        # llama-server honours it; servers that do not know it must ignore it,
        # and the token count then comes from what was actually generated.
        body["ignore_eos"] = True
    return body


async def iter_sse(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    """Yield each `data: {...}` payload of an SSE stream; stop after `data: [DONE]`.
    Comments (`: ping`), event names and blank lines are skipped. Raises if
    the stream ends without [DONE], so a truncated stream never counts as done."""
    async for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        if payload:
            yield json.loads(payload)
    raise RuntimeError("stream ended without data: [DONE]")


def chunk_text(chunk: dict[str, Any]) -> str:
    """The content a chunk carries: `text` (completions) or `delta.content` (chat)."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    text = choice.get("text")
    if text is None:
        text = (choice.get("delta") or {}).get("content")
    return text or ""


async def stream_one(
    client: httpx.AsyncClient, url: str, job: Job, model: str, ignore_eos: bool
) -> RequestResult:
    """Send one streaming completion and time it from send to the last byte."""
    sent = time.perf_counter()
    ttft: float | None = None
    chunks = 0
    stamps: list[float] = []
    usage: dict[str, Any] | None = None
    finish: str | None = None
    try:
        body = request_body(job, model, ignore_eos)
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:300]
                raise RuntimeError(f"HTTP {response.status_code}: {detail}")
            async for chunk in iter_sse(response.aiter_lines()):
                if "error" in chunk:
                    raise RuntimeError(f"stream error: {chunk['error']}")
                if chunk_text(chunk):
                    chunks += 1
                    stamps.append(time.perf_counter())
                    if ttft is None:
                        ttft = time.perf_counter() - sent
                for choice in chunk.get("choices") or []:
                    finish = choice.get("finish_reason") or finish
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except Exception as exc:  # a failed request is recorded, the level goes on
        log.warning("request %d failed: %s", job.index, exc)
        return RequestResult(job.index, ttft, time.perf_counter() - sent, chunks, 0, error=str(exc))
    duration = time.perf_counter() - sent
    tokens = int(usage["completion_tokens"]) if usage else chunks
    prompt_tokens = int(usage["prompt_tokens"]) if usage and "prompt_tokens" in usage else None
    details = (usage or {}).get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens")
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return RequestResult(
        index=job.index,
        ttft_s=ttft,
        duration_s=duration,
        chunks=chunks,
        completion_tokens=tokens,
        prompt_tokens=prompt_tokens,
        usage_reported=usage is not None,
        finish_reason=finish,
        itl_s=statistics.median(gaps) if gaps else None,
        cached_tokens=None if cached is None else int(cached),
    )


async def closed_loop(
    client: httpx.AsyncClient,
    url: str,
    jobs: Sequence[Job],
    concurrency: int,
    model: str,
    ignore_eos: bool,
) -> tuple[list[RequestResult], float]:
    """Run `jobs` with `concurrency` in flight; return results and wall time."""
    queue = list(reversed(jobs))
    results: list[RequestResult] = []

    async def user() -> None:
        while queue:
            results.append(await stream_one(client, url, queue.pop(), model, ignore_eos))

    started = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return sorted(results, key=lambda r: r.index), wall


async def run_levels(
    base_url: str,
    *,
    system: str,
    model: str,
    levels: Sequence[int] = LEVELS,
    rounds: int = 2,
    min_requests: int = 16,
    ignore_eos: bool = True,
    probe: LoadProbe | None = None,
    headers: dict[str, str] | None = None,
) -> list[LevelResult]:
    """Every level in turn. Prompt indices never repeat within a run, and two
    runs with the same arguments send identical prompts and seeds."""
    url = base_url.rstrip("/") + "/v1/completions"
    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=64)
    timeout = httpx.Timeout(600.0, connect=10.0)
    out: list[LevelResult] = []
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:
        for concurrency, warmup, jobs in level_plan(levels, rounds, min_requests):
            log.info(
                "%s c=%d: warm-up %d, measuring %d", system, concurrency, len(warmup), len(jobs)
            )
            await closed_loop(client, url, warmup, concurrency, model, ignore_eos)
            with probe() if probe else nullcontext({}) as load:
                results, wall = await closed_loop(client, url, jobs, concurrency, model, ignore_eos)
            level = LevelResult(system, concurrency, wall, results, len(warmup), dict(load))
            log_level(log, level)
            out.append(level)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="server base URL, without /v1")
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--system", default="server", help="label for the results")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=16)
    parser.add_argument("--no-ignore-eos", action="store_true")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    results = asyncio.run(
        run_levels(
            args.url,
            system=args.system,
            model=args.model,
            levels=[int(x) for x in args.levels.split(",")],
            rounds=args.rounds,
            min_requests=args.min_requests,
            ignore_eos=not args.no_ignore_eos,
        )
    )
    if args.json:
        args.json.write_text(json.dumps([r.to_dict() for r in results], indent=1))
    print_levels(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
