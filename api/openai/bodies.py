"""Whole (non-streamed) response bodies, one builder per response shape."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from api.openai import logprobs
from api.openai.chunks import usage_dict
from api.openai.tools import parse_tool_call
from schemas.events import ChoiceResult, Done
from schemas.jobs import CHAT_ENDPOINTS, GenerateJob

Renderer = Callable[[GenerateJob, int, dict[int, list[str]], Done], dict[str, Any]]


def choice_text(result: ChoiceResult, parts: dict[int, list[str]]) -> str:
    return result.text if result.text is not None else "".join(parts.get(result.index, []))


def _chat_choice(job: GenerateJob, result: ChoiceResult, text: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    reason = result.finish_reason
    if job.tool_mode != "none":
        call = parse_tool_call(text)
        if call is not None:
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            reason = "tool_calls"
    return {
        "index": result.index,
        "message": message,
        "logprobs": logprobs.chat(result.logprobs) if result.logprobs is not None else None,
        "finish_reason": reason,
    }


def openai_body(
    job: GenerateJob, created: int, parts: dict[int, list[str]], done: Done
) -> dict[str, Any]:
    """chat.completion or text_completion."""
    chat = job.endpoint in CHAT_ENDPOINTS
    choices: list[dict[str, Any]] = []
    for result in done.choices:
        text = choice_text(result, parts)
        if chat:
            choices.append(_chat_choice(job, result, text))
        else:
            lp = logprobs.completion(result.logprobs) if result.logprobs is not None else None
            choices.append(
                {
                    "index": result.index,
                    "text": text,
                    "logprobs": lp,
                    "finish_reason": result.finish_reason,
                }
            )
    return {
        "id": job.request_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": job.model,
        "system_fingerprint": None,
        "choices": choices,
        "usage": usage_dict(done.usage, done.tokens_cached),
    }


def edit_body(
    job: GenerateJob, created: int, parts: dict[int, list[str]], done: Done
) -> dict[str, Any]:
    """The legacy /v1/edits answer."""
    return {
        "object": "edit",
        "created": created,
        "choices": [{"index": r.index, "text": choice_text(r, parts)} for r in done.choices],
        "usage": usage_dict(done.usage, done.tokens_cached),
    }


def generate_body(n: int, with_logprobs: bool) -> Renderer:
    """/v1/generate: the n best choices (by mean log-probability when best_of
    sampled more; by beam score for beam search), with their scores."""

    def render(
        job: GenerateJob, created: int, parts: dict[int, list[str]], done: Done
    ) -> dict[str, Any]:
        scored = []
        for result in done.choices:
            entries = result.logprobs or []
            cumulative = result.cumulative_logprob
            if cumulative is None and result.logprobs is not None:
                cumulative = sum(e["logprob"] for e in entries)
            # Beam hypotheses report their length; sampled choices, one entry a token.
            length = max(len(entries) or result.n_tokens or 0, 1)
            mean = None if cumulative is None else cumulative / length
            scored.append((result, cumulative, mean))
        if len(scored) > n and job.beam is None:
            scored.sort(key=lambda item: item[2] if item[2] is not None else 0.0, reverse=True)
        choices = []
        for index, (result, cumulative, mean) in enumerate(scored[:n]):
            lp = result.logprobs if with_logprobs else None
            choices.append(
                {
                    "index": index,
                    "text": choice_text(result, parts),
                    "finish_reason": result.finish_reason,
                    "cumulative_logprob": cumulative,
                    "mean_logprob": mean,
                    "logprobs": lp,
                }
            )
        return {
            "id": job.request_id,
            "object": "generation",
            "created": created,
            "model": job.model,
            "choices": choices,
            # vLLM's /generate answers {"text": [...]}: the same texts, for its clients.
            "text": [c["text"] for c in choices],
            "usage": usage_dict(done.usage, done.tokens_cached),
        }

    return render


def json_literal(text: str) -> bytes:
    return json.dumps(text, ensure_ascii=False).encode()
