"""The processes of a running ``certbench run`` (Linux ``/proc``), for the tests that kill
or interrupt one at a chosen moment (tests/test_faults.py, tests/test_runner.py)."""

from __future__ import annotations

import contextlib
import math
import os
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (its fork server and workers, for certbench run)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def workers(pid: int) -> list[int]:
    """The worker processes of a certbench run: the children of its fork server."""
    server = [
        p
        for p in descendants(pid)
        if b"forkserver" in Path(f"/proc/{p}/cmdline").read_bytes()
        and int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid
    ]
    return [w for s in server for w in descendants(s)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (``/proc/PID/stat``); ``inf`` once it
    is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.inf
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def while_workers_compute(
    run: subprocess.Popen, rng: random.Random, *, timeout: float, stderr: Callable[[], str]
) -> int:
    """Wait until a worker of ``run``, chosen by ``rng``, has computed for a random 0.02 to
    0.15 s of CPU time, and return its pid; the run is then still going (asserted).

    The moment is counted in the worker's CPU time, not in wall time: the test specs' runs
    compute for under a second per worker (0.24-0.3 s for the lighter one),
    so a wall-clock delay let the speed of the host decide whether the fault hit a running run
    or a finished one. Within 0.15 s of work the workers are still training. ``stderr``: what
    the run printed, for the failure message when it ends before any worker started."""
    deadline = time.monotonic() + timeout
    while not workers(run.pid):
        assert run.poll() is None, stderr()
        assert time.monotonic() < deadline, "no worker process started"
        time.sleep(0.05)
    worker = rng.choice(sorted(workers(run.pid)))
    at = cpu_seconds(worker) + rng.uniform(0.02, 0.15)
    while run.poll() is None and cpu_seconds(worker) < at:
        time.sleep(0.005)
    assert run.poll() is None and worker in workers(run.pid), (
        "the run ended before its worker had computed for the chosen time"
    )
    return worker
