"""/v1/generate's request: vLLM's sampling parameters under vLLM's names and
defaults."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator

from api.openai.protocol import ChatMessage
from schemas.bounds import (
    CheckedBody,
    LengthPenalty,
    LogprobCount,
    Penalty,
    PositiveInt32,
    Seed,
    Width,
)
from schemas.sampling import (
    MinP,
    RepeatPenalty,
    SamplingOptions,
    Temperature,
    TopK,
    TopP,
    stop_list,
)


class GenerateRequest(CheckedBody):
    """/v1/generate: vLLM's sampling parameters, with their defaults; the
    prompt comes already formatted, or as messages for the chat template."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    stream: bool = False
    max_tokens: PositiveInt32 = 16
    n: Width = 1
    best_of: Width | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: RepeatPenalty = 1.0
    temperature: Temperature = 1.0
    # vLLM refuses 0 (it would keep no token): narrower than the shared bound.
    top_p: Annotated[TopP, Field(gt=0.0)] = 1.0
    # -1 (vLLM's "off") is 0 in the job.
    top_k: TopK = -1
    min_p: MinP = 0.0
    seed: Seed | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    logprobs: LogprobCount | None = None
    use_beam_search: bool = False
    length_penalty: LengthPenalty = 1.0
    early_stopping: bool | Literal["never"] = False
    # A canned answer returned without any worker: for testing clients.
    mock_response: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError("best_of must be at least n")
        if self.stream and (self.use_beam_search or (self.best_of or self.n) > self.n):
            raise ValueError("beam search and best_of > n cannot stream")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        return self

    @property
    def width(self) -> int:
        """Sequences decoded in parallel: best_of, else n."""
        return self.best_of or self.n

    def sampling(self) -> SamplingOptions:
        """vLLM's names and defaults as the job's options (written out: no
        field is shared under the same name and default)."""
        pick_best = self.width > self.n
        return SamplingOptions(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            min_p=self.min_p,
            repeat_penalty=self.repetition_penalty,
            # vLLM's repetition penalty looks at the whole sequence.
            repeat_last_n=-1 if self.repetition_penalty != 1.0 else None,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            stop=stop_list(self.stop),
            ignore_eos=self.ignore_eos,
            # Choosing the best of several needs their log-probabilities.
            logprobs=self.logprobs if self.logprobs is not None else (0 if pick_best else None),
            n=self.width,
        )
