"""Schemathesis' stateful mode over the Files and Batches APIs: sequences of
calls chained by the OpenAPI links api/openapi.py declares (an uploaded
file's id into GET/DELETE /v1/files/{file_id} and into POST /v1/batches, a
batch's id into its status and cancel, a finished batch's file ids into
their content). Every response must not be a 5xx and must fit what the
document declares; afterwards a good batch still completes.

Half the uploads are turned into a real one-line batch file with purpose
`batch`, so that chains reach batches that validate, run and finish, not
only rejections. INFERQ_FUZZ_EXAMPLES (default 60) scales the scenarios:
as many scenarios (at least 60) of up to 10 steps, run until 5 calls
per scenario were made. A long run:

    INFERQ_FUZZ_EXAMPLES=1500 env -u REDIS_URL -u DATABASE_URL \\
        .venv/bin/python -m pytest tests/reliability/test_fuzz_stateful.py -q -p no:cacheprovider
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis.errors import FlakyStrategyDefinition
from schemathesis import Case
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.reliability.fuzz_stack import FuzzStack
from tests.reliability.fuzzing import fuzz_settings
from tests.reliability.hostile import CHAT_MODEL

SCENARIOS = max(60, int(os.environ.get("INFERQ_FUZZ_EXAMPLES", "60")))
STEPS = 10
# Calls to make in all, and the most runs of the state machine to make
# them in: Hypothesis stops a run when it cannot replay a live server.
CALLS = SCENARIOS * STEPS // 2
ATTEMPTS = 12
GOOD_LINE = {
    "custom_id": "stateful-good",
    "method": "POST",
    "url": "/v1/chat/completions",
    "body": {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
}
GOOD_FILE = (json.dumps(GOOD_LINE) + "\n").encode()


def good_batch_completes(url: str, timeout: float = 60) -> str:
    """Upload a one-line batch, run it, and return its final status."""
    with httpx.Client(base_url=url, timeout=30) as http:
        file = http.post(
            "/v1/files", files={"file": ("in.jsonl", GOOD_FILE)}, data={"purpose": "batch"}
        ).json()
        batch = http.post(
            "/v1/batches",
            json={"input_file_id": file["id"], "endpoint": "/v1/chat/completions"},
        ).json()
        deadline = time.monotonic() + timeout
        while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
            if time.monotonic() > deadline:
                return f"still {batch['status']} after {timeout:.0f} s"
            time.sleep(0.2)
            batch = http.get(f"/v1/batches/{batch['id']}").json()
        return str(batch["status"])


@pytest.mark.timeout(180 + 2 * CALLS)
def test_files_and_batches_stateful(fuzz_stack: FuzzStack) -> None:
    schema = schemathesis.openapi.from_url(fuzz_stack.url + "/openapi.json").include(
        path_regex="^/v1/(files|batches)"
    )
    calls: list[tuple[str, int]] = []
    failures: list[str] = []

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        uploads = 0

        def before_call(self, case: Case[Any]) -> None:
            if case.operation.label == "POST /v1/files" and isinstance(case.body, dict):
                Workflow.uploads += 1
                if Workflow.uploads % 2:
                    case.body["file"] = GOOD_FILE  # type: ignore[assignment]
                    case.body["purpose"] = "batch"

        def get_call_kwargs(self, case: Case[Any]) -> dict[str, Any]:
            return {"timeout": 30}

        def after_call(self, response: Any, case: Case[Any]) -> None:
            calls.append((case.operation.label, response.status_code))

        def validate_response(
            self,
            response: Any,
            case: Case[Any],
            additional_checks: Any = None,
            **kwargs: Any,
        ) -> None:
            try:
                case.validate_response(
                    response,
                    checks=[not_a_server_error, response_schema_conformance],
                    transport_kwargs=kwargs,
                )
            except Exception as exc:
                # Kept here too: Hypothesis may lose a failure in a replay.
                failures.append(f"{case.operation.label} -> {response.status_code}: {exc}"[:3000])
                raise

    for attempt in range(ATTEMPTS):
        if failures or len(calls) >= CALLS:
            break
        try:
            Workflow.run(
                settings=fuzz_settings(
                    SCENARIOS,
                    # The first run is the same every time; later ones
                    # explore from wherever the server's state now is.
                    derandomize=attempt == 0,
                    stateful_step_count=STEPS,
                )
            )
        except FlakyStrategyDefinition:
            # The server's state moved under Hypothesis' replay (a batch
            # finished, a file was deleted, so a bundle of ids differs): a
            # property of fuzzing a live server, not a finding (schemathesis'
            # own runner restarts too). Run again until the budget of calls
            # is spent, unless a check already failed.
            continue
    assert not failures, "\n\n".join(failures)
    labels = {label for label, _ in calls}
    seen = Counter(calls)
    summary = "; ".join(f"{label} {status}: {n}" for (label, status), n in sorted(seen.items()))
    # The links were followed: batches were created from uploaded files and
    # then looked at, not only rejected on their own.
    assert {"POST /v1/files", "POST /v1/batches", "GET /v1/batches/{batch_id}"} <= labels, summary
    assert seen[("POST /v1/batches", 200)] >= 1, summary
    assert len(calls) >= CALLS, summary
    assert good_batch_completes(fuzz_stack.url) == "completed"
