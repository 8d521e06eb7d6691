"""The model registry: LocalAI-style YAML files (and bare GGUF files) in the
models directory. Both the API (routing, /v1/models) and the workers (loading)
read it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

log = logging.getLogger(__name__)


class TemplateConfig(BaseModel):
    """Prompt templates, Jinja2. `chat` renders the whole conversation (HF
    style: `messages`, `add_generation_prompt`, `bos_token`, `eos_token`; when
    `chat_message` is set it also gets `input`, the rendered messages joined).
    `chat_message` renders one message (`role`, `content`). `completion`
    wraps a completion prompt (`input`). `use_tokenizer_template` uses the
    template stored in the GGUF."""

    model_config = ConfigDict(extra="forbid")

    chat: str | None = None
    chat_message: str | None = None
    completion: str | None = None
    use_tokenizer_template: bool = False


class Parameters(BaseModel):
    """`model` is the weights file, relative to the models directory; the
    other keys are per-model sampling defaults a request may override."""

    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None


# Defaults measured on the demo model (docs/benchmarks.md, issue 13).
BULK_PARALLEL = 32
PREFIX_CACHE_TOKENS = 4096
# llama.cpp holds at most 256 sequences in one context; PREFIX_ENTRIES of
# them hold the prefix cache's entries (workers.engine.llama.prefix_cache).
PREFIX_ENTRIES = 16
MAX_SEQUENCES = 256 - PREFIX_ENTRIES


class VllmOptions(BaseModel):
    """vLLM's engine settings under their vLLM names (a `backend: vllm`
    model's YAML sets them at its top level, as LocalAI does). None: vLLM's
    own default."""

    model_config = ConfigDict(extra="forbid")

    quantization: str | None = None
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    dtype: str = "auto"
    trust_remote_code: bool = False
    # CUDA graphs off: slower steps, faster start and less memory. vLLM's CPU
    # build runs eager whatever this says.
    enforce_eager: bool = False
    # GiB of CPU memory per GPU for preempted sequences (older vLLM releases).
    swap_space: float | None = Field(default=None, ge=0)


VLLM_FIELDS = frozenset(VllmOptions.model_fields)


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    backend: Literal["llama-cpp", "vllm"] = "llama-cpp"
    parameters: Parameters
    # Tokens of context per slot (every slot can hold a full context).
    context_size: int = Field(default=2048, ge=16)
    threads: int | None = Field(default=None, ge=1)
    gpu_layers: int = Field(default=0, ge=-1)
    parallel: int = Field(default=4, ge=1, le=MAX_SEQUENCES)
    # Sequences a worker runs for batch lines beside its `parallel`
    # interactive slots: bulk work wants the engine's best batch, not a slot
    # reserved for an interactive user (default measured, docs/benchmarks.md).
    bulk_parallel: int = Field(default=BULK_PARALLEL, ge=1, le=MAX_SEQUENCES)
    # Cells of the KV cache all sequences share (default: context_size x
    # parallel, one full context per slot); a request reserves its prompt
    # plus max_tokens of them, and waits until they are free.
    kv_cache_size: int | None = Field(default=None, ge=16)
    # Tokens of recent prompts kept for reuse by later ones (0: none). Every
    # cached cell is attended to, masked, in each decode: keep it modest.
    prefix_cache_tokens: int = Field(default=PREFIX_CACHE_TOKENS, ge=0)
    # How much slower an interactive token may become while bulk lines share
    # the engine's steps (the bulk share of each step shrinks to keep it).
    interactive_slowdown: float = Field(default=1.5, ge=1.0, le=100.0)
    f16: bool = True
    stopwords: list[str] = Field(default_factory=list)
    template: TemplateConfig = Field(default_factory=TemplateConfig)
    # What else the model serves: /v1/embeddings (embeddings) and /v1/rerank
    # (reranking: a cross-encoder with rank pooling scores query-document
    # pairs; an embedding model reranks by cosine similarity).
    embeddings: bool = False
    reranking: bool = False
    pooling: Literal["mean", "cls", "last", "rank"] | None = None
    # The token budget of one packed embedding decode (a longer input still
    # goes alone), the inputs it may hold, and the longest input accepted
    # (never more than the model's trained context).
    embedding_batch: int = Field(default=512, ge=16)
    embedding_seqs: int = Field(default=64, ge=1, le=256)
    embedding_max_tokens: int = Field(default=2048, ge=16)
    # Matryoshka models can be truncated to fewer `dimensions`.
    matryoshka: bool = False
    # The engine settings of `backend: vllm` (written at the top level).
    vllm: VllmOptions = Field(default_factory=VllmOptions)

    @model_validator(mode="before")
    @classmethod
    def _vllm_names(cls, raw: Any) -> Any:
        """vLLM's own spellings, as LocalAI's YAML writes them: its engine
        settings at the top level, and `max_model_len` for context_size."""
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        if "max_model_len" in raw:
            length = raw.pop("max_model_len")
            if "context_size" in raw and raw["context_size"] != length:
                raise ValueError("max_model_len and context_size name the same setting: give one")
            raw["context_size"] = length
        options = {name: raw.pop(name) for name in VLLM_FIELDS if name in raw}
        if options:
            if raw.get("backend") != "vllm":
                names = ", ".join(sorted(options))
                raise ValueError(f"{names}: vLLM settings, for a model with `backend: vllm`")
            raw["vllm"] = {**(raw.get("vllm") or {}), **options}
        return raw

    @field_validator("embedding_seqs")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        # llama.cpp 0c1e570's pooled encode aborts the process (a failed
        # ggml_can_mul_mat assertion) when n_seq_max is not a power of two.
        if value & (value - 1):
            raise ValueError("must be a power of two (1, 2, 4, ... 256)")
        return value

    @model_validator(mode="after")
    def _fits_the_cache(self) -> ModelConfig:
        if self.parallel + self.bulk_parallel > MAX_SEQUENCES:
            raise ValueError(
                f"parallel + bulk_parallel is {self.parallel + self.bulk_parallel}; "
                f"one worker runs at most {MAX_SEQUENCES} sequences"
            )
        if self.kv_cache_size is not None and self.kv_cache_size < self.context_size:
            raise ValueError(
                f"kv_cache_size ({self.kv_cache_size}) must hold at least one "
                f"context of context_size ({self.context_size}) tokens"
            )
        return self

    @property
    def kv_cells(self) -> int:
        return self.kv_cache_size or self.context_size * self.parallel

    @property
    def generates(self) -> bool:
        """A text-generation model (embedding/rerank-only models are not). A
        vLLM engine runs one task: a model that embeds or reranks is a
        pooling model there."""
        if self.backend == "vllm":
            return not (self.embeddings or self.reranking)
        return not (self.pooling == "rank" or (self.embeddings and self.pooling in ("mean", "cls")))

    @property
    def cross_encoder(self) -> bool:
        """Reranks by scoring (query, document) pairs: rank pooling with
        llama.cpp; with vLLM, a reranking model that does not embed (a
        sequence classifier with one label)."""
        if self.backend == "vllm":
            return self.reranking and not self.embeddings
        return self.pooling == "rank"

    # Where the config came from, for error messages; not part of the YAML.
    source: str = ""

    def model_path(self, models_dir: Path) -> Path:
        path = Path(self.parameters.model)
        return path if path.is_absolute() else models_dir / path


@dataclass
class Registry:
    models: dict[str, ModelConfig] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def resolve(self, name: str | None) -> ModelConfig | None:
        """The model a request names; with exactly one model every name routes
        to it, as LocalAI does."""
        if name is not None and name in self.models:
            return self.models[name]
        if len(self.models) == 1:
            return next(iter(self.models.values()))
        return None


def _format_error(source: Path, exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "(file)"
        out.append(f"{source}: field '{loc}': {err['msg']}")
    return out


def _load_yaml(path: Path) -> tuple[ModelConfig | None, list[str]]:
    try:
        raw: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        return None, [f"{path}: cannot read YAML: {exc}"]
    if not isinstance(raw, dict):
        return None, [f"{path}: expected a mapping of model settings"]
    raw.setdefault("name", path.stem)
    if isinstance(raw.get("parameters"), str):
        # `parameters: model.gguf` shorthand.
        raw["parameters"] = {"model": raw["parameters"]}
    try:
        config = ModelConfig.model_validate({**raw, "source": str(path)})
    except ValidationError as exc:
        return None, _format_error(path, exc)
    return config, []


def load_registry(models_dir: Path) -> Registry:
    """Read every `*.yaml`/`*.yml` and bare `*.gguf` in `models_dir`. A broken
    file is reported (file and field) and skipped; the others still load."""
    registry = Registry()
    if not models_dir.is_dir():
        return registry
    claimed: set[Path] = set()
    for path in sorted([*models_dir.glob("*.yaml"), *models_dir.glob("*.yml")]):
        config, errors = _load_yaml(path)
        registry.errors.extend(errors)
        if config is None:
            continue
        weights = config.model_path(models_dir)
        if config.backend == "llama-cpp" and not weights.is_file():
            registry.errors.append(f"{path}: field 'parameters.model': file not found: {weights}")
            continue
        if config.backend == "vllm" and not weights.exists():
            # No hub at run time: the weights are a directory (or a file) the
            # operator put there beforehand.
            registry.errors.append(
                f"{path}: field 'parameters.model': not found: {weights} (vLLM models are "
                "read from a local directory; download them beforehand)"
            )
            continue
        if config.name in registry.models:
            registry.errors.append(
                f"{path}: field 'name': '{config.name}' is already defined by "
                f"{registry.models[config.name].source}"
            )
            continue
        claimed.add(weights.resolve())
        registry.models[config.name] = config
    for path in sorted(models_dir.glob("*.gguf")):
        if path.resolve() in claimed or path.stem in registry.models:
            continue
        registry.models[path.stem] = ModelConfig(
            name=path.stem, parameters=Parameters(model=path.name), source=str(path)
        )
    for error in registry.errors:
        log.error("model registry: %s", error)
    return registry
