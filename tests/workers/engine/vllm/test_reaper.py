"""A vLLM worker killed outright (SIGKILL, the OOM killer) takes its engine
processes with it: none is left holding memory or a GPU."""

from __future__ import annotations

import os
import signal
import time

import psutil

from tests.support.deploy import MODEL
from tests.support.procs import inferq
from tests.support.stack import Stack


def _command(process: psutil.Process) -> str:
    """The process's command line; "" for one that ended (or is a zombie)
    while the worker starts its engine."""
    try:
        return " ".join(process.cmdline()) + " " + process.name()
    except psutil.Error:
        return ""


def test_a_killed_worker_leaves_no_engine_behind(vllm_stack: Stack) -> None:
    log = vllm_stack.log.parent / "worker-killed.log"
    worker = inferq(["worker", "--model", MODEL], vllm_stack.env, log, python=vllm_stack.python)
    try:
        deadline = time.monotonic() + 180
        engine: list[psutil.Process] = []
        while not any("reaper" in _command(p) for p in engine):
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
            engine = psutil.Process(worker.pid).children(recursive=True)
        assert any("VLLM" in _command(p) for p in engine), [_command(p) for p in engine]
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
        _, alive = psutil.wait_procs(engine, timeout=15)
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
