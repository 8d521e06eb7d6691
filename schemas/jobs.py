"""Job payloads the API enqueues and the workers run."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.accounts import JobAccount
from schemas.bounds import LengthPenalty, NonNegInt32, TokenId, Width
from schemas.sampling import SamplingOptions

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
    # The API key it is charged to (None: auth is off).
    account: JobAccount | None = None


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
    # The API key it is charged to (None: auth is off).
    account: JobAccount | None = None
