"""Prompt templates: the model config's Jinja templates, else the chat
template stored in the GGUF, else ChatML. Pure rendering with no llama.cpp
dependency, so the worker (prompts) and the API (/apply-template, from the
template and special tokens the worker publishes) render alike."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from schemas.jobs import Message
from schemas.registry import ModelConfig

log = logging.getLogger(__name__)

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class PromptError(ValueError):
    """The template could not render these messages (a 400, not a 500)."""


def _raise(message: str) -> None:
    raise PromptError(message)


def _environment(*, keep_trailing_newline: bool = False) -> ImmutableSandboxedEnvironment:
    # Templates come from model files and configs: render them sandboxed.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=keep_trailing_newline
    )
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now(UTC).strftime(fmt)
    return env


class PromptBuilder:
    def __init__(
        self,
        config: ModelConfig,
        *,
        tokenizer_template: str | None,
        bos_token: str,
        eos_token: str,
    ) -> None:
        env = _environment()
        # Per-message and completion templates (LocalAI style) usually end in
        # a newline that belongs to the prompt; HF chat templates do not.
        text_env = _environment(keep_trailing_newline=True)
        tpl = config.template
        self._bos = bos_token
        self._eos = eos_token
        self._message: Template | None = None
        chat_source: str | None
        if tpl.use_tokenizer_template:
            if not tokenizer_template:
                raise ValueError(
                    f"{config.source}: field 'template.use_tokenizer_template': the "
                    "model file carries no chat template"
                )
            chat_source = tokenizer_template
        elif tpl.chat or tpl.chat_message:
            chat_source = tpl.chat
            if tpl.chat_message:
                self._message = text_env.from_string(tpl.chat_message)
        elif tokenizer_template:
            chat_source = tokenizer_template
        else:
            log.warning(
                "model %s has no chat template (neither in its config nor in its "
                "weights file); using ChatML",
                config.name,
            )
            chat_source = CHATML
        self._chat = env.from_string(chat_source) if chat_source else None
        # HF templates that know about tools render them themselves.
        self._template_has_tools = bool(chat_source and "tools" in chat_source)
        self._completion = text_env.from_string(tpl.completion) if tpl.completion else None

    def _common(self) -> dict[str, Any]:
        return {"bos_token": self._bos, "eos_token": self._eos}

    def chat(
        self, messages: Sequence[Message], *, tools: list[dict[str, Any]] | None = None
    ) -> str:
        plain = [m.model_dump(exclude_none=True) for m in messages]
        if tools and not self._template_has_tools:
            plain = [{"role": "system", "content": tool_instructions(tools)}, *plain]
            plain = _merge_leading_system(plain)
        try:
            joined = None
            if self._message is not None:
                joined = "".join(
                    self._message.render(index=i, **self._common(), **m)
                    for i, m in enumerate(plain)
                )
                if self._chat is None:
                    return joined
            assert self._chat is not None
            return self._chat.render(
                messages=plain,
                input=joined,
                tools=tools,
                add_generation_prompt=True,
                **self._common(),
            )
        except PromptError:
            raise
        except TemplateError as exc:
            raise PromptError(f"the chat template failed on these messages: {exc}") from exc

    def completion(self, prompt: str) -> str:
        if self._completion is None:
            return prompt
        try:
            return self._completion.render(input=prompt, **self._common())
        except TemplateError as exc:
            raise PromptError(f"the completion template failed: {exc}") from exc


def tool_instructions(tools: list[dict[str, Any]]) -> str:
    """How a model whose template knows nothing of tools learns about them.
    The grammar then holds the answer to exactly this JSON shape."""
    listing = json.dumps([t.get("function", t) for t in tools], indent=1)
    return (
        "You can call these functions:\n"
        f"{listing}\n"
        "To call one, answer with only a JSON object: "
        '{"name": <function name>, "arguments": {<arguments>}}. '
        "Otherwise answer normally."
    )


def _merge_leading_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Many templates accept a single system message, first.
    if len(messages) > 1 and messages[1].get("role") in ("system", "developer"):
        merged = {
            "role": "system",
            "content": messages[0]["content"] + "\n\n" + messages[1]["content"],
        }
        return [merged, *messages[2:]]
    return messages
