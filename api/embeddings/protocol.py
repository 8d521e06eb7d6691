"""Request models of /v1/embeddings, llama.cpp's /embedding and /v1/rerank."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.bounds import CheckedBody, PositiveInt32, TokenId

# The number of inputs per request is bounded by a setting
# (api/embeddings/requests.py); each token id is an int32.
Input = str | list[str] | list[TokenId] | list[list[TokenId]]


class EmbeddingRequest(CheckedBody):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: Input
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt32 | None = None
    user: str | None = None
    truncate: bool = False

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: Input) -> Input:
        if (
            value == ""
            or value == []
            or (isinstance(value, list) and any(v in ("", []) for v in value))
        ):
            raise ValueError("input must not be empty, nor hold an empty item")
        return value

    def items(self) -> list[str | list[int]]:
        """One entry per input: a text or a list of token ids."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if all(isinstance(v, int) for v in value):
            return [list(value)]  # type: ignore[arg-type]
        return list(value)  # type: ignore[arg-type]


class LlamaEmbeddingRequest(CheckedBody):
    """llama-server's /embedding: `content` instead of `input`."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    content: Input
    truncate: bool = False

    @field_validator("content")
    @classmethod
    def _not_empty(cls, value: Input) -> Input:
        return EmbeddingRequest._not_empty(value)


class Document(BaseModel):
    model_config = ConfigDict(extra="allow")

    text: str


class RerankRequest(CheckedBody):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    query: str = Field(min_length=1)
    documents: list[str | Document] = Field(min_length=1)
    top_n: PositiveInt32 | None = None
    return_documents: bool = True
    truncate: bool = False

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]
