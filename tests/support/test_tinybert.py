"""Check the tiny BERT models from ``tests.support.tinybert`` with llama.cpp's low-level API.

These pin down what the embeddings and rerank code relies on: the files load
as non-causal ``bert`` models with a WordPiece vocabulary, pooled output has
the model's width (one float for the reranker), and an input's pooled output
does not depend on what else shares its batch.
"""

from __future__ import annotations

import contextlib
import ctypes
import pathlib
from collections.abc import Iterator, Sequence

import llama_cpp
import numpy as np
import numpy.typing as npt
import pytest

from tests.support.llamacpp import Loaded, quiet_backend
from tests.support.llamacpp import load as load_model
from tests.support.llamacpp import tokenize as tokenize_text
from tests.support.tinybert import (
    BERT_CLS_TOKEN_ID,
    BERT_N_EMBD,
    BERT_SEP_TOKEN_ID,
    BERT_UNK_TOKEN_ID,
)
from tests.support.tinymodel import write_tiny_bert, write_tiny_reranker

quiet_backend()

# A non-causal model cannot split a batch into micro-batches (every token
# attends to its whole sequence), so n_ubatch must cover the largest batch;
# n_seq_max bounds the distinct sequence ids in one batch.
N_BATCH = 512
N_SEQ_MAX = 8

TEXTS = (
    "the cat sat on the mat.",
    "Walking dogs in the rain!",
    "python code for a search server",
    "the cat sat on the mat",
    "music",
    "a zebra ate an apple",
)

Vector = npt.NDArray[np.float32]


@contextlib.contextmanager
def load(path: pathlib.Path) -> Iterator[Loaded]:
    # pooling_type stays LLAMA_POOLING_TYPE_UNSPECIFIED: the model's own.
    with load_model(
        path,
        n_ctx=N_BATCH,
        n_batch=N_BATCH,
        n_ubatch=N_BATCH,
        n_seq_max=N_SEQ_MAX,
        embeddings=True,
    ) as lm:
        yield lm


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    with load(write_tiny_bert(tmp_path_factory.mktemp("bert") / "bert.gguf")) as lm:
        yield lm


@pytest.fixture(scope="module")
def reranker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    with load(write_tiny_reranker(tmp_path_factory.mktemp("rerank") / "rerank.gguf")) as lm:
        yield lm


def tokenize(lm: Loaded, text: str, *, add_special: bool = True) -> list[int]:
    return tokenize_text(lm.vocab, text, add_special=add_special, parse_special=False)


def pooled(lm: Loaded, inputs: Sequence[list[int]]) -> list[Vector]:
    """Decode all inputs in one batch, input i as sequence i (positions from
    0 each), and return each sequence's pooled output."""
    n_tokens = sum(len(tokens) for tokens in inputs)
    assert n_tokens <= N_BATCH and len(inputs) <= N_SEQ_MAX
    batch = llama_cpp.llama_batch_init(n_tokens, 0, 1)
    try:
        k = 0
        for seq, tokens in enumerate(inputs):
            for pos, token in enumerate(tokens):
                batch.token[k] = token
                batch.pos[k] = pos
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = seq
                # Pooling needs every token's output.
                batch.logits[k] = True
                k += 1
        batch.n_tokens = n_tokens
        # A BERT context has no KV cache; llama_decode hands the batch to
        # the encoder.
        rc = llama_cpp.llama_decode(lm.ctx, batch)
        assert rc == 0, f"llama_decode returned {rc}"
    finally:
        llama_cpp.llama_batch_free(batch)
    if llama_cpp.llama_pooling_type(lm.ctx) == llama_cpp.LLAMA_POOLING_TYPE_RANK:
        width = llama_cpp.llama_model_n_cls_out(lm.model)
    else:
        width = llama_cpp.llama_model_n_embd(lm.model)
    out: list[Vector] = []
    for seq in range(len(inputs)):
        ptr = llama_cpp.llama_get_embeddings_seq(lm.ctx, seq)
        assert ptr, f"no pooled output for sequence {seq}"
        out.append(np.ctypeslib.as_array(ptr, shape=(width,)).astype(np.float32))
    return out


def cosine(a: Vector, b: Vector) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def pair_tokens(lm: Loaded, query: str, document: str) -> list[int]:
    """Hugging Face's sentence-pair layout, [CLS] query [SEP] document [SEP]
    (what llama-server builds for this vocabulary's special-token flags)."""
    return tokenize(lm, query) + tokenize(lm, document, add_special=False) + [BERT_SEP_TOKEN_ID]


def test_files_are_small_and_deterministic(tmp_path: pathlib.Path) -> None:
    a = write_tiny_bert(tmp_path / "a.gguf")
    assert a.stat().st_size < 1_000_000
    assert a.read_bytes() == write_tiny_bert(tmp_path / "b.gguf").read_bytes()
    assert a.read_bytes() != write_tiny_bert(tmp_path / "c.gguf", seed=1).read_bytes()
    r = write_tiny_reranker(tmp_path / "r.gguf")
    assert r.stat().st_size < 1_000_000
    assert r.read_bytes() == write_tiny_reranker(tmp_path / "s.gguf").read_bytes()


