"""Ends vLLM's engine processes when the worker that started them dies
without stopping them (SIGKILL, the OOM killer): vLLM's engine core does not
watch its parent, and an orphaned one keeps its memory (and its GPU) until
someone kills it. The worker starts this once its engine is up, with the
engine's processes; it waits for the worker to go, then kills whichever of
them are still there.

    python -m workers.engine.vllm.reaper PID:CREATED ...
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import psutil

log = logging.getLogger("inferq.vllm.reaper")
POLL_S = 1.0


def start(processes: list[psutil.Process]) -> subprocess.Popen[bytes]:
    """Watch `processes` (the engine's) on behalf of this process."""
    targets = []
    for process in processes:
        try:
            targets.append(f"{process.pid}:{process.create_time()}")
        except psutil.Error:
            continue  # ended already
    return subprocess.Popen(
        [sys.executable, "-m", "workers.engine.vllm.reaper", *targets],
        stdin=subprocess.DEVNULL,
        # Its own session: a Ctrl-C or a SIGTERM to the worker's group is
        # not its concern; it ends when the worker has.
        start_new_session=True,
    )


def _alive(target: str) -> psutil.Process | None:
    """The process `PID:CREATED` names, if it still exists (not a new one
    that reused the pid)."""
    pid, _, created = target.partition(":")
    try:
        process = psutil.Process(int(pid))
        return process if abs(process.create_time() - float(created)) < 0.01 else None
    except (psutil.NoSuchProcess, ValueError):
        return None


def main(argv: list[str]) -> int:
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(POLL_S)
    for target in argv:
        process = _alive(target)
        if process is not None:
            log.warning("the worker is gone: killing its engine process %d", process.pid)
            process.kill()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
