"""The admin routes' bodies and objects (/v1/admin/keys)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.accounts.principal import KeyInfo
from schemas.accounts import QuotaRule

# Bounds on what a key may be given: positive, and small enough for Postgres.
Rpm = Field(default=None, gt=0, le=2**31 - 1)
Tokens = Field(default=None, gt=0, le=2**62)


class KeyLimits(BaseModel):
    """Limits of a key; None (or absent) means unlimited."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Rpm
    tpm: int | None = Tokens
    batch_tokens: int | None = Tokens
    # The models the key may use; None: all.
    models: list[str] | None = Field(default=None, max_length=1024)
    quotas: list[QuotaRule] = Field(default_factory=list, max_length=64)

    @field_validator("models")
    @classmethod
    def _names(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not m or len(m) > 255 for m in value):
            raise ValueError("model names are 1 to 255 characters")
        return value


class KeyCreate(KeyLimits):
    name: str = Field(min_length=1, max_length=255)
    admin: bool = False
    # A duration (`30d`, `12h`, `45m`, `2w`) after which the key stops working.
    expires_in: str | None = Field(default=None, max_length=32)


class KeyUpdate(BaseModel):
    """Changed limits of a key: the fields given replace the old ones (null
    removes a limit); they apply from the next request, on every replica."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=255)
    rpm: int | None = Rpm
    tpm: int | None = Tokens
    batch_tokens: int | None = Tokens
    models: list[str] | None = Field(default=None, max_length=1024)
    quotas: list[QuotaRule] | None = Field(default=None, max_length=64)


class KeyObject(BaseModel):
    object: Literal["api_key"] = "api_key"
    id: str
    name: str
    # The key itself: only in the answer that created or rotated it.
    key: str | None = None
    hint: str
    admin: bool
    created_at: int
    expires_at: int | None
    revoked_at: int | None
    rpm: int | None
    tpm: int | None
    batch_tokens: int | None
    models: list[str] | None
    quotas: list[QuotaRule]

    @classmethod
    def of(cls, info: KeyInfo, token: str | None = None) -> KeyObject:
        return cls(
            id=info.id,
            name=info.name,
            key=token,
            hint=info.hint,
            admin=info.admin,
            created_at=int(info.created_at.timestamp()),
            expires_at=int(info.expires_at.timestamp()) if info.expires_at else None,
            revoked_at=int(info.revoked_at.timestamp()) if info.revoked_at else None,
            rpm=info.rpm,
            tpm=info.tpm,
            batch_tokens=info.batch_tokens,
            models=list(info.models) if info.models is not None else None,
            quotas=list(info.quotas),
        )


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyObject]


class KeyDeleted(BaseModel):
    object: Literal["api_key.deleted"] = "api_key.deleted"
    id: str
    deleted: bool = True
