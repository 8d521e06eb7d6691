"""inferq's vLLM worker against `vllm serve`, A B A B, same model, same client.

Both run the same vLLM build from the vLLM environment (`./run vllm`) with the
same engine settings; each is started, warmed and measured at every
concurrency level by bench.loadgen (distinct ~100-token prompts, 64 tokens,
ignore_eos), then stopped. The report gives tokens/s and TTFT p50 per level:
each system's median and spread (min-max) over its repetitions, and their
ratio. Markdown on stdout.

    .venv/bin/python -m bench.vllm_versus --model-dir DIR [--pairs 2] [--levels 1,4,8]

DIR is a Hugging Face model directory; bench.vllm_model writes a random one
of a chosen size, tests.support.tinyhf the test suite's tiny one.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import statistics
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import services
from bench.loadgen import run_levels
from bench.workload import LevelResult

log = logging.getLogger("bench.vllm_versus")
NAME = "bench-model"
# What both systems set alike: vLLM's CPU environment and engine settings.
VLLM_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "2"}


def vllm_python() -> Path:
    return Path(os.environ.get("INFERQ_VLLM_PYTHON") or services.REPO / ".venv-vllm/bin/python")


def vllm_serve(args: argparse.Namespace, work: Path, tag: str) -> services.Service:
    port = services.free_port()
    # `vllm serve` is this module; the CPU build's `vllm` script looks up a
    # distribution named vllm, which it is not, and exits.
    cmd = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server"]
    cmd += ["--model", str(args.model_dir)]
    cmd += ["--served-model-name", NAME, "--max-model-len", str(args.context)]
    cmd += ["--max-num-seqs", str(args.seqs), "--dtype", args.dtype, "--enforce-eager"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--disable-log-stats"]
    env = {**os.environ, **VLLM_ENV}
    return services.Service(
        cmd,
        port,
        work / f"{tag}.log",
        health_timeout=300,
        stop_signal=signal.SIGINT,
        stop_timeout=60,
        env=env,
        own_session=False,
    )


def inferq_vllm(args: argparse.Namespace, work: Path, tag: str) -> services.Service:
    home = work / tag
    models = home / "models"
    models.mkdir(parents=True)
    # Interactive slots only: bulk sequences would raise vLLM's max_num_seqs.
    (models / f"{NAME}.yaml").write_text(
        f"{{name: {NAME}, backend: vllm, parameters: {{model: {args.model_dir}}}, "
        f"context_size: {args.context}, parallel: {args.seqs}, bulk_parallel: 1, "
        f"dtype: {args.dtype}}}\n"
    )
    extra = {**VLLM_ENV, "INFERQ_VLLM_PYTHON": str(vllm_python())}
    if args.inferq_nice is not None:
        extra["INFERQ_VLLM_CPU_NICE"] = str(args.inferq_nice)
    return services.inferq_up(home, home / "inferq.log", drop=services.INFERQ_ENV_DROP, **extra)


def measure(service: services.Service, system: str, args: argparse.Namespace) -> list[LevelResult]:
    with services.serve(service) as (_, started):
        log.info("%s up in %.1f s", system, started)
        return asyncio.run(
            run_levels(
                service.url,
                system=system,
                model=NAME,
                levels=args.levels,
                rounds=args.rounds,
                min_requests=args.min_requests,
            )
        )


def _cell(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    mid = statistics.median(values)
    return f"{mid:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def report(runs: dict[str, list[list[LevelResult]]], args: argparse.Namespace) -> str:
    lines = [
        f"Model: {args.model_dir.name}, dtype {args.dtype}, context {args.context}, "
        f"max_num_seqs {args.seqs}; {len(runs['vllm serve'])} runs of each, A B A B"
        + ("." if args.inferq_nice is None else f"; inferq's engine at nice {args.inferq_nice}."),
        "",
        "| concurrency | vllm serve tok/s | inferq tok/s | ratio | vllm serve TTFT p50 ms "
        "| inferq TTFT p50 ms |",
        "|---|---|---|---|---|---|",
    ]
    for i, level in enumerate(args.levels):
        tok = {s: [run[i].tokens_per_s for run in r] for s, r in runs.items()}
        ttft = {s: [1000 * (run[i].ttft(50) or 0) for run in r] for s, r in runs.items()}
        ratios = [a / b for a, b in zip(tok["inferq"], tok["vllm serve"], strict=True) if b]
        lines.append(
            f"| {level} | {_cell(tok['vllm serve'], 1)} | {_cell(tok['inferq'], 1)} "
            f"| {_cell(ratios, 2)} | {_cell(ttft['vllm serve'], 0)} | {_cell(ttft['inferq'], 0)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--levels", default="1,4,8")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=16)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--inferq-nice", type=int, help="the vLLM engine's niceness in inferq (default: its own)"
    )
    args = parser.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",")]
    args.model_dir = args.model_dir.resolve()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    runs: dict[str, list[list[LevelResult]]] = {"vllm serve": [], "inferq": []}
    with tempfile.TemporaryDirectory(prefix="vllm-versus-") as tmp:
        work = Path(tmp)
        for pair in range(args.pairs):
            runs["vllm serve"].append(
                measure(vllm_serve(args, work, f"vllm{pair}"), "vllm serve", args)
            )
            runs["inferq"].append(measure(inferq_vllm(args, work, f"inferq{pair}"), "inferq", args))
    print(report(runs, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
