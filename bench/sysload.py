"""What else the machine did while a level ran.

With 2 cores, one stray test run halves a number, so every measured window
records /proc/loadavg before and after, the CPU the system under test used
(by process role, and its busiest threads), the CPU the load generator used,
everything else, and the hypervisor's steal time. CPU% is of one core: 200%
is the whole 2-core machine."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def role(proc: psutil.Process) -> str:
    """A short name for a process, from its command line."""
    try:
        cmd: list[str] = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "?"
    if not cmd:
        return str(proc.name())
    # Some servers (redis) rewrite their title into argv[0]: "redis-server *:6379".
    exe = os.path.basename(cmd[0].split(" ")[0])
    if exe.startswith("python") or exe == "inferq":
        args = [a for a in cmd[1:] if not a.startswith("-")]
        if "inferq" in args:
            args = args[args.index("inferq") + 1 :]
        elif args and os.path.basename(args[0]) == "inferq":
            args = args[1:]
        if args and args[0] in ("api", "worker", "up", "migrate"):
            return f"inferq {args[0]}"
        if "bench.engine_bench" in cmd or any(a.endswith("engine_bench.py") for a in cmd):
            return "engine_bench"
        return " ".join(os.path.basename(a) for a in cmd[:3])[:60]
    return exe


@dataclass(frozen=True)
class _Snapshot:
    at: float
    loadavg: str
    system: Any  # psutil's scputimes
    procs: dict[tuple[int, float], tuple[str, float]]  # (pid, created) -> (role, cpu s)
    threads: dict[tuple[int, int], float]  # (pid, tid) -> cpu s, for the SUT


def _cpu(times: Any) -> float:
    return float(times.user + times.system)


class LoadMonitor:
    """Measures windows of time for one system under test.

    `roots` returns the pids whose whole process trees are the system under
    test (looked up at each snapshot, since servers fork children);
    `loadgen_pid` is the process that generates the load, when separate."""

    def __init__(self, roots: Callable[[], list[int]], loadgen_pid: int | None = None) -> None:
        self.roots = roots
        self.loadgen_pid = loadgen_pid

    def _sut_pids(self) -> set[int]:
        pids: set[int] = set()
        for pid in self.roots():
            try:
                root = psutil.Process(pid)
                pids.add(pid)
                pids.update(c.pid for c in root.children(recursive=True))
            except psutil.NoSuchProcess:
                continue
        return pids

    def _snapshot(self) -> tuple[_Snapshot, set[int]]:
        sut = self._sut_pids()
        procs: dict[tuple[int, float], tuple[str, float]] = {}
        threads: dict[tuple[int, int], float] = {}
        for proc in psutil.process_iter(["create_time", "cpu_times"]):
            info = proc.info
            if info.get("cpu_times") is None:
                continue
            name = "loadgen" if proc.pid == self.loadgen_pid else role(proc)
            procs[(proc.pid, info["create_time"])] = (name, _cpu(info["cpu_times"]))
            if proc.pid in sut:
                with contextlib.suppress(psutil.Error):
                    for t in proc.threads():
                        threads[(proc.pid, t.id)] = t.user_time + t.system_time
        snap = _Snapshot(time.monotonic(), loadavg(), psutil.cpu_times(), procs, threads)
        return snap, sut

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict[str, Any]]:
        """A window; the yielded dict is filled in when the block exits."""
        result: dict[str, Any] = {}
        before, sut_before = self._snapshot()
        yield result
        after, sut_after = self._snapshot()
        result.update(self._compare(before, after, sut_before | sut_after))

    def _compare(self, before: _Snapshot, after: _Snapshot, sut: set[int]) -> dict[str, Any]:
        wall = after.at - before.at
        pct = 100.0 / wall if wall > 0 else 0.0
        sb, sa = before.system, after.system
        busy = (sum(sa) - sa.idle - sa.iowait) - (sum(sb) - sb.idle - sb.iowait)
        roles: dict[str, float] = {}
        others: dict[str, float] = {}
        loadgen = 0.0
        for key, (name, cpu) in after.procs.items():
            # A process born inside the window started from zero.
            delta = cpu - before.procs.get(key, (name, 0.0))[1]
            if delta <= 0:
                continue
            if key[0] in sut:
                roles[name] = roles.get(name, 0.0) + delta
            elif name == "loadgen":
                loadgen += delta
            else:
                others[name] = others.get(name, 0.0) + delta
        sut_total = sum(roles.values())
        thread_deltas = sorted(
            ((cpu - before.threads.get(key, 0.0), key) for key, cpu in after.threads.items()),
            reverse=True,
        )
        return {
            "wall_s": round(wall, 3),
            "loadavg_before": before.loadavg,
            "loadavg_after": after.loadavg,
            "busy_pct": round(busy * pct, 1),
            "steal_pct": round((sa.steal - sb.steal) * pct, 1),
            "sut_pct": round(sut_total * pct, 1),
            "loadgen_pct": round(loadgen * pct, 1),
            # Busy time nobody above accounts for: other processes, the kernel,
            # processes that exited inside the window.
            "other_pct": round(max(busy - sut_total - loadgen, 0.0) * pct, 1),
            "sut_roles_pct": {k: round(v * pct, 1) for k, v in sorted(roles.items())},
            "other_top_pct": {
                k: round(v * pct, 1)
                for k, v in sorted(others.items(), key=lambda kv: -kv[1])[:4]
                if v * pct >= 1.0
            },
            "sut_threads_pct": [
                {"pid": pid, "tid": tid, "comm": _comm(pid, tid), "pct": round(d * pct, 1)}
                for d, (pid, tid) in thread_deltas[:6]
                if d * pct >= 1.0
            ],
        }


def _comm(pid: int, tid: int) -> str:
    try:
        return Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:
        return "?"
