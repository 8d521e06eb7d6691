from __future__ import annotations

from pathlib import Path

from inferq.demo import FILE, GEMMA_CHAT, NAME, _yaml
from schemas.registry import load_registry


def test_demo_config_loads_with_gemma_chat_template(tmp_path: Path) -> None:
    (tmp_path / FILE).write_bytes(b"GGUF")
    (tmp_path / f"{NAME}.yaml").write_text(_yaml())
    registry = load_registry(tmp_path)
    assert registry.errors == []
    config = registry.models[NAME]
    # The GGUF has no chat template: the config must carry Gemma's, verbatim.
    assert config.template.chat == GEMMA_CHAT
    assert config.parameters.max_tokens == 256
    assert config.model_path(tmp_path) == tmp_path / FILE


def test_demo_embedding_config(tmp_path: Path) -> None:
    from inferq.demo import EMBED_FILE, EMBED_NAME, EMBED_YAML

    (tmp_path / EMBED_FILE).write_bytes(b"GGUF")
    (tmp_path / f"{EMBED_NAME}.yaml").write_text(EMBED_YAML)
    registry = load_registry(tmp_path)
    assert registry.errors == []
    config = registry.models[EMBED_NAME]
    assert config.embeddings and config.reranking and config.pooling == "mean"
    assert not config.generates
