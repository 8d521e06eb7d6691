"""What accounts cost the serving path: auth off against auth on, A B A B.

A is `inferq up` with no API key (auth off). B is the same tree and model
with an API key that has every limit inferq checks per request, set so high
that none is reached: requests and tokens per minute and a quota window on
the model, so each request is authenticated, admitted through the Redis
token buckets, charged to its key and settled by the worker. Both record
usage rows. Each round starts a fresh `inferq up`, runs the closed-loop
streaming workload (bench.loadgen) and stops it; the report gives time to
first token p50 and tokens/s per round, and the median and range per system.

    .venv/bin/python -m bench.auth_bench --levels 1,8 --pairs 2
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ab_commits import ab_table, measure_levels, parse_ab_args
from bench.services import MODEL_NAME, inferq_config, inferq_home, inferq_up, serve
from bench.workload import LevelResult

log = logging.getLogger("bench.auth_bench")

_ENV_DROP = ("REDIS_URL", "DATABASE_URL", "INFERQ_MODELS_DIR", "INFERQ_PORT", "INFERQ_AUTH")
# Limits no run of this benchmark reaches: every check runs, none refuses.
_LIMITS = [
    "--rpm", "1000000",
    "--tpm", "1000000000",
    "--quota", f"model={MODEL_NAME},window=1d,tokens=1000000000,requests=1000000",
]  # fmt: skip


def _make_key(home: Path) -> str:
    """A limited key in `home`'s own database (before inferq up starts)."""
    env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
    command = [sys.executable, "-m", "inferq"]
    subprocess.run([*command, "migrate"], cwd=home, env=env, check=True, capture_output=True)
    made = subprocess.run(
        [*command, "keys", "create", "--name", "bench", *_LIMITS],
        cwd=home,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return made.stdout.strip()


def _one_round(
    label: str, work: Path, model: Path, levels: list[int], args: argparse.Namespace
) -> list[LevelResult]:
    home = inferq_home(
        work / f"{label}-{len(list(work.iterdir()))}", model, inferq_config(model, args)
    )
    headers = None
    if label == "B":
        (home / "data").mkdir()
        headers = {"Authorization": f"Bearer {_make_key(home)}"}
    service = inferq_up(home, home / "inferq.log", drop=_ENV_DROP)
    with serve(service):
        return measure_levels(service.url, label, levels, args, headers)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args = parse_ab_args(parser, argv)
    levels = [int(x) for x in args.levels.split(",")]
    results: dict[str, list[list[LevelResult]]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="inferq-auth-") as tmp:
        work = Path(tmp)
        for _ in range(args.pairs):
            for label in ("A", "B"):
                results[label].append(_one_round(label, work, args.model, levels, args))
    header = (
        f"A = auth off, B = auth on with a limited key ({' '.join(_LIMITS)}); "
        f"{args.pairs} pairs A B A B; levels {args.levels}; {args.slots} slots, "
        f"{args.threads} threads"
    )
    print(ab_table(header, results, levels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
