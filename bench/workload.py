"""The benchmark workload and its statistics, shared by every system under test.

Each system gets the same prompts in the same order with the same seeds, so
the numbers differ only by the serving stack."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

LEVELS: tuple[int, ...] = (1, 4, 8, 16)
MAX_TOKENS = 64
TEMPERATURE = 0.8


def _words(text: str, sep: str | None = None) -> tuple[str, ...]:
    return tuple(text.split(sep))


# Plain English words: with Gemma's 256k vocabulary almost each is one token,
# so ~75 words plus punctuation come to ~100 prompt tokens.
_SUBJECTS = _words(
    "farmer teacher river engine captain painter doctor village robot sailor "
    "merchant child scientist forest baker pilot musician garden soldier writer "
    "city mountain student library dragon train lawyer nurse kitchen wizard"
)
_ADJECTIVES = _words(
    "old quiet bright tired angry golden small heavy gentle strange cold busy "
    "green empty narrow famous broken lucky silver patient hidden wooden"
)
_VERBS = _words(
    "carried watched repaired painted followed opened counted visited built "
    "cleaned found lost sold borrowed measured described remembered crossed"
)
_OBJECTS = _words(
    "bridge letter window basket lantern map bicycle clock boat fence song "
    "tower ladder coin candle wheel rope bottle mirror hammer blanket key"
)
_PLACES = _words(
    "near the harbor|after the storm|before dawn|in the market|behind the school|"
    "under the old tree|on the hill|at the station|during the festival|by the lake",
    sep="|",
)
_SENTENCES_PER_PROMPT = 9


def make_prompt(index: int, seed: int = 1234) -> str:
    """A distinct plain-text completion prompt of about 100 tokens.

    Every prompt starts with its own randomly drawn words, so no two prompts
    share more than a token or two of prefix and a prompt cache cannot skip
    any prefill."""
    rng = random.Random(seed * 1_000_003 + index)
    sentences = []
    for _ in range(_SENTENCES_PER_PROMPT):
        sentences.append(
            f"The {rng.choice(_ADJECTIVES)} {rng.choice(_SUBJECTS)} "
            f"{rng.choice(_VERBS)} the {rng.choice(_ADJECTIVES)} {rng.choice(_OBJECTS)} "
            f"{rng.choice(_PLACES)}."
        )
    # Leave the text open so that a base model simply continues the story.
    return " ".join(sentences) + " Then the"


@dataclass(frozen=True)
class Job:
    """One request of the workload."""

    index: int
    prompt: str
    # None: no seed is sent (inferq evaluates a seeded prompt in full, for
    # reproducibility, so a seed would keep the prefix cache out of play).
    seed: int | None
    max_tokens: int = MAX_TOKENS
    temperature: float = TEMPERATURE


def level_jobs(concurrency: int, offset: int, count: int) -> list[Job]:
    """`count` jobs starting at prompt index `offset`; the seed is the index."""
    return [Job(i, make_prompt(i), seed=i) for i in range(offset, offset + count)]


def requests_for(concurrency: int, rounds: int, min_requests: int) -> int:
    """Measured requests at one level: `rounds` full rounds, at least `min_requests`."""
    return max(rounds * concurrency, min_requests)


def level_plan(
    levels: Sequence[int], rounds: int, min_requests: int
) -> Iterator[tuple[int, list[Job], list[Job]]]:
    """Each level's concurrency, warm-up round and measured jobs, in turn.
    Prompt indices never repeat within a run, and two runs with the same
    arguments send identical prompts and seeds."""
    offset = 0
    for concurrency in levels:
        warmup = level_jobs(concurrency, offset, concurrency)
        offset += len(warmup)
        count = requests_for(concurrency, rounds, min_requests)
        jobs = level_jobs(concurrency, offset, count)
        offset += count
        yield concurrency, warmup, jobs


@dataclass
class RequestResult:
    index: int
    ttft_s: float | None  # send -> first non-empty content chunk
    duration_s: float  # send -> end of the stream
    chunks: int  # non-empty content chunks received
    completion_tokens: int  # from `usage` when the server sent it, else chunks
    prompt_tokens: int | None = None
    usage_reported: bool = False
    finish_reason: str | None = None
    error: str | None = None
    # Median gap between this request's streamed content chunks (None with
    # fewer than two chunks), and the prompt tokens the server said it reused.
    itl_s: float | None = None
    cached_tokens: int | None = None


@dataclass
class LevelResult:
    system: str
    concurrency: int
    wall_s: float
    requests: list[RequestResult]
    warmup_requests: int
    load: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.requests if r.error is None]

    @property
    def tokens(self) -> int:
        return sum(r.completion_tokens for r in self.ok)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def errors(self) -> int:
        return len(self.requests) - len(self.ok)

    def ttft(self, q: float) -> float | None:
        values = [r.ttft_s for r in self.ok if r.ttft_s is not None]
        return percentile(values, q) if values else None

    def itl(self, q: float) -> float | None:
        """Percentile over requests of each request's median inter-chunk gap."""
        values = [r.itl_s for r in self.ok if r.itl_s is not None]
        return percentile(values, q) if values else None

    def cached_tokens(self) -> int | None:
        values = [r.cached_tokens for r in self.ok if r.cached_tokens is not None]
        return sum(values) if values else None

    def mean_tokens(self) -> float:
        ok = self.ok
        return self.tokens / len(ok) if ok else 0.0

    def mean_prompt_tokens(self) -> float | None:
        values = [r.prompt_tokens for r in self.ok if r.prompt_tokens is not None]
        return sum(values) / len(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LevelResult:
        requests = [RequestResult(**r) for r in data["requests"]]
        return cls(
            system=data["system"],
            concurrency=data["concurrency"],
            wall_s=data["wall_s"],
            requests=requests,
            warmup_requests=data["warmup_requests"],
            load=data.get("load", {}),
        )


def log_level(logger: logging.Logger, level: LevelResult) -> None:
    logger.info(
        "%s c=%d: %.1f tok/s, %d tokens in %.2f s, %d errors",
        level.system,
        level.concurrency,
        level.tokens_per_s,
        level.tokens,
        level.wall_s,
        level.errors,
    )


def print_levels(results: Sequence[LevelResult]) -> None:
    """One summary line per level on stdout: the command's own output."""
    for r in results:
        p50, p99 = r.ttft(50), r.ttft(99)
        print(
            f"c={r.concurrency:<3d} {r.tokens_per_s:8.1f} tok/s  "
            f"ttft p50 {p50 or 0:.3f} s  p99 {p99 or 0:.3f} s  "
            f"tokens/request {r.mean_tokens():.1f}  errors {r.errors}"
        )


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
