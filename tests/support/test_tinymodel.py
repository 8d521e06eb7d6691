"""Check the tiny GGUF model from ``tests.support.tinymodel`` with llama.cpp's low-level API.

These tests pin down the properties the rest of the suite relies on: the file
loads, English tokenizes into word pieces, the chat template round-trips
through metadata, and greedy decoding is deterministic, readable and never
stops early on an end-of-generation token.
"""

from __future__ import annotations

import ctypes
import pathlib
from collections.abc import Iterator

import llama_cpp
import pytest

from tests.support.llamacpp import Loaded, load, quiet_backend, tokenize
from tests.support.tinymodel import (
    BOS_TOKEN_ID,
    CHAT_TEMPLATE,
    EOS_TOKEN_ID,
    IM_END_TOKEN,
    IM_END_TOKEN_ID,
    IM_START_TOKEN,
    write_tiny_llama,
)

quiet_backend()

N_GENERATE = 32


@pytest.fixture
def tiny_model_path(tmp_path: pathlib.Path) -> pathlib.Path:
    return write_tiny_llama(tmp_path / "tiny.gguf")


@pytest.fixture
def loaded(tiny_model_path: pathlib.Path) -> Iterator[Loaded]:
    with load(tiny_model_path, n_ctx=512, n_batch=512) as lm:
        yield lm


def piece(vocab: llama_cpp.llama_vocab_p, token: int) -> bytes:
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    assert n >= 0
    return buf.raw[:n]


def detokenize(vocab: llama_cpp.llama_vocab_p, tokens: list[int]) -> bytes:
    arr = (llama_cpp.llama_token * len(tokens))(*tokens)
    buf = ctypes.create_string_buffer(16 * len(tokens) + 16)
    n = llama_cpp.llama_detokenize(vocab, arr, len(tokens), buf, len(buf), True, False)
    assert n >= 0
    return buf.raw[:n]


def generate(
    lm: Loaded, prompt: str, sampler: llama_cpp.llama_sampler_p, n: int = N_GENERATE
) -> list[int]:
    """Decode ``prompt`` then sample ``n`` tokens, one llama_decode per token."""
    memory = llama_cpp.llama_get_memory(lm.ctx)
    llama_cpp.llama_memory_clear(memory, True)
    prompt_tokens = tokenize(lm.vocab, prompt)
    batch = llama_cpp.llama_batch_init(len(prompt_tokens), 0, 1)
    try:

        def submit(tokens: list[int], start: int) -> None:
            batch.n_tokens = len(tokens)
            for i, tok in enumerate(tokens):
                batch.token[i] = tok
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                # Only the last position's logits are needed for sampling.
                batch.logits[i] = i == len(tokens) - 1
            rc = llama_cpp.llama_decode(lm.ctx, batch)
            assert rc == 0, f"llama_decode returned {rc}"

        submit(prompt_tokens, 0)
        out: list[int] = []
        for step in range(n):
            tok = llama_cpp.llama_sampler_sample(sampler, lm.ctx, -1)
            out.append(tok)
            submit([tok], len(prompt_tokens) + step)
        return out
    finally:
        llama_cpp.llama_batch_free(batch)


def greedy(lm: Loaded, prompt: str) -> list[int]:
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    try:
        return generate(lm, prompt, chain)
    finally:
        llama_cpp.llama_sampler_free(chain)  # also frees the samplers in the chain


def sample(lm: Loaded, prompt: str, seed: int) -> list[int]:
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(1.0))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
    try:
        return generate(lm, prompt, chain)
    finally:
        llama_cpp.llama_sampler_free(chain)


def chatml(user: str) -> str:
    return f"{IM_START_TOKEN}user\n{user}{IM_END_TOKEN}\n{IM_START_TOKEN}assistant\n"


def test_file_is_small_and_deterministic(tmp_path: pathlib.Path) -> None:
    a = write_tiny_llama(tmp_path / "a.gguf")
    b = write_tiny_llama(tmp_path / "b.gguf")
    c = write_tiny_llama(tmp_path / "c.gguf", seed=1)
    assert a.stat().st_size < 1_000_000
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_loads_as_llama(loaded: Loaded) -> None:
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_model_meta_val_str(loaded.model, b"general.architecture", buf, len(buf))
    assert n > 0 and buf.value == b"llama"
    assert llama_cpp.llama_vocab_type(loaded.vocab) == llama_cpp.LLAMA_VOCAB_TYPE_SPM
    assert llama_cpp.llama_model_n_embd(loaded.model) == 64
    assert llama_cpp.llama_model_n_layer(loaded.model) == 2
    assert llama_cpp.llama_model_n_head(loaded.model) == 4
    assert llama_cpp.llama_model_n_ctx_train(loaded.model) == 4096
    assert llama_cpp.llama_vocab_bos(loaded.vocab) == BOS_TOKEN_ID
    assert llama_cpp.llama_vocab_eos(loaded.vocab) == EOS_TOKEN_ID
    assert llama_cpp.llama_vocab_eot(loaded.vocab) == IM_END_TOKEN_ID
    assert llama_cpp.llama_vocab_is_eog(loaded.vocab, EOS_TOKEN_ID)
    assert llama_cpp.llama_vocab_is_eog(loaded.vocab, IM_END_TOKEN_ID)


