"""Property-based fuzzing of the whole HTTP surface from its own OpenAPI
document: no input makes a 5xx, and every response fits what the document
declares for its status.

INFERQ_FUZZ_EXAMPLES (default 60, as in tests/reliability/) scales the
examples per operation: two thirds of it, at least 40."""

from __future__ import annotations

import os
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.support.stack import MODEL, Stack

EXAMPLES = max(40, int(os.environ.get("INFERQ_FUZZ_EXAMPLES", "60")) * 2 // 3)


def test_api_never_fails_on_any_input(stack: Stack) -> None:
    schema = schemathesis.openapi.from_url(stack.url + "/openapi.json")
    failures: list[str] = []
    statuses: list[int] = []
    operations = 0
    for result in schema.get_all_operations():
        # An operation the document cannot describe is a failure too.
        assert isinstance(result, Ok), result
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def fuzz(case: schemathesis.Case[Any]) -> None:
            if isinstance(case.body, dict):
                # Random or missing names only reach the 404/400 paths; fuzz
                # the rest with a real model.
                case.body["model"] = MODEL
            response = case.call(timeout=30)
            statuses.append(response.status_code)
            case.validate_response(
                response, checks=[not_a_server_error, response_schema_conformance]
            )

        try:
            fuzz()
        except Exception as exc:  # report every operation, not just the first
            failures.append(f"{operation.label}: {exc}")
    assert operations >= 5
    # Valid requests were generated and served too, not only rejections.
    assert statuses.count(200) >= 10 and any(400 <= s < 500 for s in statuses)
    assert not failures, "\n\n".join(failures)
