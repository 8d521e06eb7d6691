"""Worker log-probability entries in OpenAI's two shapes."""

from __future__ import annotations

from typing import Any

Entry = dict[str, Any]


def chat(entries: list[Entry]) -> dict[str, Any]:
    """`choices[].logprobs` of a chat completion (or chunk)."""

    def one(e: Entry) -> dict[str, Any]:
        return {"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"]}

    return {
        "content": [
            {**one(e), "top_logprobs": [one(t) for t in e.get("top_logprobs", [])]} for e in entries
        ],
        "refusal": None,
    }


def completion(entries: list[Entry], text_offset: int = 0) -> dict[str, Any]:
    """`choices[].logprobs` of a legacy completion: parallel lists."""
    offsets = []
    for e in entries:
        offsets.append(text_offset)
        text_offset += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [
            {t["token"]: t["logprob"] for t in e.get("top_logprobs", [])} for e in entries
        ],
        "text_offset": offsets,
    }
