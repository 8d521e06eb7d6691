"""Markdown for bench.versus: per suite, each metric's median and spread
(min-max) over the repetitions per system, and inferq/other per repetition."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

Results = dict[str, dict[str, list[dict[str, Any]]]]  # suite -> system -> runs


def _values(runs: Sequence[dict[str, Any]], metric: str) -> list[float | None]:
    return [run["metrics"].get(metric) for run in runs]


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def spread(values: Sequence[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "n/a"
    med = statistics.median(known)
    if len(known) == 1:
        return _fmt(med)
    return f"{_fmt(med)} ({_fmt(min(known))}-{_fmt(max(known))})"


def median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def ratios(a: Sequence[float | None], b: Sequence[float | None]) -> list[float | None]:
    return [x / y if x is not None and y else None for x, y in zip(a, b, strict=False)]


def _per_rep(values: Sequence[float | None]) -> str:
    return " / ".join("n/a" if v is None else f"{v:.2f}" for v in values)


def suite_table(systems: dict[str, list[dict[str, Any]]]) -> list[str]:
    names = list(systems)
    metrics: list[str] = []
    for runs in systems.values():
        for run in runs:
            metrics += [m for m in run["metrics"] if m not in metrics]
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for metric in metrics:
        cells = [spread(_values(systems[n], metric)) for n in names]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def ratio_table(systems: dict[str, list[dict[str, Any]]], base: str) -> list[str]:
    """inferq/other per repetition for the throughput and latency metrics both have."""
    if base not in systems:
        return []
    lines = ["| metric | inferq / | per repetition | median |", "|---|---|---|---|"]
    keys = ("tok/s", "TTFT p50 ms", "ITL p50 ms")
    for other, runs in systems.items():
        if other == base:
            continue
        for metric in systems[base][0]["metrics"]:
            if not metric.endswith(keys) or metric not in runs[0]["metrics"]:
                continue
            per = ratios(_values(systems[base], metric), _values(runs, metric))
            m = median(per)
            cell = "n/a" if m is None else f"{m:.2f}"
            lines.append(f"| {metric} | {other} | {_per_rep(per)} | {cell} |")
    return [*lines, ""] if len(lines) > 2 else []


def distinct_headline(systems: dict[str, list[dict[str, Any]]], base: str) -> list[str]:
    if base not in systems:
        return []
    others = {k: v for k, v in systems.items() if k != base}
    reps = len(systems[base])
    mine = _values(systems[base], "best tok/s")
    # llama-server's best per repetition over all its -np settings and levels.
    theirs = [
        max(
            (v for v in (_values(runs, "best tok/s")[i] for runs in others.values()) if v),
            default=None,
        )
        for i in range(reps)
    ]
    out = [
        f"- best tok/s: inferq {spread(mine)}, llama-server (best -np, best level) "
        f"{spread(theirs)}; ratio per repetition {_per_rep(ratios(mine, theirs))}",
    ]
    for other, runs in others.items():
        c8 = ratios(_values(systems[base], "c=8 tok/s"), _values(runs, "c=8 tok/s"))
        out.append(f"- c=8 tok/s, inferq / {other}: {_per_rep(c8)}")
    itl = [f"inferq {spread(_values(systems[base], 'c=1 ITL p50 ms'))}"]
    itl += [f"{k} {spread(_values(v, 'c=1 ITL p50 ms'))}" for k, v in others.items()]
    out.append("- c=1 inter-token latency p50 ms: " + ", ".join(itl))
    return [*out, ""]


def best_llama(results: Results, base: str) -> list[float | None]:
    """llama-server's best closed-loop tok/s per repetition from suite distinct."""
    systems = {k: v for k, v in results.get("distinct", {}).items() if k != base}
    if not systems:
        return []
    reps = min(len(v) for v in systems.values())
    return [
        max((r[i]["metrics"].get("best tok/s") or 0.0 for r in systems.values()), default=None)
        for i in range(reps)
    ]


def render(results: Results, setup: Sequence[str], base: str = "inferq") -> str:
    lines = ["## inferq versus llama-server (issue 13)", "", *setup, ""]
    titles = {
        "distinct": "### Distinct ~100-token prompts, closed loop, 64 tokens",
        "prefix": "### Shared ~400-token system prompt + distinct ~30-token question",
        "batch": "### Completions batch (Batches API) and interactive requests during it",
    }
    for suite, systems in results.items():
        lines += [titles.get(suite, f"### {suite}"), ""]
        if suite == "distinct":
            lines += distinct_headline(systems, base)
        lines += suite_table(systems)
        lines += ratio_table(systems, base)
        if suite == "batch":
            lines += _batch_lines(results, systems)
    return "\n".join(lines)


def _batch_lines(results: Results, systems: dict[str, list[dict[str, Any]]]) -> list[str]:
    mine = _values(systems.get("inferq batch", []), "batch tok/s")
    engine = _values(systems.get("engine", []), "tok/s")
    llama = best_llama(results, "inferq") or _values(
        systems.get("llama-server c=32", []), "c=32 tok/s"
    )
    out = [f"- batch / engine in process, per repetition: {_per_rep(ratios(mine, engine))}"]
    if llama:
        out.append(f"- batch / llama-server best closed loop: {_per_rep(ratios(mine, llama))}")
    for key in ("TTFT", "ITL"):
        per = _values(systems.get("inferq batch", []), f"busy/idle {key}")
        out.append(f"- interactive {key} p50 busy/idle: {_per_rep(per)}")
    return [*out, ""]
