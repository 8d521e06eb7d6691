"""vLLM's outputs (RequestOutput deltas) as the worker's events: the token
events of a streamed request, and the Done with each choice's text,
log-probabilities and why it ended, in the shapes the llama.cpp engine
publishes (workers/engine/llama/tokens.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from schemas.events import ChoiceResult, Done, encode_token, encode_token_logprobs
from workers.engine.types import EngineRequest, answer

# The events of one output, as (request id, encoded event).
Out = list[tuple[str, bytes]]


class RequestFailed(RuntimeError):
    """vLLM ended a request with finish_reason "error" (it logs why: a
    grammar its engine could not compile, say)."""


def logprob_entries(token_ids: Any, logprobs: Any, n_top: int) -> list[dict[str, Any]]:
    """Each generated token's entry, {"id", "token", "bytes", "logprob",
    "top_logprobs"}, from vLLM's {token id: Logprob} of each position (the
    chosen token and the `n_top` most likely)."""
    entries = []
    for token, ranked in zip(token_ids, logprobs or (), strict=False):
        chosen = ranked.get(token)
        top = sorted(
            ((t, lp) for t, lp in ranked.items() if lp.rank is not None and lp.rank <= n_top),
            key=lambda item: item[1].rank,
        )
        entries.append(
            {
                **_info(token, chosen),
                "logprob": float(chosen.logprob) if chosen is not None else float("-inf"),
                "top_logprobs": [{**_info(t, lp), "logprob": float(lp.logprob)} for t, lp in top],
            }
        )
    return entries


def _info(token: int, logprob: Any) -> dict[str, Any]:
    text = (logprob.decoded_token if logprob is not None else None) or ""
    return {"id": int(token), "token": text, "bytes": list(text.encode("utf-8"))}


def ending(finish_reason: str | None, stop_reason: Any) -> tuple[str, str | None, str | None]:
    """(finish_reason, llama-server's stop_type, stopping_word) of a choice."""
    if finish_reason == "length":
        return "length", "limit", None
    if isinstance(stop_reason, str):
        return "stop", "word", stop_reason
    return "stop", "eos", None


@dataclass
class _Choice:
    parts: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)


@dataclass(eq=False)
class Progress:
    """One request's outputs so far."""

    request: EngineRequest
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    n_generated: int = 0
    tokens_cached: int = 0
    choices: dict[int, ChoiceResult] = field(default_factory=dict)
    _open: dict[int, _Choice] = field(default_factory=dict)

    def take(self, output: Any) -> Out:
        """Fold one RequestOutput (deltas since the last) in; the token
        events a streamed request publishes for it."""
        request = self.request
        n_top = request.sampling.logprobs
        if output.num_cached_tokens:
            self.tokens_cached = int(output.num_cached_tokens)
        out: Out = []
        for delta in output.outputs:
            index = int(delta.index)
            new = len(delta.token_ids)
            if new and self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self.n_generated += new
            entries = (
                logprob_entries(delta.token_ids, delta.logprobs, n_top) if n_top is not None else []
            )
            if request.streams:
                if n_top is None:
                    if delta.text:
                        out.append((request.request_id, encode_token(index, delta.text)))
                elif delta.text or entries:
                    event = encode_token_logprobs(index, delta.text, entries)
                    out.append((request.request_id, event))
            else:
                choice = self._open.setdefault(index, _Choice())
                choice.parts.append(delta.text)
                choice.logprobs.extend(entries)
            if delta.finish_reason == "error":
                raise RequestFailed(f"vLLM ended choice {index} with an error")
            if delta.finish_reason is not None and delta.finish_reason != "abort":
                self._close(index, delta)
        return out

    def _close(self, index: int, delta: Any, *, beam: bool = False) -> None:
        reason, stop_type, word = ending(delta.finish_reason, delta.stop_reason)
        choice = self._open.pop(index, _Choice())
        stream = self.request.streams
        self.choices[index] = ChoiceResult(
            index=index,
            finish_reason=reason,
            text=None if stream else "".join(choice.parts),
            logprobs=None if stream or self.request.sampling.logprobs is None else choice.logprobs,
            cumulative_logprob=float(delta.cumulative_logprob) if beam else None,
            n_tokens=len(delta.token_ids) if beam else None,
            stop_type=stop_type,
            stopping_word=word,
        )

    def take_beams(self, output: Any) -> None:
        """The one output of vLLM's beam search: its best hypotheses, whole."""
        n_top = self.request.sampling.logprobs
        for delta in output.outputs:
            index = int(delta.index)
            self.n_generated += len(delta.token_ids)
            choice = self._open.setdefault(index, _Choice())
            choice.parts.append(delta.text)
            if n_top is not None:
                choice.logprobs.extend(logprob_entries(delta.token_ids, delta.logprobs, n_top))
            self._close(index, delta, beam=True)
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def result(self) -> Done:
        # vLLM evaluates the prompt and samples the first token in one step:
        # the prompt's time is the time to the first token.
        ttft = self.first_token_at
        return answer(
            self.request,
            self.choices,
            n_generated=self.n_generated,
            started=self.started,
            first_token_at=ttft,
            tokens_cached=self.tokens_cached,
            prompt_ms=None if ttft is None else (ttft - self.started) * 1000,
        )
