"""llama-server's routes for a `backend: vllm` model, whose weights are a
Hugging Face directory: /tokenize and /detokenize read its tokenizer.json in
the API (no vLLM, no worker), and the llama.cpp-only routes refuse it with a
400 that names the route to use. A GGUF model beside it is unaffected."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from api.llama.common import require_llama_cpp
from tests.support.deploy import migrate, other_redis_db, scratch_database, stack_env
from tests.support.procs import free_port, inferq, stop, wait_status
from tests.support.tinymodel import BOS_TOKEN_ID

HF = "hf-tiny"
GGUF = "gguf-tiny"
# A vLLM model whose directory has no tokenizer.json.
BARE = "hf-bare"
BOS, EOS = "<s>", "</s>"
Body = dict[str, Any]

# No "é" in the corpus: it stays two byte tokens (0xC3 0xA9).
_CORPUS = [
    "hello world, the sky is blue and the sea is green",
    "the quick brown fox jumps over the lazy dog",
    "hello there, how are you today? the world is big",
] * 20


def write_tokenizer(directory: Path) -> Tokenizer:
    """A byte-level BPE trained here, with a BOS post-processor, saved as
    `directory`/tokenizer.json (what a Hugging Face model directory holds)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    bos = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos)]
    )
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS})
    )
    return tokenizer


