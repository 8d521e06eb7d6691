"""Hostile request values against a running inferq (real API, worker, Redis,
Postgres and llama.cpp): nothing a request carries aborts the worker. Each
case asserts what the client sees (a 4xx in the OpenAI envelope, or a clean
finish), that it came at once, and that the same worker process serves the
next request.

The first half goes through HTTP; the second hands jobs straight to the
worker's queue, as a batch line or another API version could, with values
the API itself would refuse: the worker must be safe on its own."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from api.vocab import Vocab
from schemas import keys
from schemas.events import Done, ErrorEvent, decode
from schemas.queue import make_celery
from schemas.settings import Settings
from tests.support.stack import MODEL, Stack

Body = dict[str, Any]
# A hostile request is answered well within this (the stack's request
# timeout is 60 s: a dead or wedged worker would show as a wait that long).
PROMPT_ANSWER_S = 20.0

# The largest integers the API accepts for these fields (int32, and uint32
# for the seed): far beyond the tiny model, which the worker must clamp.
LARGEST = {
    "top_k": 2**31 - 1,
    "min_keep": 2**31 - 1,
    "repeat_last_n": 2**31 - 1,
    "seed": 2**32 - 1,
}


def _envelope(response: httpx.Response) -> Body:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["code"], str) and error["message"]
    return dict(error)


def _post(stack: Stack, path: str, body: Body | str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    if isinstance(body, str):
        headers = {"content-type": "application/json"}
        response = httpx.post(stack.url + path, content=body, headers=headers, timeout=90)
    else:
        response = httpx.post(stack.url + path, json=body, timeout=90)
    elapsed = time.monotonic() - started
    assert elapsed < PROMPT_ANSWER_S, f"{path} took {elapsed:.1f} s"
    return response, elapsed


def _served_by(stack: Stack) -> str:
    """The worker that answers a plain request (its id holds its pid)."""
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "temperature": 0}
    response, _ = _post(stack, "/v1/completions", body)
    assert response.status_code == 200, response.text
    return str(stack.usage(response.json()["id"])["worker"])


@pytest.fixture
def same_worker(stack: Stack) -> Iterator[None]:
    before = _served_by(stack)
    yield
    assert _served_by(stack) == before, "the worker process changed: it died"


@pytest.fixture(scope="module")
def a_tokens(tiny_gguf: Path) -> list[int]:
    """Every token whose text is exactly "a" (word piece and byte fallback)."""
    vocab = Vocab(tiny_gguf)
    return [t for t in range(vocab.n_tokens) if vocab.piece(t) == b"a"]


# -- through HTTP ------------------------------------------------------------


def test_a_complete_grammar_with_ignore_eos_ends_there(stack: Stack, same_worker: None) -> None:
    body = {"prompt": "x", "grammar": 'root ::= "a"', "ignore_eos": True, "n_predict": 8}
    response, _ = _post(stack, "/completion", body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert (out["content"], out["stop_type"], out["tokens_predicted"]) == ("a", "eos", 1)


def test_a_complete_grammar_with_ignore_eos_ends_a_stream(stack: Stack, same_worker: None) -> None:
    body = {"prompt": "x", "grammar": 'root ::= "a"', "ignore_eos": True, "stream": True}
    with httpx.stream("POST", stack.url + "/completion", json=body, timeout=30) as response:
        assert response.status_code == 200
        events = [json.loads(line[6:]) for line in response.iter_lines() if line]
    assert "".join(e.get("content", "") for e in events) == "a"
    assert events[-1]["stop"] is True and events[-1]["stop_type"] == "eos"


def test_chat_json_schema_with_ignore_eos_ends_with_the_object(
    stack: Stack, same_worker: None
) -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"const": 1}},
        "required": ["a"],
        "additionalProperties": False,
    }
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        "ignore_eos": True,
        "max_tokens": 200,
        "temperature": 0,
    }
    response, _ = _post(stack, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert json.loads(choice["message"]["content"]) == {"a": 1}


def test_banning_every_token_the_grammar_allows_ends_cleanly(
    stack: Stack, same_worker: None, a_tokens: list[int]
) -> None:
    assert a_tokens
    body = {
        "prompt": "x",
        "grammar": 'root ::= "a"',
        "logit_bias": [[t, False] for t in a_tokens],
        "n_predict": 8,
    }
    response, _ = _post(stack, "/completion", body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["content"] == "" and out["stop"] is True


@pytest.mark.parametrize(
    ("grammar", "why"),
    [
        ("root ::= foo", "`foo`, which is not defined"),
        ('root ::= "abc', "never closed"),
        ('foo ::= "a"', "no `root` rule"),
        ("root ::= " + "(" * 3000 + '"a"' + ")" * 3000, "nests groups deeper"),
    ],
    ids=["undefined", "unterminated", "no-root", "deep"],
)
@pytest.mark.parametrize("path", ["/completion", "/v1/chat/completions"])
def test_a_grammar_that_does_not_parse_is_a_400_that_says_why(
    stack: Stack, same_worker: None, path: str, grammar: str, why: str
) -> None:
    body: Body = {"grammar": grammar, "max_tokens": 4}
    if path == "/completion":
        body["prompt"] = "x"
    else:
        body.update(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    response, _ = _post(stack, path, body)
    assert response.status_code == 400
    error = _envelope(response)
    assert error["param"] == "grammar" and why in error["message"], error


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/completion", {"prompt": [999_999], "n_predict": 2}, "prompt"),
        ("/completion", {"prompt": ["hello", -5], "n_predict": 2}, "prompt"),
        ("/completion", {"prompt": "x", "logit_bias": [[999_999, 1.0]]}, "logit_bias"),
        ("/completion", {"prompt": "x", "logit_bias": [[-1, False]]}, "logit_bias"),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "x", "logit_bias": {"999999": 5}},
            "logit_bias",
        ),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": [1, 999_999]}, "tokens"),
    ],
)
def test_token_ids_outside_the_vocabulary_are_a_400(
    stack: Stack, same_worker: None, path: str, body: Body, param: str
) -> None:
    response, _ = _post(stack, path, body)
    assert response.status_code == 400
    error = _envelope(response)
    assert error["param"] == param, error


@pytest.mark.parametrize(
    "body",
    [
        '{"prompt": "x", "temperature": NaN}',
        '{"prompt": "x", "top_p": Infinity}',
        '{"prompt": "x", "mirostat": 2, "mirostat_tau": -Infinity}',
        '{"prompt": "x", "logit_bias": [[1, NaN]]}',
        '{"prompt": "x", "repeat_penalty": 1e400}',
    ],
)
def test_non_finite_numbers_are_a_400(stack: Stack, same_worker: None, body: str) -> None:
    response, _ = _post(stack, "/completion", body)
    assert response.status_code == 400, response.text
    _envelope(response)


@pytest.mark.parametrize(
    "extra",
    [
        {"top_k": 2**40},
        {"seed": 2**70},
        {"n_predict": 2**40},
        {"repeat_last_n": 2**40},
        {"min_keep": 2**40},
        {"n_probs": 2**40},
        {"id_slot": 2**40},
        {"mirostat": 7},
    ],
)
def test_integers_beyond_their_c_type_are_a_400(
    stack: Stack, same_worker: None, extra: Body
) -> None:
    response, _ = _post(stack, "/completion", {"prompt": "x", **extra})
    assert response.status_code == 400, response.text
    _envelope(response)


def test_the_largest_accepted_integers_generate(stack: Stack, same_worker: None) -> None:
    # In range for the API, far beyond the model: the worker clamps them
    # (top_k and min_keep to the vocabulary, repeat_last_n to the context).
    body = {"prompt": "hello", "n_predict": 4, **LARGEST, "repeat_penalty": 1.2, "n_probs": 20}
    response, _ = _post(stack, "/completion", body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["tokens_predicted"] == 4
    assert len(out["completion_probabilities"][0]["top_logprobs"]) == 20


@pytest.mark.parametrize("length_penalty", [10.0, -10.0, 2000.0])
def test_beam_search_length_penalties_fail_nothing(
    stack: Stack, same_worker: None, length_penalty: float
) -> None:
    body = {
        "model": MODEL,
        "prompt": "hello",
        "use_beam_search": True,
        "n": 2,
        "max_tokens": 8,
        "length_penalty": length_penalty,
    }
    response, _ = _post(stack, "/v1/generate", body)
    if abs(length_penalty) > 10:
        assert response.status_code == 400, response.text
        assert _envelope(response)["param"] == "length_penalty"
    else:
        assert response.status_code == 200, response.text


def test_seeded_requests_repeat_whatever_the_cache_holds(stack: Stack) -> None:
    prefix = "the quick brown fox jumps over the lazy dog " * 6
    seeded = {
        "model": MODEL,
        "prompt": prefix + "question",
        "seed": 4242,
        "temperature": 1,
        "max_tokens": 24,
    }
    texts = []
    for i in range(3):
        # Warm the slots with prompts sharing its prefix, and with others.
        for warm in (prefix + f"other {i}", f"something else {i}"):
            body = {"model": MODEL, "prompt": warm, "max_tokens": 4, "temperature": 0}
            assert _post(stack, "/v1/completions", body)[0].status_code == 200
        response, _ = _post(stack, "/v1/completions", seeded)
        assert response.status_code == 200, response.text
        texts.append(response.json()["choices"][0]["text"])
    assert texts[0] and texts == [texts[0]] * 3


# -- straight to the worker -------------------------------------------------


class RawJobs:
    """Jobs handed to the worker's queue as they are, past the API's checks."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        settings = Settings.model_validate({"REDIS_URL": stack.env["REDIS_URL"]})
        self.celery = make_celery(settings)
        self.redis = redis.Redis.from_url(stack.env["REDIS_URL"])

    def run(self, sampling: Body, **fields: Any) -> tuple[Done | ErrorEvent, float]:
        request_id = f"raw-{uuid.uuid4().hex}"
        job = {
            "request_id": request_id,
            "model": MODEL,
            "endpoint": "llama.completion",
            "prompt_parts": ["hello"],
            "sampling": sampling,
            **fields,
        }
        pubsub = self.redis.pubsub()
        pubsub.subscribe(keys.stream_channel(request_id))
        started = time.monotonic()
        try:
            self.celery.send_task(
                keys.TASK_GENERATE, args=[job], queue=keys.model_queue(MODEL), expires=60
            )
            while time.monotonic() - started < PROMPT_ANSWER_S:
                message = pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None:
                    continue
                event = decode(message["data"])
                if isinstance(event, Done | ErrorEvent):
                    return event, time.monotonic() - started
        finally:
            pubsub.close()
        raise AssertionError(f"no end of {request_id} within {PROMPT_ANSWER_S} s")


