"""inferq against an earlier inferq: the serving path of two commits, A B A B.

A is a git revision (checked out into a temporary worktree), B the working
tree. Each round starts `inferq up` from one tree on the same model and
config (what bench.run calls system (c)), runs the closed-loop streaming
workload at the given concurrency levels (bench.loadgen), and stops it; the
rounds alternate A B A B so that drift of the machine hits both alike. The
report gives each round's tokens/s and time to first token p50, and the
median and spread per system.

    .venv/bin/python -m bench.ab_commits --base 7c12020 --levels 1,8 --rounds 2

With `--batch-lines N` each round then submits an N-line completions batch
(bench.versus's lines: distinct ~100-token prompts, 64 tokens, ignore_eos)
through the Batches API with nothing else running, and reports its
generated tokens over the time it was in progress. `--levels ""` runs the
batch alone.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loadgen import run_levels
from bench.services import (
    MODEL_NAME,
    REPO,
    add_model_args,
    inferq_config,
    inferq_home,
    inferq_up,
    serve,
)
from bench.versus_suites import submit_and_wait
from bench.workload import LevelResult

log = logging.getLogger("bench.ab_commits")

# Everything that would point `inferq up` at shared services or another tree.
_ENV_DROP = ("REDIS_URL", "DATABASE_URL", "INFERQ_MODELS_DIR", "INFERQ_PORT", "PYTHONPATH")


def _worktree(revision: str, into: Path) -> Path:
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(into), revision],
        check=True,
        capture_output=True,
    )
    return into


class Round:
    def __init__(self, levels: list[LevelResult], batch_tps: float | None) -> None:
        self.levels = levels
        self.batch_tps = batch_tps


def _one_round(
    label: str, tree: Path, work: Path, model: Path, levels: list[int], args: argparse.Namespace
) -> Round:
    home = inferq_home(
        work / f"{label}-{len(list(work.iterdir()))}", model, inferq_config(model, args)
    )
    # The tree's own packages come before the installed (editable) ones.
    service = inferq_up(home, home / "inferq.log", drop=_ENV_DROP, PYTHONPATH=str(tree))
    log.info("%s: cd %s && PYTHONPATH=%s %s", label, home, tree, shlex.join(service.cmd))
    with serve(service):
        measured = measure_levels(service.url, label, levels, args) if levels else []
        batch_tps = None
        if args.batch_lines:
            state: dict[str, Any] = {}
            submit_and_wait(service.url, args.batch_lines, state)
            batch_tps = state["tokens"] / (state["ended"] - state["running"])
            log.info("%s: batch of %d lines, %.1f tok/s", label, args.batch_lines, batch_tps)
        return Round(measured, batch_tps)


def measure_levels(
    url: str,
    label: str,
    levels: list[int],
    args: argparse.Namespace,
    headers: dict[str, str] | None = None,
) -> list[LevelResult]:
    """The closed-loop streaming workload at each level, against `url`."""
    return asyncio.run(
        run_levels(
            url,
            system=label,
            model=MODEL_NAME,
            levels=levels,
            rounds=args.rounds,
            min_requests=args.min_requests,
            headers=headers,
        )
    )


def _spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def parse_ab_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace:
    """The options every A B A B run takes (model, workload, pairs), parsed,
    with logging set up."""
    add_model_args(parser, ctx_per_slot=1024)
    parser.add_argument("--levels", default="1,8")
    parser.add_argument("--pairs", type=int, default=2, help="A B pairs")
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds per level")
    parser.add_argument("--min-requests", type=int, default=16)
    parser.add_argument("--batch-lines", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return args


def ab_table(header: str, results: dict[str, list[list[LevelResult]]], levels: list[int]) -> str:
    """The report of an A B A B run: per system and level, tokens/s and time
    to first token p50 of each round, and their median and range."""
    lines = [
        header,
        "",
        "| system | concurrency | tok/s per round | tok/s median (range) "
        "| TTFT p50 ms per round | TTFT p50 median (range) | errors |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label in ("A", "B"):
        for i, concurrency in enumerate(levels):
            level = [run[i] for run in results[label]]
            tps = [r.tokens_per_s for r in level]
            ttft = [(r.ttft(50) or 0) * 1000 for r in level]
            errors = sum(r.errors for r in level)
            lines.append(
                f"| {label} | {concurrency} | {' / '.join(f'{t:.1f}' for t in tps)} "
                f"| {_spread(tps)} | {' / '.join(f'{t:.1f}' for t in ttft)} "
                f"| {_spread(ttft)} | {errors} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision for A")
    args = parse_ab_args(parser, argv)
    levels = [int(x) for x in args.levels.split(",") if x]
    rounds: dict[str, list[Round]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="inferq-ab-") as tmp:
        work = Path(tmp)
        base = _worktree(args.base, work / "base")
        runs = work / "runs"
        runs.mkdir()
        try:
            for _ in range(args.pairs):
                for label, tree in (("A", base), ("B", REPO)):
                    rounds[label].append(_one_round(label, tree, runs, args.model, levels, args))
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)],
                check=False,
                capture_output=True,
            )
    header = (
        f"A = {args.base}, B = working tree; {args.pairs} pairs A B A B; "
        f"levels {args.levels}; {args.slots} slots, {args.threads} threads"
    )
    results = {label: [r.levels for r in rs] for label, rs in rounds.items()}
    print(ab_table(header, results, levels))
    if args.batch_lines:
        print(f"\nBatch of {args.batch_lines} lines, generated tok/s while in progress:\n")
        for label, rs in rounds.items():
            tps = [r.batch_tps or 0.0 for r in rs]
            print(f"- {label}: {' / '.join(f'{t:.1f}' for t in tps)}, median {_spread(tps)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