def _meta(lm: Loaded, key: str) -> str:
    buf = ctypes.create_string_buffer(128)
    n = llama_cpp.llama_model_meta_val_str(lm.model, key.encode(), buf, len(buf))
    assert n > 0, key
    return buf.value.decode()


def test_loads_as_non_causal_bert(bert: Loaded, reranker: Loaded) -> None:
    for lm in (bert, reranker):
        assert _meta(lm, "general.architecture") == "bert"
        assert llama_cpp.llama_vocab_type(lm.vocab) == llama_cpp.LLAMA_VOCAB_TYPE_WPM
        assert llama_cpp.llama_model_n_embd(lm.model) == BERT_N_EMBD
        assert llama_cpp.llama_model_has_encoder(lm.model) is False
        assert llama_cpp.llama_vocab_bos(lm.vocab) == BERT_CLS_TOKEN_ID
        assert llama_cpp.llama_vocab_sep(lm.vocab) == BERT_SEP_TOKEN_ID
    assert llama_cpp.llama_pooling_type(bert.ctx) == llama_cpp.LLAMA_POOLING_TYPE_MEAN
    assert llama_cpp.llama_pooling_type(reranker.ctx) == llama_cpp.LLAMA_POOLING_TYPE_RANK
    assert llama_cpp.llama_model_n_cls_out(reranker.model) == 1


def test_wordpiece_tokenization(bert: Loaded) -> None:
    tokens = tokenize(bert, "Walking dogs!")
    assert tokens[0] == BERT_CLS_TOKEN_ID and tokens[-1] == BERT_SEP_TOKEN_ID
    texts = [llama_cpp.llama_vocab_get_text(bert.vocab, t).decode() for t in tokens[1:-1]]
    # Lower-cased, split into word pieces, punctuation a word of its own.
    assert texts == ["\u2581walk", "ing", "\u2581dog", "s", "\u2581!"]
    # Unknown ASCII words fall back to letters; a word with no piece at all
    # (CJK here) becomes one [UNK].
    assert BERT_UNK_TOKEN_ID not in tokenize(bert, "zebra")
    assert tokenize(bert, "\u65e5", add_special=False) == [BERT_UNK_TOKEN_ID]


def test_embedding_width(bert: Loaded) -> None:
    [vector] = pooled(bert, [tokenize(bert, TEXTS[0])])
    assert vector.shape == (BERT_N_EMBD,)
    assert np.all(np.isfinite(vector)) and np.linalg.norm(vector) > 0


def test_packed_inputs_match_inputs_decoded_alone(bert: Loaded) -> None:
    inputs = [tokenize(bert, t) for t in TEXTS]
    alone = [pooled(bert, [tokens])[0] for tokens in inputs]
    packed = pooled(bert, inputs)
    backwards = pooled(bert, inputs[::-1])[::-1]
    for a, p, b in zip(alone, packed, backwards, strict=True):
        assert cosine(a, p) > 0.9999 and cosine(a, b) > 0.9999
        np.testing.assert_allclose(p, a, rtol=1e-4, atol=1e-4)


def test_different_texts_give_different_embeddings(bert: Loaded) -> None:
    vectors = pooled(bert, [tokenize(bert, t) for t in TEXTS])
    for i in range(len(vectors)):
        for j in range(i + 1, len(vectors)):
            assert cosine(vectors[i], vectors[j]) < 0.99, (TEXTS[i], TEXTS[j])


def test_cls_pooling(tmp_path: pathlib.Path) -> None:
    with load(write_tiny_bert(tmp_path / "cls.gguf", pooling="cls")) as lm:
        assert llama_cpp.llama_pooling_type(lm.ctx) == llama_cpp.LLAMA_POOLING_TYPE_CLS
        inputs = [tokenize(lm, t) for t in TEXTS]
        cls = pooled(lm, inputs)
        for tokens, vector in zip(inputs, cls, strict=True):
            assert cosine(pooled(lm, [tokens])[0], vector) > 0.9999
    with load(write_tiny_bert(tmp_path / "mean.gguf")) as lm:
        mean = pooled(lm, inputs)
    # Same weights (same seed), different pooling.
    for c, m in zip(cls, mean, strict=True):
        assert c.shape == m.shape == (BERT_N_EMBD,) and cosine(c, m) < 0.99


def test_reranker_scores_each_pair(reranker: Loaded) -> None:
    query = "what do cats eat"
    documents = ["cats eat fish and milk", "the train is slow", "python is a language", "hello"]
    pairs = [pair_tokens(reranker, query, d) for d in documents]
    assert all(p.count(BERT_CLS_TOKEN_ID) == 1 and p.count(BERT_SEP_TOKEN_ID) == 2 for p in pairs)
    scores = pooled(reranker, pairs)
    assert all(s.shape == (1,) and np.isfinite(s[0]) for s in scores)
    values = [float(s[0]) for s in scores]
    assert len({round(v, 4) for v in values}) == len(values)
    # Packing does not change a pair's score either.
    for pair, value in zip(pairs, values, strict=True):
        [alone] = pooled(reranker, [pair])
        assert abs(float(alone[0]) - value) < 1e-4
    # The score depends on the query too, not only the document.
    [other] = pooled(reranker, [pair_tokens(reranker, "music", documents[0])])
    assert abs(float(other[0]) - values[0]) > 1e-3
