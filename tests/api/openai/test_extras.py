"""OpenAI surface beyond the basics: model retrieval, LocalAI's bearer model,
legacy edits, function calling."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.support.stack import MODEL, Stack

MESSAGES = [{"role": "user", "content": "what is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "celsius": {"type": "boolean"},
            },
            "required": ["city", "celsius"],
        },
    },
}
NOW = {
    "type": "function",
    "function": {"name": "now", "parameters": {"type": "object", "properties": {}}},
}


def test_retrieve_model(stack: Stack) -> None:
    model = stack.client().models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        stack.client().models.retrieve("gpt-4o")


def test_bearer_token_names_the_model(stack: Stack) -> None:
    body = {"messages": MESSAGES, "max_tokens": 2}
    named = httpx.post(
        stack.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {MODEL}"}
    )
    assert named.status_code == 200 and named.json()["model"] == MODEL
    # Two models here: without a model and without a bearer naming one, it is a 400.
    anonymous = httpx.post(stack.url + "/v1/chat/completions", json=body)
    assert anonymous.status_code == 400
    assert anonymous.json()["error"]["param"] == "model"


def test_legacy_edits(stack: Stack) -> None:
    response = httpx.post(
        stack.url + "/v1/edits",
        json={
            "model": MODEL,
            "instruction": "Fix the spelling",
            "input": "helo wrld",
            "max_tokens": 4,
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "edit"
    assert body["choices"][0]["text"] and body["usage"]["completion_tokens"] == 4
    missing = httpx.post(stack.url + "/v1/edits", json={"model": MODEL, "input": "x"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "instruction"


def test_required_tool_call(stack: Stack) -> None:
    response = stack.client().chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        tools=[WEATHER, NOW],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=80,
        temperature=0.7,
        seed=1,
    )
    ChatCompletion.model_validate(response.model_dump())
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather" and call.id.startswith("call_")  # type: ignore[union-attr]
    arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
    assert set(arguments) == {"city", "celsius"} and isinstance(arguments["celsius"], bool)


def test_required_tool_call_streamed(stack: Stack) -> None:
    chunks = list(
        stack.client().chat.completions.create(
            model=MODEL,
            messages=MESSAGES,  # type: ignore[arg-type]
            tools=[WEATHER, NOW],  # type: ignore[list-item]
            tool_choice="required",
            max_tokens=80,
            stream=True,
            seed=2,
        )
    )
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk.model_dump())
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1
    assert calls[0].function is not None and calls[0].function.name in ("get_weather", "now")
    json.loads(calls[0].function.arguments or "")
    assert not any(c.choices and c.choices[0].delta.content for c in chunks)
    assert [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ] == ["tool_calls"]


def test_tool_choice_none_and_bad_tool_choice(stack: Stack) -> None:
    plain = stack.client().chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=5,  # type: ignore[arg-type, list-item]
    )
    assert (
        plain.choices[0].finish_reason == "length" and plain.choices[0].message.tool_calls is None
    )
    for bad in (
        {"tool_choice": "required"},  # no tools
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
    ):
        response = httpx.post(
            stack.url + "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, **bad}
        )
        assert response.status_code == 400, response.text
