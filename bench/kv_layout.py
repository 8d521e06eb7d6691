"""What one decode step costs in a unified KV cache against per-sequence streams.

    .venv/bin/python -m bench.kv_layout [--seqs 1,8,16,32] [--extra 4096]

For each count k: k sequences each evaluate a ~100-token prompt, then the
median time of a step that decodes one token for each of them, in a context
with one unified cache (inferq's layout: every sequence's cells in one pool,
attention masked per sequence), in the same cache with `--extra` more cells
held by another sequence (the prefix cache's entries), and with one stream
per sequence (`kv_unified` off, llama-server's default with -np). Raw
llama.cpp calls, no engine: the layout's own cost. Markdown, not a test."""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp

from bench.services import REPO
from schemas.llama_vocab import load_model

PROMPT = 100
STEPS = 24


class Context:
    def __init__(self, model: Any, *, unified: bool, n_seq: int, per_seq: int, threads: int):
        params = llama_cpp.llama_context_default_params()
        # inferq sizes a unified cache by the interactive slots; streams get
        # per_seq cells each, as llama-server's -c N*np -np N.
        params.n_ctx = per_seq * (8 if unified else n_seq)
        params.n_seq_max = n_seq
        params.kv_unified = unified
        params.n_batch = params.n_ubatch = 512
        params.n_outputs_max = 512
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create the context")
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)

    def decode(self, items: list[tuple[int, int, int, bool]]) -> float:
        """Decode (token, position, sequence, logits) items; seconds taken."""
        batch = self.batch
        batch.n_tokens = len(items)
        for i, (token, pos, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, int(logits)
        started = time.perf_counter()
        if llama_cpp.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - started

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)


def step_ms(model: Any, k: int, *, unified: bool, extra: int, args: argparse.Namespace) -> float:
    n_seq = max(k, 1) + 1
    per_seq, threads = args.ctx_per_seq, args.threads
    ctx = Context(model, unified=unified, n_seq=n_seq, per_seq=per_seq, threads=threads)
    try:
        holder = n_seq - 1
        for start in range(0, extra, 512):
            n = min(512, extra - start)
            ctx.decode([(100 + (start + i) % 1000, start + i, holder, False) for i in range(n)])
        for s in range(k):
            ctx.decode([(200 + (s * 7 + i) % 5000, i, s, i == PROMPT - 1) for i in range(PROMPT)])
        times = [
            ctx.decode([(300 + step, PROMPT + step, s, True) for s in range(k)])
            for step in range(STEPS)
        ]
    finally:
        ctx.close()
    return statistics.median(times) * 1000


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=REPO / "models/gemma-3-270m-q4_k_m.gguf")
    p.add_argument("--seqs", default="1,8,16,32")
    p.add_argument("--extra", type=int, default=4096)
    p.add_argument("--ctx-per-seq", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p())
    model = load_model(args.model)
    print(
        f"| sequences | unified ms/step | unified + {args.extra} cached cells ms/step "
        "| streams ms/step | unified / streams |\n|---|---|---|---|---|"
    )
    try:
        for k in (int(x) for x in args.seqs.split(",")):
            unified = step_ms(model, k, unified=True, extra=0, args=args)
            cached = step_ms(model, k, unified=True, extra=args.extra, args=args)
            streams = step_ms(model, k, unified=False, extra=0, args=args)
            print(
                f"| {k} | {unified:.1f} | {cached:.1f} | {streams:.1f} | {unified / streams:.2f} |",
                flush=True,
            )
    finally:
        llama_cpp.llama_model_free(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
