"""`inferq usage`: token usage per model, key, day or endpoint, as a table
with a per-day sparkline, read from a running inferq's GET /v1/usage.

It talks HTTP like `inferq batch`, not to the database: the API applies
the key's view (a key sees its own usage, an admin everyone's), it works
from any machine that can reach the API (no database credentials on a
laptop), and the sums are the ones every other client of /v1/usage gets.
Exit status: 0 ok, 1 the server answered an error or was not reachable,
2 usage errors."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, NoReturn

from rich.console import Console
from rich.table import Table

from inferq.batch_client import Client, CLIError

DEFAULT_URL = "http://127.0.0.1:8080"
GROUPS = ("model", "key", "day", "endpoint")
SPARKS = "▁▂▃▄▅▆▇█"
# Beyond this many days a sparkline cell stands for several days.
MAX_SPARK = 60
_DURATION = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: datetime) -> datetime:
    """`7d`, `12h`, `30m`, `2w`, `90s` before `now`, or an ISO date or time (UTC)."""
    value = text.strip().lower()
    match = _DURATION.fullmatch(value)
    if match:
        return now - timedelta(seconds=int(match[1]) * _UNITS[match[2]])
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since takes 7d, 24h, 30m, 2w or an ISO date, not {text!r}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def sparkline(values: Sequence[int]) -> str:
    """One character per value, scaled to the largest; zero is a blank."""
    top = max(values, default=0)
    if top <= 0:
        return " " * len(values)
    marks = []
    for value in values:
        if value <= 0:
            marks.append(" ")
        else:
            marks.append(SPARKS[min(len(SPARKS) - 1, (value * len(SPARKS) - 1) // top)])
    return "".join(marks)


def binned(values: Sequence[int], width: int = MAX_SPARK) -> list[int]:
    """At most `width` values: consecutive days summed when there are more."""
    if len(values) <= width:
        return list(values)
    size = -(-len(values) // width)
    return [sum(values[i : i + size]) for i in range(0, len(values), size)]


@dataclass
class Row:
    label: str
    requests: int = 0
    prompt: int = 0
    cached: int = 0
    completion: int = 0
    total: int = 0
    daily: dict[date, int] = field(default_factory=dict)

    def add(self, result: dict[str, Any], day: date) -> None:
        self.requests += int(result.get("num_model_requests", 0))
        self.prompt += int(result.get("input_tokens", 0))
        self.cached += int(result.get("input_cached_tokens", 0))
        self.completion += int(result.get("output_tokens", 0))
        tokens = int(result.get("total_tokens", 0))
        self.total += tokens
        self.daily[day] = self.daily.get(day, 0) + tokens


def _label(by: str, result: dict[str, Any], day: date, names: dict[str, str]) -> str:
    if by == "day":
        return day.isoformat()
    if by == "key":
        key_id = result.get("api_key_id")
        if key_id is None:
            return "(no key: auth off)"
        name = names.get(str(key_id))
        return f"{name} ({key_id})" if name else str(key_id)
    return str(result.get("model" if by == "model" else "endpoint") or "-")


def rows(page: dict[str, Any], by: str, names: dict[str, str]) -> tuple[list[Row], Row]:
    """The table's rows (by label) and their total, from a page grouped by
    `by` and day."""
    found: dict[str, Row] = {}
    total = Row("total")
    for bucket in page.get("data") or []:
        day = datetime.fromtimestamp(int(bucket["start_time"]), UTC).date()
        for result in bucket.get("results") or []:
            label = _label(by, result, day, names)
            found.setdefault(label, Row(label)).add(result, day)
            total.add(result, day)
    return sorted(found.values(), key=lambda r: (-r.total, r.label)), total


def days_between(first: date, last: date) -> list[date]:
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def render(console: Console, by: str, table_rows: list[Row], total: Row, days: list[date]) -> None:
    def spark(row: Row) -> str:
        return sparkline(binned([row.daily.get(d, 0) for d in days]))

    table = Table(
        title=f"inferq usage by {by}, {days[0].isoformat()} .. {days[-1].isoformat()} (UTC)",
        caption="sparkline: total tokens per day" if by != "day" else None,
    )
    table.add_column(by, no_wrap=True)
    for name in ("requests", "prompt", "cached", "completion", "total"):
        table.add_column(name, justify="right", no_wrap=True)
    if by != "day":
        table.add_column("per day", no_wrap=True)

    def cells(row: Row) -> list[str]:
        out = [
            row.label,
            f"{row.requests:,}",
            f"{row.prompt:,}",
            f"{row.cached:,}",
            f"{row.completion:,}",
            f"{row.total:,}",
        ]
        return [*out, spark(row)] if by != "day" else out

    ordered = sorted(table_rows, key=lambda r: r.label) if by == "day" else table_rows
    for index, row in enumerate(ordered):
        table.add_row(*cells(row), end_section=index == len(ordered) - 1)
    table.add_row(*cells(total), style="bold")
    console.print(table)
    if by == "day":
        console.print(f"tokens per day: {spark(total)}")


def _key_names(client: Client) -> dict[str, str]:
    """Key id -> name, for an admin key (others may not list keys: ids only)."""
    try:
        listing = client.json("GET", "/v1/admin/keys")
    except CLIError:
        return {}
    return {
        str(k["id"]): str(k["name"])
        for k in listing.get("data") or []
        if isinstance(k, dict) and "id" in k and "name" in k
    }


def fetch(client: Client, *, start: datetime, by: str, key_ids: Sequence[str]) -> dict[str, Any]:
    params: list[tuple[str, str | int]] = [("start", int(start.timestamp()))]
    params += [("group_by", g) for g in dict.fromkeys([by, "day"])]
    params += [("key_id", k) for k in key_ids]
    return client.json("GET", "/v1/usage", params=params)


def _usage(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    parser.error(message)


def add_parser(sub: Any) -> None:
    """Register `inferq usage` on the `inferq` command's subparsers."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "usage", help="token usage per model, key, day or endpoint (a table)"
    )
    parser.add_argument("--by", choices=GROUPS, default="model", help="default: model")
    parser.add_argument(
        "--since", default="7d", metavar="WHEN", help="7d, 24h, 2w or an ISO date (default 7d)"
    )
    parser.add_argument(
        "--key-id",
        action="append",
        default=[],
        metavar="ID",
        help="admin keys: only these keys' usage (repeatable)",
    )
    parser.add_argument(
        "--url",
        "--base-url",
        dest="url",
        metavar="URL",
        default=os.environ.get("INFERQ_URL") or DEFAULT_URL,
        help=f"default: $INFERQ_URL, else {DEFAULT_URL}",
    )
    parser.add_argument(
        "--key",
        "--api-key",
        dest="api_key",
        metavar="KEY",
        help="the API key; default: $INFERQ_API_KEY, else $OPENAI_API_KEY",
    )
    parser.add_argument("--json", action="store_true", help="print the /v1/usage answer as is")
    parser.set_defaults(func=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    if not args.url.startswith(("http://", "https://")):
        _usage(parser, f"--url must start with http:// or https://, not {args.url!r}")
    now = datetime.now(UTC)
    try:
        start = parse_since(args.since, now)
    except ValueError as exc:
        _usage(parser, str(exc))
    if start >= now:
        _usage(parser, "--since must be in the past")
    # httpx logs each request at INFO; the CLI reports for itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    key = args.api_key or os.environ.get("INFERQ_API_KEY") or os.environ.get("OPENAI_API_KEY")
    client = Client(args.url, key)
    try:
        page = fetch(client, start=start, by=args.by, key_ids=args.key_id)
        if args.json:
            print(json.dumps(page, indent=2))
            return 0
        names = _key_names(client) if args.by == "key" else {}
    except CLIError as exc:
        print(f"inferq usage: {exc}", file=sys.stderr)
        return 1
    finally:
        client.http.close()
    table_rows, total = rows(page, args.by, names)
    console = Console(width=None if sys.stdout.isatty() else 160)
    if not table_rows:
        console.print(f"no usage since {start.strftime('%Y-%m-%d %H:%M')} UTC")
        return 0
    render(console, args.by, table_rows, total, days_between(start.date(), now.date()))
    return 0
