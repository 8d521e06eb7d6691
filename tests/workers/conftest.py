"""Shared fixtures for engine tests: a real llama.cpp engine on the tiny model."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from schemas.events import Done, TokenEvent, decode
from schemas.registry import ModelConfig, Parameters
from schemas.templates import PromptBuilder
from workers.engine.llama.engine import LlamaEngine
from workers.engine.llama.model import ContextOptions, LlamaModel
from workers.engine.types import EngineRequest, Sampling
from workers.generate import WorkerRuntime
from workers.llama_server import shapers


class RecordingSink:
    def __init__(self) -> None:
        self.events: dict[str, list[object]] = {}
        self.steps = 0
        self._lock = threading.Lock()

    def publish(self, events: Sequence[tuple[str, bytes]]) -> None:
        with self._lock:
            self.steps += 1
            for request_id, raw in events:
                self.events.setdefault(request_id, []).append(decode(raw))

    def pieces(self, request_id: str) -> list[str]:
        return [e.text for e in self.events[request_id] if isinstance(e, TokenEvent)]


def prompt_tokens(engine: LlamaEngine, text: str) -> list[int]:
    return engine.model.tokenize(text, add_special=True)


def run(
    engine: LlamaEngine, prompts: list[str], sampling: Sampling, stream: bool = True
) -> list[EngineRequest]:
    requests = [
        EngineRequest(
            f"r{i}-{time.monotonic_ns()}", prompt_tokens(engine, p), sampling, stream=stream
        )
        for i, p in enumerate(prompts)
    ]
    engine.submit(*requests)
    for request in requests:
        assert request.wait(timeout=60) is not None
    return requests


def text_of(request: EngineRequest, sink: RecordingSink) -> str:
    if request.stream:
        return "".join(sink.pieces(request.request_id))
    assert isinstance(request.result, Done)
    text = request.result.choices[0].text
    assert text is not None
    return text


def make_runtime(engine: LlamaEngine, *, wired: bool = True) -> WorkerRuntime:
    """A generation runtime on `engine` (no Redis, no database: for prepare()
    and the prompt shapers); `wired`: with llama-server's shapers, as
    workers.main wires them."""
    config = ModelConfig(name="tiny", parameters=Parameters(model="tiny.gguf"))
    prompts = PromptBuilder(
        config,
        tokenizer_template=engine.model.metadata("tokenizer.chat_template"),
        bos_token=engine.model.bos_text,
        eos_token=engine.model.eos_text,
    )
    table = shapers(engine) if wired else {}
    return WorkerRuntime(config, engine, prompts, None, None, {}, "", table)  # type: ignore[arg-type]


@pytest.fixture
def engine(tiny_gguf: Path) -> Iterator[tuple[LlamaEngine, RecordingSink]]:
    sink = RecordingSink()
    model = LlamaModel(
        tiny_gguf, ContextOptions(n_slots=4, n_ctx_per_slot=512, n_batch=64, n_threads=1)
    )
    engine = LlamaEngine(model, sink)
    yield engine, sink
    engine.close()
