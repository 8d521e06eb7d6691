"""The Files API's wire objects (OpenAI's shapes), so the OpenAPI document
declares what /v1/files answers."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

# What an upload may be for: batch input, or anything a user keeps
# (OpenAI's names; batch output files are "batch_output").
UPLOAD_PURPOSES = ("batch", "user_data")


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    # Only finished files are ever shown, so always "processed".
    status: Literal["processed"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool
