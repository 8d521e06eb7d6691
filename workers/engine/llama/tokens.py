"""What one sampled token does to its choice: the text it adds (held back
while it may begin a stop string), its log-probabilities, the token events of
a streamed request, and whether the choice ends there and why."""

from __future__ import annotations

import time

from schemas.events import encode_token, encode_token_logprobs
from workers.engine.llama.model import LlamaModel
from workers.engine.llama.sampling import logprob_entry
from workers.engine.llama.sequence import Sequence
from workers.engine.llama.stats import EngineStats

# The events of one engine step, as (request id, encoded event).
Out = list[tuple[str, bytes]]
# Why a choice ended: (finish_reason, stop_type).
End = tuple[str, str]
LENGTH: End = ("length", "limit")
EOS: End = ("stop", "eos")
WORD: End = ("stop", "word")


def take_token(
    model: LlamaModel,
    seq: Sequence,
    token: int | None,
    out: Out,
    *,
    n_ctx: int,
    stats: EngineStats,
) -> End | None:
    """Add the sampled `token` to `seq` (its token events go to `out`); how the
    choice ends when it ends here, else None. `token` None: nothing may follow
    (a grammar that is complete or whose every allowed token is banned)."""
    request = seq.request
    group = seq.group
    if seq.max_tokens == 0:
        # llama.cpp's n_predict 0: the prompt is in the cache, nothing more.
        return LENGTH
    if group.first_token_at is None:
        group.first_token_at = time.perf_counter()
    if token is None:
        return EOS
    n_probs = request.sampling.logprobs
    if n_probs is not None:
        entry = logprob_entry(model, seq.logits_index, token, n_probs or 0)
    if model.is_eog(token):
        return EOS
    seq.n_generated += 1
    group.n_generated += 1
    stats.tokens_generated += 1
    seq.last_token = token
    text = seq.text.push(model.piece(token))
    if n_probs is not None:
        seq.logprobs.append(entry)
        seq.pending_logprobs.append(entry)
    if request.streams:
        emit(seq, text, out)
    if seq.text.stopped:
        return WORD
    if seq.n_generated >= seq.max_tokens or len(request.prompt_tokens) + seq.n_generated >= n_ctx:
        return LENGTH
    return None


def emit(seq: Sequence, text: str, out: Out) -> None:
    """The token event of a streamed choice (with its log-probabilities)."""
    request_id = seq.request.request_id
    if seq.request.sampling.logprobs is None:
        if text:
            out.append((request_id, encode_token(seq.index, text)))
    elif text or seq.text.stopped:
        out.append((request_id, encode_token_logprobs(seq.index, text, seq.pending_logprobs)))
        seq.pending_logprobs = []


def close_choice(seq: Sequence, end: End, out: Out) -> None:
    """Record the ended choice on its group; a streamed one first sends the
    text it still held back."""
    if not seq.text.stopped:
        tail = seq.text.finish()
        if seq.request.streams and (tail or seq.pending_logprobs):
            emit(seq, tail, out)
    reason, stop_type = end
    seq.group.choices[seq.index] = seq.finish(reason, stop_type)
