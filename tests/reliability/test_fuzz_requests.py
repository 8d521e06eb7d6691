"""Hostile request bodies on every POST route that reaches a model: zero 5xx,
every 4xx in the OpenAI envelope with a string code, every 200 strict JSON
(streams end with [DONE]), no hung client, and the worker still alive and
serving a plain request at once after each one.

Three sweeps per route, on a private stack (tests/reliability/fuzzing.py):
the route's catalogue of hostile field combinations (the issue's examples
among them: a grammar that completes under `ignore_eos`, `logit_bias`
{"²": 1}, out-of-vocabulary token ids, beam search with `length_penalty`
2000, ...), then hypothesis mutations of a valid seed body (fields replaced,
added, deleted or repeated with NaN, 1e400, 2**64, lone surrogates, invalid
UTF-8, 10,000-level nesting, huge strings, wrong types; the bytes sometimes
damaged), then bodies that are not requests at all. Failures are collected,
not raised at the first one, so one run lists every distinct failure with
the shortest body that showed it; a worker killed on the way is restarted.

Examples are derandomized (the same bodies every run). INFERQ_FUZZ_EXAMPLES
sets the hypothesis examples per route (default 60; junk bodies get as many
in all); a long run:

    INFERQ_FUZZ_EXAMPLES=2000 env -u REDIS_URL -u DATABASE_URL \\
        .venv/bin/python -m pytest tests/reliability/test_fuzz_requests.py -q -p no:cacheprovider
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.reliability.fuzz_routes import ROUTE_IDS, ROUTES, Route, merged, mutated_body
from tests.reliability.fuzz_stack import FuzzStack
from tests.reliability.fuzzing import Judge, fuzz_settings
from tests.reliability.hostile import dumps, junk_body

EXAMPLES = int(os.environ.get("INFERQ_FUZZ_EXAMPLES", "60"))
# Seconds per example at worst (a worker death, its notice and a restart).
_BUDGET = 120 + 3 * EXAMPLES


@pytest.mark.timeout(300)
@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_hostile_catalogue(fuzz_stack: FuzzStack, route: Route) -> None:
    judge = Judge(fuzz_stack)
    seed = judge.send(route.path, dumps(route.seed), model=route.model)
    # The seed itself is served: the mutations start from a request that
    # reaches the worker, not from one already refused.
    assert seed.status == 200, f"seed answered {seed.status}: {seed.body[:500]!r}"
    for patch in route.patches:
        if judge.exhausted():
            break
        judge.send(route.path, dumps(merged(route.seed, patch)), model=route.model)
    assert not judge.findings, judge.report()


@pytest.mark.timeout(_BUDGET)
@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_mutated_bodies(fuzz_stack: FuzzStack, route: Route) -> None:
    judge = Judge(fuzz_stack)

    @given(body=mutated_body(route))
    @fuzz_settings(EXAMPLES)
    def fuzz(body: bytes) -> None:
        if not judge.exhausted():
            judge.send(route.path, body, model=route.model)

    fuzz()
    assert not judge.findings, judge.report()
    # Mutants were both served and refused: the sweep reached the engine,
    # not only the validation in front of it.
    assert judge.statuses.get(200, 0) >= 1, judge.report()
    assert any(400 <= s < 500 for s in judge.statuses), judge.report()


# How clients label bodies: curl's -d default, none at all, text, and JSON.
_CONTENT_TYPES = (
    "application/json",
    None,
    "application/x-www-form-urlencoded",
    "text/plain",
    "application/json; charset=latin-1",
    "multipart/form-data; boundary=x",
)


@pytest.mark.timeout(_BUDGET)
def test_junk_bodies(fuzz_stack: FuzzStack) -> None:
    judge = Judge(fuzz_stack)

    @given(
        route=st.sampled_from(ROUTES),
        body=junk_body,
        content_type=st.sampled_from(_CONTENT_TYPES),
        # A web page the user visits sends its Origin; curl sends none.
        origin=st.sampled_from((None, None, "https://attacker.example", "null")),
    )
    @fuzz_settings(EXAMPLES)
    def fuzz(route: Route, body: bytes, content_type: str | None, origin: str | None) -> None:
        if not judge.exhausted():
            judge.send(
                route.path, body, model=route.model, content_type=content_type, origin=origin
            )

    fuzz()
    assert not judge.findings, judge.report()
    assert any(400 <= s < 500 for s in judge.statuses), judge.report()
