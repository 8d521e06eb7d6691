"""Hostile batch files through POST /v1/files and POST /v1/batches: no call
answers 5xx, every batch reaches `completed` or `failed` within a bound
(failed: `errors` name lines; completed: every line has a result, none
5xx, every well-formed good line answered 200), the workers stay alive, and
a known-good batch sent right after completes: one bad file never stops
the scheduler for everyone.

Lines are drawn from: good requests, the request fuzzer's hostile bodies
(the issue's `logit_bias` {"²": 1} line among them), bodies with edge values,
lines that are JSON arrays, strings, numbers or deep nesting, missing,
repeated or hostile custom_ids, wrong url or method, invalid UTF-8, a BOM,
CRLF endings, blank lines and one enormous line. Each line kind also runs
alone, in a fixed sweep.

INFERQ_FUZZ_EXAMPLES (default 60) scales the hypothesis examples here too:
one batch file per 10 (at least 6). A long run:

    INFERQ_FUZZ_EXAMPLES=600 env -u REDIS_URL -u DATABASE_URL \\
        .venv/bin/python -m pytest tests/reliability/test_fuzz_batches.py -q -p no:cacheprovider
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.reliability.fuzz_routes import CHAT_PATCHES, GENERATION_PATCHES, merged
from tests.reliability.fuzz_stack import FuzzStack
from tests.reliability.fuzzing import Judge, envelope_problem, fuzz_settings
from tests.reliability.hostile import CHAT_MODEL, EDGE_VALUES, EMBED_MODEL, dumps, nested

EXAMPLES = max(6, int(os.environ.get("INFERQ_FUZZ_EXAMPLES", "60")) // 10)
# A batch of a few tiny lines finishes in seconds (the scheduler ticks every
# 0.2 s on the fuzz stack); past this it is stuck.
BATCH_SECONDS = 60.0
TERMINAL = {"completed", "failed", "expired", "cancelled"}

ENDPOINTS: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
    },
    "/v1/completions": {"model": CHAT_MODEL, "prompt": "Once", "max_tokens": 2},
    "/v1/embeddings": {"model": EMBED_MODEL, "input": "Hi"},
    "/v1/rerank": {"model": EMBED_MODEL, "query": "cat", "documents": ["a cat", "a dog"]},
}


def _line(custom_id: Any, url: str, body: Any, method: Any = "POST") -> bytes:
    return dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def good_line(url: str) -> tuple[bytes, str]:
    custom_id = f"good-{uuid.uuid4().hex[:8]}"
    return _line(custom_id, url, ENDPOINTS[url]), custom_id


def _cid() -> str:
    return f"c-{uuid.uuid4().hex[:8]}"


def _spliced(url: str, field: str, raw: bytes) -> bytes:
    """A line whose body's `field` is `raw`, bytes json.dumps cannot write."""
    return _line(_cid(), url, {**ENDPOINTS[url], field: "@@"}).replace(b'"@@"', raw)


# Each kind: url -> the bytes of one line (no newline).
def _kinds() -> dict[str, Any]:
    def body(url: str) -> dict[str, Any]:
        return ENDPOINTS[url]

    return {
        "array": lambda url: b'["custom_id", "x"]',
        "string": lambda url: b'"a line"',
        "number": lambda url: b"1e400",
        "null": lambda url: b"null",
        "deep": lambda url: nested(10_000).text,
        "deep-body": lambda url: _line(_cid(), url, nested(10_000, objects=True)),
        "no-custom-id": lambda url: dumps({"method": "POST", "url": url, "body": body(url)}),
        "empty-custom-id": lambda url: _line("", url, body(url)),
        "surrogate-custom-id": lambda url: _line("\ud800", url, body(url)),
        "nul-custom-id": lambda url: _line("a\u0000b", url, body(url)),
        "long-custom-id": lambda url: _line("x" * 100_000, url, body(url)),
        "number-custom-id": lambda url: _line(2**64, url, body(url)),
        "wrong-url": lambda url: _line(_cid(), "/v1/nope", body(url)),
        "wrong-method": lambda url: _line(_cid(), url, body(url), method="GET"),
        "body-not-object": lambda url: _line(_cid(), url, [body(url)]),
        "invalid-utf8": lambda url: _spliced(url, "user", b'"\xff\xfe"'),
        "surrogate-utf8": lambda url: _spliced(url, "user", b'"\xed\xa0\x80"'),
        "bom": lambda url: b"\xef\xbb\xbf" + _line(_cid(), url, body(url)),
        "crlf": lambda url: _line(_cid(), url, body(url)) + b"\r",
        "blank": lambda url: b"   \t",
        "nan": lambda url: _line(_cid(), url, {**body(url), "temperature": float("nan")}),
        "huge-int": lambda url: _spliced(url, "seed", b"9" * 5000),
        "enormous": lambda url: _line(_cid(), url, {**body(url), "user": "x" * 3_000_000}),
        "stream": lambda url: _line(_cid(), url, {**body(url), "stream": True}),
        "unknown-model": lambda url: _line(_cid(), url, {**body(url), "model": "nope"}),
        "model-not-string": lambda url: _line(_cid(), url, {**body(url), "model": ["tiny"]}),
        "logit-bias-superscript": lambda url: _line(
            _cid(), url, {**body(url), "logit_bias": {"²": 1}}
        ),
    }


