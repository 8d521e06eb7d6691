"""`inferq batch`: submit, follow, cancel and download bulk jobs through a
running inferq's OpenAI Files + Batches API.

Results go to stdout (a batch id, a summary, a file's bytes); progress and
errors go to stderr. Exit status: 0 ok, 1 the server answered an error or was
not reachable, or a followed batch ended other than completed; 2 usage errors."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from inferq.batch_client import Client, CLIError, first_url
from inferq.progress import Progress, format_duration

TERMINAL = {"completed", "failed", "expired", "cancelled"}
DEFAULT_URL = "http://127.0.0.1:8080"


def _when(timestamp: Any) -> str:
    if not isinstance(timestamp, int | float):
        return "-"
    return datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _counts(batch: dict[str, Any]) -> tuple[int, int, int]:
    counts = batch.get("request_counts") or {}
    return (
        int(counts.get("total", 0)),
        int(counts.get("completed", 0)),
        int(counts.get("failed", 0)),
    )


def one_line(batch: dict[str, Any]) -> str:
    total, completed, failed = _counts(batch)
    return (
        f"{batch['id']}  {batch['status']:<11} {completed + failed}/{total} done, "
        f"{failed} failed  {batch.get('endpoint', '-')}  created {_when(batch.get('created_at'))}"
    )


def _errors(batch: dict[str, Any]) -> list[str]:
    errors = batch.get("errors") or {}
    data = errors.get("data") if isinstance(errors, dict) else None
    out = []
    for error in data or []:
        where = f"line {error['line']}: " if error.get("line") is not None else ""
        out.append(f"  {where}{error.get('message', '')} ({error.get('code', '')})")
    return out


def summary(batch: dict[str, Any]) -> str:
    total, completed, failed = _counts(batch)
    rows = [
        f"{batch['id']}: {batch['status']}",
        f"  requests      {completed + failed}/{total} done: {completed} completed, "
        f"{failed} failed",
        f"  endpoint      {batch.get('endpoint', '-')}",
        f"  input file    {batch.get('input_file_id') or '-'}",
        f"  output file   {batch.get('output_file_id') or '-'}",
        f"  error file    {batch.get('error_file_id') or '-'}",
        f"  created       {_when(batch.get('created_at'))}",
    ]
    for field in ("in_progress", "finalizing", "completed", "failed", "expired", "cancelled"):
        if batch.get(f"{field}_at"):
            rows.append(f"  {field.replace('_', ' '):<13} {_when(batch[f'{field}_at'])}")
    if batch.get("status") not in TERMINAL and batch.get("expires_at"):
        rows.append(f"  expires       {_when(batch['expires_at'])}")
    metadata = batch.get("metadata") or {}
    if metadata:
        rows.append("  metadata      " + ", ".join(f"{k}={v}" for k, v in metadata.items()))
    errors = _errors(batch)
    return "\n".join(rows + (["  errors:", *errors] if errors else []))


def follow(client: Client, batch_id: str, interval: float, patience: float) -> dict[str, Any]:
    """Poll until the batch ends, drawing progress on stderr. Outages shorter
    than `patience` seconds (an API restart) are waited out."""
    progress = Progress(sys.stderr)
    outage: float | None = None
    try:
        while True:
            try:
                batch = client.batch("GET", f"/v1/batches/{batch_id}")
            except CLIError as exc:
                now = time.monotonic()
                if not exc.transient or (outage is not None and now - outage > patience):
                    raise
                if outage is None:
                    outage = now
                    progress.note(f"inferq batch: {exc}; retrying for {patience:.0f}s")
                time.sleep(interval)
                continue
            outage = None
            progress.update(batch["status"], *_counts(batch))
            if batch["status"] in TERMINAL:
                return batch
            time.sleep(interval)
    finally:
        progress.close()


def _report(client: Client, batch: dict[str, Any], output: str | None, errors: str | None) -> None:
    """After --wait: the outcome and where the results are, on stderr."""
    _, completed, failed = _counts(batch)
    took = ""
    ended = batch.get(f"{batch['status']}_at")
    if isinstance(ended, int) and isinstance(batch.get("created_at"), int):
        took = f" in {format_duration(ended - batch['created_at'])}"
    lines = [f"{batch['id']} {batch['status']}{took}: {completed} completed, {failed} failed"]
    lines += _errors(batch)
    for kind, file_id, target, flag in (
        ("output", batch.get("output_file_id"), output, "--output"),
        ("errors", batch.get("error_file_id"), errors, "--errors"),
    ):
        if target is not None:
            size = client.download(file_id, target)
            lines.append(f"{kind}: {size} bytes written to {target}")
        elif file_id is not None:
            hint = f"inferq batch download {batch['id']} {flag} FILE"
            lines.append(f"{kind}: file {file_id} ({hint})")
    print("\n".join(lines), file=sys.stderr)


def _submit(client: Client, args: argparse.Namespace) -> int:
    path = Path(args.file)
    endpoint = args.endpoint or first_url(path)
    if endpoint is None:
        _usage(args, f"{path}'s first line has no url to take the endpoint from: --endpoint")
    with path.open("rb") as handle:
        upload = client.json(
            "POST", "/v1/files", files={"file": (path.name, handle)}, data={"purpose": "batch"}
        )
    if not isinstance(upload.get("id"), str):
        raise CLIError(f"{client.base_url}/v1/files did not answer with a file: is it inferq?")
    body: dict[str, Any] = {
        "input_file_id": upload["id"],
        "endpoint": endpoint,
        "completion_window": args.window,
    }
    if args.metadata:
        body["metadata"] = dict(args.metadata)
    batch = client.batch("POST", "/v1/batches", json=body)
    print(batch["id"], flush=True)
    if not args.wait:
        return 0
    try:
        batch = follow(client, batch["id"], args.interval, args.patience)
    except KeyboardInterrupt:
        print(f"inferq batch: stopped following; {batch['id']} goes on", file=sys.stderr)
        return 130
    _report(client, batch, args.output, args.errors)
    return 0 if batch["status"] == "completed" else 1


def _status(client: Client, args: argparse.Namespace) -> int:
    batch = client.batch("GET", f"/v1/batches/{args.id}")
    print(json.dumps(batch, indent=2) if args.json else summary(batch))
    return 0


def _list(client: Client, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": args.limit}
    if args.after:
        params["after"] = args.after
    page = client.json("GET", "/v1/batches", params=params)
    if args.json:
        print(json.dumps(page, indent=2))
        return 0
    for batch in page.get("data") or []:
        print(one_line(batch))
    if page.get("has_more") and page.get("last_id"):
        print(f"(more: inferq batch list --after {page['last_id']})", file=sys.stderr)
    return 0


def _cancel(client: Client, args: argparse.Namespace) -> int:
    print(one_line(client.batch("POST", f"/v1/batches/{args.id}/cancel")))
    return 0


def _download(client: Client, args: argparse.Namespace) -> int:
    batch = client.batch("GET", f"/v1/batches/{args.id}")
    if batch["status"] not in TERMINAL:
        raise CLIError(f"{args.id} is {batch['status']}: no results yet")
    wanted = [("output", batch.get("output_file_id"), args.output)]
    if args.errors is not None:
        wanted.append(("error", batch.get("error_file_id"), args.errors))
    for kind, file_id, target in wanted:
        if file_id is None:
            print(f"inferq batch: {args.id} has no {kind} file", file=sys.stderr)
        client.download(file_id, target)
    return 0


def _usage(args: argparse.Namespace, message: str) -> NoReturn:
    """argparse's way: usage and the message on stderr, exit status 2."""
    parser: argparse.ArgumentParser = args.parser
    parser.error(message)


