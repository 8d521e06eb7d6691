"""llama-server's own request bodies (/completion, /infill, /tokenize,
/detokenize), with its field names and defaults, and their translation into
inferq's job options."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.openai.protocol import ChatMessage, Tool
from schemas.bounds import CheckedBody, Float32, LogprobCount, MinusOneInt32, NonNegInt32, TokenId
from schemas.jobs import InfillChunk, InfillInput
from schemas.sampling import (
    SAMPLER_NAMES,
    SHARED_FIELDS,
    BiasMap,
    BiasPairs,
    SamplingOptions,
    SharedSampling,
    bias_pairs,
    sampling_options,
    stop_list,
)

_SAMPLER_ALIASES = {
    "top-k": "top_k",
    "top-p": "top_p",
    "nucleus": "top_p",
    "typical-p": "typ_p",
    "typical": "typ_p",
    "typ-p": "typ_p",
    "typ": "typ_p",
    "min-p": "min_p",
    "temp": "temperature",
    "top-n-sigma": "top_n_sigma",
    "adaptive-p": "adaptive_p",
}
# The one-letter form (`"samplers": "kypmt"`, llama.cpp's --sampling-seq).
_SAMPLER_CHARS = {
    "e": "penalties",
    "d": "dry",
    "s": "top_n_sigma",
    "k": "top_k",
    "y": "typ_p",
    "p": "top_p",
    "m": "min_p",
    "x": "xtc",
    "t": "temperature",
    "i": "infill",
    "a": "adaptive_p",
    "f": "tfs_z",
}
# llama.cpp's "random seed" values.
_RANDOM_SEEDS = (-1, 0xFFFFFFFF)

Parts = list[TokenId | str]


def sampler_names(value: list[str] | str) -> list[str]:
    """Canonical sampler names, from names, aliases or one-letter codes."""
    if isinstance(value, str):
        unknown = sorted(set(value) - set(_SAMPLER_CHARS))
        if unknown:
            raise ValueError(f"unknown sampler codes {unknown}; known: {''.join(_SAMPLER_CHARS)}")
        return [_SAMPLER_CHARS[c] for c in value]
    names = [_SAMPLER_ALIASES.get(name, name) for name in value]
    unknown = sorted({n for n in names if n not in SAMPLER_NAMES})
    if unknown:
        raise ValueError(f"unknown samplers {unknown}; known: {sorted(SAMPLER_NAMES)}")
    return names


class LlamaOptions(CheckedBody, SharedSampling):
    """The generation options /completion and /infill share: the shared knobs
    (SharedSampling) and llama-server's own fields. Fields llama-server
    documents that inferq does not implement (n_indent, dry_*, xtc_*,
    dynatemp_*, t_max_predict_ms, lora, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    # llama-server's own meaning: a negative temperature is greedy sampling
    # (the job carries 0), so this one knob is wider than the shared bound.
    temperature: Float32 | None = None
    # llama-server's default is 0 rather than "unset" (the same sampling).
    min_keep: NonNegInt32 = 0
    model: str | None = None
    n_predict: MinusOneInt32 = -1
    max_tokens: MinusOneInt32 | None = None
    # inferq never shifts the context (it stops when a slot is full), so
    # n_keep has nothing to keep; it is echoed in generation_settings.
    n_keep: MinusOneInt32 = 0
    stream: bool = False
    stop: list[str] | str | None = None
    # Accepted without effect, as in current llama.cpp.
    penalize_nl: bool = False
    # The pair form first, as llama-server lists it (pydantic's errors name
    # the members of a union in this order).
    logit_bias: BiasPairs | BiasMap | None = None
    n_probs: LogprobCount = 0
    id_slot: MinusOneInt32 = -1
    samplers: list[str] | str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys_in_range(cls, value: BiasPairs | BiasMap | None) -> BiasPairs | BiasMap | None:
        bias_pairs(value, text_keys=True)  # an integer key out of int32 is a ValueError
        return value

    @field_validator("samplers")
    @classmethod
    def _canonical_samplers(cls, value: list[str] | str | None) -> list[str] | None:
        return None if value is None else sampler_names(value)

    def token_limit(self) -> int | None:
        """n_predict, else max_tokens; -1 (the default) is no limit."""
        limit = self.n_predict
        if "n_predict" not in self.model_fields_set and self.max_tokens is not None:
            limit = self.max_tokens
        return None if limit < 0 else limit

    def bias_list(self) -> list[tuple[int | str, float | bool]]:
        """logit_bias, where a map key that is not an integer is text to
        tokenize; llama-server skips a bias of `true` (only numbers and
        `false` count)."""
        pairs = bias_pairs(self.logit_bias, text_keys=True)
        return [(token, bias) for token, bias in pairs if bias is not True]

    def sampling(self) -> SamplingOptions:
        """llama-server's names and conventions as the job's options."""
        samplers = self.samplers
        return sampling_options(
            self,
            max_tokens=self.token_limit(),
            temperature=None if self.temperature is None else max(self.temperature, 0.0),
            seed=None if self.seed in _RANDOM_SEEDS else self.seed,
            stop=[s for s in stop_list(self.stop) if s],
            logit_bias=self.bias_list(),
            grammar=self.grammar or None,
            # llama-server uses json_schema only when no grammar is given.
            json_schema=None if self.grammar else self.json_schema,
            logprobs=self.n_probs or None,
            samplers=list(samplers) if isinstance(samplers, list) else None,
        )

    def echo(self) -> dict[str, Any]:
        """Request fields llama-server's generation_settings repeats as given."""
        return {
            "n_keep": self.n_keep,
            "stream": self.stream,
            "penalize_nl": self.penalize_nl,
            "id_slot": self.id_slot,
        }


class LlamaCompletionRequest(LlamaOptions):
    """POST /completion. `prompt`: a string, token ids, or both mixed; a list
    holding one such list is that prompt (several prompts are not supported)."""

    prompt: str | list[TokenId | str | list[TokenId | str]] = ""

    @field_validator("prompt")
    @classmethod
    def _one_prompt(
        cls, value: str | list[int | str | list[int | str]]
    ) -> str | list[int | str | list[int | str]]:
        _parts(value)
        return value

    def prompt_parts(self) -> Parts:
        return _parts(self.prompt)


def _parts(prompt: str | list[int | str | list[int | str]]) -> Parts:
    if isinstance(prompt, str):
        return [prompt]
    nested = [p for p in prompt if isinstance(p, list)]
    if nested:
        if len(prompt) != 1:
            raise ValueError("several prompts in one request are not supported")
        return nested[0]
    flat: Parts = [p for p in prompt if not isinstance(p, list)]
    if len(flat) > 1 and all(isinstance(p, str) for p in flat):
        raise ValueError("several prompts in one request are not supported")
    return flat


class InfillExtra(BaseModel):
    model_config = ConfigDict(extra="allow")

    filename: str = "tmp"
    text: str = ""


class InfillRequest(LlamaOptions):
    """POST /infill: the text before and after the gap, extra context chunks
    (other files), and `prompt`, the start of the middle."""

    input_prefix: str | Parts
    input_suffix: str | Parts
    input_extra: list[InfillExtra] = Field(default_factory=list)
    prompt: str = ""

    def infill(self) -> InfillInput:
        def parts(value: str | Parts) -> Parts:
            return [value] if isinstance(value, str) else list(value)

        return InfillInput(
            input_prefix=parts(self.input_prefix),
            input_suffix=parts(self.input_suffix),
            input_extra=[InfillChunk(filename=c.filename, text=c.text) for c in self.input_extra],
            prompt=self.prompt,
        )


class TokenizeRequest(CheckedBody):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    content: str | Parts = ""
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False

    def parts(self) -> Parts:
        return [self.content] if isinstance(self.content, str) else list(self.content)


class DetokenizeRequest(CheckedBody):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: list[TokenId] = Field(default_factory=list)


# What POST /props may set: the defaults of /completion and /infill. Those
# are the shared knobs, less what only means something per request (an output
# grammar or schema, the prompt cache), plus llama-server's own names.
WRITABLE_PROPS = (SHARED_FIELDS - {"grammar", "json_schema", "cache_prompt"}) | {
    "n_predict",
    "n_probs",
    "samplers",
    "stop",
}


class ApplyTemplateRequest(CheckedBody):
    """POST /apply-template: the prompt the model's chat template makes of
    `messages` (and `tools`), as the worker would render it."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
