"""The process environment of a run: device, torch threads, global seeds and provenance.

Everything is device-agnostic: tensors follow ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
"""

from __future__ import annotations

import os
import random
import subprocess
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

import bench
from bench.errors import ConfigError


def resolve_device(device: str | None) -> torch.device:
    """``"auto"``/``None`` → ``cuda`` when available, else ``cpu``; otherwise validated as given."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device!r} requested but CUDA is not available here")
    return dev


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op threads (default: the CPUs available to this process).

    On small CPU boxes torch's intra-op pool and several worker processes fight; parallel
    executors call this with 1 per worker.
    """
    if num_threads is None:
        env = os.environ.get("CERTBENCH_NUM_THREADS")
        if env:
            num_threads = int(env)
        else:
            try:
                num_threads = len(os.sched_getaffinity(0))
            except AttributeError:  # pragma: no cover - non-Linux
                num_threads = os.cpu_count() or 1
    num_threads = max(1, int(num_threads))
    if torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
    return num_threads


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
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
    return {
        "certbench_version": bench.__version__,
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
