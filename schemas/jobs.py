"""Job payloads the API enqueues and the workers run."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.bounds import (
    Bias,
    Int32,
    LengthPenalty,
    LogprobCount,
    MinusOneInt32,
    NonNegFloat32,
    NonNegInt32,
    Penalty,
    PositiveFloat32,
    Probability,
    Seed,
    TokenId,
    Width,
)

# Endpoints whose prompt is a conversation (the chat template applies).
CHAT_ENDPOINTS = ("chat.completions", "edits", "generate.chat")
# llama-server's own /completion and /infill: the prompt is evaluated verbatim
# (no template), as token ids and strings.
LLAMA_ENDPOINTS = ("llama.completion", "llama.infill")
Endpoint = Literal[
    "chat.completions",
    "completions",
    "edits",
    "generate",
    "generate.chat",
    "llama.completion",
    "llama.infill",
]


class Message(BaseModel):
    """A chat message as the template sees it: content already flattened."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    role: str
    content: str
    name: str | None = None
    # Function calling: an assistant's calls, and the call a tool message answers.
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class SamplingOptions(BaseModel):
    """Per-request sampling; None means the model's (then llama-server's) default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # 0 (llama.cpp's n_predict 0) evaluates the prompt into the cache only.
    max_tokens: NonNegInt32 | None = None
    temperature: NonNegFloat32 | None = None
    top_p: Probability | None = None
    top_k: Int32 | None = None
    min_p: Probability | None = None
    typical_p: Probability | None = None
    min_keep: NonNegInt32 | None = None
    repeat_penalty: PositiveFloat32 | None = None
    repeat_last_n: MinusOneInt32 | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    mirostat: Literal[0, 1, 2] | None = None
    mirostat_tau: PositiveFloat32 | None = None
    mirostat_eta: PositiveFloat32 | None = None
    seed: Seed | None = None
    stop: list[str] = Field(default_factory=list)
    # (token id or text, bias); a bias of False bans the token(s).
    logit_bias: list[tuple[TokenId | str, Bias]] = Field(default_factory=list)
    grammar: str | None = None
    # A JSON schema the output must follow; {} means any JSON object.
    json_schema: dict[str, Any] | None = None
    # Log-probabilities of the chosen tokens and this many alternatives.
    logprobs: LogprobCount | None = None
    ignore_eos: bool = False
    n: Width = 1
    cache_prompt: bool = True
    # llama-server's sampler chain order (canonical names: "penalties",
    # "top_k", "typ_p", "top_p", "min_p", "temperature", ...); None: its default.
    samplers: list[str] | None = None


class InfillChunk(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    filename: str = "tmp"
    text: str = ""


class InfillInput(BaseModel):
    """llama-server's /infill: the worker lays these out around the model's
    fill-in-the-middle tokens. Prefix and suffix are strings and token ids."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    input_prefix: list[TokenId | str] = Field(default_factory=list)
    input_suffix: list[TokenId | str] = Field(default_factory=list)
    input_extra: list[InfillChunk] = Field(default_factory=list)
    prompt: str = ""


class BeamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    width: Width
    length_penalty: LengthPenalty = 1.0
    # True: stop at `width` finished hypotheses; False: stop once no live beam
    # can beat the worst finished one; "never": run to max_tokens.
    early_stopping: bool | Literal["never"] = False


class GenerateJob(BaseModel):
    """An interactive completion or chat request, as a Celery task argument."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    request_id: str
    model: str
    endpoint: Endpoint
    messages: list[Message] | None = None
    prompt: str | None = None
    sampling: SamplingOptions = Field(default_factory=SamplingOptions)
    # Streamed jobs publish every token; the others publish only the final text.
    stream: bool = False
    # Function calling: the tools ({"type": "function", "function": {...}}),
    # and whether the answer may ("auto") or must ("required") be a call, to
    # one of `tool_names` (all tools when empty).
    tools: list[dict[str, Any]] | None = None
    tool_mode: Literal["none", "auto", "required"] = "none"
    tool_names: list[str] = Field(default_factory=list)
    # Beam search instead of sampling (/v1/generate).
    beam: BeamOptions | None = None
    # llama.cpp endpoints: the prompt as strings (tokenized) and token ids
    # (verbatim), the /infill parts, and the slot to run on (None: any).
    prompt_parts: list[TokenId | str] | None = None
    infill: InfillInput | None = None
    id_slot: NonNegInt32 | None = None
    enqueued_at: float = 0.0


class EmbedJob(BaseModel):
    """Embeddings of `inputs`, or rerank scores of `documents` for `query`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    request_id: str
    model: str
    kind: Literal["embed", "rerank"] = "embed"
    # Text or token ids, one item per input.
    inputs: list[str | list[TokenId]] = Field(default_factory=list)
    query: str | None = None
    documents: list[str] = Field(default_factory=list)
    # Over-long inputs are cut to the model's limit instead of rejected.
    truncate: bool = False
    normalize: bool = True