@pytest.fixture(scope="module")
def hf_tokenizer_and_api(
    tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, redis_url: str, pg_server_url: str
) -> Iterator[tuple[Tokenizer, str]]:
    """An API (no worker) on a models directory with vLLM models (directories,
    one without a tokenizer) and a llama.cpp model (a GGUF), on a Redis
    database of its own."""
    root = tmp_path_factory.mktemp("vllm-api")
    models_dir = root / "models"
    models_dir.mkdir()
    tokenizer = write_tokenizer(models_dir / "tiny-hf")
    (models_dir / "hf.yaml").write_text(
        f"name: {HF}\nbackend: vllm\nparameters:\n  model: tiny-hf\ncontext_size: 64\n"
    )
    (models_dir / "bare-hf").mkdir()
    (models_dir / "bare.yaml").write_text(
        f"name: {BARE}\nbackend: vllm\nparameters:\n  model: bare-hf\n"
    )
    (models_dir / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    (models_dir / "gguf.yaml").write_text(
        f"name: {GGUF}\nparameters:\n  model: tiny.gguf\ncontext_size: 64\n"
    )
    port = free_port()
    with scratch_database(pg_server_url, "inferq_vllm_api") as database_url:
        env = stack_env(other_redis_db(redis_url, 5), database_url, models_dir, port)
        log = root / "api.log"
        migrate(env, log)
        api = inferq(["api"], env, log)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_status(url + "/v1/models", 200, 30, log)
            yield tokenizer, url
        finally:
            stop(api)


@pytest.fixture
def url(hf_tokenizer_and_api: tuple[Tokenizer, str]) -> str:
    return hf_tokenizer_and_api[1]


@pytest.fixture
def tokenizer(hf_tokenizer_and_api: tuple[Tokenizer, str]) -> Tokenizer:
    return hf_tokenizer_and_api[0]


def _post(url: str, path: str, body: Body, status: int = 200) -> Body:
    response = httpx.post(url + path, json=body, timeout=30)
    assert response.status_code == status, response.text
    data: Body = response.json()
    if status >= 400:
        error = data["error"]
        assert set(error) == {"message", "type", "param", "code"}
        return dict(error)
    return data


def _tokenize(url: str, content: Any, **options: Any) -> list[Any]:
    tokens: list[Any] = _post(url, "/tokenize", {"model": HF, "content": content, **options})[
        "tokens"
    ]
    return tokens


def test_vllm_model_is_listed(url: str) -> None:
    listed = {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
    assert {HF, BARE, GGUF} <= listed


def test_tokenize_then_detokenize_round_trips(url: str, tokenizer: Tokenizer) -> None:
    text = "hello world, the sky is blue é"
    ids = _tokenize(url, text)
    assert ids == tokenizer.encode(text, add_special_tokens=False).ids
    assert all(isinstance(t, int) for t in ids)
    assert _post(url, "/detokenize", {"model": HF, "tokens": ids})["content"] == text
    # Special tokens are written out, as llama-server's /detokenize does.
    with_bos = _tokenize(url, text, add_special=True)
    assert with_bos == [tokenizer.token_to_id(BOS), *ids]
    assert _post(url, "/detokenize", {"model": HF, "tokens": with_bos})["content"] == BOS + text


def test_with_pieces(url: str, tokenizer: Tokenizer) -> None:
    pieces = _tokenize(url, "hello é", with_pieces=True)
    assert all(set(p) == {"id", "piece"} and isinstance(p["id"], int) for p in pieces)
    assert pieces[0]["piece"] == "hello"
    # "é" is two byte tokens, neither valid UTF-8 alone: their bytes, not U+FFFD.
    assert [p["piece"] for p in pieces[-2:]] == [[0xC3], [0xA9]]
    assert [p["id"] for p in pieces] == tokenizer.encode("hello é", add_special_tokens=False).ids
    special = _tokenize(url, "hello", add_special=True, with_pieces=True)
    assert special[0] == {"id": tokenizer.token_to_id(BOS), "piece": BOS}


def test_special_tokens(url: str, tokenizer: Tokenizer) -> None:
    bos = tokenizer.token_to_id(BOS)
    assert _tokenize(url, "hello", add_special=True)[0] == bos
    assert bos not in _tokenize(url, "hello")
    # Special tokens in the text are parsed unless parse_special is off.
    assert _tokenize(url, BOS) == [bos]
    assert bos not in _tokenize(url, BOS, parse_special=False)
    # Token ids pass through; the BOS only comes before a leading string.
    mixed = _tokenize(url, ["hello", 7, " world"], add_special=True)
    assert mixed[0] == bos and 7 in mixed
    assert _tokenize(url, [7, "hello"], add_special=True)[0] == 7


def test_out_of_range_ids_answer_as_for_a_gguf_model(url: str, tokenizer: Tokenizer) -> None:
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    for bad in (-1, size):
        hf = _post(url, "/detokenize", {"model": HF, "tokens": [5, bad]}, 400)
        gguf = _post(url, "/detokenize", {"model": GGUF, "tokens": [5, -1]}, 400)
        assert (hf["type"], hf["code"], hf["param"]) == (gguf["type"], gguf["code"], "tokens")
        assert hf["message"] == f"token id {bad} is not in the vocabulary (0 to {size - 1})"
    assert _post(url, "/detokenize", {"model": HF, "tokens": [size - 1]})["content"]
    # Ids given to /tokenize are checked the same way.
    error = _post(url, "/tokenize", {"model": HF, "content": ["a", size]}, 400)
    assert error["param"] == "content"


def _assert_unsupported(error: Body, route: str) -> None:
    assert error["code"] == "unsupported_model" and error["param"] == "model"
    assert error["type"] == "invalid_request_error"
    message = error["message"]
    assert f"'{HF}'" in message and "vLLM" in message, message
    assert route in message and "/v1/completions" in message, message


@pytest.mark.parametrize("path", ["/completion", "/completions"])
@pytest.mark.parametrize("stream", [False, True])
def test_completion_refuses_a_vllm_model(url: str, path: str, stream: bool) -> None:
    body = {"model": HF, "prompt": "hello", "n_predict": 4, "stream": stream}
    _assert_unsupported(_post(url, path, body, 400), "/completion")


def test_infill_refuses_a_vllm_model(url: str) -> None:
    body = {"model": HF, "input_prefix": "def f(", "input_suffix": "):", "n_predict": 4}
    _assert_unsupported(_post(url, "/infill", body, 400), "/infill")


def test_gguf_model_beside_it_is_unaffected(url: str) -> None:
    tokens = _post(url, "/tokenize", {"model": GGUF, "content": "hi", "add_special": True})
    assert tokens["tokens"][0] == BOS_TOKEN_ID
    # Past the vLLM check: the request meets the model's own limits (no worker runs it).
    too_long = {"prompt": "hello", "n_predict": 1000}
    error = _post(url, "/completion", {"model": GGUF, **too_long}, 400)
    assert error["code"] == "context_length_exceeded"
    infill = {"input_prefix": "a", "input_suffix": "b", "n_predict": 1000}
    error = _post(url, "/infill", {"model": GGUF, **infill}, 400)
    assert error["code"] == "context_length_exceeded"
    # The same limit on the vLLM model is not reached: the vLLM refusal comes first.
    _assert_unsupported(_post(url, "/completion", {"model": HF, **too_long}, 400), "/completion")


def test_missing_tokenizer_is_a_503(url: str) -> None:
    error = _post(url, "/tokenize", {"model": BARE, "content": "hello"}, 503)
    assert error["code"] == "vocab_unavailable"
    assert f"model '{BARE}'" in error["message"] and "tokenizer.json" in error["message"]
    error = _post(url, "/detokenize", {"model": BARE, "tokens": [1]}, 503)
    assert error["code"] == "vocab_unavailable"


def test_a_model_without_config_is_let_through() -> None:
    # Known only from a live worker: its worker answers for what it serves.
    require_llama_cpp(None, "remote", "/completion", "POST /v1/completions")
