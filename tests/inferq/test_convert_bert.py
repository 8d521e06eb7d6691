"""all-MiniLM-L6-v2 converted to GGUF and served by the embedding engine."""

from __future__ import annotations

from pathlib import Path

from inferq.convert_bert import convert_minilm
from workers.engine.llama.embedding import EmbeddingEngine, EmbedRequest, cosine


def test_converted_minilm_embeds_meaningfully(tmp_path: Path) -> None:
    path = convert_minilm(tmp_path / "minilm.gguf", ftype="f16")
    engine = EmbeddingEngine(path, pooling=None, n_batch=512, n_seq=8, n_threads=2)
    try:
        texts = [
            "A man is playing a guitar.",
            "Someone plays the guitar.",
            "The stock market fell sharply today.",
        ]
        # WordPiece with [CLS] ... [SEP]: the ids of the bert-base vocabulary.
        assert engine.tokenize("hello world") == [101, 7592, 2088, 102]
        request = EmbedRequest([engine.tokenize(t) for t in texts])
        engine.submit(request)
        assert request.wait(60) and request.error is None
        guitar, guitar_too, market = request.vectors
        assert len(guitar) == 384
        # Paraphrases are close; an unrelated sentence is not.
        assert cosine(guitar, guitar_too) > 0.6
        assert cosine(guitar, guitar_too) > cosine(guitar, market) + 0.3
    finally:
        engine.close()
