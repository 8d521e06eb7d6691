"""The Markdown report of one benchmark run, and its place in docs/benchmarks.md."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.workload import LevelResult

SECTION = "## Continuous batching (llama.cpp)"
LABELS = {
    "engine": "(a) inferq engine, in process",
    "llama-server": "(b) llama-server",
    "inferq": "(c) inferq end to end (HTTP, Celery, Redis, SSE)",
}
SHORT = {"engine": "(a) engine", "llama-server": "(b) llama-server", "inferq": "(c) inferq"}


@dataclass
class RunInfo:
    date: str
    command: str
    machine: list[str]
    versions: list[str]
    setup: list[str]  # how each system was started, one Markdown bullet each
    notes: list[str] = field(default_factory=list)


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f}"


def _find(levels: Sequence[LevelResult], concurrency: int) -> LevelResult | None:
    return next((r for r in levels if r.concurrency == concurrency), None)


def _tps(level: LevelResult | None) -> str:
    return "n/a" if level is None else f"{level.tokens_per_s:.1f}"


def _ratio(num: LevelResult | None, den: LevelResult | None) -> str:
    if num is None or den is None or den.tokens_per_s <= 0:
        return "n/a"
    return f"{num.tokens_per_s / den.tokens_per_s:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return [*out, ""]


def render(results: dict[str, list[LevelResult]], info: RunInfo) -> str:
    levels = sorted({r.concurrency for rs in results.values() for r in rs})
    lines = [SECTION, "", f"Run on {info.date} with `{info.command}`.", ""]
    lines += [
        "Workload: closed loop; at concurrency C, C streaming `/v1/completions` requests "
        "are in flight (in process: C threads calling `LlamaEngine.submit`). Every request "
        "is a distinct ~100-token plain completion prompt (no shared prefix beyond BOS and "
        "one word), `max_tokens` 64, temperature 0.8, per-request seed, `ignore_eos: true`. "
        "One warm-up round of C requests per level is not counted; tok/s = generated tokens "
        "of the measured requests / wall time of the level. TTFT = request sent to first "
        "non-empty content chunk (in process: `submit()` to the first token event reaching "
        "the EventSink).",
        "",
        "### Generation throughput (tokens/s, all streams together)",
        "",
    ]
    rows = []
    for system, rs in results.items():
        rows.append([LABELS.get(system, system), *(_tps(_find(rs, c)) for c in levels)])
    lines += _table(["system", *[f"c={c}" for c in levels]], rows)

    lines += ["### Time to first token at concurrency 1 (ms)", ""]
    rows = []
    for system, rs in results.items():
        one = _find(rs, 1)
        if one is not None:
            rows.append([LABELS.get(system, system), _ms(one.ttft(50)), _ms(one.ttft(99))])
    lines += _table(["system", "p50", "p99"], rows)

    engine, server, inferq = (results.get(k, []) for k in ("engine", "llama-server", "inferq"))
    lines += ["### Ratios at concurrency 8 (tokens/s)", ""]
    lines += _table(
        ["ratio", "value"],
        [
            ["(c) inferq / (b) llama-server", _ratio(_find(inferq, 8), _find(server, 8))],
            ["(c) inferq / (a) engine", _ratio(_find(inferq, 8), _find(engine, 8))],
            ["(a) engine / (b) llama-server", _ratio(_find(engine, 8), _find(server, 8))],
        ],
    )

    lines += ["### Every level", ""]
    rows = []
    for system, rs in results.items():
        for r in rs:
            prompt = r.mean_prompt_tokens()
            rows.append(
                [
                    SHORT.get(system, system),
                    str(r.concurrency),
                    str(len(r.requests)),
                    str(r.tokens),
                    f"{r.mean_tokens():.1f}",
                    "n/a" if prompt is None else f"{prompt:.0f}",
                    f"{r.wall_s:.2f}",
                    f"{r.tokens_per_s:.1f}",
                    _ms(r.ttft(50)),
                    _ms(r.ttft(99)),
                    str(r.errors),
                ]
            )
    lines += _table(
        [
            "system",
            "C",
            "requests",
            "tokens",
            "tokens/req",
            "prompt tokens/req",
            "wall s",
            "tok/s",
            "TTFT p50 ms",
            "TTFT p99 ms",
            "errors",
        ],
        rows,
    )

    lines += [
        "### Machine load during each measured level",
        "",
        "CPU% is of one core (the machine has 2: 200% is everything). SUT = the system "
        "under test's processes (whole process tree); loadgen = the benchmark's own "
        "HTTP client (in process for (a), where it is part of the SUT); other = every "
        "other process and the kernel; steal = time the hypervisor took away. llama.cpp "
        "is built with OpenMP here: its threads spin between decode steps, so every SUT "
        "shows close to 200% whatever its real work; what matters is that other and steal "
        "stay near 0.",
        "",
    ]
    rows = []
    for system, rs in results.items():
        for r in rs:
            load: dict[str, Any] = r.load
            if not load:
                continue
            roles = ", ".join(f"{k} {v:.0f}" for k, v in load.get("sut_roles_pct", {}).items())
            others = ", ".join(f"{k} {v:.0f}" for k, v in load.get("other_top_pct", {}).items())
            rows.append(
                [
                    SHORT.get(system, system),
                    str(r.concurrency),
                    f"{load['loadavg_before']} → {load['loadavg_after']}",
                    f"{load['busy_pct']:.0f}",
                    f"{load['sut_pct']:.0f}",
                    f"{load['loadgen_pct']:.0f}",
                    f"{load['other_pct']:.0f}",
                    f"{load['steal_pct']:.0f}",
                    roles,
                    others or "-",
                ]
            )
    lines += _table(
        [
            "system",
            "C",
            "loadavg before → after",
            "busy %",
            "SUT %",
            "loadgen %",
            "other %",
            "steal %",
            "SUT by process %",
            "busiest others %",
        ],
        rows,
    )
    for system in results:
        r8 = _find(results[system], 8)
        threads = r8.load.get("sut_threads_pct", []) if r8 else []
        if threads:
            described = ", ".join(f"{t['comm']}[{t['tid']}] {t['pct']:.0f}%" for t in threads)
            lines += [f"Busiest threads of {SHORT.get(system, system)} at c=8: {described}.", ""]

    lines += ["### Setup", ""]
    lines += [f"- {line}" for line in info.machine + info.versions + info.setup]
    lines += [""]
    if info.notes:
        lines += ["### Notes", ""] + [f"- {n}" for n in info.notes] + [""]
    return "\n".join(lines).rstrip() + "\n"


def write_section(path: Path, section: str) -> None:
    """Put `section` into `path`, replacing an earlier copy of the same section
    and leaving every other section of the file alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    # The heading line itself, not a longer heading that starts the same way.
    start = text.find(SECTION + "\n")
    if start == -1:
        text = text.rstrip() + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        tail = "" if end == -1 else text[end:]
        text = text[:start] + section + tail
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
