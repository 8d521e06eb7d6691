"""Shared by the usage tests: keys whose ids the test knows, /v1/usage read
as a key, and waiting for the buffered usage rows to land."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from api.accounts.store import token_id
from tests.support.accounts import new_key
from tests.support.fleet import Fleet


@dataclass(frozen=True)
class Key:
    id: str
    token: str


def make_key(fleet: Fleet, name: str, *, admin: bool = False) -> Key:
    """A key of `fleet` (tests.support.accounts.new_key), with its id."""
    token = new_key(fleet, name, admin=admin)
    key_id = token_id(token)
    assert key_id is not None
    return Key(key_id, token)


@dataclass
class Tokens:
    """What responses reported, summed."""

    requests: int = 0
    prompt: int = 0
    completion: int = 0
    cached: int = 0

    def add(self, prompt: int, completion: int, cached: int = 0) -> None:
        self.requests += 1
        self.prompt += prompt
        self.completion += completion
        self.cached += cached

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(
            self.requests + other.requests,
            self.prompt + other.prompt,
            self.completion + other.completion,
            self.cached + other.cached,
        )

    def result(self) -> dict[str, int]:
        """As /v1/usage reports them."""
        return {
            "num_model_requests": self.requests,
            "input_tokens": self.prompt,
            "input_cached_tokens": self.cached,
            "output_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
        }


SUMS = ("num_model_requests", "input_tokens", "input_cached_tokens", "output_tokens")


def sums(result: dict[str, Any]) -> dict[str, int]:
    return {name: result[name] for name in (*SUMS, "total_tokens")}


def get_usage(
    fleet: Fleet, token: str, params: Sequence[tuple[str, str | int]] = ()
) -> httpx.Response:
    return httpx.get(
        fleet.url + "/v1/usage",
        params=list(params),
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )


def usage_page(
    fleet: Fleet, token: str, params: Sequence[tuple[str, str | int]] = ()
) -> dict[str, Any]:
    response = get_usage(fleet, token, params)
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


def total(page: dict[str, Any]) -> dict[str, int]:
    """Every result of every bucket, summed."""
    out = dict.fromkeys((*SUMS, "total_tokens"), 0)
    for bucket in page["data"]:
        for result in bucket["results"]:
            for name in out:
                out[name] += result[name]
    return out


def wait_usage(
    fleet: Fleet,
    token: str,
    params: Sequence[tuple[str, str | int]] = (),
    *,
    requests: int,
    timeout: float = 20,
) -> dict[str, Any]:
    """/v1/usage as `token` once it counts `requests` requests (workers
    write their rows in the background, just after the answer went out)."""
    deadline = time.monotonic() + timeout
    while True:
        page = usage_page(fleet, token, params)
        if total(page)["num_model_requests"] >= requests:
            return page
        assert time.monotonic() < deadline, (total(page), fleet.log.read_text()[-3000:])
        time.sleep(0.1)