@pytest.fixture(scope="module")
def raw(stack: Stack) -> Iterator[RawJobs]:
    jobs = RawJobs(stack)
    yield jobs
    jobs.redis.close()


@pytest.mark.parametrize(
    ("sampling", "param"),
    [
        ({"grammar": "root ::= foo"}, "grammar"),
        ({"grammar": "root ::= " + "(" * 3000 + '"a"' + ")" * 3000}, "grammar"),
        ({"grammar": 'root ::= "\\x00"', "json_schema": {}}, "grammar"),
        ({"json_schema": {"$ref": "http://elsewhere/schema"}}, "json_schema"),
        ({"json_schema": {"type": "string", "pattern": "(((("}}, "json_schema"),
        ({"logit_bias": [[999_999, 1.0]]}, "logit_bias"),
        ({"logit_bias": [[-7, False]]}, "logit_bias"),
        ({"logit_bias": [[1, True]]}, "logit_bias"),
    ],
)
def test_raw_jobs_with_values_llama_cpp_cannot_take_are_a_400(
    stack: Stack, same_worker: None, raw: RawJobs, sampling: Body, param: str
) -> None:
    event, _ = raw.run(sampling)
    assert isinstance(event, ErrorEvent), event
    assert (event.status, event.param) == (400, param), event


