"""`inferq usage` as a user runs it: a subprocess against a fleet with keys,
printing a table of its key's usage with a per-day sparkline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime

from tests.api.usage.helpers import Key, Tokens, make_key, usage_page, wait_usage
from tests.api.usage.helpers import total as total_of
from tests.support.accounts import accounts, openai_as
from tests.support.deploy import MODEL
from tests.support.fleet import Fleet

__all__ = ["accounts"]


def inferq_usage(
    fleet: Fleet, *args: str, key: str | None = None, env_key: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("INFERQ_API_KEY", "OPENAI_API_KEY")}
    if env_key is not None:
        env["INFERQ_API_KEY"] = env_key
    command = [sys.executable, "-m", "inferq", "usage", "--url", fleet.url, *args]
    if key is not None:
        command += ["--key", key]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def spend(fleet: Fleet, key: Key, prompts: list[str]) -> Tokens:
    client = openai_as(fleet, key.token)
    spent = Tokens()
    for prompt in prompts:
        answer = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=5
        )
        assert answer.usage is not None
        spent.add(answer.usage.prompt_tokens, answer.usage.completion_tokens)
    wait_usage(fleet, key.token, requests=spent.requests)
    return spent


def test_usage_table(accounts: Fleet) -> None:
    alice = make_key(accounts, "alice-cli")
    bob = make_key(accounts, "bob-cli")
    admin = make_key(accounts, "admin-cli", admin=True)
    mine = spend(accounts, alice, ["hello there", "and again"])
    theirs = spend(accounts, bob, ["something else"])

    shown = inferq_usage(accounts, "--by", "model", key=alice.token)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "inferq usage by model" in out
    (row,) = [line for line in out.splitlines() if f" {MODEL} " in line]
    total = mine.prompt + mine.completion
    cells = row.replace("│", " ").split()
    assert cells[:3] == [MODEL, "2", f"{mine.prompt:,}"]
    # Cached: some of the prompt (the chats share their template's prefix).
    assert 0 <= int(cells[3].replace(",", "")) <= mine.prompt
    assert cells[4:6] == [f"{mine.completion:,}", f"{total:,}"]
    # Today's is the last mark of the sparkline, and the only one.
    assert cells[6:] == ["█"]
    assert f"{total + theirs.prompt + theirs.completion:,}" not in out

    # An admin sees every key, named.
    by_key = inferq_usage(accounts, "--by", "key", env_key=admin.token)
    assert by_key.returncode == 0, by_key.stderr
    assert f"alice-cli ({alice.id})" in by_key.stdout
    assert f"bob-cli ({bob.id})" in by_key.stdout

    by_day = inferq_usage(accounts, "--by", "day", "--since", "2d", key=alice.token)
    assert by_day.returncode == 0, by_day.stderr
    assert datetime.now(UTC).date().isoformat() in by_day.stdout
    assert "tokens per day:" in by_day.stdout

    raw = inferq_usage(accounts, "--json", "--since", "1h", key=alice.token)
    assert raw.returncode == 0, raw.stderr
    page = json.loads(raw.stdout)
    assert page["object"] == "page"
    assert total_of(page) == total_of(usage_page(accounts, alice.token, [("group_by", "day")]))

    refused = inferq_usage(accounts, key="sk-inferq-not-a-key")
    assert refused.returncode == 1 and "401" in refused.stderr
    assert "sk-inferq-not-a-key" not in refused.stderr
    bad = inferq_usage(accounts, "--since", "last tuesday", key=alice.token)
    assert bad.returncode == 2 and "--since" in bad.stderr
