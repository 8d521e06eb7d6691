"""llama-server's own API end to end (`inferq api` and `inferq worker` as
processes): /completion, /infill, /tokenize, /detokenize and /props, in the
shapes llama.cpp's clients read."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import create_engine, text

from schemas import keys
from tests.support.procs import free_port, inferq, stop, wait_status
from tests.support.stack import MODEL, Stack
from tests.support.tinymodel import BOS_TOKEN, BOS_TOKEN_ID, CHAT_TEMPLATE

GREEDY = {"prompt": "hello world", "n_predict": 8, "temperature": 0}
Body = dict[str, Any]


def _post(url: str, path: str, body: Body, status: int = 200) -> Body:
    response = httpx.post(url + path, json=body, timeout=60)
    assert response.status_code == status, response.text
    data: Body = response.json()
    if status >= 400:
        error = data["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["code"], str) and error["message"]
        return dict(error)
    return data


def _stream(url: str, path: str, body: Body) -> list[Body]:
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    # Every line is a data line with a JSON object: llama-server sends no [DONE].
    assert all(line.startswith("data: {") for line in lines), lines
    return [json.loads(line[6:]) for line in lines]


def test_completion_answers_like_llama_server(stack: Stack) -> None:
    # llama-server clients name no model: the one with a worker answers.
    out = _post(stack.url, "/completion", GREEDY)
    assert out["model"] == MODEL and out["stop"] is True and out["truncated"] is False
    assert out["tokens_predicted"] == 8 and len(out["content"].split()) >= 4
    assert out["prompt"] == BOS_TOKEN + " hello world" and out["tokens_evaluated"] == 3
    assert (out["stop_type"], out["stopped_limit"], out["stopped_eos"]) == ("limit", True, False)
    assert (out["stopped_word"], out["stopping_word"]) == (False, "")
    settings = out["generation_settings"]
    assert (settings["n_predict"], settings["temperature"], settings["n_ctx"]) == (8, 0.0, 2048)
    assert settings["model"] == MODEL and settings["seed"] == 4294967295
    assert settings["samplers"][0] == "penalties" and settings["samplers"][-1] == "temperature"
    assert (settings["stream"], settings["n_keep"], settings["penalize_nl"]) == (False, 0, False)
    timings = out["timings"]
    assert timings["predicted_n"] == 8
    assert (
        timings["prompt_n"] + timings["cache_n"] == 3 and timings["cache_n"] == out["tokens_cached"]
    )
    for field in ("prompt_ms", "prompt_per_token_ms", "prompt_per_second", "predicted_ms"):
        assert timings[field] > 0, field
    assert timings["predicted_per_second"] > 0 and timings["predicted_per_token_ms"] > 0
    # The same tokens as the OpenAI route (no template on this model) give the same text.
    openai = stack.client().completions.create(
        model=MODEL, prompt="hello world", max_tokens=8, temperature=0
    )
    assert openai.choices[0].text == out["content"]


def test_streamed_completion(stack: Stack) -> None:
    whole = _post(stack.url, "/completion", GREEDY)
    *tokens, last = _stream(stack.url, "/completion", GREEDY)
    assert tokens and all(c == {"index": 0, "content": c["content"], "stop": False} for c in tokens)
    assert "".join(c["content"] for c in tokens) == whole["content"]
    assert last["stop"] is True and last["content"] == ""
    assert last["stopped_limit"] is True and last["tokens_predicted"] == 8
    assert last["generation_settings"]["stream"] is True
    assert last["timings"]["predicted_n"] == 8 and last["prompt"] == whole["prompt"]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_word_and_end_of_stream(stack: Stack, stream: bool) -> None:
    def complete(body: Body) -> tuple[str, Body]:
        if not stream:
            out = _post(stack.url, "/completion", body)
            return out["content"], out
        *tokens, last = _stream(stack.url, "/completion", body)
        return "".join(c["content"] for c in tokens), last

    text, _ = complete({**GREEDY, "n_predict": 12})
    stop = " " + text.split()[3]
    cut, out = complete({**GREEDY, "n_predict": 12, "stop": ["never there", stop]})
    assert cut == text.split(stop)[0]
    assert (out["stop_type"], out["stopped_word"], out["stopping_word"]) == ("word", True, stop)
    assert out["stopped_limit"] is False
    # A finished grammar leaves only end-of-generation tokens.
    ended, out = complete({**GREEDY, "grammar": 'root ::= " hello world"'})
    assert ended == " hello world" and out["tokens_predicted"] == 2
    assert (out["stop_type"], out["stopped_eos"], out["stopping_word"]) == ("eos", True, "")


def test_repeated_prompt_comes_from_the_cache(stack: Stack) -> None:
    body = {"prompt": "the old man and the sea " * 6, "n_predict": 2, "temperature": 0}
    first = _post(stack.url, "/completion", body)
    again = _post(stack.url, "/completion", body)
    n_prompt = again["tokens_evaluated"]
    assert n_prompt > 30 and first["tokens_cached"] < n_prompt - 1
    # Everything but the last prompt token (which yields the logits) was cached.
    assert again["tokens_cached"] == again["timings"]["cache_n"] == n_prompt - 1
    assert again["timings"]["prompt_n"] == 1 and again["content"] == first["content"]
    uncached = _post(stack.url, "/completion", {**body, "cache_prompt": False})
    assert uncached["tokens_cached"] == 0


def test_completion_probabilities(stack: Stack) -> None:
    body = {**GREEDY, "n_predict": 4, "n_probs": 3}
    out = _post(stack.url, "/completion", body)
    probs = out["completion_probabilities"]
    assert len(probs) == 4 and "".join(p["token"] for p in probs) == out["content"]
    for p in probs:
        assert set(p) == {"id", "token", "logprob", "bytes", "top_logprobs"}
        assert p["logprob"] <= 0 and p["bytes"] == list(p["token"].encode())
        assert len(p["top_logprobs"]) == 3 and p["top_logprobs"][0]["id"] == p["id"]  # greedy
        assert set(p["top_logprobs"][0]) == {"id", "token", "logprob", "bytes"}
    *tokens, last = _stream(stack.url, "/completion", body)
    streamed = [p for c in tokens for p in c["completion_probabilities"]]
    assert [p["id"] for p in streamed] == [p["id"] for p in probs]
    assert "completion_probabilities" not in last


def test_prompt_as_token_ids_and_mixed(stack: Stack) -> None:
    ids = _post(stack.url, "/tokenize", {"content": "hello world", "add_special": True})["tokens"]
    assert ids[0] == BOS_TOKEN_ID and len(ids) == 3
    text = _post(stack.url, "/completion", GREEDY)
    # Token ids go in verbatim (no BOS added); a leading string gets the BOS.
    for prompt in (ids, ["hello", ids[2]], [BOS_TOKEN_ID, "hello world"], [ids]):
        out = _post(stack.url, "/completion", {**GREEDY, "prompt": prompt})
        assert (out["content"], out["tokens_evaluated"]) == (text["content"], 3), prompt
        assert out["prompt"] == text["prompt"]
    several = _post(stack.url, "/completion", {**GREEDY, "prompt": ["a", "b"]}, 400)
    assert several["param"] == "prompt"
    unknown = _post(stack.url, "/completion", {**GREEDY, "prompt": [1, 10**6]}, 400)
    assert unknown["param"] == "prompt" and "vocabulary" in unknown["message"]


def test_id_slot(stack: Stack) -> None:
    body = {**GREEDY, "prompt": "what a long way to go in the rain " * 3, "n_predict": 2}
    for slot in (1, 0, 1):
        out = _post(stack.url, "/completion", {**body, "id_slot": slot})
        assert out["id_slot"] == slot and out["generation_settings"]["id_slot"] == slot
    # Slot 1 still holds this prompt from two requests ago.
    assert out["tokens_cached"] == out["tokens_evaluated"] - 1
    assert _post(stack.url, "/completion", {**body, "id_slot": -1})["id_slot"] in (0, 1)
    missing = _post(stack.url, "/completion", {**body, "id_slot": 2}, 400)
    assert missing["param"] == "id_slot" and "slots 0 to 1" in missing["message"]


def test_samplers_order(stack: Stack) -> None:
    greedy = _post(stack.url, "/completion", {**GREEDY, "n_predict": 12})["content"]
    hot = {**GREEDY, "n_predict": 12, "temperature": 1.5, "top_k": 1, "seed": 3}
    # top_k=1 makes any temperature greedy, when top_k is in the chain...
    ranked = _post(stack.url, "/completion", {**hot, "samplers": ["top_k", "temperature"]})
    assert ranked["content"] == greedy
    assert ranked["generation_settings"]["samplers"] == ["top_k", "temperature"]
    # ...the one-letter form names the same chain...
    assert _post(stack.url, "/completion", {**hot, "samplers": "kt"})["content"] == greedy
    # ...and without top_k in it, top_k=1 does nothing.
    unranked = _post(stack.url, "/completion", {**hot, "samplers": ["temperature"]})
    assert unranked["content"] != greedy
    bad = _post(stack.url, "/completion", {**hot, "samplers": ["top_k", "magic"]}, 400)
    assert bad["param"] == "samplers" and "magic" in bad["message"]


def test_tokenize_and_detokenize(stack: Stack) -> None:
    pieces = _post(stack.url, "/tokenize", {"content": "hello é", "with_pieces": True})["tokens"]
    # "é" is not in the vocabulary: two byte tokens, neither valid UTF-8 alone.
    assert pieces[0]["piece"] == " hello"
    assert [p["piece"] for p in pieces[-2:]] == [[0xC3], [0xA9]]
    assert all(isinstance(p["id"], int) for p in pieces)
    special = _post(stack.url, "/tokenize", {"content": "hi", "add_special": True})["tokens"]
    assert special[0] == BOS_TOKEN_ID
    assert _post(stack.url, "/tokenize", {"content": BOS_TOKEN})["tokens"] == [BOS_TOKEN_ID]
    plain = _post(stack.url, "/tokenize", {"content": BOS_TOKEN, "parse_special": False})
    assert BOS_TOKEN_ID not in plain["tokens"]
    text = "hello world, the sky is blue é"
    ids = _post(stack.url, "/tokenize", {"content": text, "model": MODEL})["tokens"]
    # SentencePiece marks the first word with a space, as llama-server returns it.
    assert _post(stack.url, "/detokenize", {"tokens": ids})["content"] == " " + text
    bad = _post(stack.url, "/detokenize", {"tokens": [5, -1]}, 400)
    assert bad["param"] == "tokens"
    unknown = _post(stack.url, "/tokenize", {"content": "x", "model": "gpt-4"}, 404)
    assert unknown["code"] == "model_not_found"


def _models(stack: Stack) -> dict[str, bool]:
    data = httpx.get(stack.url + "/v1/models").json()["data"]
    return {m["id"]: m["ready"] for m in data}


@pytest.fixture
def fim_model(stack: Stack, tmp_path: Path, tiny_fim_gguf: Path) -> Iterator[str]:
    """A worker for a model with fill-in-the-middle tokens, from its own models
    directory: the API learns of it from the worker's heartbeat."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "fim.gguf").write_bytes(tiny_fim_gguf.read_bytes())
    (models / "fim.yaml").write_text(
        "name: fim\nparameters:\n  model: fim.gguf\ncontext_size: 1024\nparallel: 1\nthreads: 1\n"
    )
    log = tmp_path / "fim.log"
    worker = inferq(
        ["worker", "--model", "fim"], {**stack.env, "INFERQ_MODELS_DIR": str(models)}, log
    )
    try:
        deadline = time.monotonic() + 60
        while not _models(stack).get("fim"):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield "fim"
    finally:
        stop(worker)
        # Other tests list the models: wait until the API has forgotten this one.
        deadline = time.monotonic() + 30
        while "fim" in _models(stack) and time.monotonic() < deadline:
            time.sleep(0.2)


