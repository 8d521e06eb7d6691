"""OpenAI-compatible request models for the interactive endpoints."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.bounds import CheckedBody, LogprobCount, MinusOneInt32, PositiveInt32, Width
from schemas.jobs import Message
from schemas.sampling import (
    LogitBias,
    SamplingOptions,
    SharedSampling,
    bias_pairs,
    sampling_options,
    stop_list,
)


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def flatten(self) -> Message:
        if isinstance(self.content, list):
            text = "".join(part.text for part in self.content)
        else:
            text = self.content or ""
        calls: list[dict[str, Any]] | None = None
        if self.tool_calls:
            calls = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": _json_or_text(c.function.arguments),
                    },
                }
                for c in self.tool_calls
            ]
            if not text:
                # Templates without tool support still see what was called.
                text = json.dumps(
                    [
                        {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}
                        for c in self.tool_calls
                    ]
                )
        return Message(
            role=self.role,
            content=text,
            name=self.name,
            tool_calls=calls,
            tool_call_id=self.tool_call_id,
        )


def _json_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None
    # llama-server's form: {"type": "json_object", "schema": {...}}
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (
            self.json_schema is None or self.json_schema.schema_ is None
        ):
            raise ValueError("type json_schema needs json_schema.schema")
        return self

    def schema_dict(self) -> dict[str, Any] | None:
        """The JSON schema to constrain output with ({} for any object)."""
        if self.type == "text":
            return None
        if self.type == "json_schema" and self.json_schema is not None:
            return self.json_schema.schema_
        return self.schema_ or {}


class _SamplingRequest(CheckedBody, SharedSampling):
    """Fields the OpenAI and llama.cpp clients send on both endpoints: the
    shared knobs (SharedSampling) and llama-server's extras. Unknown fields
    are accepted and ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, allow_inf_nan=False)

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt32 | None = None
    n_predict: MinusOneInt32 | None = None
    # Count and length are bounded by settings (api/streaming/limits.py).
    stop: str | list[str] | None = None
    logit_bias: LogitBias | None = None
    response_format: ResponseFormat | None = None
    n_probs: LogprobCount | None = None
    n: Width = 1
    user: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: LogitBias | None) -> LogitBias | None:
        # OpenAI's form maps token ids (integers as strings) to biases; text
        # biases (a llama.cpp extra) take the list form [["text", bias]].
        bias_pairs(value, text_keys=False)
        return value

    def token_limit(self) -> int | None:
        if self.max_tokens is not None:
            return self.max_tokens
        return self.n_predict if self.n_predict and self.n_predict > 0 else None

    def logprob_count(self) -> int | None:
        return self.n_probs if self.n_probs else None

    def output_schema(self) -> dict[str, Any] | None:
        if self.json_schema is not None:
            return self.json_schema
        return self.response_format.schema_dict() if self.response_format else None

    def sampling(self) -> SamplingOptions:
        """OpenAI's names (and llama-server's extras) as the job's options."""
        return sampling_options(
            self,
            max_tokens=self.token_limit(),
            stop=stop_list(self.stop),
            logit_bias=bias_pairs(self.logit_bias, text_keys=False),
            json_schema=self.output_schema(),
            logprobs=self.logprob_count(),
            n=self.n,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt32 | None = None
    logprobs: bool = False
    top_logprobs: LogprobCount | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ChatCompletionRequest:
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise ValueError("tool_choice is only allowed when tools are specified")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tools:
            names = {t.function.name for t in self.tools}
            if self.tool_choice.function.name not in names:
                raise ValueError(
                    f"tool_choice names an unknown function {self.tool_choice.function.name!r}"
                )
        return self

    def tool_settings(
        self,
    ) -> tuple[list[dict[str, Any]] | None, Literal["none", "auto", "required"], list[str]]:
        """(tools, mode, allowed names) for the job."""
        if not self.tools:
            return None, "none", []
        tools = [t.model_dump(exclude_none=True) for t in self.tools]
        choice = self.tool_choice or "auto"
        if isinstance(choice, NamedToolChoice):
            return tools, "required", [choice.function.name]
        if self.response_format is not None or self.grammar or self.json_schema:
            # An explicit output constraint wins over "auto".
            return tools, "none" if choice == "auto" else choice, []
        return tools, choice, []

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or super().token_limit()

    def logprob_count(self) -> int | None:
        if self.logprobs:
            return self.top_logprobs or 0
        return super().logprob_count()


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str]
    logprobs: LogprobCount | None = None

    def token_limit(self) -> int | None:
        # OpenAI's default for legacy completions is 16 tokens.
        limit = super().token_limit()
        return 16 if limit is None and self.n_predict is None else limit

    def logprob_count(self) -> int | None:
        return self.logprobs if self.logprobs is not None else super().logprob_count()

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class EditRequest(_SamplingRequest):
    """The legacy /v1/edits request."""

    instruction: str = Field(min_length=1)
    input: str = ""

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, value: bool) -> bool:
        if value:
            raise ValueError("the edits API does not stream")
        return value
