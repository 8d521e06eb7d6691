"""The embedding engine on real llama.cpp (tiny random BERT models)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.tinybert import write_tiny_bert, write_tiny_reranker
from workers.embed import InputError, _fit
from workers.engine.llama.embedding import EmbeddingEngine, EmbedRequest, cosine

TEXTS = ["hello world", "the cat sat", "a big dog ran far away", "one two three", "we go"]


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddingEngine]:
    path = write_tiny_bert(tmp_path_factory.mktemp("bert") / "bert.gguf")
    engine = EmbeddingEngine(path, pooling="mean", n_batch=512, n_seq=16, n_threads=1)
    yield engine
    engine.close()


def _embed(engine: EmbeddingEngine, texts: list[str]) -> list[list[float]]:
    request = EmbedRequest([engine.tokenize(t) for t in texts])
    engine.submit(request)
    assert request.wait(30) and request.error is None
    return request.vectors


def test_vectors_are_normalised_and_distinct(embedder: EmbeddingEngine) -> None:
    vectors = _embed(embedder, TEXTS)
    assert len(vectors) == len(TEXTS) and all(len(v) == embedder.n_out for v in vectors)
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-5) for v in vectors)
    assert cosine(vectors[0], vectors[1]) < 0.9999


def test_packed_inputs_match_inputs_embedded_alone(embedder: EmbeddingEngine) -> None:
    packed = _embed(embedder, TEXTS)
    for text, vector in zip(TEXTS, packed, strict=True):
        [alone] = _embed(embedder, [text])
        assert cosine(alone, vector) > 0.9999


def test_requests_are_packed_into_shared_decodes(embedder: EmbeddingEngine) -> None:
    before = embedder.stats.decodes
    requests = [EmbedRequest([embedder.tokenize(t) for t in TEXTS]) for _ in range(3)]
    for request in requests:
        embedder.submit(request)
    for request in requests:
        assert request.wait(30) and request.error is None
    # 15 inputs from 3 requests: at most 2 decodes (the first may start alone).
    assert embedder.stats.decodes - before <= 2


def test_over_long_input_is_rejected_or_truncated(embedder: EmbeddingEngine) -> None:
    tokens = embedder.tokenize(" ".join(["hello"] * 600))
    assert len(tokens) > embedder.max_input_tokens
    with pytest.raises(InputError, match="truncate"):
        _fit(tokens, embedder.max_input_tokens, False, "input")
    cut = _fit(tokens, embedder.max_input_tokens, True, "input")
    assert len(cut) == embedder.max_input_tokens and cut[-1] == tokens[-1]
    with pytest.raises(ValueError):
        embedder.submit(EmbedRequest([tokens]))


def test_inputs_never_outrun_the_trained_context(tmp_path: Path) -> None:
    # A packing budget above BERT's 512 positions must not let a 600-token
    # input through: llama.cpp would abort the whole worker on it.
    engine = EmbeddingEngine(
        write_tiny_bert(tmp_path / "bert.gguf"), pooling="mean", n_batch=1024, n_threads=1
    )
    try:
        assert engine.max_input_tokens == 512
        long = engine.tokenize(" ".join(["hello"] * 600))
        with pytest.raises(ValueError, match="1 to 512"):
            engine.submit(EmbedRequest([long]))
        # Inputs together above the budget are split over decodes, not refused.
        request = EmbedRequest([long[:500], long[:500], long[:500]])
        engine.submit(request)
        assert request.wait(30) and request.error is None and len(request.vectors) == 3
    finally:
        engine.close()


def test_reranker_scores_each_pair(tmp_path: Path) -> None:
    engine = EmbeddingEngine(
        write_tiny_reranker(tmp_path / "rerank.gguf"),
        pooling="rank",
        n_batch=512,
        n_seq=8,
        n_threads=1,
    )
    try:
        assert engine.rank and engine.n_out >= 1
        pairs = [engine.pair_tokens("hello world", d) for d in TEXTS]
        assert all(p.count(pairs[0][0]) == 1 for p in pairs)  # one [CLS]
        request = EmbedRequest(pairs, normalize=False)
        engine.submit(request)
        assert request.wait(30) and request.error is None
        scores = [v[0] for v in request.vectors]
        assert len(set(scores)) == len(scores)
        again = EmbedRequest(pairs[:1], normalize=False)
        engine.submit(again)
        assert again.wait(30)
        assert math.isclose(again.vectors[0][0], scores[0], rel_tol=1e-4, abs_tol=1e-5)
    finally:
        engine.close()
