"""llama-server's /props. GET reports a model's properties, which its workers
publish when they start (the API may have no copy of the model), and the
slots of its live workers. POST, only with INFERQ_PROPS_WRITABLE on, sets the
defaults of /completion and /infill for every API process (through Redis)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from api.accounts.principal import AdminDep, PrincipalDep
from api.deps import CatalogDep, RedisDep, SettingsDep
from api.errors import APIError
from api.llama.common import load_overrides, published_props, save_overrides
from api.llama.protocol import WRITABLE_PROPS, LlamaCompletionRequest
from api.routing import StrictJSONRoute

router = APIRouter(tags=["llama.cpp"], route_class=StrictJSONRoute)
_RANDOM_SEED = 0xFFFFFFFF


def _as_settings(overrides: dict[str, Any]) -> dict[str, Any]:
    """Stored defaults (request field names) as generation_settings shows them."""
    out = dict(overrides)
    if "n_predict" in out:
        out["max_tokens"] = out["n_predict"]
    if out.get("seed") == -1:
        out["seed"] = _RANDOM_SEED
    if isinstance(out.get("stop"), str):
        out["stop"] = [out["stop"]]
    return out


@router.get("/props")
async def get_props(
    catalog: CatalogDep,
    client: RedisDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    model: str | None = None,
) -> dict[str, Any]:
    name = await catalog.named_or_default(model)
    principal.require_model(name)
    raw = await published_props(client, name, why="its properties come from its workers")
    props: dict[str, Any] = json.loads(raw)
    params = dict(props.get("params", {}))
    if settings.props_writable:
        params.update(_as_settings(await load_overrides(client, name)))
    slots = sum(w.slots for w in await catalog.live_workers() if w.model == name)
    return {
        "default_generation_settings": {
            "id": 0,
            "id_task": -1,
            "n_ctx": props.get("n_ctx", 0),
            "speculative": False,
            "is_processing": False,
            "params": params,
            "prompt": "",
        },
        "total_slots": slots,
        "model_alias": name,
        "model_path": props.get("model_path", ""),
        "chat_template": props.get("chat_template", ""),
        "bos_token": props.get("bos_token", ""),
        "eos_token": props.get("eos_token", ""),
        "modalities": {"vision": False, "audio": False},
        "build_info": props.get("build_info", ""),
        "is_sleeping": False,
    }


def _params(body: dict[str, Any]) -> dict[str, Any]:
    """The settings in a POST: flat, or shaped like GET's answer
    ({"default_generation_settings": {"params": {...}}})."""
    nested = body.get("default_generation_settings")
    if isinstance(nested, dict):
        params = nested.get("params")
        return params if isinstance(params, dict) else nested
    return {k: v for k, v in body.items() if k != "model"}


@router.post("/props")
async def set_props(
    request: Request,
    catalog: CatalogDep,
    client: RedisDep,
    settings: SettingsDep,
    principal: AdminDep,
    model: str | None = None,
) -> dict[str, Any]:
    """Sets the defaults that /completion and /infill requests leave out
    (`null` removes one). Other fields are listed as ignored. They apply to
    every caller, so only an admin key (or anyone while auth is off) may."""
    if not settings.props_writable:
        raise APIError(
            403,
            "changing properties is disabled: start the API with "
            "INFERQ_PROPS_WRITABLE=true (llama-server's --props)",
            code="props_read_only",
        )
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    named = body.get("model")
    name = await catalog.named_or_default(model or (named if isinstance(named, str) else None))
    principal.require_model(name)
    params = _params(body)
    if "max_tokens" in params and "n_predict" not in params:
        params["n_predict"] = params.pop("max_tokens")
    applied = {k: v for k, v in params.items() if k in WRITABLE_PROPS}
    given = {k: v for k, v in applied.items() if v is not None}
    try:
        checked = LlamaCompletionRequest.model_validate(given)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from exc
    overrides = await load_overrides(client, name)
    # Validated values (sampler names canonical), stored as request fields.
    overrides.update({k: getattr(checked, k) for k in given})
    for key in applied.keys() - given.keys():
        overrides.pop(key, None)
    await save_overrides(client, name, overrides)
    return {
        "success": True,
        "model": name,
        "applied": sorted(applied),
        "ignored": sorted(k for k in params if k not in WRITABLE_PROPS),
    }