LINE_KINDS = _kinds()
# The same repeated custom_id needs two lines; it gets its own kind here.
DUPLICATE = "duplicate-custom-id"


def hostile_body_line(url: str, patch: dict[str, Any]) -> bytes:
    return _line(_cid(), url, merged(ENDPOINTS[url], patch))


class BatchJudge:
    """Runs one batch file end to end and records what went wrong."""

    def __init__(self, judge: Judge) -> None:
        self.judge = judge
        self.stack: FuzzStack = judge.stack
        self.http = httpx.Client(base_url=judge.stack.url, timeout=30)
        # Final statuses of the hostile batches (not the good ones after).
        self.finals: Counter[str] = Counter()

    def call(self, what: str, file: bytes, method: str, path: str, **kw: Any) -> Any:
        try:
            response = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            self.judge.record("no-answer", what, file, f"{method} {path}: {exc!r}")
            return None
        if response.status_code >= 500:
            self.judge.record(
                "5xx",
                what,
                file,
                f"{method} {path} -> {response.status_code}: {response.text[:300]}",
            )
            return None
        data = response.json()
        if response.status_code >= 400:
            why = envelope_problem(data)
            if why:
                self.judge.record("not-envelope", what, file, f"{method} {path}: {why}")
            return None
        return data

    def run(
        self, what: str, file: bytes, endpoint: str, good: set[str], *, counted: bool = True
    ) -> str | None:
        """The batch's final status (None when it never got one)."""
        uploaded = self.call(
            what,
            file,
            "POST",
            "/v1/files",
            files={"file": ("input.jsonl", file)},
            data={"purpose": "batch"},
        )
        if uploaded is None:
            return None
        created = self.call(
            what,
            file,
            "POST",
            "/v1/batches",
            json={
                "input_file_id": uploaded["id"],
                "endpoint": endpoint,
                "completion_window": "24h",
            },
        )
        if created is None:
            return None
        batch = created
        deadline = time.monotonic() + BATCH_SECONDS
        while batch["status"] not in TERMINAL:
            if time.monotonic() > deadline:
                self.judge.record(
                    "batch-stuck",
                    what,
                    file,
                    f"still {batch['status']} after {BATCH_SECONDS:.0f} s: {json.dumps(batch)}",
                )
                self.judge.wedges += 1
                return None
            time.sleep(0.2)
            batch = self.call(what, file, "GET", f"/v1/batches/{batch['id']}") or batch
        self.check_final(what, file, batch, good)
        if counted:
            self.finals[batch["status"]] += 1
        return str(batch["status"])

    def check_final(self, what: str, file: bytes, batch: dict[str, Any], good: set[str]) -> None:
        status = batch["status"]
        if status not in ("completed", "failed"):
            self.judge.record("batch-status", what, file, f"ended {status}: {batch}")
            return
        if status == "failed":
            errors = (batch.get("errors") or {}).get("data") or []
            if not errors or not all(isinstance(e.get("message"), str) for e in errors):
                self.judge.record("batch-failed-silently", what, file, json.dumps(batch)[:600])
            return
        counts = batch["request_counts"]
        results: list[dict[str, Any]] = []
        for key in ("output_file_id", "error_file_id"):
            if batch.get(key):
                content = self.http.get(f"/v1/files/{batch[key]}/content")
                results += [json.loads(x) for x in content.text.splitlines() if x.strip()]
        if (
            len(results) != counts["total"]
            or counts["total"] != counts["completed"] + counts["failed"]
        ):
            self.judge.record(
                "batch-lost-lines", what, file, f"{len(results)} results for counts {counts}"
            )
        for result in results:
            response = result.get("response") or {}
            code = response.get("status_code")
            if isinstance(code, int) and code >= 500:
                self.judge.record("batch-line-5xx", what, file, json.dumps(result)[:600])
            if result.get("custom_id") in good and code != 200:
                self.judge.record("batch-good-line-failed", what, file, json.dumps(result)[:600])
        answered = {r.get("custom_id") for r in results}
        if not good <= answered:
            self.judge.record(
                "batch-lost-lines", what, file, f"good lines {good - answered} missing"
            )

    def after(self, what: str, file: bytes) -> None:
        """Workers alive (restarted if not) and the scheduler still serves
        everyone: a good batch completes at once."""
        dead = self.stack.dead_workers()
        if dead:
            self.judge.record("worker-died", what, file, f"worker {dead} exited")
            self.stack.restart_dead()
        line, custom_id = good_line("/v1/chat/completions")
        status = self.run(
            f"{what} (next good batch)",
            line + b"\n",
            "/v1/chat/completions",
            {custom_id},
            counted=False,
        )
        if status != "completed":
            self.judge.record(
                "scheduler-stopped", what, file, f"a good batch after it ended {status}"
            )
            self.judge.wedges += 1


