"""The fuzzers' own inferq stack: a private Redis database, Postgres
database, API and two workers (a tiny llama with fill-in-the-middle tokens,
a tiny BERT that embeds and reranks), each process under a memory limit.

Private because a fuzzer's job is to find the input that kills a worker or
wedges the batch scheduler: on the session-wide e2e stack that would fail
every test after it. Here a dead worker is restarted and fuzzing goes on."""

from __future__ import annotations

import logging
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.reliability.hostile import CHAT_MODEL, EMBED_MODEL
from tests.support.deploy import migrate, model_dir, other_redis_db, scratch_database, stack_env
from tests.support.procs import free_port, stop, wait_status
from tests.support.tinybert import write_tiny_bert

log = logging.getLogger(__name__)

# A plain request per model: served at once by a healthy worker.
PROBES = {
    CHAT_MODEL: ("/v1/completions", {"model": CHAT_MODEL, "prompt": "Hi", "max_tokens": 1}),
    EMBED_MODEL: ("/v1/embeddings", {"model": EMBED_MODEL, "input": "Hi"}),
}


# Address space each fuzzed process may take. A normal tiny worker maps
# ~0.7 GiB; an input that makes llama.cpp allocate without bound (a grammar
# that expands into billions of states) then kills its worker with
# bad_alloc, a finding, instead of taking the memory of the whole machine.
MEMORY_LIMIT = 3 * 1024**3


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`inferq ARGS` as tests.support.procs.inferq starts it, with MEMORY_LIMIT."""
    return subprocess.Popen(
        [sys.executable, "-m", "inferq", *args],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_limit_memory,
    )


@dataclass
class FuzzStack:
    url: str
    env: dict[str, str]
    log: Path
    redis_url: str
    database_url: str
    workers: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0

    def start_worker(self, model: str) -> None:
        self.workers[model] = spawn(["worker", "--model", model], self.env, self.log)
        self.wait_ready(model)

    def wait_ready(self, model: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        path, body = PROBES[model]
        while time.monotonic() < deadline:
            try:
                if httpx.post(self.url + path, json=body, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"worker {model} never served\n{self.tail()}")

    def dead_workers(self) -> list[str]:
        return [m for m, p in self.workers.items() if p.poll() is not None]

    def restart_dead(self) -> list[str]:
        dead = self.dead_workers()
        for model in dead:
            log.warning(
                "fuzz stack: worker %s died (rc %s); restarting",
                model,
                self.workers[model].returncode,
            )
            self.start_worker(model)
            self.restarts += 1
        return dead

    def log_size(self) -> int:
        return self.log.stat().st_size

    def log_since(self, offset: int) -> str:
        with self.log.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@pytest.fixture(scope="session")
def fuzz_stack(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_fim_gguf: Path,
    redis_url: str,
    pg_server_url: str,
) -> Iterator[FuzzStack]:
    root = tmp_path_factory.mktemp("fuzz")
    models = model_dir(root, tiny_fim_gguf, context=1024, parallel=2, name=CHAT_MODEL)
    write_tiny_bert(models / "embed.gguf")
    (models / "embed.yaml").write_text(
        f"name: {EMBED_MODEL}\nparameters:\n  model: embed.gguf\nembeddings: true\n"
        "reranking: true\npooling: mean\nembedding_max_tokens: 256\nthreads: 1\n"
    )
    # A Redis database of its own: the session stack's workers consume queues
    # of the same model name, and other tests flush db+1.
    fuzz_redis = other_redis_db(redis_url, 9)
    with scratch_database(pg_server_url, "inferq_fuzz") as database_url:
        port = free_port()
        # A 10 s batch lease: lines a dead worker held come back in seconds, not a minute.
        settings = {"INFERQ_REQUEST_TIMEOUT": "60", "INFERQ_BATCH_TICK": "0.2"}
        env = stack_env(fuzz_redis, database_url, models, port, INFERQ_BATCH_LEASE="10", **settings)
        yield from _run(root, env, port=port, redis_url=fuzz_redis, database_url=database_url)


def _run(
    root: Path, env: dict[str, str], *, port: int, redis_url: str, database_url: str
) -> Iterator[FuzzStack]:
    """The API and both workers, each under MEMORY_LIMIT, until the session ends."""
    log_path = root / "stack.log"
    migrate(env, log_path)
    api = spawn(["api"], env, log_path)
    stack = FuzzStack(f"http://127.0.0.1:{port}", env, log_path, redis_url, database_url)
    try:
        wait_status(stack.url + "/v1/models", 200, 30, log_path)
        for model in (CHAT_MODEL, EMBED_MODEL):
            stack.start_worker(model)
        yield stack
    finally:
        stop(api)
        for process in stack.workers.values():
            stop(process)
