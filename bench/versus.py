"""inferq against llama-server, A B A B, on the four workloads of issue 13.

Each repetition starts every system in turn (inferq through `inferq up` in
a temporary home; llama-server once per -np), warms it, measures it with the
same client (bench.loadgen) and the machine's load (bench.sysload), and stops
it. The report gives each metric's median and spread (min-max) per system and
inferq / llama-server per repetition; Markdown on stdout, raw JSON to --json.

Everything (the engineer's full run):

    .venv/bin/python -m bench.versus --llama-server PATH/TO/llama-server \\
        --reps 3 --json /tmp/versus.json > versus.md

One suite alone: `--suite distinct`, `--suite prefix`, `--suite batch`
(prefix uses llama-server's best -np from distinct when both run, else the
first of --np-list; batch compares with llama-server's best from distinct,
or measures llama-server at c=32 when distinct does not run). Engine settings
go to inferq's model config as is: `--inferq-option bulk_parallel=32`.

Tiny check: `--reps 1 --levels 1,4 --np-list 4 --min-requests 4
--prefix-levels 2 --prefix-requests-per-slot 2 --batch-lines 20 --probes 3`.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import services
from bench import versus_suites as suites
from bench import versus_systems as vs
from bench.sysload import loadavg
from bench.versus_report import Results, median, render

log = logging.getLogger("bench.versus")
SUITES = ("distinct", "prefix", "batch")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-server", type=Path, help="llama-server binary")
    p.add_argument("--model", type=Path, default=services.REPO / "models/gemma-3-270m-q4_k_m.gguf")
    p.add_argument("--suite", default=",".join(SUITES), help="any of distinct,prefix,batch")
    p.add_argument("--reps", type=int, default=3, help="A B A B repetitions")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--levels", default="1,4,8,16,32", help="distinct: concurrency levels")
    p.add_argument("--rounds", type=int, default=2, help="distinct: measured rounds per level")
    p.add_argument("--min-requests", type=int, default=16)
    p.add_argument("--np-list", default="8,32", help="llama-server -np settings")
    p.add_argument("--ctx-per-slot", type=int, default=2048, help="llama-server -c = this x np")
    p.add_argument("--kvu", action="store_true", help="llama-server -kvu (one shared KV pool)")
    p.add_argument("--prefix-levels", default="8,32")
    p.add_argument("--prefix-requests-per-slot", type=int, default=6, help="c=8: 48 requests")
    p.add_argument("--batch-lines", type=int, default=1000)
    p.add_argument("--engine-seqs", type=int, default=32)
    p.add_argument("--probes", type=int, default=10, help="idle interactive requests")
    p.add_argument("--probe-pause", type=float, default=1.0, help="seconds between them")
    p.add_argument("--inferq-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--cooldown", type=float, default=5.0, help="seconds between systems")
    p.add_argument("--json", type=Path, help="raw results")
    args = p.parse_args(argv)
    args.model = args.model.resolve()
    args.level_list = [int(x) for x in args.levels.split(",")]
    args.np_values = [int(x) for x in args.np_list.split(",")]
    args.prefix_levels = [int(x) for x in args.prefix_levels.split(",")]
    args.suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    if unknown := set(args.suites) - set(SUITES):
        p.error(f"unknown suite(s) {sorted(unknown)}")
    needs_llama = bool({"distinct", "prefix"} & set(args.suites)) or "batch" in args.suites
    if needs_llama and not (args.llama_server and os.access(args.llama_server, os.X_OK)):
        p.error("--llama-server PATH to an executable llama-server is needed")
    return args


class Driver:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.results: Results = {}
        self.setup: list[str] = []
        self.runs = 0

    def _tag(self, name: str) -> str:
        self.runs += 1
        return f"{self.runs:03d}-{name.replace(' ', '_')}"

    def measure(self, suite: str, system: str, fn: Callable[[], dict[str, Any]]) -> None:
        if self.runs:
            time.sleep(self.args.cooldown)  # let the previous system's exit settle
        before = loadavg()
        run = fn()
        run["loadavg"] = [before, loadavg()]
        self.results.setdefault(suite, {}).setdefault(system, []).append(run)
        log.info("%s / %s: %s", suite, system, run["metrics"])
        if self.args.json:  # after every run, so a broken run keeps what was done
            self.args.json.write_text(json.dumps(self.results, indent=1, default=str))

    def inferq(self, runner: Callable[..., dict[str, Any]], suite: str, name: str) -> None:
        service = vs.inferq_service(self.args, self.work, self._tag(name))
        self.measure(suite, name, lambda: runner(service, name, self.args))

    def llama(self, runner: Callable[..., dict[str, Any]], suite: str, np: int, **kw: Any) -> str:
        name = vs.llama_label(np, self.args)
        service = vs.llama_service(self.args, self.work, self._tag(name), np, **kw)
        self.measure(suite, name, lambda: runner(service, name, self.args))
        return name

    def best_np(self) -> int:
        """llama-server's -np with the highest median best tok/s in distinct."""
        runs = self.results.get("distinct", {})
        scored = [
            (median([r["metrics"]["best tok/s"] for r in runs[vs.llama_label(n, self.args)]]), n)
            for n in self.args.np_values
            if vs.llama_label(n, self.args) in runs
        ]
        known = [(score, n) for score, n in scored if score is not None]
        return int(max(known)[1]) if known else int(self.args.np_values[0])

    def distinct(self) -> None:
        for rep in range(self.args.reps):
            log.info("distinct: repetition %d", rep + 1)
            self.inferq(suites.distinct, "distinct", "inferq")
            for np in self.args.np_values:
                self.llama(suites.distinct, "distinct", np)
        for np in self.args.np_values:
            self.setup.append(f"- distinct, llama-server: `{vs.llama_shown(np, self.args)}`")

    def prefix(self) -> None:
        np = self.best_np()
        for rep in range(self.args.reps):
            log.info("prefix: repetition %d", rep + 1)
            self.inferq(suites.prefix, "prefix", "inferq")
            self.llama(suites.prefix, "prefix", np, cache_reuse=True)
        shown = vs.llama_shown(np, self.args, cache_reuse=True)
        self.setup.append(f"- prefix, llama-server: `{shown}`")

    def batch(self) -> None:
        args = self.args
        reference = "distinct" not in self.results
        np = self.best_np()
        for rep in range(args.reps):
            log.info("batch: repetition %d", rep + 1)
            self.inferq(suites.batch, "batch", "inferq batch")
            tag = self._tag("engine")
            self.measure("batch", "engine", functools.partial(suites.engine, args, self.work, tag))
            if reference:  # llama-server's closed loop at c=32, measured here
                saved = args.level_list
                args.level_list = [32]
                name = vs.llama_label(np, args)
                service = vs.llama_service(args, self.work, self._tag(name), np)
                self.measure(
                    "batch",
                    "llama-server c=32",
                    functools.partial(suites.distinct, service, name, args),
                )
                args.level_list = saved
        self.setup.append(
            f"- batch: {args.batch_lines} lines, engine in process at {args.engine_seqs} "
            f"sequences (`python -m bench.engine_bench --slots {args.engine_seqs} "
            f"--levels {args.engine_seqs}`); interactive client: {args.probes} idle requests, "
            f"then one at a time while the batch runs, {args.probe_pause} s apart"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    with tempfile.TemporaryDirectory(prefix="inferq-versus-") as tmp:
        driver = Driver(args, Path(tmp))
        driver.setup = [
            f"- {args.reps} repetitions A B A B, {args.threads} threads, model "
            f"`{args.model.name}`, streaming `/v1/completions`, max_tokens 64, ignore_eos",
            f"- inferq: `inferq up` in a temporary home, model config "
            f"`{vs.inferq_yaml(args.model, args)}`",
        ]
        for suite in SUITES:
            if suite in args.suites:
                getattr(driver, suite)()
    print(render(driver.results, driver.setup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
