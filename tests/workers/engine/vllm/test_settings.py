"""A `backend: vllm` model's YAML as vLLM's engine arguments, and what the
worker refuses before vLLM sees a request. Plain functions: no vLLM here."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.jobs import BeamOptions, GenerateJob
from schemas.registry import load_registry
from schemas.sampling import SamplingOptions
from workers.engine.options import SamplingError
from workers.engine.vllm.options import check_supported, structured_output
from workers.engine.vllm.settings import engine_kwargs


def _registry(tmp_path: Path, text: str) -> tuple[Path, dict[str, object]]:
    (tmp_path / "weights").mkdir()
    (tmp_path / "m.yaml").write_text(text)
    registry = load_registry(tmp_path)
    return tmp_path, {"errors": registry.errors, "models": registry.models}


def test_vllm_settings_at_the_top_level_and_max_model_len(tmp_path: Path) -> None:
    root, loaded = _registry(
        tmp_path,
        "name: m\nbackend: vllm\nparameters:\n  model: weights\nmax_model_len: 4096\n"
        "parallel: 3\nbulk_parallel: 5\ngpu_memory_utilization: 0.5\ndtype: bfloat16\n"
        "tensor_parallel_size: 2\nquantization: awq\n",
    )
    assert loaded["errors"] == []
    config = loaded["models"]["m"]  # type: ignore[index]
    kwargs = engine_kwargs(config, config.model_path(root), cpu=False)
    assert kwargs["model"] == str(root / "weights")
    assert kwargs["max_model_len"] == 4096
    assert kwargs["max_num_seqs"] == 8
    assert (kwargs["gpu_memory_utilization"], kwargs["dtype"]) == (0.5, "bfloat16")
    assert (kwargs["tensor_parallel_size"], kwargs["quantization"]) == (2, "awq")
    assert kwargs["scheduling_policy"] == "priority"
    assert kwargs["enforce_eager"] is False
    assert "swap_space" not in kwargs
    assert engine_kwargs(config, root, cpu=True)["enforce_eager"] is True


def test_pooling_models_and_their_context(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "e.yaml").write_text(
        "name: e\nbackend: vllm\nparameters:\n  model: weights\nembeddings: true\n"
    )
    (tmp_path / "r.yaml").write_text(
        "name: r\nbackend: vllm\nparameters:\n  model: weights\nreranking: true\n"
        "context_size: 512\n"
    )
    models = load_registry(tmp_path).models
    embed = engine_kwargs(models["e"], tmp_path, cpu=True)
    rerank = engine_kwargs(models["r"], tmp_path, cpu=True)
    assert (embed["runner"], embed["convert"]) == ("pooling", "embed")
    assert (rerank["runner"], rerank["convert"]) == ("pooling", "classify")
    # An embedding model keeps its own context unless the YAML sets one.
    assert "max_model_len" not in embed and rerank["max_model_len"] == 512
    assert not models["e"].generates and models["r"].cross_encoder


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("backend: vllm\nparameters:\n  model: missing\n", "not found"),
        ("parameters:\n  model: w.gguf\ndtype: float16\n", "for a model with `backend: vllm`"),
        (
            "backend: vllm\nparameters:\n  model: weights\nmax_model_len: 10\ncontext_size: 20\n",
            "give one",
        ),
        ("backend: vllm\nparameters:\n  model: weights\ngpu_memory_utilization: 2\n", "1"),
    ],
)
def test_bad_vllm_configs_are_reported(tmp_path: Path, text: str, error: str) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "w.gguf").write_bytes(b"GGUF")
    (tmp_path / "bad.yaml").write_text("name: bad\n" + text)
    registry = load_registry(tmp_path)
    assert "bad" not in registry.models
    assert any(error in e and "bad.yaml" in e for e in registry.errors), registry.errors


def _job(**sampling: object) -> GenerateJob:
    return GenerateJob(
        request_id="r",
        model="m",
        endpoint="completions",
        prompt="hi",
        sampling=SamplingOptions.model_validate(sampling),
    )


@pytest.mark.parametrize(
    ("sampling", "param"),
    [
        ({"typical_p": 0.5}, "typical_p"),
        ({"mirostat": 2}, "mirostat"),
        ({"min_keep": 3}, "min_keep"),
        ({"repeat_penalty": 1.1, "repeat_last_n": 64}, "repeat_last_n"),
        ({"samplers": ["top_k", "temperature"]}, "samplers"),
    ],
)
def test_what_vllm_cannot_honour_is_refused(sampling: dict[str, object], param: str) -> None:
    with pytest.raises(SamplingError) as caught:
        check_supported(_job(**sampling))
    assert (caught.value.param, caught.value.code) == (param, "unsupported_parameter")


def test_what_vllm_honours_passes() -> None:
    check_supported(_job(typical_p=1.0, mirostat=0, repeat_penalty=1.1, repeat_last_n=-1))
    check_supported(_job(repeat_penalty=1.0, repeat_last_n=64))
    beam = _job().model_copy(update={"beam": BeamOptions(width=2, early_stopping="never")})
    check_supported(beam)
    eager = _job().model_copy(update={"beam": BeamOptions(width=2, early_stopping=True)})
    with pytest.raises(SamplingError):
        check_supported(eager)


def test_llama_endpoints_and_slots_are_refused() -> None:
    native = GenerateJob(request_id="r", model="m", endpoint="llama.completion", prompt="x")
    with pytest.raises(SamplingError) as caught:
        check_supported(native)
    assert caught.value.code == "unsupported_model"
    with pytest.raises(SamplingError) as caught:
        check_supported(_job().model_copy(update={"id_slot": 0}))
    assert caught.value.param == "id_slot"


def test_structured_output_schema_grammar_and_tools() -> None:
    assert structured_output(_job()) == (None, None)
    schema, grammar = structured_output(_job(json_schema={"type": "integer"}))
    assert schema == '{"type": "integer"}' and grammar is None
    assert structured_output(_job(json_schema={})) == ('{"type": "object"}', None)
    assert structured_output(_job(grammar='root ::= "a"')) == (None, 'root ::= "a"')
    with pytest.raises(SamplingError):
        structured_output(_job(grammar='root ::= "a"', json_schema={}))
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    required = _job().model_copy(update={"tools": [tool], "tool_mode": "required"})
    schema, grammar = structured_output(required)
    assert grammar is None and schema is not None and '"const": "f"' in schema