def test_tokenizes_english_into_word_pieces(loaded: Loaded) -> None:
    tokens = tokenize(loaded.vocab, "Hello world")
    assert tokens[0] == BOS_TOKEN_ID
    # One SentencePiece word piece per word; the piece renders "\u2581" as a space.
    assert [llama_cpp.llama_vocab_get_text(loaded.vocab, t) for t in tokens[1:]] == [
        "\u2581Hello".encode(),
        "\u2581world".encode(),
    ]
    assert [piece(loaded.vocab, t) for t in tokens[1:]] == [b" Hello", b" world"]
    assert [llama_cpp.llama_vocab_get_attr(loaded.vocab, t) for t in tokens[1:]] == [
        llama_cpp.LLAMA_TOKEN_ATTR_NORMAL
    ] * 2
    # llama.cpp drops SentencePiece's added leading space only when the text
    # does not start with BOS (as with real llama models), so round-trip
    # without it.
    text = detokenize(loaded.vocab, tokens[1:])
    assert text == b"Hello world"
    assert tokenize(loaded.vocab, text.decode()) == tokens


def test_other_text_falls_back_to_bytes(loaded: Loaded) -> None:
    text = "caf\u00e9 \u2603"
    tokens = tokenize(loaded.vocab, text, add_special=False)
    attrs = {llama_cpp.llama_vocab_get_attr(loaded.vocab, t) for t in tokens}
    assert llama_cpp.LLAMA_TOKEN_ATTR_BYTE in attrs
    assert detokenize(loaded.vocab, tokens).decode("utf-8") == text


def test_chatml_special_tokens_are_single_tokens(loaded: Loaded) -> None:
    tokens = tokenize(loaded.vocab, chatml("Hello world"), add_special=False)
    assert tokens.count(IM_END_TOKEN_ID) == 1
    assert piece(loaded.vocab, tokens[0]) == IM_START_TOKEN.encode()
    assert (
        llama_cpp.llama_vocab_get_attr(loaded.vocab, tokens[0]) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
    )


def test_chat_template_in_metadata(loaded: Loaded) -> None:
    key = b"tokenizer.chat_template"
    n = llama_cpp.llama_model_meta_val_str(loaded.model, key, None, 0)
    assert n > 0
    buf = ctypes.create_string_buffer(n + 1)
    assert llama_cpp.llama_model_meta_val_str(loaded.model, key, buf, len(buf)) == n
    assert buf.value.decode() == CHAT_TEMPLATE


def test_llama_cpp_renders_template_as_chatml(loaded: Loaded) -> None:
    msgs = (llama_cpp.llama_chat_message * 2)(
        llama_cpp.llama_chat_message(role=b"system", content=b"Be brief."),
        llama_cpp.llama_chat_message(role=b"user", content=b"Hello world"),
    )
    buf = ctypes.create_string_buffer(1024)
    n = llama_cpp.llama_chat_apply_template(
        CHAT_TEMPLATE.encode(), msgs, len(msgs), True, buf, len(buf)
    )
    assert 0 < n < len(buf)
    assert buf.raw[:n].decode() == (
        "<|im_start|>system\nBe brief.<|im_end|>\n" + chatml("Hello world")
    )


def test_greedy_generation_is_readable_varied_and_deterministic(loaded: Loaded) -> None:
    first = greedy(loaded, "Hello world")
    second = greedy(loaded, "Hello world")
    assert len(first) == N_GENERATE
    assert first == second
    assert not any(llama_cpp.llama_vocab_is_eog(loaded.vocab, t) for t in first)
    assert len(set(first)) >= 5
    text = detokenize(loaded.vocab, first)
    assert text.isascii()
    assert text.decode().strip()
    assert all(
        llama_cpp.llama_vocab_get_attr(loaded.vocab, t) == llama_cpp.LLAMA_TOKEN_ATTR_NORMAL
        for t in first
    )


def test_greedy_after_chat_prompt(loaded: Loaded) -> None:
    out = greedy(loaded, chatml("Hello world"))
    assert not any(llama_cpp.llama_vocab_is_eog(loaded.vocab, t) for t in out)
    assert len(set(out)) >= 5
    assert detokenize(loaded.vocab, out).isascii()
    # The random attention layers make the output depend on more than the
    # final "\n" of the generation prompt.
    assert out != greedy(loaded, chatml("What is the time"))


def test_sampling_depends_on_seed(loaded: Loaded) -> None:
    a = sample(loaded, "Hello world", seed=1)
    b = sample(loaded, "Hello world", seed=2)
    assert a != b
    assert a == sample(loaded, "Hello world", seed=1)
    assert not any(llama_cpp.llama_vocab_is_eog(loaded.vocab, t) for t in a + b)