@pytest.mark.parametrize(
    "parts", [[999_999], ["hello", -1], [2**31 - 1]], ids=["beyond", "negative", "int32-max"]
)
def test_raw_jobs_with_prompt_ids_outside_the_vocabulary_are_a_400(
    stack: Stack, same_worker: None, raw: RawJobs, parts: list[Any]
) -> None:
    event, _ = raw.run({}, prompt_parts=parts)
    assert isinstance(event, ErrorEvent), event
    assert (event.status, event.param) == (400, "prompt"), event


@pytest.mark.parametrize(
    "sampling",
    [
        {"grammar": 'root ::= "a"', "ignore_eos": True, "max_tokens": 8},
        {"grammar": "root ::= [z-a]", "max_tokens": 8},
        {"json_schema": {"const": 1}, "ignore_eos": True, "max_tokens": 32, "temperature": 0},
        {**LARGEST, "repeat_penalty": 1.3, "logprobs": 20, "max_tokens": 4},
        {"samplers": ["nonsense", "top_k", "temperature", "temperature"], "max_tokens": 4},
        {"mirostat": 2, "mirostat_tau": 3.4e38, "mirostat_eta": 3.4e38, "max_tokens": 4},
        {"temperature": 3.4e38, "max_tokens": 4},
        {"stop": ["\x00", "", "a" * 5000], "max_tokens": 4},
    ],
    ids=[
        "grammar-ignore-eos",
        "empty-grammar-language",
        "schema-ignore-eos",
        "int32-extremes",
        "odd-samplers",
        "float32-max-mirostat",
        "float32-max-temperature",
        "odd-stops",
    ],
)
def test_raw_jobs_at_the_edges_finish_cleanly(
    stack: Stack, same_worker: None, raw: RawJobs, sampling: Body
) -> None:
    event, _ = raw.run(sampling)
    assert isinstance(event, Done), event
    assert event.choices[0].finish_reason in ("stop", "length")


def test_raw_beam_jobs_with_extreme_penalties_finish(
    stack: Stack, same_worker: None, raw: RawJobs
) -> None:
    for penalty in (10.0, -10.0):
        event, _ = raw.run(
            {"max_tokens": 6},
            endpoint="generate",
            prompt="hello",
            prompt_parts=None,
            beam={"width": 2, "length_penalty": penalty, "early_stopping": "never"},
        )
        assert isinstance(event, Done), event
        assert len(event.choices) == 2
