"""Who is calling: the key a request authenticated with, or nobody while auth
is off. Routes read it from `request.state`, where api/accounts/auth.py put
it before the body was read."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated

from fastapi import Depends, Request

from api.errors import APIError
from schemas.accounts import QuotaRule
from schemas.tables import ApiKey, aware


@dataclass(frozen=True)
class KeyInfo:
    """An API key as the API holds it in memory (no secret: only its hash)."""

    id: str
    name: str
    secret_hash: str
    hint: str
    admin: bool
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    rpm: int | None
    tpm: int | None
    batch_tokens: int | None
    models: tuple[str, ...] | None
    quotas: tuple[QuotaRule, ...]

    @classmethod
    def from_row(cls, row: ApiKey) -> KeyInfo:
        return cls(
            id=row.id,
            name=row.name,
            secret_hash=row.secret_hash,
            hint=row.hint,
            admin=bool(row.admin),
            created_at=aware(row.created_at),
            expires_at=aware(row.expires_at) if row.expires_at else None,
            revoked_at=aware(row.revoked_at) if row.revoked_at else None,
            rpm=row.rpm,
            tpm=row.tpm,
            batch_tokens=row.batch_tokens,
            models=tuple(row.models) if row.models is not None else None,
            quotas=tuple(QuotaRule.model_validate(q) for q in row.quotas or ()),
        )

    def usable(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


@dataclass(frozen=True)
class Principal:
    """The caller. `key` is None while auth is off: the single user of an
    embedded install, who owns and may do everything."""

    key: KeyInfo | None = None

    @property
    def key_id(self) -> str | None:
        return self.key.id if self.key else None

    @property
    def admin(self) -> bool:
        return self.key is None or self.key.admin

    @property
    def owner_filter(self) -> str | None:
        """The owner a listing or lookup is limited to; None: everything
        (an admin key, or auth off)."""
        return None if self.admin else self.key_id

    def sees(self, owner: str | None) -> bool:
        """Whether a file, batch or usage row owned by `owner` exists for this
        caller (others get a 404, never a 403: existence is not revealed)."""
        return self.admin or owner == self.key_id

    def may_use(self, model: str) -> bool:
        return self.key is None or self.key.models is None or model in self.key.models

    def require_model(self, model: str) -> None:
        """A model this key may not use does not exist for it: the same 404
        as an unknown model (a 403 would tell it the model is there)."""
        if not self.may_use(model):
            raise APIError(
                404, f"The model '{model}' does not exist", code="model_not_found", param="model"
            )


OPEN = Principal()


def current_principal(request: Request) -> Principal:
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):
        # Only routes the middleware lets through unauthenticated (/health)
        # have none, and they never ask: refuse rather than open up.
        raise APIError(401, "missing API key", code="invalid_api_key")
    return principal


def require_admin(request: Request) -> Principal:
    principal = current_principal(request)
    if not principal.admin:
        raise APIError(403, "this route needs an admin key", code="permission_denied")
    return principal


PrincipalDep = Annotated[Principal, Depends(current_principal)]
AdminDep = Annotated[Principal, Depends(require_admin)]