@pytest.fixture
def batches(fuzz_stack: FuzzStack) -> BatchJudge:
    return BatchJudge(Judge(fuzz_stack))


@pytest.mark.timeout(600)
def test_issue_example_batch(batches: BatchJudge) -> None:
    """Issue 10's batch: one line whose body has "logit_bias": {"²": 1}."""
    good, custom_id = good_line("/v1/chat/completions")
    bad = _line(
        "bad", "/v1/chat/completions", {**ENDPOINTS["/v1/chat/completions"], "logit_bias": {"²": 1}}
    )
    file = bad + b"\n" + good + b"\n"
    batches.run("issue example", file, "/v1/chat/completions", {custom_id})
    batches.after("issue example", file)
    assert not batches.judge.findings, batches.judge.report()


@pytest.mark.timeout(900)
@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_each_line_kind(batches: BatchJudge, endpoint: str) -> None:
    """Every hostile line kind alone beside a good line, then the hostile
    bodies of the request fuzzer all in one file."""
    for name, make in LINE_KINDS.items():
        if batches.judge.exhausted():
            break
        good, custom_id = good_line(endpoint)
        file = make(endpoint) + b"\n" + good + b"\n"
        batches.run(name, file, endpoint, {custom_id})
        batches.after(name, file)
    if endpoint in ("/v1/chat/completions", "/v1/completions") and not batches.judge.exhausted():
        patches = GENERATION_PATCHES + (CHAT_PATCHES if "chat" in endpoint else ())
        good, custom_id = good_line(endpoint)
        file = b"\n".join([*(hostile_body_line(endpoint, p) for p in patches), good]) + b"\n"
        batches.run("hostile bodies", file, endpoint, {custom_id})
        batches.after("hostile bodies", file)
    assert not batches.judge.findings, batches.judge.report()


@st.composite
def batch_file(draw: st.DrawFn) -> tuple[str, bytes, set[str]]:
    endpoint = draw(st.sampled_from(sorted(ENDPOINTS)))
    lines: list[bytes] = []
    good: set[str] = set()
    for _ in range(draw(st.integers(1, 8))):
        choice = draw(st.sampled_from(("good", "kind", "kind", "patch", "edge", DUPLICATE)))
        if choice == "good":
            line, custom_id = good_line(endpoint)
            good.add(custom_id)
            lines.append(line)
        elif choice == "kind":
            lines.append(LINE_KINDS[draw(st.sampled_from(sorted(LINE_KINDS)))](endpoint))
        elif choice == "patch":
            lines.append(hostile_body_line(endpoint, draw(st.sampled_from(GENERATION_PATCHES))))
        elif choice == "edge":
            body = dict(ENDPOINTS[endpoint])
            body[draw(st.sampled_from([*sorted(body), "seed", "user", "n"]))] = draw(
                st.sampled_from(EDGE_VALUES)
            )
            lines.append(_line(_cid(), endpoint, body))
        else:
            line = _line("twice", endpoint, ENDPOINTS[endpoint])
            lines += [line, line]
    ending = draw(st.sampled_from((b"\n", b"\r\n")))
    file = ending.join(lines) + draw(st.sampled_from((ending, b"")))
    # A repeated custom_id or a line that is not a batch line fails the whole
    # file, good lines included; only a file that can complete must answer them.
    return endpoint, file, good


@pytest.mark.timeout(120 + 150 * EXAMPLES)
def test_mutated_batch_files(batches: BatchJudge) -> None:
    @given(case=batch_file())
    @fuzz_settings(EXAMPLES)
    def fuzz(case: tuple[str, bytes, set[str]]) -> None:
        if batches.judge.exhausted():
            return
        endpoint, file, good = case
        batches.run(f"random file for {endpoint}", file, endpoint, good)
        batches.after(f"random file for {endpoint}", file)

    fuzz()
    assert not batches.judge.findings, batches.judge.report()
    # Files that fail whole and files whose lines ran were both drawn.
    finals = batches.finals
    assert finals["completed"] >= 1 and finals["failed"] >= 1, finals
    assert sum(finals.values()) >= EXAMPLES // 2, finals
