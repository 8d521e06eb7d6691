"""Embedding and rerank throughput: inferq (`inferq up`) against
`llama-server --embeddings`, same model (all-MiniLM-L6-v2 converted by
inferq.convert_bert), same threads, one run.

    .venv/bin/python -m bench.embed_bench --llama-server PATH/TO/llama-server

Closed loop at concurrency 4, 16 inputs per request; rerank: 16 documents
per request. Prints a Markdown section (not a test)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.services import free_port, stop, wait_health

log = logging.getLogger("bench.embed")

WORDS = [
    "search",
    "vector",
    "index",
    "retrieval",
    "query",
    "document",
    "ranking",
    "model",
    "cluster",
    "semantic",
    "embedding",
    "sentence",
    "paragraph",
    "language",
    "meaning",
    "similar",
    "distance",
    "nearest",
    "neighbour",
    "database",
    "store",
    "batch",
    "token",
    "context",
    "attention",
    "layer",
    "encoder",
    "network",
    "training",
    "data",
]


def sentence(i: int) -> str:
    # Distinct ~20-word inputs, deterministic.
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(20)) + f" #{i}"


async def _loop(
    url: str, path: str, body: Any, concurrency: int, requests: int
) -> tuple[float, int]:
    async with httpx.AsyncClient(timeout=120) as client:
        queue = list(range(requests))
        done = 0

        async def worker() -> None:
            nonlocal done
            while queue:
                i = queue.pop()
                response = await client.post(url + path, json=body(i))
                response.raise_for_status()
                done += 1

        await worker_warmup(client, url, path, body)
        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        return time.perf_counter() - start, done


async def worker_warmup(client: httpx.AsyncClient, url: str, path: str, body: Any) -> None:
    (await client.post(url + path, json=body(10_000))).raise_for_status()


def measure(url: str, model: str | None, rerank: bool, args: argparse.Namespace) -> dict[str, Any]:
    per = args.inputs

    def embed_body(i: int) -> dict[str, Any]:
        body: dict[str, Any] = {"input": [sentence(i * per + k) for k in range(per)]}
        if model:
            body["model"] = model
        return body

    def rerank_body(i: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "query": sentence(i),
            "documents": [sentence(i * per + k + 1) for k in range(per)],
        }
        if model:
            body["model"] = model
        return body

    out: dict[str, Any] = {}
    wall, n = asyncio.run(_loop(url, "/v1/embeddings", embed_body, args.concurrency, args.requests))
    out["inputs_per_s"] = n * per / wall
    if rerank:
        wall, n = asyncio.run(
            _loop(url, "/v1/rerank", rerank_body, args.concurrency, args.requests)
        )
        out["pairs_per_s"] = n * per / wall
    return out


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama-server", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--inputs", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48)
    # Tokens per packed decode: attention inside one micro-batch spans all of
    # its tokens, so bigger is not always faster for an encoder.
    parser.add_argument("--embedding-batch", type=int, default=512)
    args = parser.parse_args()
    from inferq.convert_bert import convert_minilm

    work = Path(tempfile.mkdtemp(prefix="embed-bench-"))
    models = work / "models"
    models.mkdir()
    gguf = convert_minilm(models / "minilm.gguf", ftype="f16")
    results: dict[str, dict[str, Any]] = {}

    port = free_port()
    cmd = [
        args.llama_server,
        "-m",
        str(gguf),
        "--embeddings",
        "--pooling",
        "mean",
        "-t",
        str(args.threads),
        "-tb",
        str(args.threads),
        "-np",
        "4",
        "-c",
        "2048",
        "-b",
        "2048",
        "-ub",
        "2048",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_health(f"http://127.0.0.1:{port}", proc, 120)
        results["llama-server --embeddings (-np 4)"] = measure(
            f"http://127.0.0.1:{port}", None, False, args
        )
    finally:
        stop(proc, signal.SIGTERM, 20)

    (models / "minilm.yaml").write_text(
        "name: minilm\nparameters:\n  model: minilm.gguf\nembeddings: true\nreranking: true\n"
        f"pooling: mean\nthreads: {args.threads}\nembedding_batch: {args.embedding_batch}\n"
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["INFERQ_PORT"] = str(port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "inferq", "up"],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_health(f"http://127.0.0.1:{port}", proc, 120)
        results["inferq (HTTP, Celery, Redis)"] = measure(
            f"http://127.0.0.1:{port}", "minilm", True, args
        )
    finally:
        stop(proc, signal.SIGINT, 30)

    print(
        f"| system | inputs/s (c={args.concurrency}, {args.inputs} inputs/request) | "
        "rerank pairs/s |"
    )
    print("| --- | --- | --- |")
    for name, r in results.items():
        pairs = f"{r['pairs_per_s']:.0f}" if "pairs_per_s" in r else "n/a"
        print(f"| {name} | {r['inputs_per_s']:.0f} | {pairs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
