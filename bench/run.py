"""Runs the continuous-batching benchmark on all three systems in one go and
writes the Markdown report (stdout, and the "Continuous batching (llama.cpp)"
section of --out).

  (a) inferq's engine in process  (bench.engine_bench, in a subprocess)
  (b) llama.cpp's llama-server    (--llama-server PATH, built by you)
  (c) inferq end to end           (`inferq up` in a temporary directory)

    .venv/bin/python -m bench.run --llama-server PATH/TO/llama-server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):
    # Run as a file (python bench/run.py): make `bench` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import services
from bench.loadgen import run_levels
from bench.report import RunInfo, render, write_section
from bench.sysload import LoadMonitor, loadavg
from bench.workload import LEVELS, MAX_TOKENS, LevelResult

log = logging.getLogger("bench.run")


@dataclass
class Facts:
    """What the runs learned that the report needs."""

    notes: list[str] = field(default_factory=list)
    engine_meta: dict[str, Any] = field(default_factory=dict)
    llama_server_cmd: str | None = None
    inferq_config: str | None = None


def _problems(log_path: Path) -> int:
    text = log_path.read_text(errors="replace")
    return sum(1 for line in text.splitlines() if "Traceback" in line or " ERROR " in line)


def run_engine(args: argparse.Namespace, work: Path, facts: Facts) -> list[LevelResult]:
    out = work / "engine.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.engine_bench",
        f"--model={args.model}",
        f"--slots={args.slots}",
        f"--ctx-per-slot={args.ctx_per_slot}",
        f"--threads={args.threads}",
        f"--levels={args.levels}",
        f"--rounds={args.rounds}",
        f"--min-requests={args.min_requests}",
        f"--json={out}",
    ]
    log.info("(a) %s", shlex.join(cmd))
    subprocess.run(cmd, cwd=services.REPO, check=True, stdout=subprocess.DEVNULL)
    data = json.loads(out.read_text())
    facts.engine_meta = meta = data["meta"]
    if not meta["ignore_eos"]:
        facts.notes.append(
            "(a): `Sampling` has no `ignore_eos` yet, so engine requests stop at EOS; "
            "tokens counted are those actually generated (see tokens/req)."
        )
    return [LevelResult.from_dict(d) for d in data["levels"]]


def run_llama_server(args: argparse.Namespace, work: Path, facts: Facts) -> list[LevelResult]:
    port = services.free_port()
    cmd = [
        str(args.llama_server),
        "-m",
        str(args.model),
        "-t",
        str(args.threads),
        "-tb",
        str(args.threads),
        "-np",
        str(args.slots),
        # llama-server's -c is the total context, split evenly across the slots.
        "-c",
        str(args.ctx_per_slot * args.slots),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    log.info("(b) %s", shlex.join(cmd))
    # The report names no path of the machine it ran on.
    shown = ["llama-server", "-m", f"models/{Path(args.model).name}", *cmd[3:-1], "<port>"]
    facts.llama_server_cmd = shlex.join(shown)
    service = services.Service(
        cmd,
        port,
        work / "llama-server.log",
        health_timeout=180,
        stop_signal=signal.SIGTERM,
        stop_timeout=30,
        own_session=False,
    )
    return _measure(
        args, facts, "(b)", "llama-server", service, "error lines in llama-server's log"
    )


def run_inferq(args: argparse.Namespace, work: Path, facts: Facts) -> list[LevelResult]:
    facts.inferq_config = services.inferq_config(args.model, args)
    home = services.inferq_home(work / "inferq", args.model, facts.inferq_config)
    service = services.inferq_up(home, work / "inferq.log", drop=services.INFERQ_ENV_DROP)
    log.info("(c) cd %s && INFERQ_PORT=%d %s", home, service.port, shlex.join(service.cmd))
    return _measure(
        args, facts, "(c)", "inferq", service, "error/traceback lines in the `inferq up` log"
    )


def _measure(
    args: argparse.Namespace,
    facts: Facts,
    label: str,
    system: str,
    service: services.Service,
    complaint: str,
) -> list[LevelResult]:
    """Every level against the service, with its load measured; a note for
    the report if its log shows errors."""
    try:
        with services.serve(service) as (proc, took):
            log.info("%s healthy after %.1f s", label, took)
            monitor = LoadMonitor(lambda: [proc.pid], loadgen_pid=os.getpid())
            return asyncio.run(levels(args, service.url, system, monitor))
    finally:
        if problems := _problems(service.log_path):
            facts.notes.append(f"{label}: {problems} {complaint}")


async def levels(
    args: argparse.Namespace, url: str, system: str, monitor: LoadMonitor
) -> list[LevelResult]:
    """The closed-loop levels of `args` (level_list, rounds, min_requests)
    against `url`, the machine's load probed around each."""
    return await run_levels(
        url,
        system=system,
        model=services.MODEL_NAME,
        levels=args.level_list,
        rounds=args.rounds,
        min_requests=args.min_requests,
        probe=monitor.measure,
    )


