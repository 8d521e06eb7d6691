"""llama-server's POST /apply-template: the prompt a model's chat template
makes of `messages`, rendered here from the template and special tokens its
worker publishes (the same PromptBuilder the worker uses), with no job."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter

from api.accounts.principal import PrincipalDep
from api.deps import CatalogDep, RedisDep
from api.errors import APIError
from api.llama.common import published_props
from api.llama.protocol import ApplyTemplateRequest
from api.routing import StrictJSONRoute
from schemas.registry import ModelConfig, Parameters
from schemas.templates import PromptBuilder, PromptError

router = APIRouter(tags=["llama.cpp"], route_class=StrictJSONRoute)
# Built templates by (model, published properties): compiling Jinja per
# request would cost more than rendering.
_BUILDERS: dict[tuple[str, bytes], PromptBuilder] = {}


def _builder(model: str, config: ModelConfig | None, raw: bytes) -> PromptBuilder:
    key = (model, raw)
    builder = _BUILDERS.get(key)
    if builder is None:
        props: dict[str, Any] = json.loads(raw)
        config = config or ModelConfig(name=model, parameters=Parameters(model=""))
        try:
            builder = PromptBuilder(
                config,
                tokenizer_template=props.get("chat_template") or None,
                bos_token=props.get("bos_token", ""),
                eos_token=props.get("eos_token", ""),
            )
        except Exception as exc:  # a template that does not compile
            raise APIError(400, f"the chat template of '{model}' is unusable: {exc}") from exc
        if len(_BUILDERS) > 64:
            _BUILDERS.clear()
        _BUILDERS[key] = builder
    return builder


@router.post("/apply-template")
async def apply_template(
    body: ApplyTemplateRequest, catalog: CatalogDep, client: RedisDep, principal: PrincipalDep
) -> dict[str, str]:
    model = await catalog.named_or_default(body.model)
    principal.require_model(model)
    raw = await published_props(client, model, why="its template comes from its workers")
    builder = _builder(model, catalog.registry.models.get(model), raw)
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    try:
        prompt = builder.chat([m.flatten() for m in body.messages], tools=tools)
    except PromptError as exc:
        raise APIError(400, str(exc), param="messages") from exc
    return {"prompt": prompt}
