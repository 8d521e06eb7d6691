"""Bulk jobs: a chat batch through `inferq up` against the engine in process.

    .venv/bin/python -m bench.batch_bench [--lines 1000] [--slots 8]

1. In process: the same chat prompts (Gemma's template), every request handed
   to one LlamaEngine with S slots at once (the best aggregate throughput the
   engine reaches at that slot count); completion tokens per second.
2. `inferq up` (private Redis, SQLite) with the model at S slots: TTFT of
   sequential streamed interactive requests on an idle server, then the batch
   is submitted through the Files + Batches API and, while it runs, the same
   interactive requests again (the bulk work must let them go first). The
   batch's throughput is its completion tokens over the time from its first
   finished line to its last.

Every line asks for exactly `--max-tokens` tokens (`ignore_eos`), so both
sides do the same work. Prints a Markdown section (not a test)."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import openai

from bench.services import free_port, stop, wait_health
from schemas.jobs import Message
from schemas.registry import load_registry
from schemas.templates import PromptBuilder
from workers.engine.llama.engine import LlamaEngine
from workers.engine.llama.model import ContextOptions, LlamaModel
from workers.engine.types import EngineRequest, Sampling

log = logging.getLogger("bench.batch")

TOPICS = ["rivers", "bridges", "clocks", "bees", "glass", "maps", "salt", "kites", "owls", "tea"]


def question(i: int) -> str:
    return f"Write a short paragraph about {TOPICS[i % len(TOPICS)]} (note {i})."


class NullSink:
    def publish(self, events: Any) -> None:
        pass


def in_process(models: Path, name: str, args: argparse.Namespace) -> float:
    config = load_registry(models).models[name]
    model = LlamaModel(
        config.model_path(models),
        ContextOptions(
            n_slots=args.slots, n_ctx_per_slot=config.context_size, n_threads=args.threads
        ),
    )
    prompts = PromptBuilder(
        config,
        tokenizer_template=model.metadata("tokenizer.chat_template"),
        bos_token=model.bos_text,
        eos_token=model.eos_text,
    )
    engine = LlamaEngine(model, NullSink())
    try:
        requests = []
        for i in range(args.in_process_lines):
            text = prompts.chat([Message(role="user", content=question(i))])
            tokens = model.tokenize(text, add_special=False, parse_special=True)
            sampling = Sampling(max_tokens=args.max_tokens, ignore_eos=True, seed=i)
            requests.append(EngineRequest(f"r{i}", tokens, sampling, stream=False))
        started = time.perf_counter()
        engine.submit(*requests)
        generated = 0
        for request in requests:
            result = request.wait()
            generated += result.usage.completion_tokens  # type: ignore[union-attr]
        return generated / (time.perf_counter() - started)
    finally:
        engine.close()


def ttft(url: str, model: str, n: int, pause: float) -> list[float]:
    out = []
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 4,
        "stream": True,
    }
    with httpx.Client(timeout=120) as client:
        for _ in range(n):
            sent = time.perf_counter()
            first = None
            with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    if first is None and line.startswith("data: ") and '"content"' in line:
                        first = (time.perf_counter() - sent) * 1000
            assert first is not None, "no token came"
            out.append(first)
            time.sleep(pause)
    return out


def through_inferq(work: Path, name: str, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["INFERQ_PORT"] = str(port)
    logfile = (work / "up.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "inferq", "up"],
        cwd=work,
        env=env,
        stdout=logfile,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_health(url, proc, 180)
        ttft(url, name, 2, 0.2)  # warm-up
        idle = ttft(url, name, args.probes, 0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        lines = "".join(
            json.dumps(
                {
                    "custom_id": f"line-{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {
                        "model": name,
                        "messages": [{"role": "user", "content": question(i)}],
                        "max_tokens": args.max_tokens,
                        "ignore_eos": True,
                        "seed": i,
                    },
                }
            )
            + "\n"
            for i in range(args.lines)
        )
        file = client.files.create(
            file=("bench.jsonl", io.BytesIO(lines.encode())), purpose="batch"
        )
        submitted = time.perf_counter()
        batch = client.batches.create(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        first_done = None
        while True:
            batch = client.batches.retrieve(batch.id)
            counts = batch.request_counts
            if counts is not None and counts.completed > 0 and first_done is None:
                first_done = time.perf_counter()
                busy = ttft(url, name, args.probes, 1.0)
            if batch.status in ("finalizing", "completed", "failed", "expired", "cancelled"):
                break
            time.sleep(0.25)
        last_done = time.perf_counter()
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            time.sleep(0.25)
            batch = client.batches.retrieve(batch.id)
        assert batch.status == "completed", batch
        output = client.files.content(batch.output_file_id or "").text.splitlines()
        tokens = sum(
            json.loads(line)["response"]["body"]["usage"]["completion_tokens"] for line in output
        )
        assert first_done is not None
        return {
            "lines": len(output),
            "tokens": tokens,
            "tok_s": tokens / (last_done - submitted),
            "tok_s_running": tokens / (last_done - first_done),
            "wall_s": last_done - submitted,
            "ttft_idle": idle,
            "ttft_busy": busy,
        }
    finally:
        stop(proc, signal.SIGINT, 30)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser()
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--in-process-lines", type=int, default=200)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--probes", type=int, default=10)
    args = parser.parse_args()

    source = load_registry(args.models_dir).models[args.model]
    work = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    models = work / "models"
    models.mkdir()
    gguf = source.model_path(args.models_dir).resolve()
    (models / gguf.name).symlink_to(gguf)
    raw = source.model_dump(exclude={"source", "name", "parallel", "threads", "parameters"})
    raw.update(
        name=args.model,
        parameters={"model": gguf.name},
        parallel=args.slots,
        threads=args.threads,
    )
    (models / f"{args.model}.yaml").write_text(json.dumps(raw))

    engine_tok_s = in_process(models, args.model, args)
    log.info("in process: %.1f tok/s", engine_tok_s)
    result = through_inferq(work, args.model, args)
    step_ms = args.slots / engine_tok_s * 1000
    idle, busy = result["ttft_idle"], result["ttft_busy"]
    print("| slots | lines x max_tokens | engine in process tok/s | batch tok/s | ratio |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| {args.slots} | {result['lines']} x {args.max_tokens} | {engine_tok_s:.1f} | "
        f"{result['tok_s']:.1f} | {result['tok_s'] / engine_tok_s:.2f} |"
    )
    print()
    print("| interactive TTFT (ms) | p50 | max |")
    print("| --- | --- | --- |")
    print(f"| idle server | {statistics.median(idle):.0f} | {max(idle):.0f} |")
    print(f"| batch running | {statistics.median(busy):.0f} | {max(busy):.0f} |")
    print()
    print(f"TTFT samples (ms), idle: {', '.join(f'{v:.0f}' for v in idle)}")
    print(f"TTFT samples (ms), batch running: {', '.join(f'{v:.0f}' for v in busy)}")
    print()
    print(
        f"decode step at {args.slots} sequences: {step_ms:.0f} ms; batch wall "
        f"{result['wall_s']:.0f} s for {result['tokens']} tokens "
        f"({result['tok_s_running']:.1f} tok/s from the first finished line)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