def _output(cmd: Sequence[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=services.REPO)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    return (done.stdout + done.stderr).strip()


def _public_args(argv: Sequence[str]) -> list[str]:
    """argv with machine paths replaced by placeholders, for the report."""
    out: list[str] = []
    hide_next = False
    prev = ""
    for arg in argv:
        if hide_next:
            out.append("PATH/TO/llama-server" if prev == "--llama-server" else Path(arg).name)
            hide_next = False
        elif arg in ("--llama-server", "--model"):
            hide_next, prev = True, arg
            out.append(arg)
        elif arg.startswith(("--llama-server=", "--model=")):
            key = arg.split("=", 1)[0]
            value = "PATH/TO/llama-server" if key == "--llama-server" else Path(arg).name
            out.append(f"{key}={value}")
        else:
            out.append(arg)
    return out


def run_info(args: argparse.Namespace, argv: Sequence[str], facts: Facts) -> RunInfo:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    python = sys.executable
    with_venv = Path(python).is_relative_to(services.REPO) if Path(python).is_absolute() else False
    shown = os.path.relpath(python, services.REPO) if with_venv else python
    commit = _output(["git", "rev-parse", "--short", "HEAD"])
    dirty = _output(["git", "status", "--porcelain", "--untracked-files=no"])
    meta = facts.engine_meta
    versions = [
        f"inferq commit {commit}" + (" with uncommitted changes" if dirty else ""),
        f"Python {platform.python_version()}, llama-cpp-python "
        f"{meta.get('llama_cpp_python', 'n/a')}, httpx {httpx.__version__}",
    ]
    if args.llama_server:
        server_version = _output([str(args.llama_server), "--version"]).splitlines()
        versions.append(
            "llama-server: "
            + "; ".join(line for line in server_version if line.strip())
            + ", built with cmake from `vendor/llama.cpp` of the llama-cpp-python 0.3.36 "
            "sdist: Release, target `llama-server`, `LLAMA_USE_PREBUILT_UI`, `LLAMA_CURL`, "
            "`LLAMA_BUILD_TESTS` and `LLAMA_BUILD_EXAMPLES` off, GGML_NATIVE on, C/C++ flags "
            "`-mno-amx-tile -mno-amx-int8 -mno-amx-bf16` (the flags `./run` gives "
            "llama-cpp-python)"
        )
    if meta.get("system_info"):
        versions.append(f"llama.cpp system info (a): `{meta['system_info']}`")
    setup = [
        f"(a): `{shlex.join(['python', '-m', 'bench.engine_bench'])} --slots {args.slots} "
        f"--ctx-per-slot {args.ctx_per_slot} --threads {args.threads}`: "
        "`LlamaEngine` over `LlamaModel(ContextOptions(n_slots, n_ctx_per_slot, n_threads))`",
    ]
    if facts.llama_server_cmd:
        setup.append(f"(b): `{facts.llama_server_cmd}`")
    if facts.inferq_config:
        setup.append(
            "(c): `INFERQ_PORT=<free port> python -m inferq up` in a temporary directory "
            "without REDIS_URL/DATABASE_URL (private redis-server, SQLite), "
            f"`models/` = a symlink to the GGUF plus `{services.MODEL_NAME}.yaml`: "
            f"`{facts.inferq_config}`; "
            "stopped with SIGINT"
        )
    return RunInfo(
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        command=shlex.join([shown, "-m", "bench.run", *_public_args(argv)]),
        machine=[f"{cpu}, {os.cpu_count()} CPUs, {platform.platform()}"],
        versions=versions,
        setup=setup,
        notes=facts.notes,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-server", type=Path, help="llama-server binary for (b)")
    parser.add_argument(
        "--model", type=Path, default=services.REPO / "models/gemma-3-270m-q4_k_m.gguf"
    )
    parser.add_argument("--systems", default="a,b,c", help="which of a,b,c to run")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)))
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds per level")
    parser.add_argument("--min-requests", type=int, default=16)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--ctx-per-slot", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cooldown", type=float, default=10.0, help="seconds between systems")
    parser.add_argument("--out", type=Path, default=services.REPO / "docs/benchmarks.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    args.model = args.model.resolve()
    args.level_list = [int(x) for x in args.levels.split(",")]
    systems = [s.strip() for s in args.systems.split(",")]
    if "b" in systems and not (args.llama_server and os.access(args.llama_server, os.X_OK)):
        parser.error("(b) needs --llama-server PATH to an executable llama-server")

    facts = Facts()
    results: dict[str, list[LevelResult]] = {}
    runners = {"a": ("engine", run_engine), "b": ("llama-server", run_llama_server)}
    runners["c"] = ("inferq", run_inferq)
    with tempfile.TemporaryDirectory(prefix="inferq-bench-") as tmp:
        work = Path(tmp)
        for i, key in enumerate(systems):
            name, runner = runners[key]
            if i:
                time.sleep(args.cooldown)  # let the previous system's exit settle
            before = loadavg()
            results[name] = runner(args, work, facts)
            log.info("%s done; loadavg %s -> %s", name, before, loadavg())
        # Raw results next to nothing in the repo: the report is the record.
        raw = {k: [r.to_dict() for r in v] for k, v in results.items()}
        raw_path = Path(tempfile.gettempdir()) / "inferq-bench-last.json"
        raw_path.write_text(json.dumps(raw, indent=1))
        log.info("raw results in %s", raw_path)
    for name, levels in results.items():
        short = [r for r in levels if r.ok and r.mean_tokens() < MAX_TOKENS]
        if short:
            facts.notes.append(
                f"{name}: {len(short)} level(s) averaged fewer than {MAX_TOKENS} tokens "
                "per request (requests ended at EOS): ignore_eos was not applied."
            )
    report = render(results, run_info(args, argv, facts))
    print(report)
    write_section(args.out, report)
    log.info("report written to %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
