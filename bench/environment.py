"""The process environment of a run: device, torch threads, global seeds and provenance.

Thread policy (README, "Threads and parallel jobs"): training runs on
:func:`training_threads` (1 unless ``CERTBENCH_NUM_THREADS`` says otherwise), so a trained
model does not depend on the machine; ``certbench run`` evaluates in single-thread worker
processes (:mod:`bench.executors.local`); a command that evaluates in its own process
(``eval``, ``certify``, ``attack``, ``bench.evaluate``) uses the cores that other processes
leave free (:func:`configure_threads`, :func:`adapt_threads`); there, the certification of a
deterministic defense runs its chunks side by side on that many threads of one intra-op
thread each (:func:`bench.pipeline.certify_all`).

Everything is device-agnostic: tensors follow ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import bench
from bench.errors import ConfigError, ValidationError
from bench.validation import check_int

if TYPE_CHECKING:
    import torch


def resolve_device(device: str | None) -> torch.device:
    """``"auto"``/``None`` → ``cuda`` when available, else ``cpu``; otherwise validated as given."""
    import torch  # here, not at the top: the command line reads the core count before torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device!r} requested but CUDA is not available here")
    return dev


THREADS_ENV = "CERTBENCH_NUM_THREADS"
"""Environment variable fixing torch's intra-op threads of every computation (training and
evaluation; per worker in ``certbench run``). Unset: see :func:`configure_threads`."""

FREE_CORE_SLACK = 0.25
"""A core counts as free when other processes use at most this fraction of it (it rounds the
free-core estimate: fewer threads cost a little on an idle machine, one thread too many costs
several times the run time on a busy one)."""

_SAMPLE_WINDOW_S = 0.1
"""How long :func:`configure_threads` watches the CPUs before its first choice."""
_MIN_WINDOW_S = 0.05
"""A shorter interval between two samples says too little (jiffies are 10 ms)."""


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def threads_from_env() -> int | None:
    """:data:`THREADS_ENV` as an integer >= 1, or ``None`` when unset or empty."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    try:
        return check_int(int(value), THREADS_ENV, minimum=1)
    except ValueError:
        raise ValidationError(f"{THREADS_ENV} must be an integer >= 1, got {value!r}") from None


def training_threads() -> int:
    """Intra-op threads for training: :data:`THREADS_ENV`, else 1.

    Training is deterministic for a fixed seed *and thread count* (reductions are split
    differently across threads), so it never follows the machine's core count or load: a
    checkpoint trained by ``certbench train``, by ``certbench run`` with any ``--jobs`` or by
    a Ray task is the same file everywhere.
    """
    return threads_from_env() or 1


@dataclass(frozen=True)
class _CpuSample:
    wall: float  # time.monotonic()
    busy: float  # CPU seconds the usable CPUs spent on any process
    own: float  # CPU seconds this process spent


def _cpu_sample() -> _CpuSample | None:
    """Busy time of this process's CPUs (``/proc/stat``) and of the process; ``None`` off
    Linux."""
    try:
        cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        lines = Path("/proc/stat").read_text().splitlines()
    except (AttributeError, OSError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    busy = 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in cpus:
            # user nice system idle iowait irq softirq steal (guest time is inside user)
            ticks = [int(v) for v in fields[1:9]]
            busy += sum(ticks) - ticks[3] - ticks[4]
    return _CpuSample(time.monotonic(), busy / hz, time.process_time())


def _cores_used_by_others(before: _CpuSample, after: _CpuSample) -> float:
    dt = after.wall - before.wall
    return max(0.0, (after.busy - before.busy) - (after.own - before.own)) / dt


def free_cores(window: float = _SAMPLE_WINDOW_S) -> float:
    """Usable cores that other processes left idle over the next ``window`` seconds (all of
    them off Linux)."""
    before = _cpu_sample()
    if before is None:
        return float(usable_cores())
    time.sleep(window)
    after = _cpu_sample()
    assert after is not None
    return max(0.0, usable_cores() - _cores_used_by_others(before, after))


def _threads_for(free: float) -> int:
    return max(1, min(usable_cores(), math.floor(free + FREE_CORE_SLACK)))


_adaptive: dict[str, _CpuSample | None] = {}
"""Set while the thread count follows the free cores: ``{"last": the previous sample}``."""


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op threads for the computation this process runs; returns them.

    ``num_threads`` or :data:`THREADS_ENV` fix the count. Without either, the count follows
    the cores other processes leave free: it is chosen now, from a short look at the CPUs
    (:func:`free_cores`), and re-chosen between evaluation chunks (:func:`adapt_threads`).
    Fine-grained intra-op parallelism degrades badly when a core is taken away (every
    parallel region waits for the thread that lost its core), so on a busy machine fewer
    threads finish sooner. Evaluation results do not depend on the thread count (tested);
    training pins its own count (:func:`training_threads`).

    Parallel executors call this with 1 per worker process.
    """
    import torch

    if num_threads is None:
        num_threads = threads_from_env()
    if num_threads is None:
        before = _cpu_sample()
        if before is None:
            num_threads = usable_cores()
        else:
            time.sleep(_SAMPLE_WINDOW_S)
            after = _cpu_sample()
            assert after is not None
            num_threads = _threads_for(usable_cores() - _cores_used_by_others(before, after))
            _adaptive["last"] = after
    else:
        _adaptive.clear()
        num_threads = max(1, int(num_threads))
    if torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
    return num_threads


def adaptive() -> bool:
    """Whether the thread count follows the free cores (:func:`configure_threads` without a
    fixed count): in-process evaluation, not a worker process or a pinned count."""
    return _adaptive.get("last") is not None


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside the block, restored after it."""
    import torch

    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def adapt_threads() -> int:
    """Between chunks of work: re-choose the thread count from the cores other processes
    used since the last choice, when :func:`configure_threads` left it adaptive (otherwise a
    no-op). Returns the current count."""
    import torch

    last = _adaptive.get("last")
    if last is None:
        return torch.get_num_threads()
    now = _cpu_sample()
    if now is None or now.wall - last.wall < _MIN_WINDOW_S:
        return torch.get_num_threads()
    _adaptive["last"] = now
    want = _threads_for(usable_cores() - _cores_used_by_others(last, now))
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)
    return want


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@lru_cache(maxsize=1)
def git_commit() -> str:
    """The git commit of the certbench source tree, or ``""`` when not in a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def provenance() -> dict[str, str]:
    """Versions and time stamp recorded with every result."""
    import torch

    return {
        "certbench_version": bench.__version__,
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
