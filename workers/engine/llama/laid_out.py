"""What a step laid out, kept so that its decode can be undone or counted.

Each entry is a sequence as it was before the step: (sequence, prompt
tokens it had evaluated, tokens its slot held). An aborted decode (an
interactive arrival) leaves no cells behind in llama.cpp, so the sequences
go back to those values; a successful one counts the prompt tokens it
evaluated and marks each group as stepped (the pacing's fairness order)."""

from __future__ import annotations

from workers.engine.llama.sequence import Sequence
from workers.engine.llama.stats import EngineStats

LaidOut = list[tuple[Sequence, int, int]]


def undo(laid_out: LaidOut, tokens: list[list[int]]) -> None:
    """Put every sequence back as it was; `tokens`: the slots' token lists."""
    for seq, n_evaluated, n_cached in laid_out:
        seq.n_evaluated = n_evaluated
        seq.logits_index = -1
        del tokens[seq.slot][n_cached:]


def account(laid_out: LaidOut, stats: EngineStats, *, step: int, started: float) -> None:
    """A decode succeeded: count its prompt tokens, and when each group stepped."""
    for seq, n_evaluated, _ in laid_out:
        prompt = seq.n_evaluated - n_evaluated
        if prompt:
            stats.prompt_tokens_evaluated += prompt
            if seq.group.prompt_started is None:
                seq.group.prompt_started = started
        seq.group.last_step = step


def outputs(laid_out: LaidOut) -> int:
    """Tokens of the step whose logits are computed."""
    return sum(1 for seq, _, _ in laid_out if seq.logits_index >= 0)
