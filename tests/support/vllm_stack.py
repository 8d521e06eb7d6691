"""The end-to-end stack on vLLM: `inferq api` and vLLM workers (each in the
vLLM environment's Python, `./run vllm`) on real Redis and Postgres, serving
the tiny Hugging Face models tests.support.tinyhf writes. Its models carry
the names the llama.cpp stack's do, so that one test runs on either
(`served`, in the root conftest)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.deploy import MODEL, migrate, other_redis_db, scratch_database, stack_env
from tests.support.procs import free_port, inferq, stop, wait_models_ready, wait_status
from tests.support.stack import Stack

ROOT = Path(__file__).resolve().parents[2]
EMBED_MODEL = "tiny-embed"
RERANK_MODEL = "tiny-rerank"


def vllm_python() -> Path:
    """The vLLM environment's Python: INFERQ_VLLM_PYTHON, else .venv-vllm
    beside the checkout. Missing, it fails the test that needs it (with how
    to make it): these tests run real vLLM, and never skip."""
    python = Path(os.environ.get("INFERQ_VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python")
    if not python.exists():
        pytest.fail(
            f"the vLLM environment is missing ({python}): create it with `./run vllm` "
            "(`./run test` does), or set INFERQ_VLLM_PYTHON",
            pytrace=False,
        )
    return python


def write_hf_models(out: Path) -> Path:
    """The tiny Hugging Face models, written by the vLLM environment's
    Python (it has torch and transformers; this one need not)."""
    subprocess.run(
        [str(vllm_python()), "-m", "tests.support.tinyhf", str(out)],
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    return out


def vllm_models(root: Path, hf: Path) -> Path:
    """`root/models`: the tiny Llama as MODEL (generation), the same weights
    as an embedding model, the one-label BERT as a cross-encoder, and a model
    `other` that no worker serves."""
    models = root / "models"
    models.mkdir()
    llama, reranker = hf / "tiny-llama-hf", hf / "tiny-reranker-hf"
    (models / "tiny.yaml").write_text(
        f"name: {MODEL}\nbackend: vllm\nparameters:\n  model: {llama}\n"
        "context_size: 2048\nparallel: 2\nbulk_parallel: 8\ndtype: float32\n"
    )
    (models / "other.yaml").write_text(
        f"name: other\nbackend: vllm\nparameters:\n  model: {llama}\n"
    )
    (models / "embed.yaml").write_text(
        f"name: {EMBED_MODEL}\nbackend: vllm\nparameters:\n  model: {llama}\n"
        "embeddings: true\nreranking: true\ncontext_size: 512\ndtype: float32\n"
    )
    (models / "rerank.yaml").write_text(
        f"name: {RERANK_MODEL}\nbackend: vllm\nparameters:\n  model: {reranker}\nreranking: true\n"
    )
    return models


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_models(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="session")
def vllm_stack(
    tmp_path_factory: pytest.TempPathFactory, hf_models: Path, redis_url: str, pg_server_url: str
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("e2e-vllm")
    models = vllm_models(root, hf_models)
    python = vllm_python()
    port = free_port()
    with scratch_database(pg_server_url, "inferq_vllm") as database_url:
        env = stack_env(
            other_redis_db(redis_url, 3),
            database_url,
            models,
            port,
            INFERQ_REQUEST_TIMEOUT="60",
            INFERQ_BATCH_TICK="0.2",
            # A busy vLLM engine on CPU keeps two processes at full speed (its
            # scheduler and its model runner): on a 2-core machine everything
            # else, heartbeats included, waits seconds for a core. Beats 3 s
            # apart (a worker is dead after 9 s without one) ride that out.
            INFERQ_HEARTBEAT_INTERVAL="3",
        )
        log = root / "stack.log"
        migrate(env, log)
        api = inferq(["api"], env, log)
        workers = [
            inferq(["worker", "--model", name], env, log, python=python)
            for name in (MODEL, EMBED_MODEL, RERANK_MODEL)
        ]
        try:
            url = f"http://127.0.0.1:{port}"
            # vLLM takes 15-30 s to start on 2 cores; three start at once.
            wait_status(url + "/health", 200, 300, log)
            wait_models_ready(url, [MODEL, EMBED_MODEL, RERANK_MODEL], log, timeout=300)
            yield Stack(url, database_url, log, env, python)
        finally:
            stop(api)
            for worker in workers:
                stop(worker, timeout=60)
