"""api/accounts/store.py on real Postgres: what is stored of a key, and what
revoke, rotate and update do to it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine, text

from api.accounts import store
from api.accounts.auth import authenticate
from api.errors import APIError
from schemas.accounts import QuotaRule


@pytest.fixture
def db(pg_engine: Engine) -> Engine:
    return pg_engine


def test_only_a_hash_of_the_key_is_stored(db: Engine) -> None:
    info, token = store.create_key(db, name="a", limits=store.Limits(rpm=5))
    assert token.startswith(f"sk-inferq-{info.id}_")
    assert store.token_id(token) == info.id
    with db.connect() as conn:
        row = conn.execute(text("SELECT * FROM api_keys")).mappings().one()
    stored = " ".join(str(v) for v in row.values())
    assert token not in stored and token.split("_", 1)[1] not in stored
    assert row["secret_hash"] == store.hash_token(token)
    assert store.matches(info, token) and not store.matches(info, token + "x")


def test_authenticate(db: Engine) -> None:
    info, token = store.create_key(db, name="a")
    keys = store.load_keys(db)
    assert authenticate(keys, token).key_id == info.id
    for bad in (None, "", "sk-inferq-", token[:-1], token + "a", "Bearer x", "\x00" * 40):
        with pytest.raises(APIError) as caught:
            authenticate(keys, bad or None)
        assert caught.value.status == 401 and caught.value.code == "invalid_api_key"
        assert token not in caught.value.message


def test_rotate_keeps_the_id_and_revoke_keeps_the_row(db: Engine) -> None:
    info, token = store.create_key(db, name="a", admin=True)
    rotated = store.rotate_key(db, key_id=info.id)
    assert rotated is not None
    new_info, new_token = rotated
    assert new_info.id == info.id and new_token != token
    keys = store.load_keys(db)
    with pytest.raises(APIError):
        authenticate(keys, token)
    assert authenticate(keys, new_token).admin
    store.revoke_key(db, key_id=info.id)
    with pytest.raises(APIError) as caught:
        authenticate(store.load_keys(db), new_token)
    assert "revoked" in caught.value.message
    assert store.rotate_key(db, key_id=info.id) is None
    assert store.get_key(db, key_id=info.id) is not None


def test_expired_key(db: Engine) -> None:
    _, token = store.create_key(db, name="a", expires_in=timedelta(seconds=-1))
    with pytest.raises(APIError) as caught:
        authenticate(store.load_keys(db), token)
    assert "expired" in caught.value.message


def test_update_and_find(db: Engine) -> None:
    info, _ = store.create_key(db, name="team-a", limits=store.Limits(rpm=1, models=["m"]))
    rule = QuotaRule(model="m", window=3600, max_tokens=10)
    updated = store.update_key(db, key_id=info.id, changes={"rpm": None, "quotas": [rule]})
    assert updated is not None and updated.rpm is None and updated.quotas == (rule,)
    assert updated.models == ("m",)
    assert store.find_key(db, ref="team-a") == updated
    store.create_key(db, name="team-a")
    # Two keys share the name: only the id finds one.
    assert store.find_key(db, ref="team-a") is None
    assert store.find_key(db, ref=info.id) is not None


@pytest.mark.parametrize(
    ("text_", "seconds"), [("30d", 30 * 86400), ("12h", 43200), ("45m", 2700), ("2w", 1209600)]
)
def test_parse_duration(text_: str, seconds: int) -> None:
    assert store.parse_duration(text_).total_seconds() == seconds


@pytest.mark.parametrize(
    "bad", ["", "d", "0d", "-1d", "3y", "1.5h", "30", "36501d", "99999999999999999999d"]
)
def test_parse_duration_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        store.parse_duration(bad)
