"""Overload: many more streaming clients than the model has slots, for a while.

N clients (default 200) each send streaming `/v1/completions` requests in a
closed loop for a fixed time. Every request ends in exactly one of:

- completed: a 200 stream that ended with `data: [DONE]` and no error event;
- refused: a 503 or 429 in the OpenAI error envelope with a `Retry-After`
  header (the client then waits that long, capped, before its next request);
- broken: anything else (another status, an error event inside a stream, a
  stream cut before `[DONE]`, a refusal without `Retry-After`);
- hung: no byte for `--hang-after` seconds (the request is abandoned).

What inferq promises under overload: zero broken and zero hung requests; the
excess is refused at once. Reported: the counts, time to first token p50/p99
of the completed requests, refusal latency p50/p99, tokens per second.

    ./run &                       # the demo stack on :8080
    python -m bench.overload --url http://127.0.0.1:8080 --clients 200 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workload import make_prompt, percentile

log = logging.getLogger("bench.overload")

# A refused client waits what Retry-After says, up to this long (the openai
# client honours Retry-After up to 60 s).
MAX_BACKOFF_S = 60.0


@dataclass
class Outcome:
    kind: str  # completed, refused, broken, hung
    elapsed_s: float
    ttft_s: float | None = None
    tokens: int = 0
    status: int | None = None
    detail: str = ""
    # Seconds from the start of the run to when the request was sent.
    sent_s: float = 0.0


@dataclass
class Report:
    clients: int
    duration_s: float
    wall_s: float
    outcomes: list[Outcome] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        c = Counter(o.kind for o in self.outcomes)
        return {k: c.get(k, 0) for k in ("completed", "refused", "broken", "hung")}

    def summary(self) -> dict[str, Any]:
        done = [o for o in self.outcomes if o.kind == "completed"]
        refused = [o for o in self.outcomes if o.kind == "refused"]
        ttfts = [o.ttft_s for o in done if o.ttft_s is not None]
        tokens = sum(o.tokens for o in done)
        return {
            "clients": self.clients,
            "duration_s": self.duration_s,
            "wall_s": round(self.wall_s, 1),
            **self.counts(),
            "ttft_p50_s": _round(_pct(ttfts, 50)),
            "ttft_p99_s": _round(_pct(ttfts, 99)),
            "refusal_p50_s": _round(_pct([o.elapsed_s for o in refused], 50)),
            "refusal_p99_s": _round(_pct([o.elapsed_s for o in refused], 99)),
            "tokens_per_s": round(tokens / self.wall_s, 1) if self.wall_s else 0.0,
            "statuses": dict(Counter(str(o.status) for o in self.outcomes)),
            "broken_examples": [o.detail for o in self.outcomes if o.kind == "broken"][:5],
            # (sent, time to first token) of each completed request, for a plot.
            "completed_timeline": [
                (round(o.sent_s, 2), _round(o.ttft_s)) for o in sorted(done, key=lambda o: o.sent_s)
            ],
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _pct(values: Sequence[float], q: float) -> float | None:
    return percentile(values, q) if values else None


async def one_request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], hang_after: float
) -> tuple[Outcome, float]:
    """Send one request; return its outcome and how long to wait before the next."""
    sent = time.perf_counter()
    ttft: float | None = None
    tokens = 0
    try:
        async with asyncio.timeout(hang_after) as budget:
            async with client.stream("POST", url, json=body) as response:
                if response.status_code != 200:
                    raw = await response.aread()
                    elapsed = time.perf_counter() - sent
                    return _refusal(response, raw, elapsed)
                done = False
                async for line in response.aiter_lines():
                    # Every byte proves the server alive: the hang clock restarts.
                    budget.reschedule(asyncio.get_running_loop().time() + hang_after)
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        return Outcome(
                            "broken",
                            time.perf_counter() - sent,
                            ttft,
                            tokens,
                            200,
                            f"error event: {chunk['error']}",
                        ), 0.0
                    for choice in chunk.get("choices") or []:
                        if choice.get("text"):
                            tokens += 1
                            if ttft is None:
                                ttft = time.perf_counter() - sent
        elapsed = time.perf_counter() - sent
        if not done:
            return Outcome("broken", elapsed, ttft, tokens, 200, "stream ended without [DONE]"), 0.0
        return Outcome("completed", elapsed, ttft, tokens, 200), 0.0
    except TimeoutError:
        return Outcome("hung", time.perf_counter() - sent, ttft, tokens, None, "no byte"), 0.0
    except (httpx.HTTPError, ValueError) as exc:
        return Outcome(
            "broken", time.perf_counter() - sent, ttft, tokens, None, repr(exc)[:200]
        ), 0.5


def _refusal(response: httpx.Response, raw: bytes, elapsed: float) -> tuple[Outcome, float]:
    status = response.status_code
    detail = raw.decode(errors="replace")[:200]
    try:
        error = json.loads(raw)["error"]
        enveloped = isinstance(error.get("code"), str) and "message" in error
    except (ValueError, KeyError, TypeError, AttributeError):
        enveloped = False
    retry_after = response.headers.get("retry-after")
    if status in (429, 503) and enveloped and retry_after is not None:
        try:
            wait = min(float(retry_after), MAX_BACKOFF_S)
        except ValueError:
            wait = MAX_BACKOFF_S
        return Outcome("refused", elapsed, status=status, detail=detail), wait
    return Outcome("broken", elapsed, status=status, detail=f"HTTP {status}: {detail}"), 0.5


async def run(
    url: str,
    *,
    model: str,
    clients: int,
    duration: float,
    max_tokens: int,
    hang_after: float,
) -> Report:
    endpoint = url.rstrip("/") + "/v1/completions"
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    timeout = httpx.Timeout(None, connect=10.0)
    report = Report(clients, duration, 0.0)
    started = time.perf_counter()
    stop_at = started + duration

    async def client_loop(index: int, client: httpx.AsyncClient) -> None:
        n = 0
        while time.perf_counter() < stop_at:
            body = {
                "model": model,
                "prompt": make_prompt(index * 100_003 + n),
                "max_tokens": max_tokens,
                "temperature": 0.8,
                "seed": index * 1000 + n,
                "stream": True,
                "ignore_eos": True,
            }
            sent = time.perf_counter() - started
            outcome, wait = await one_request(client, endpoint, body, hang_after)
            outcome.sent_s = sent
            report.outcomes.append(outcome)
            n += 1
            if wait:
                # Never past the end of the run: the load stops on time.
                await asyncio.sleep(min(wait, max(0.0, stop_at - time.perf_counter())))

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
    report.wall_s = time.perf_counter() - started
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--hang-after", type=float, default=60.0, help="seconds without a byte that count as hung"
    )
    parser.add_argument("--json", type=Path, help="write the summary here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    report = asyncio.run(
        run(
            args.url,
            model=args.model,
            clients=args.clients,
            duration=args.duration,
            max_tokens=args.max_tokens,
            hang_after=args.hang_after,
        )
    )
    summary = report.summary()
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    shown = {k: v for k, v in summary.items() if k != "completed_timeline"}
    log.info("%s", json.dumps(shown, indent=1))
    failures = summary["broken"] + summary["hung"]
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
