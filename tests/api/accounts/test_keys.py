"""API keys end to end: `inferq keys` and /v1/admin/keys on a real deployment,
and what a client sees the moment a key is made, revoked, rotated or expires."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.support.accounts import accounts, as_key, new_key, openai_as
from tests.support.deploy import MODEL
from tests.support.fleet import Fleet

__all__ = ["accounts"]

CHAT = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


def keys_cli(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferq", "keys", *args],
        env=fleet.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def chat(fleet: Fleet, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(fleet.url + "/v1/chat/completions", json=CHAT, headers=headers, timeout=60)


def test_first_key_turns_auth_on_at_once(accounts: Fleet) -> None:
    # No key yet: the embedded single-user default, open.
    assert chat(accounts).status_code == 200
    made = keys_cli(accounts, "create", "--name", "first", "--admin")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("sk-inferq-")
    assert token not in made.stderr
    # The very next request without a key is refused, in the OpenAI envelope.
    refused = chat(accounts)
    assert refused.status_code == 401
    error = refused.json()["error"]
    assert error["code"] == "invalid_api_key"
    assert error["type"] == "authentication_error"
    assert chat(accounts, as_key(token)).status_code == 200
    # Some clients send x-api-key instead.
    assert chat(accounts, {"x-api-key": token}).status_code == 200
    # /health stays open for load balancers.
    assert httpx.get(accounts.url + "/health").status_code == 200


def test_official_client_with_and_without_a_key(accounts: Fleet) -> None:
    token = new_key(accounts, "client")
    answer = openai_as(accounts, token).chat.completions.create(**CHAT)
    assert answer.choices[0].message.content is not None
    with pytest.raises(openai.AuthenticationError) as caught:
        openai_as(accounts, "sk-inferq-aaaaaaaaaaaa_not-the-secret").chat.completions.create(**CHAT)
    assert caught.value.code == "invalid_api_key"
    # A model name as the bearer token (LocalAI's habit) is a key like any other now.
    assert chat(accounts, as_key(MODEL)).status_code == 401


def test_revoke_and_rotate_apply_on_the_next_request(accounts: Fleet) -> None:
    token = new_key(accounts, "short-lived")
    assert chat(accounts, as_key(token)).status_code == 200
    key_id = token.removeprefix("sk-inferq-").split("_")[0]
    rotated = keys_cli(accounts, "rotate", key_id)
    assert rotated.returncode == 0, rotated.stderr
    new_token = rotated.stdout.strip()
    assert new_token.startswith(f"sk-inferq-{key_id}_") and new_token != token
    assert chat(accounts, as_key(token)).status_code == 401
    assert chat(accounts, as_key(new_token)).status_code == 200
    revoked = keys_cli(accounts, "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    refused = chat(accounts, as_key(new_token))
    assert refused.status_code == 401
    assert "revoked" in refused.json()["error"]["message"]


def test_expired_key_is_refused(accounts: Fleet) -> None:
    made = keys_cli(accounts, "create", "--name", "brief", "--expires", "2s")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert chat(accounts, as_key(token)).status_code == 200
    time.sleep(2.5)
    refused = chat(accounts, as_key(token))
    assert refused.status_code == 401
    assert "expired" in refused.json()["error"]["message"]


def test_list_shows_keys_but_never_secrets(accounts: Fleet) -> None:
    token = new_key(accounts, "listed", rpm=7, models=[MODEL])
    listing = keys_cli(accounts, "list", "--json")
    assert listing.returncode == 0, listing.stderr
    assert token not in listing.stdout
    assert token.split("_", 1)[1] not in listing.stdout
    assert '"name": "listed"' in listing.stdout
    assert '"rpm": 7' in listing.stdout
    table = keys_cli(accounts, "list")
    assert table.returncode == 0 and "listed" in table.stdout


def test_admin_routes(accounts: Fleet) -> None:
    admin = new_key(accounts, "admin", admin=True)
    user = new_key(accounts, "user")
    with httpx.Client(base_url=accounts.url, timeout=60) as http:
        # An ordinary key may not manage keys.
        denied = http.get("/v1/admin/keys", headers=as_key(user))
        assert denied.status_code == 403
        assert denied.json()["error"]["code"] == "permission_denied"
        made = http.post(
            "/v1/admin/keys",
            json={"name": "made-over-http", "rpm": 5, "models": [MODEL], "expires_in": "30d"},
            headers=as_key(admin),
        )
        assert made.status_code == 201, made.text
        body = made.json()
        token, key_id = body["key"], body["id"]
        assert token.startswith(f"sk-inferq-{key_id}_")
        assert body["rpm"] == 5 and body["models"] == [MODEL] and body["expires_at"] > time.time()
        assert chat(accounts, as_key(token)).status_code == 200
        listed = http.get("/v1/admin/keys", headers=as_key(admin)).json()["data"]
        assert {k["id"] for k in listed} >= {key_id}
        assert all(k["key"] is None for k in listed)
        assert token not in http.get("/v1/admin/keys", headers=as_key(admin)).text
        changed = http.post(
            f"/v1/admin/keys/{key_id}", json={"rpm": None, "name": "renamed"}, headers=as_key(admin)
        )
        assert changed.status_code == 200 and changed.json()["rpm"] is None
        assert changed.json()["name"] == "renamed"
        bad = http.post("/v1/admin/keys", json={"name": "x", "rpm": -1}, headers=as_key(admin))
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "rpm"
        forever = {"name": "x", "expires_in": "9" * 30 + "d"}
        too_long = http.post("/v1/admin/keys", json=forever, headers=as_key(admin))
        assert too_long.status_code == 400, too_long.text
        assert too_long.json()["error"]["param"] == "expires_in"
        rotated = http.post(f"/v1/admin/keys/{key_id}/rotate", headers=as_key(admin))
        assert rotated.status_code == 200
        assert chat(accounts, as_key(token)).status_code == 401
        assert chat(accounts, as_key(rotated.json()["key"])).status_code == 200
        gone = http.delete(f"/v1/admin/keys/{key_id}", headers=as_key(admin))
        assert gone.status_code == 200 and gone.json()["deleted"] is True
        assert chat(accounts, as_key(rotated.json()["key"])).status_code == 401
        missing = http.get("/v1/admin/keys/nosuchkey000", headers=as_key(admin))
        assert missing.status_code == 404


def test_keys_never_reach_the_logs(accounts: Fleet) -> None:
    token = new_key(accounts, "secretive")
    chat(accounts, as_key(token))
    chat(accounts, as_key(token + "x"))
    log = accounts.log.read_text(errors="replace")
    secret = token.split("_", 1)[1]
    assert secret not in log
