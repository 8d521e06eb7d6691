"""The judge of every answer the fuzzers get.

The stack (tests/reliability/fuzz_stack.py) is private: a dead worker is
recorded as a finding and restarted, and fuzzing goes on to the next one.

`Judge.send` sends one body and records, without raising, everything a
client must never see: a 5xx, an error that is not the OpenAI envelope with a
string code, a 200 that is not strict JSON, a stream without `[DONE]`, a
hung or dropped connection, a dead worker, or a worker that no longer
answers a plain request quickly. Findings are grouped by kind, so one run
reports every distinct failure with the shortest body that showed it."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from hypothesis import HealthCheck, Phase, settings

from tests.reliability.fuzz_stack import PROBES, FuzzStack

log = logging.getLogger(__name__)
# One line per fuzzed request would bury the findings.
logging.getLogger("httpx").setLevel(logging.WARNING)

# A request (stream included) must be answered within this; a client that
# waits longer is a hung client. The tiny models generate in milliseconds.
ANSWER_SECONDS = 20.0
# After a worker dies, its clients must learn it within 5 s (issue 10).
DEATH_NOTICE_SECONDS = 6.0
# A plain request after each fuzzed one must be answered within this.
PROBE_SECONDS = 10.0
# Dead or wedged workers after which a sweep stops.
MAX_TROUBLES = 3


def fuzz_settings(examples: int, *, derandomize: bool = True, **extra: Any) -> settings:
    """Hypothesis as every fuzzer here runs it: reproducible by default, no
    example database, no deadline or health check (a live server is slow and
    uneven), and no shrinking: nothing is raised inside, so there is nothing
    to shrink; the judge keeps the shortest body per distinct failure instead."""
    return settings(
        max_examples=examples,
        derandomize=derandomize,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
        **extra,
    )


# How long a wedged worker is given to serve again before fuzzing goes on.
SETTLE_SECONDS = 120.0


@dataclass
class Answer:
    status: int | None
    headers: dict[str, str]
    body: bytes
    seconds: float
    error: str | None = None


def envelope_problem(data: Any) -> str | None:
    """Why `data` is not {"error": {"message", "type", "param", "code"}} with
    string message, type and code and a string or null param, or None."""
    if not isinstance(data, dict) or set(data) != {"error"} or not isinstance(data["error"], dict):
        return "not the OpenAI error envelope"
    error = data["error"]
    missing = {"message", "type", "param", "code"} - set(error)
    if missing:
        return f"error lacks {sorted(missing)}"
    for name in ("message", "type", "code"):
        if not isinstance(error[name], str) or not error[name]:
            return f"error.{name} is {error[name]!r}, not a string"
    if error["param"] is not None and not isinstance(error["param"], str):
        return f"error.param is {error['param']!r}"
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} in a response body")


def strict_json(raw: bytes | str) -> Any:
    """Parse as a client in another language would: no NaN or Infinity."""
    return json.loads(raw, parse_constant=_reject_constant)


def sse_problems(raw: bytes, *, openai_style: bool) -> list[str]:
    """What is wrong with a whole SSE body: every data line strict JSON (or
    [DONE]), the end marked (OpenAI routes: `data: [DONE]`; llama-server's
    own routes: a last chunk with `"stop": true`, or an error), and error
    events in the envelope and not server-side."""
    problems: list[str] = []
    data = [line[5:].strip() for line in raw.split(b"\n") if line.startswith(b"data:")]
    if openai_style:
        if not data or data[-1] != b"[DONE]":
            problems.append("stream did not end with data: [DONE]")
        data = data[:-1]
    events = []
    for item in data:
        try:
            events.append(strict_json(item))
        except ValueError as exc:
            problems.append(f"stream event is not strict JSON: {exc}")
    if not openai_style:
        last = events[-1] if events else None
        if not isinstance(last, dict) or not (last.get("stop") is True or "error" in last):
            problems.append('stream did not end with a "stop": true chunk')
    for event in events:
        if isinstance(event, dict) and "error" in event:
            why = envelope_problem(event)
            if why:
                problems.append(f"stream error event: {why}")
            elif event["error"]["type"] in ("server_error", "unavailable_error", "timeout_error"):
                problems.append(f"stream error event {event['error']['code']}")
    return problems


@dataclass
class Finding:
    kind: str
    route: str
    body: bytes
    detail: str
    count: int = 1
    # The shortest body that showed it, when shorter than the first.
    shortest: bytes | None = None

    def render(self) -> str:
        def shown(body: bytes) -> str:
            return repr(body[:400]) + ("..." if len(body) > 400 else "")

        text = f"[{self.kind}] {self.route} x{self.count}\n  body: {shown(self.body)}"
        if self.shortest is not None:
            text += f"\n  shortest: {shown(self.shortest)}"
        return f"{text}\n  {self.detail[:1500]}"


_DIGITS = re.compile(r"\d+")


def _log_excerpt(text: str) -> str:
    keep = [
        line
        for line in text.splitlines()
        if any(w in line for w in ("Error", "error", "Traceback", "abort", "ASSERT", "Exception"))
    ]
    return " | ".join(keep[-8:])[-1200:]


class Judge:
    """Sends fuzzed bodies to one stack and collects what went wrong."""

    def __init__(self, stack: FuzzStack) -> None:
        self.stack = stack
        self.findings: dict[tuple[str, str, str], Finding] = {}
        self.sent = 0
        self.wedges = 0
        self.statuses: dict[int, int] = {}

    def record(self, kind: str, route: str, body: bytes, detail: str) -> None:
        key = (kind, route, _DIGITS.sub("N", detail.split("\n")[0])[:120])
        found = self.findings.get(key)
        if found is None:
            self.findings[key] = Finding(kind, route, body, detail)
            log.warning("fuzz finding [%s] %s: %s", kind, route, detail[:300])
        else:
            found.count += 1
            if len(body) < len(found.shortest or found.body):
                found.shortest = body

    def _post(self, path: str, body: bytes, headers: dict[str, str]) -> Answer:
        started = time.monotonic()
        try:
            with httpx.Client(timeout=ANSWER_SECONDS) as client:
                response = client.post(self.stack.url + path, content=body, headers=headers)
            return Answer(
                response.status_code,
                dict(response.headers),
                response.content,
                time.monotonic() - started,
            )
        except httpx.HTTPError as exc:
            return Answer(None, {}, b"", time.monotonic() - started, f"{type(exc).__name__}: {exc}")

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> Answer:
        """POST, watching the workers meanwhile: when one dies the client must
        hear within DEATH_NOTICE_SECONDS, so waiting longer is not useful."""
        box: list[Answer] = []
        thread = threading.Thread(
            target=lambda: box.append(self._post(path, body, headers)), daemon=True
        )
        started = time.monotonic()
        thread.start()
        died_at: float | None = None
        while thread.is_alive():
            thread.join(0.1)
            if died_at is None and self.stack.dead_workers():
                died_at = time.monotonic()
            if died_at is not None and time.monotonic() - died_at > DEATH_NOTICE_SECONDS:
                return Answer(
                    None,
                    {},
                    b"",
                    time.monotonic() - started,
                    f"no answer {DEATH_NOTICE_SECONDS:.0f} s after the worker died",
                )
        return box[0]

    def send(
        self,
        route: str,
        body: bytes,
        *,
        model: str,
        content_type: str | None = "application/json",
        origin: str | None = None,
    ) -> Answer:
        headers = {} if content_type is None else {"content-type": content_type}
        if origin is not None:
            headers["origin"] = origin
        offset = self.stack.log_size()
        answer = self.post(route, body, headers)
        self.sent += 1
        if answer.status is not None:
            self.statuses[answer.status] = self.statuses.get(answer.status, 0) + 1
        problems = list(self.problems(route, answer))
        for kind, detail in problems:
            self.record(kind, route, body, f"{detail}\n  log: {self._log(offset)}")
        dead = self.stack.dead_workers()
        if dead:
            self.record(
                "worker-died", route, body, f"worker {dead} exited; log: {self._log(offset)}"
            )
            self.stack.restart_dead()
            return answer
        if not self.probe(model) or any(k in ("no-answer", "slow") for k, _ in problems):
            self.settle(route, body, model)
        return answer

    def _log(self, offset: int) -> str:
        return _log_excerpt(self.stack.log_since(offset))

    def problems(self, route: str, answer: Answer) -> Iterator[tuple[str, str]]:
        if answer.status is None:
            yield "no-answer", f"{answer.error} after {answer.seconds:.1f} s"
            return
        excerpt = answer.body[:300]
        if answer.status >= 500:
            # Grouped by status and error message (its first line), not by
            # the rest of the body, which quotes the input.
            try:
                message = str(strict_json(answer.body)["error"]["message"])[:100]
            except (ValueError, KeyError, TypeError):
                message = "(no envelope)"
            yield "5xx", f"status {answer.status} {message}\n  response: {excerpt!r}"
        if answer.seconds > ANSWER_SECONDS / 2:
            yield "slow", f"status {answer.status} after {answer.seconds:.1f} s"
        content_type = answer.headers.get("content-type", "")
        if answer.status == 200 and content_type.startswith("text/event-stream"):
            for problem in sse_problems(answer.body, openai_style=route.startswith("/v1/")):
                yield "bad-stream", problem
            return
        if answer.status == 200:
            try:
                strict_json(answer.body)
            except ValueError as exc:
                yield "bad-200", f"not strict JSON ({exc}): {excerpt!r}"
            return
        try:
            data = strict_json(answer.body)
        except ValueError:
            yield "not-envelope", f"status {answer.status}, body not JSON: {excerpt!r}"
            return
        why = envelope_problem(data)
        if why:
            yield "not-envelope", f"status {answer.status}, {why}: {excerpt!r}"
        if answer.status == 503 and "retry-after" not in answer.headers:
            yield "503-no-retry-after", f"{excerpt!r}"

    def probe(self, model: str, timeout: float = PROBE_SECONDS) -> bool:
        """A plain request to the worker the fuzzed one reached answers 200
        quickly: no slot was left wedged."""
        path, plain = PROBES[model]
        try:
            return httpx.post(self.stack.url + path, json=plain, timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def settle(self, route: str, body: bytes, model: str) -> None:
        """After a hang, wait until the worker serves again, so that the next
        bodies are not blamed for this one; how long it took is the finding."""
        started = time.monotonic()
        while time.monotonic() - started < SETTLE_SECONDS:
            if self.stack.restart_dead():
                self.record("worker-died", route, body, "exited after hanging")
                return
            if self.probe(model, timeout=5):
                break
        waited = time.monotonic() - started
        self.record(
            "worker-wedged",
            route,
            body,
            f"{model} served a plain request again only after {waited:.0f} s",
        )
        self.wedges += 1

    def exhausted(self) -> bool:
        """Enough workers died or wedged that the rest of a sweep would only
        spend minutes on restarts; the findings so far already fail it."""
        deaths = sum(f.count for f in self.findings.values() if f.kind == "worker-died")
        return deaths + self.wedges >= MAX_TROUBLES

    def report(self) -> str:
        lines = [
            f"{len(self.findings)} distinct failures in {self.sent} requests "
            f"(statuses {dict(sorted(self.statuses.items()))}, worker restarts "
            f"{self.stack.restarts}):"
        ]
        lines += [f.render() for f in self.findings.values()]
        return "\n".join(lines)
