"""/metrics with auth on: an admin key only, as the other global routes."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.accounts import accounts, as_key, new_key
from tests.support.deploy import MODEL
from tests.support.fleet import Fleet

__all__ = ["accounts"]


def test_metrics_need_an_admin_key(accounts: Fleet) -> None:
    user = new_key(accounts, "metrics-user")
    admin = new_key(accounts, "metrics-admin", admin=True)
    url = accounts.url + "/metrics"
    missing = httpx.get(url, timeout=30)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url, headers=as_key("sk-inferq-not-a-key"), timeout=30).status_code == 401
    refused = httpx.get(url, headers=as_key(user), timeout=30)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "permission_denied"
    # Neither refusal gives a figure away.
    assert "llamacpp:" not in missing.text + refused.text
    allowed = httpx.get(url, headers=as_key(admin), timeout=30)
    assert allowed.status_code == 200
    names = {f.name for f in text_string_to_metric_families(allowed.text)}
    assert {"llamacpp:tokens_predicted", "inferq_workers_alive"} <= names
    assert f'inferq_workers_alive{{model="{MODEL}"}} 1.0' in allowed.text
