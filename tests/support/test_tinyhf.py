"""Check the tiny Hugging Face models that ``tests.support.tinyhf`` writes for vLLM.

The writer needs torch and transformers, which only the vLLM environment has,
so it runs there as a subprocess; these checks read the files from the main
environment (JSON and safetensors headers only) and start no vLLM engine.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
from typing import Any

import pytest
from safetensors import safe_open

REPO = pathlib.Path(__file__).resolve().parents[2]
VLLM_PYTHON = pathlib.Path(
    os.environ.get("INFERQ_VLLM_PYTHON", str(REPO / ".venv-vllm" / "bin" / "python"))
)
# tinyhf's directory names; importing it here would need torch.
LLAMA_DIR = "tiny-llama-hf"
RERANKER_DIR = "tiny-reranker-hf"


def write_models(out: pathlib.Path) -> pathlib.Path:
    # A missing environment is a failure, not a skip: the vLLM tests would
    # otherwise silently stop running.
    if not VLLM_PYTHON.exists():
        pytest.fail(
            f"the vLLM environment's Python {VLLM_PYTHON} does not exist; create it with "
            "`./run vllm` (or point INFERQ_VLLM_PYTHON at one)",
            pytrace=False,
        )
    proc = subprocess.run(
        [str(VLLM_PYTHON), "-m", "tests.support.tinyhf", str(out)],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_models(tmp_path_factory.mktemp("tinyhf"))


def read_json(path: pathlib.Path) -> Any:
    return json.loads(path.read_text())


def tokenizer_size(model_dir: pathlib.Path) -> int:
    """Ids the tokenizer can produce: the BPE vocabulary plus added tokens."""
    tok = read_json(model_dir / "tokenizer.json")
    ids = set(tok["model"]["vocab"].values()) | {t["id"] for t in tok["added_tokens"]}
    assert ids == set(range(len(ids))), "token ids are not contiguous"
    return len(ids)


def token_id(model_dir: pathlib.Path, token: str) -> int:
    tok = read_json(model_dir / "tokenizer.json")
    [found] = [t["id"] for t in tok["added_tokens"] if t["content"] == token]
    assert isinstance(found, int)
    return found


def shapes(model_dir: pathlib.Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(model_dir / "model.safetensors"), "np") as f:
        names = f.keys()  # a safe_open handle is not iterable
        return {name: tuple(f.get_slice(name).get_shape()) for name in names}


def test_llama_matches_its_tokenizer(models: pathlib.Path) -> None:
    d = models / LLAMA_DIR
    config = read_json(d / "config.json")
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == tokenizer_size(d)
    # vLLM's CPU attention needs a head size that is a multiple of 32.
    assert config["head_dim"] % 32 == 0
    assert config["head_dim"] * config["num_attention_heads"] == config["hidden_size"]
    assert config["max_position_embeddings"] >= 2048
    assert shapes(d)["model.embed_tokens.weight"] == (config["vocab_size"], config["hidden_size"])
    assert shapes(d)["lm_head.weight"] == (config["vocab_size"], config["hidden_size"])
    bos, eos = token_id(d, "<s>"), token_id(d, "</s>")
    generation = read_json(d / "generation_config.json")
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (bos, eos)
    assert (config["bos_token_id"], config["eos_token_id"]) == (bos, eos)


def test_llama_tokenizer_adds_bos_and_has_a_chat_template(models: pathlib.Path) -> None:
    d = models / LLAMA_DIR
    post = read_json(d / "tokenizer.json")["post_processor"]
    assert post["type"] == "TemplateProcessing"
    assert post["single"][0] == {"SpecialToken": {"id": "<s>", "type_id": 0}}
    tok_config = read_json(d / "tokenizer_config.json")
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<s>", "</s>")
    assert "add_generation_prompt" in tok_config["chat_template"]


def test_reranker_is_a_one_label_cross_encoder(models: pathlib.Path) -> None:
    d = models / RERANKER_DIR
    config = read_json(d / "config.json")
    assert config["architectures"] == ["BertForSequenceClassification"]
    # transformers stores num_labels as id2label.
    assert len(config["id2label"]) == 1
    assert config["vocab_size"] == tokenizer_size(d)
    assert (config["hidden_size"] // config["num_attention_heads"]) % 32 == 0
    assert config["type_vocab_size"] == 2
    assert shapes(d)["classifier.weight"] == (1, config["hidden_size"])
    # [CLS] query [SEP] document [SEP], the document's segment as type 1.
    pair = read_json(d / "tokenizer.json")["post_processor"]["pair"]
    assert [next(iter(p.values()))["type_id"] for p in pair] == [0, 0, 0, 1, 1]
    assert "token_type_ids" in read_json(d / "tokenizer_config.json")["model_input_names"]


def test_two_runs_write_identical_files(models: pathlib.Path, tmp_path: pathlib.Path) -> None:
    again = write_models(tmp_path)
    for name in (LLAMA_DIR, RERANKER_DIR):
        files = sorted(p.name for p in (models / name).iterdir())
        assert "model.safetensors" in files
        assert files == sorted(p.name for p in (again / name).iterdir())
        for f in files:
            assert (models / name / f).read_bytes() == (again / name / f).read_bytes(), f
        # A few hundred kB: cheap to write per test session.
        assert (models / name / "model.safetensors").stat().st_size < 2_000_000
