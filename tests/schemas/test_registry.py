from __future__ import annotations

from pathlib import Path

from schemas.registry import load_registry


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_yaml_config_fields(tmp_path: Path) -> None:
    (tmp_path / "w.gguf").write_bytes(b"GGUF")
    _write(
        tmp_path / "chat.yaml",
        """
name: my-chat
backend: llama-cpp
parameters:
  model: w.gguf
  temperature: 0.2
context_size: 1024
threads: 2
gpu_layers: 10
parallel: 3
f16: false
stopwords: ["<end>"]
template:
  chat: "{{ messages[0]['content'] }}"
  completion: "Q: {{ input }}"
""",
    )
    registry = load_registry(tmp_path)
    assert registry.errors == []
    config = registry.models["my-chat"]
    assert config.model_path(tmp_path) == tmp_path / "w.gguf"
    assert (config.context_size, config.threads, config.gpu_layers, config.parallel) == (
        1024,
        2,
        10,
        3,
    )
    assert config.f16 is False
    assert config.stopwords == ["<end>"]
    assert config.parameters.temperature == 0.2
    assert config.template.completion == "Q: {{ input }}"
    # The GGUF a YAML claims does not register a second time under its stem.
    assert set(registry.models) == {"my-chat"}


def test_bare_gguf_registers_under_its_stem(tmp_path: Path) -> None:
    (tmp_path / "tiny-model.gguf").write_bytes(b"GGUF")
    registry = load_registry(tmp_path)
    assert list(registry.models) == ["tiny-model"]
    assert registry.models["tiny-model"].parallel == 4


def test_broken_config_reports_file_and_field_and_others_load(tmp_path: Path) -> None:
    (tmp_path / "good.gguf").write_bytes(b"GGUF")
    _write(tmp_path / "good.yaml", "name: good\nparameters:\n  model: good.gguf\n")
    bad = _write(
        tmp_path / "bad.yaml",
        "name: bad\nparameters:\n  model: good.gguf\ncontext_size: lots\n",
    )
    missing = _write(tmp_path / "missing.yaml", "name: gone\nparameters:\n  model: nope.gguf\n")
    _write(tmp_path / "notyaml.yaml", "name: [unclosed\n")
    registry = load_registry(tmp_path)
    assert set(registry.models) == {"good"}
    assert any(str(bad) in e and "context_size" in e for e in registry.errors)
    assert any(str(missing) in e and "parameters.model" in e for e in registry.errors)
    assert any("notyaml.yaml" in e for e in registry.errors)


def test_single_model_takes_every_name_otherwise_unknown_is_none(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    one = load_registry(tmp_path)
    assert one.resolve("gpt-4o") is not None
    assert one.resolve(None) is not None
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    two = load_registry(tmp_path)
    assert two.resolve("gpt-4o") is None
    resolved = two.resolve("b")
    assert resolved is not None and resolved.name == "b"


def test_duplicate_names_are_reported(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    _write(tmp_path / "a.yaml", "name: same\nparameters: x.gguf\n")
    _write(tmp_path / "b.yaml", "name: same\nparameters: x.gguf\n")
    registry = load_registry(tmp_path)
    assert list(registry.models) == ["same"]
    assert any("already defined" in e for e in registry.errors)


def test_embedding_seqs_must_be_a_power_of_two(tmp_path: Path) -> None:
    (tmp_path / "e.gguf").write_bytes(b"GGUF")
    base = "parameters:\n  model: e.gguf\nembeddings: true\npooling: mean\n"
    _write(tmp_path / "twelve.yaml", f"name: twelve\n{base}embedding_seqs: 12\n")
    _write(tmp_path / "sixteen.yaml", f"name: sixteen\n{base}embedding_seqs: 16\n")
    registry = load_registry(tmp_path)
    assert set(registry.models) == {"sixteen"}
    assert any("twelve.yaml" in e and "power of two" in e for e in registry.errors)


def test_bulk_sequences_and_kv_cache_bounds(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    base = "parameters:\n  model: m.gguf\ncontext_size: 1024\n"
    _write(tmp_path / "default.yaml", f"name: default\n{base}parallel: 8\n")
    _write(
        tmp_path / "shared.yaml", f"name: shared\n{base}bulk_parallel: 16\nkv_cache_size: 4096\n"
    )
    _write(tmp_path / "wide.yaml", f"name: wide\n{base}parallel: 200\nbulk_parallel: 100\n")
    _write(tmp_path / "small.yaml", f"name: small\n{base}kv_cache_size: 512\n")
    registry = load_registry(tmp_path)
    assert set(registry.models) == {"default", "shared"}
    # One full context per interactive slot unless the cache size is given.
    assert registry.models["default"].kv_cells == 8 * 1024
    assert registry.models["shared"].kv_cells == 4096
    assert registry.models["shared"].bulk_parallel == 16
    assert any("wide.yaml" in e and "bulk_parallel" in e for e in registry.errors)
    assert any("small.yaml" in e and "kv_cache_size" in e for e in registry.errors)