def test_infill(stack: Stack, fim_model: str) -> None:
    body = {
        "model": fim_model,
        "input_prefix": "the big",
        "input_suffix": "the end",
        "input_extra": [{"filename": "notes.txt", "text": "one two"}],
        "prompt": " dog",
        "n_predict": 6,
        "temperature": 0,
    }
    out = _post(stack.url, "/infill", body)
    assert out["model"] == fim_model and out["tokens_predicted"] == 6 and out["content"].strip()
    prompt = out["prompt"]
    # llama-server's layout: extra chunks, then prefix + prompt, suffix, middle.
    marks = ["notes.txt", "one two", "<|fim_prefix|>", "the big", "dog", "<|fim_suffix|>"]
    at = [prompt.index(mark) for mark in [*marks, "the end"]]
    assert at == sorted(at) and prompt.endswith("<|fim_middle|>"), prompt
    *tokens, last = _stream(stack.url, "/infill", body)
    assert "".join(c["content"] for c in tokens) == out["content"] and last["stop"] is True
    # The test stack's model has no FIM tokens.
    error = _post(stack.url, "/infill", {**body, "model": MODEL}, 400)
    assert error["code"] == "infill_not_supported"
    missing = _post(stack.url, "/infill", {"model": fim_model, "input_prefix": "a"}, 400)
    assert missing["param"] == "input_suffix"


