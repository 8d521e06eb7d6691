"""What the worker's services ask of an engine.

The services (workers.generate, workers.embed, workers.bulk) see engines only
through these Protocols; workers.main is the one place that builds a concrete
engine (llama.cpp's, in workers.engine.llama). Another engine implements the
same Protocols and serves the same jobs, events and channels. Nothing here
knows llama.cpp: no model handle, no ctypes."""

from __future__ import annotations

from typing import Protocol

from schemas.events import Done, ErrorEvent
from schemas.jobs import GenerateJob
from schemas.registry import ModelConfig
from schemas.worker_stats import WorkStats
from workers.engine.types import EmbedRequest, EngineRequest, Sampling


class InvalidRequest(ValueError):
    """A request this engine cannot run as asked: a 400 naming `param`."""

    def __init__(
        self, message: str, *, param: str | None, code: str = "invalid_request_error"
    ) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class Tokenizer(Protocol):
    """A generation model's vocabulary, as prompt building uses it."""

    @property
    def n_vocab(self) -> int: ...

    @property
    def add_bos(self) -> bool:
        """Whether tokenizing with add_special writes a BOS token first."""
        ...

    @property
    def bos_text(self) -> str: ...

    @property
    def eos_text(self) -> str: ...

    def tokenize(
        self, text: str, *, add_special: bool, parse_special: bool = True
    ) -> list[int]: ...


class GenerationEngine(Protocol):
    """Continuous batching over `n_slots` sequences of `n_ctx_per_slot` tokens.

    Requests are submitted and end exactly once, with a Done or an ErrorEvent
    in `request.result` (published to the sink unless `request.publish` is
    False); `wait` never blocks past the request's time budget."""

    @property
    def n_slots(self) -> int: ...

    @property
    def n_ctx_per_slot(self) -> int: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    def sampling_for(self, job: GenerateJob, config: ModelConfig) -> Sampling:
        """The job's sampling settings resolved for this model (request, then
        the model's defaults) and checked for this engine; InvalidRequest
        names an option it cannot take."""
        ...

    def check_fits(self, prompt_tokens: int, max_tokens: int | None, n: int = 1) -> None:
        """Raise ContextLengthExceeded or TooManyChoices unless a request of
        this size can run."""
        ...

    def submit(self, *requests: EngineRequest) -> None:
        """Queue requests; several given together start together."""
        ...

    def wait(self, request: EngineRequest, *, queue_timeout: float) -> Done | ErrorEvent:
        """The result of a submitted request, waited for within its budget
        (workers.engine.types.time_budget); past it, a 504 error event."""
        ...

    def cancel(self, request: EngineRequest) -> None:
        """Stop a request at the next step (it ends with a cancelled answer)."""
        ...

    def metrics(self) -> WorkStats:
        """Cumulative counters and current gauges for the heartbeat (GET
        /metrics); cheap, callable from any thread. What an engine does not
        count stays 0."""
        ...

    def close(self) -> None:
        """Stop the engine; every request still in it ends (503)."""
        ...


class Embedder(Protocol):
    """Embeddings and rerank scores, inputs packed across requests."""

    @property
    def max_input_tokens(self) -> int: ...

    @property
    def n_vocab(self) -> int: ...

    @property
    def rank(self) -> bool:
        """A cross-encoder: it scores (query, document) pairs."""
        ...

    def tokenize(self, text: str) -> list[int]: ...

    def pair_tokens(self, query: str, document: str) -> list[int]: ...

    def submit(self, request: EmbedRequest) -> None: ...

    def metrics(self) -> WorkStats:
        """As GenerationEngine.metrics; an embedder counts fewer figures."""
        ...

    def close(self) -> None: ...