def _metadata(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"takes KEY=VALUE pairs, not {item!r}")
    return key, value


def _limit(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 100:
        raise argparse.ArgumentTypeError("a number from 1 to 100")
    return int(text)


def add_parser(sub: Any) -> None:
    """Register `inferq batch` on the `inferq` command's subparsers."""

    def connection(parser: argparse.ArgumentParser, url: str | None) -> None:
        # On `batch` (url: the default) and on each action (url None), so they
        # go before or after the action; an action's SUPPRESS keeps what came
        # before it.
        base_url = argparse.SUPPRESS if url is None else url
        api_key = argparse.SUPPRESS if url is None else None
        parser.add_argument(
            "--base-url",
            metavar="URL",
            default=base_url,
            help=f"default: $INFERQ_URL, else {DEFAULT_URL}",
        )
        parser.add_argument(
            "--api-key",
            metavar="KEY",
            default=api_key,
            help="default: $INFERQ_API_KEY, else $OPENAI_API_KEY",
        )

    batch = sub.add_parser("batch", help="bulk jobs: submit, status, list, cancel, download")
    connection(batch, os.environ.get("INFERQ_URL") or DEFAULT_URL)
    batch.set_defaults(func=run)
    actions = batch.add_subparsers(dest="action", required=True)

    def action(name: str, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=help)
        connection(parser, None)
        parser.set_defaults(parser=parser)
        return parser

    submit = action("submit", "upload a JSONL file and start a batch; prints its id")
    submit.add_argument("file", metavar="FILE.jsonl", help="one request a line")
    submit.add_argument(
        "--endpoint", metavar="PATH", help="default: the url of the file's first line"
    )
    submit.add_argument(
        "--window", metavar="DURATION", default="24h", help="completion window: 24h, 1h, 30m"
    )
    submit.add_argument("--metadata", nargs="+", action="extend", type=_metadata, metavar="K=V")
    submit.add_argument("--wait", action="store_true", help="follow it to the end")
    submit.add_argument("--output", metavar="PATH", help="with --wait: write the output file here")
    submit.add_argument("--errors", metavar="PATH", help="with --wait: write the error file here")
    submit.add_argument(
        "--interval", metavar="SECONDS", type=float, default=1.0, help="seconds between polls"
    )
    submit.add_argument("--patience", type=float, default=60.0, help=argparse.SUPPRESS)
    submit.set_defaults(batch_func=_submit)

    status = action("status", "one batch, as a summary or --json")
    status.add_argument("id")
    status.add_argument("--json", action="store_true")
    status.set_defaults(batch_func=_status)

    listing = action("list", "batches, newest first")
    listing.add_argument("--limit", metavar="N", type=_limit, default=20, help="1-100 (default 20)")
    listing.add_argument("--after", metavar="ID", help="the last id of the previous page")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(batch_func=_list)

    cancel = action("cancel", "cancel a batch")
    cancel.add_argument("id")
    cancel.set_defaults(batch_func=_cancel)

    fetch = action("download", "a batch's output file (stdout by default)")
    fetch.add_argument("id")
    fetch.add_argument("--output", metavar="PATH", help="write it here instead of stdout")
    fetch.add_argument("--errors", metavar="PATH", help="also write the error file here")
    fetch.set_defaults(batch_func=_download)


def run(args: argparse.Namespace) -> int:
    if not args.base_url.startswith(("http://", "https://")):
        _usage(args, f"--base-url must start with http:// or https://, not {args.base_url!r}")
    if args.action == "submit":
        if not Path(args.file).is_file():
            _usage(args, f"{args.file} is not a file")
        if (args.output or args.errors) and not args.wait:
            _usage(args, "--output and --errors need --wait")
    # httpx logs each request at INFO; the CLI reports for itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    key = args.api_key or os.environ.get("INFERQ_API_KEY") or os.environ.get("OPENAI_API_KEY")
    client = Client(args.base_url, key)
    try:
        result: int = args.batch_func(client, args)
        return result
    except (CLIError, OSError) as exc:
        print(f"inferq batch: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("inferq batch: interrupted", file=sys.stderr)
        return 130
    finally:
        client.http.close()
