"""Data access for API keys. The secret is made here, shown once and kept
only as a hash; `announce` tells every API process to reload its keys."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from api.accounts.principal import KeyInfo
from schemas import keys
from schemas.accounts import QuotaRule
from schemas.tables import ApiKey, utcnow

log = logging.getLogger(__name__)

PREFIX = "sk-inferq-"
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_ID_LENGTH = 12


def _new_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_LENGTH))


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _new_token(key_id: str) -> str:
    return f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def token_id(token: str) -> str | None:
    """The key id a presented token names, or None when it is not shaped
    like one of our keys (then it is simply unknown)."""
    if not token.startswith(PREFIX):
        return None
    rest = token[len(PREFIX) :]
    key_id, sep, secret = rest.partition("_")
    if not sep or len(key_id) != _ID_LENGTH or not secret:
        return None
    return key_id


def matches(key: KeyInfo, token: str) -> bool:
    """Constant-time comparison of the token's hash with the stored one."""
    return hmac.compare_digest(key.secret_hash, hash_token(token))


def _hint(token: str) -> str:
    return f"{token[: len(PREFIX) + _ID_LENGTH]}...{token[-4:]}"


@dataclass(frozen=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    batch_tokens: int | None = None
    models: Sequence[str] | None = None
    quotas: Sequence[QuotaRule] = ()


def create_key(
    db: Engine,
    *,
    name: str,
    admin: bool = False,
    limits: Limits = Limits(),
    expires_in: timedelta | None = None,
) -> tuple[KeyInfo, str]:
    """A new key and its token (the only time the token exists in clear)."""
    now = utcnow()
    with Session(db) as session, session.begin():
        key_id = _new_id()
        while session.get(ApiKey, key_id) is not None:
            key_id = _new_id()
        token = _new_token(key_id)
        row = ApiKey(
            id=key_id,
            name=name,
            secret_hash=hash_token(token),
            hint=_hint(token),
            admin=admin,
            created_at=now,
            expires_at=now + expires_in if expires_in is not None else None,
            rpm=limits.rpm,
            tpm=limits.tpm,
            batch_tokens=limits.batch_tokens,
            models=list(limits.models) if limits.models is not None else None,
            quotas=[q.model_dump(mode="json") for q in limits.quotas] or None,
        )
        session.add(row)
        session.flush()
        info = KeyInfo.from_row(row)
    log.info("API key %s (%s) created", key_id, name)
    return info, token


def load_keys(db: Engine) -> dict[str, KeyInfo]:
    """Every key, revoked and expired ones included (they answer 401)."""
    with Session(db) as session:
        return {row.id: KeyInfo.from_row(row) for row in session.scalars(select(ApiKey))}


def list_keys(db: Engine) -> list[KeyInfo]:
    return sorted(load_keys(db).values(), key=lambda k: (k.created_at, k.id))


def get_key(db: Engine, *, key_id: str) -> KeyInfo | None:
    with Session(db) as session:
        row = session.get(ApiKey, key_id)
        return KeyInfo.from_row(row) if row is not None else None


def find_key(db: Engine, *, ref: str) -> KeyInfo | None:
    """A key by id, or by name when exactly one live key has it."""
    by_id = get_key(db, key_id=ref)
    if by_id is not None:
        return by_id
    named = [k for k in load_keys(db).values() if k.name == ref and k.revoked_at is None]
    return named[0] if len(named) == 1 else None


def revoke_key(db: Engine, *, key_id: str) -> KeyInfo | None:
    with Session(db) as session, session.begin():
        session.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
        row = session.get(ApiKey, key_id)
        info = KeyInfo.from_row(row) if row is not None else None
    if info is not None:
        log.info("API key %s revoked", key_id)
    return info


def update_key(db: Engine, *, key_id: str, changes: dict[str, Any]) -> KeyInfo | None:
    """Replace the given fields (name and limits) of a key."""
    allowed = {"name", "rpm", "tpm", "batch_tokens", "models", "quotas"}
    values = {k: v for k, v in changes.items() if k in allowed}
    if "quotas" in values:
        rules = [QuotaRule.model_validate(q) for q in values["quotas"] or []]
        values["quotas"] = [q.model_dump(mode="json") for q in rules] or None
    with Session(db) as session, session.begin():
        row = session.get(ApiKey, key_id, with_for_update=True)
        if row is None:
            return None
        for name, value in values.items():
            setattr(row, name, value)
        session.flush()
        info = KeyInfo.from_row(row)
    log.info("API key %s updated (%s)", key_id, ", ".join(sorted(values)) or "nothing")
    return info


def rotate_key(db: Engine, *, key_id: str) -> tuple[KeyInfo, str] | None:
    """A new secret for a live key: the old token stops working, everything
    the key owns stays its own (the id does not change)."""
    with Session(db) as session, session.begin():
        row = session.get(ApiKey, key_id, with_for_update=True)
        if row is None or row.revoked_at is not None:
            return None
        token = _new_token(key_id)
        row.secret_hash = hash_token(token)
        row.hint = _hint(token)
        session.flush()
        info = KeyInfo.from_row(row)
    log.info("API key %s rotated", key_id)
    return info, token


def announce(client: redis.Redis) -> None:
    """Make every API process reload its keys before its next request."""
    client.incr(keys.API_KEYS_VERSION)


def try_announce(redis_url: str, *, timeout: float = 2.0) -> bool:
    """`announce` from a command line tool; False when Redis is not there
    (then the API processes see the change at their next periodic reload)."""
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        announce(client)
        return True
    except redis.RedisError as exc:
        log.warning("could not reach Redis to announce the key change: %s", exc)
        return False
    finally:
        client.close()


# The longest duration a key may be given: 100 years.
MAX_DURATION_S = 36500 * 86400


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `45m`, `90s`, or `2w` as a duration (a ValueError else)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    text = text.strip().lower()
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit() or int(text[:-1]) <= 0:
        raise ValueError(f"a duration like 30d, 12h or 45m, not {text!r}")
    seconds = int(text[:-1]) * units[text[-1]]
    if seconds > MAX_DURATION_S:
        # Past this, timedelta and the expiry's datetime overflow (a 500).
        raise ValueError(f"at most {MAX_DURATION_S // 86400} days, not {text!r}")
    return timedelta(seconds=seconds)