def test_props(stack: Stack) -> None:
    props = httpx.get(stack.url + "/props").json()
    assert props["total_slots"] == 2 and props["model_alias"] == MODEL
    assert props["model_path"].endswith("tiny.gguf") and props["chat_template"] == CHAT_TEMPLATE
    defaults = props["default_generation_settings"]
    assert defaults["n_ctx"] == 2048 and defaults["params"]["temperature"] == pytest.approx(0.8)
    assert defaults["params"]["n_predict"] == -1 and props["bos_token"] == BOS_TOKEN
    assert httpx.get(stack.url + "/props", params={"model": MODEL}).json() == props
    unknown = httpx.get(stack.url + "/props", params={"model": "gpt-4"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    # "other" is configured but no worker of it ever started.
    idle = httpx.get(stack.url + "/props", params={"model": "other"})
    assert idle.status_code == 503 and idle.json()["error"]["code"] == "no_worker_ready"
    denied = _post(stack.url, "/props", {"temperature": 0.1}, 403)
    assert denied["code"] == "props_read_only" and "INFERQ_PROPS_WRITABLE" in denied["message"]


def test_writable_props_set_completion_defaults(stack: Stack) -> None:
    port = free_port()
    log = stack.log.parent / "props-api.log"
    env = {**stack.env, "INFERQ_PORT": str(port), "INFERQ_PROPS_WRITABLE": "true"}
    api = inferq(["api"], env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_status(url + "/health", 200, 30, log)
        changed = _post(url, "/props", {"temperature": 0, "n_predict": 5, "n_ctx": 9})
        assert changed["applied"] == ["n_predict", "temperature"]
        assert changed["ignored"] == ["n_ctx"] and changed["success"] is True
        params = httpx.get(url + "/props").json()["default_generation_settings"]["params"]
        assert (params["temperature"], params["n_predict"], params["max_tokens"]) == (0, 5, 5)
        greedy = _post(stack.url, "/completion", {**GREEDY, "n_predict": 5})
        defaulted = _post(url, "/completion", {"prompt": "hello world"})
        assert defaulted["tokens_predicted"] == 5 and defaulted["content"] == greedy["content"]
        # What a request gives wins over the defaults.
        assert _post(url, "/completion", {"prompt": "hi", "n_predict": 2})["tokens_predicted"] == 2
        bad = _post(url, "/props", {"top_k": "many"}, 400)
        assert bad["param"] == "top_k"
        # The read-only API does not apply them.
        assert _post(stack.url, "/completion", {"prompt": "hi", "n_predict": 3})[
            "generation_settings"
        ]["temperature"] == pytest.approx(0.8)
        _post(url, "/props", {"temperature": None, "n_predict": None})
        params = httpx.get(url + "/props").json()["default_generation_settings"]["params"]
        assert params["n_predict"] == -1
    finally:
        stop(api)
        redis.Redis.from_url(stack.env["REDIS_URL"]).delete(keys.props_overrides(MODEL))


@pytest.mark.parametrize("stream", [False, True])
def test_errors_come_before_any_byte(stack: Stack, stream: bool) -> None:
    prompt = " ".join(["the big dog"] * 800)
    error = _post(stack.url, "/completion", {"prompt": prompt, "stream": stream}, 400)
    assert error["code"] == "context_length_exceeded"
    bad = _post(stack.url, "/completion", {"prompt": "x", "temperature": "hot"}, 400)
    assert bad["param"] == "temperature"
    grammar = _post(stack.url, "/completion", {"prompt": "x", "grammar": "root ::= ("}, 400)
    assert grammar["param"] == "grammar"


def test_client_disconnect_cancels_the_job(stack: Stack) -> None:
    engine = create_engine(stack.database_url)
    query = text(
        "SELECT count(*) FROM usage WHERE endpoint = 'llama.completion' AND status = 'cancelled'"
    )

    def cancelled() -> int:
        with engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    try:
        before = cancelled()
        body = {"prompt": "hello", "n_predict": 1500, "stream": True}
        with httpx.stream("POST", stack.url + "/completion", json=body, timeout=60) as response:
            next(line for line in response.iter_lines() if line.startswith("data: "))
        deadline = time.monotonic() + 10
        while cancelled() == before:
            assert time.monotonic() < deadline, "the job was not cancelled"
            time.sleep(0.1)
    finally:
        engine.dispose()
