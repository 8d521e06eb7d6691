from __future__ import annotations

import pytest

from inferq.demo import GEMMA_CHAT
from schemas.jobs import Message
from schemas.registry import ModelConfig, Parameters, TemplateConfig
from schemas.templates import PromptBuilder, PromptError


def _builder(template: TemplateConfig, gguf: str | None = None) -> PromptBuilder:
    config = ModelConfig(name="m", parameters=Parameters(model="m.gguf"), template=template)
    return PromptBuilder(config, tokenizer_template=gguf, bos_token="<bos>", eos_token="<eos>")


def test_gemma_turn_format_with_system_folded_into_first_user_turn() -> None:
    builder = _builder(TemplateConfig(chat=GEMMA_CHAT))
    prompt = builder.chat(
        [
            Message(role="system", content="Be brief."),
            Message(role="user", content="Hello"),
            Message(role="assistant", content="Hi!"),
            Message(role="user", content="Bye"),
        ]
    )
    assert prompt == (
        "<bos><start_of_turn>user\nBe brief.\n\nHello<end_of_turn>\n"
        "<start_of_turn>model\nHi!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_gguf_template_is_used_when_the_config_has_none() -> None:
    gguf = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}>"
    assert _builder(TemplateConfig(), gguf).chat([Message(role="user", content="x")]) == "[user]x>"


def test_config_template_wins_unless_use_tokenizer_template() -> None:
    gguf = "GGUF{{ messages[0]['content'] }}"
    mine = TemplateConfig(chat="MINE{{ messages[0]['content'] }}")
    assert _builder(mine, gguf).chat([Message(role="user", content="1")]) == "MINE1"
    forced = TemplateConfig(chat="MINE", use_tokenizer_template=True)
    assert _builder(forced, gguf).chat([Message(role="user", content="1")]) == "GGUF1"


def test_use_tokenizer_template_without_one_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="use_tokenizer_template"):
        _builder(TemplateConfig(use_tokenizer_template=True), None)


def test_chat_message_and_chat_localai_style() -> None:
    builder = _builder(
        TemplateConfig(chat_message="{{ role }}: {{ content }}\n", chat="{{ input }}assistant:")
    )
    messages = [Message(role="user", content="a"), Message(role="assistant", content="b")]
    assert builder.chat(messages) == "user: a\nassistant: b\nassistant:"


def test_chatml_fallback_and_completion_template() -> None:
    builder = _builder(TemplateConfig(completion="Q: {{ input }}\nA:"))
    assert builder.chat([Message(role="user", content="hi")]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert builder.completion("2+2?") == "Q: 2+2?\nA:"
    assert _builder(TemplateConfig()).completion("raw") == "raw"


def test_template_raising_is_a_prompt_error() -> None:
    builder = _builder(TemplateConfig(chat="{{ raise_exception('roles must alternate') }}"))
    with pytest.raises(PromptError, match="roles must alternate"):
        builder.chat([Message(role="user", content="x")])


TOOLS = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]


def test_tools_are_described_to_templates_that_do_not_know_them() -> None:
    prompt = _builder(TemplateConfig()).chat(
        [Message(role="system", content="Be brief."), Message(role="user", content="time?")],
        tools=TOOLS,
    )
    # One system turn: the tool listing merged with the caller's system message.
    assert prompt.count("<|im_start|>system") == 1
    assert '"name": "now"' in prompt and "Be brief." in prompt
    assert prompt.index('"name": "now"') < prompt.index("time?")


def test_templates_that_know_tools_render_them_themselves() -> None:
    gguf = (
        "{% for t in tools %}[{{ t['function']['name'] }}]{% endfor %}{{ messages[-1]['content'] }}"
    )
    prompt = _builder(TemplateConfig(), gguf).chat([Message(role="user", content="q")], tools=TOOLS)
    assert prompt == "[now]q"
