"""`inferq keys`: create, list, update, revoke and rotate API keys, straight
in the database (so the first admin key can be made before any exists), then
announced through Redis so every API process applies the change at once.

`create` and `rotate` print the key alone on stdout (the only time it is
shown: `KEY=$(inferq keys create --name ci)`); everything else goes to stderr."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from api.accounts import store
from api.accounts.principal import KeyInfo
from api.accounts.protocol import KeyObject
from inferq.embedded import private_redis_url
from schemas.accounts import QuotaRule
from schemas.db import make_engine
from schemas.settings import get_settings


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a positive number, not {text}")
    return value


def _duration(text: str) -> str:
    try:
        store.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _quota(text: str) -> QuotaRule:
    """`model=gemma,window=1d,tokens=100000,requests=500` (model optional)."""
    fields: dict[str, Any] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in {"model", "window", "tokens", "requests"}:
            raise argparse.ArgumentTypeError(
                f"--quota takes model=,window=,tokens=,requests= (got {part!r})"
            )
        fields[name] = value.strip()
    try:
        window = int(store.parse_duration(fields.get("window", "")).total_seconds())
        return QuotaRule(
            model=fields.get("model") or None,
            window=window,
            max_tokens=int(fields["tokens"]) if "tokens" in fields else None,
            max_requests=int(fields["requests"]) if "requests" in fields else None,
        )
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--quota {text!r}: {exc}") from None


def _models(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _announce() -> None:
    url = (
        os.environ.get("REDIS_URL")
        or os.environ.get("INFERQ_REDIS_URL")
        or private_redis_url(get_settings())
        or get_settings().redis_url
    )
    if not store.try_announce(url):
        print("(API processes apply the change within 5 seconds)", file=sys.stderr)


def _when(moment: datetime | None) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M") if moment else "-"


def _limits(key: KeyInfo) -> str:
    parts = [
        f"rpm {key.rpm}" if key.rpm else "",
        f"tpm {key.tpm}" if key.tpm else "",
        f"batch {key.batch_tokens}" if key.batch_tokens else "",
        f"{len(key.quotas)} quota(s)" if key.quotas else "",
    ]
    return ", ".join(p for p in parts if p) or "-"


def _show(keys: list[KeyInfo], as_json: bool) -> None:
    if as_json:
        print(json.dumps([KeyObject.of(k).model_dump(mode="json") for k in keys], indent=2))
        return
    table = Table(title="API keys")
    for column in ("id", "name", "key", "admin", "models", "limits", "created", "expires", "state"):
        table.add_column(column)
    now = datetime.now().astimezone()
    for key in keys:
        state = "revoked" if key.revoked_at else ("expired" if not key.usable(now) else "active")
        table.add_row(
            key.id,
            key.name,
            key.hint,
            "yes" if key.admin else "",
            ",".join(key.models) if key.models is not None else "all",
            _limits(key),
            _when(key.created_at),
            _when(key.expires_at),
            state,
        )
    Console().print(table)


def _run(args: argparse.Namespace) -> int:
    db = make_engine(get_settings().database_url)
    try:
        return _dispatch(args, db)
    finally:
        db.dispose()


def _dispatch(args: argparse.Namespace, db: Any) -> int:
    if args.keys_command == "create":
        limits = store.Limits(
            rpm=args.rpm,
            tpm=args.tpm,
            batch_tokens=args.batch_tokens,
            models=args.models,
            quotas=args.quota or (),
        )
        expires = store.parse_duration(args.expires) if args.expires else None
        info, token = store.create_key(
            db, name=args.name, admin=args.admin, limits=limits, expires_in=expires
        )
        _announce()
        print(f"created key {info.id} ({info.name}); it is shown only once:", file=sys.stderr)
        print(token, flush=True)
        return 0
    if args.keys_command == "list":
        _show(store.list_keys(db), args.json)
        return 0
    key = store.find_key(db, ref=args.key)
    if key is None:
        print(f"no such key: {args.key}", file=sys.stderr)
        return 1
    if args.keys_command == "revoke":
        store.revoke_key(db, key_id=key.id)
        _announce()
        print(f"revoked {key.id} ({key.name})", file=sys.stderr)
        return 0
    if args.keys_command == "rotate":
        rotated = store.rotate_key(db, key_id=key.id)
        if rotated is None:
            print(f"{key.id} is revoked", file=sys.stderr)
            return 1
        _announce()
        print(f"rotated {key.id}; the old key no longer works. New key:", file=sys.stderr)
        print(rotated[1], flush=True)
        return 0
    changes: dict[str, Any] = {}
    for name in ("rpm", "tpm", "batch_tokens", "models"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value or None
    if args.quota is not None:
        changes["quotas"] = [q.model_dump() for q in args.quota]
    if args.unlimited:
        changes.update(rpm=None, tpm=None, batch_tokens=None, quotas=None)
    store.update_key(db, key_id=key.id, changes=changes)
    _announce()
    print(f"updated {key.id} ({', '.join(sorted(changes)) or 'nothing'})", file=sys.stderr)
    return 0


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"0 (no limit) or more, not {text}")
    return value


def _limit_options(parser: argparse.ArgumentParser, *, number: Any = _positive) -> None:
    parser.add_argument("--rpm", type=number, help="requests per minute")
    parser.add_argument("--tpm", type=number, help="tokens per minute")
    parser.add_argument(
        "--batch-tokens", type=number, help="prompt tokens of batches enqueued at once"
    )
    parser.add_argument("--models", type=_models, help="the models it may use, a,b (default all)")
    parser.add_argument(
        "--quota",
        type=_quota,
        action="append",
        help="a window: model=NAME,window=1d,tokens=N,requests=N (repeatable; model optional)",
    )


def add_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="manage API keys (in the database)")
    keys.set_defaults(func=_run)
    cmds = keys.add_subparsers(dest="keys_command", required=True)
    create = cmds.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", required=True)
    create.add_argument("--admin", action="store_true", help="may manage keys and see everything")
    create.add_argument("--expires", type=_duration, help="e.g. 30d, 12h, 2w")
    _limit_options(create)
    listing = cmds.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--json", action="store_true")
    for name, text in (("revoke", "revoke a key at once"), ("rotate", "give a key a new secret")):
        cmd = cmds.add_parser(name, help=text)
        cmd.add_argument("key", help="key id (or a unique name)")
    update = cmds.add_parser("update", help="change a key's limits (0 removes one)")
    update.add_argument("key", help="key id (or a unique name)")
    update.add_argument("--unlimited", action="store_true", help="remove every limit")
    _limit_options(update, number=_count)
