"""CPU time each inferq process spends per streamed token, at concurrency 1.

    .venv/bin/python -m bench.serving_cpu [--requests 20]

Starts `inferq up` (private Redis, SQLite) on the demo model, streams three
warm-up completions, then `--requests` more one after another (~100-token
prompts, 64 tokens, ignore_eos), and reads every process's user + system CPU
seconds (psutil) before and after: the API, the worker, the embedded Redis
and the supervisor, each divided by the SSE chunks received. On a 2-core
machine every millisecond the API and Redis spend per token is taken from
llama.cpp's two threads. Markdown, not a test."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import psutil

from bench.services import (
    MODEL_NAME,
    add_model_args,
    inferq_config,
    inferq_home,
    inferq_up,
    serve,
)
from bench.workload import make_prompt

_ENV_DROP = ("REDIS_URL", "DATABASE_URL", "INFERQ_MODELS_DIR", "INFERQ_PORT", "PYTHONPATH")


def cpu_seconds(root: int) -> dict[str, float]:
    """CPU seconds of `root` and its descendants, by a short name."""
    out: dict[str, float] = {}
    parent = psutil.Process(root)
    for proc in [parent, *parent.children(recursive=True)]:
        args = proc.cmdline()
        name = " ".join(args[2:4]) if "inferq" in " ".join(args) else Path(args[0]).name
        times = proc.cpu_times()
        out[name or "?"] = out.get(name or "?", 0.0) + times.user + times.system
    return out


def stream(client: httpx.Client, url: str, i: int, gaps: list[float]) -> int:
    body = {
        "model": MODEL_NAME,
        "prompt": make_prompt(i),
        "max_tokens": 64,
        "stream": True,
        "ignore_eos": True,
        "temperature": 1.0,
    }
    chunks, last = 0, None
    with client.stream("POST", url, json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last, chunks = now, chunks + 1
    return chunks


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--requests", type=int, default=20)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="inferq-cpu-") as tmp:
        home = inferq_home(Path(tmp) / "home", args.model, inferq_config(args.model, args))
        service = inferq_up(home, home / "inferq.log", drop=_ENV_DROP)
        with serve(service) as (proc, _), httpx.Client(timeout=300) as client:
            url = service.url + "/v1/completions"
            for i in range(3):
                stream(client, url, i, [])
            gaps: list[float] = []
            before = cpu_seconds(proc.pid)
            started = time.perf_counter()
            chunks = sum(stream(client, url, 100 + i, gaps) for i in range(args.requests))
            wall = time.perf_counter() - started
            after = cpu_seconds(proc.pid)
    print(
        f"{chunks} chunks in {wall:.1f} s, inter-token p50 "
        f"{statistics.median(gaps) * 1000:.2f} ms\n\n| process | CPU ms per token |\n|---|---|"
    )
    for name, seconds in after.items():
        print(f"| {name} | {(seconds - before.get(name, 0.0)) / chunks * 1000:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
