"""Keep freed tensor memory mapped between forward passes (glibc malloc tuning).

torch's CPU allocator hands every tensor to ``malloc``. With glibc's defaults, a freed block
above the *dynamic* mmap threshold (128 KiB at start, raised up to 32 MiB by what was freed
before) goes straight back to the OS, and freed memory at the top of the heap is trimmed once
it exceeds twice that threshold. A Monte Carlo forward pass allocates and frees the same
activations hundreds of times, so each pass page-faults its activations in again: on the
2-core benchmark machine that was up to 2/3 of the run time (``sys`` time and 300-670k minor
faults per 1x28x28 certificate, benchmarks/RESULTS.md), and how much of it happened depended
on what had run earlier in the process (the dynamic threshold), which made timings drift by
2-3x between identical calls.

:func:`tune_malloc` fixes both thresholds (``mallopt(M_MMAP_THRESHOLD)`` and
``mallopt(M_TRIM_THRESHOLD)``) so that freed activations stay mapped and are reused. It is
what ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the environment do, applied
from inside the process. Cost: up to :data:`TRIM_THRESHOLD` bytes of freed memory stay
resident (counted in RSS) instead of going back to the OS.

It changes process-wide state, so the library never calls it on its own: the ``certbench``
command (which owns its process), its Ray workers and ``benchmarks/`` do. Set
``CERTBENCH_MALLOC_TUNING=0`` to keep glibc's defaults. It does nothing when the environment
already sets glibc's malloc thresholds, when another allocator (jemalloc, tcmalloc, mimalloc)
is preloaded, or off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_malloc"]

MMAP_THRESHOLD = 256 * 2**20
"""Blocks at least this large are still served by ``mmap`` (and returned on free). Above the
sampling engine's 64 MiB CPU pass budget, so no activation of a default-sized pass qualifies."""
TRIM_THRESHOLD = 512 * 2**20
"""Freed memory at the top of the heap is returned to the OS only beyond this many bytes."""
FALLBACK_MMAP_THRESHOLD = 32 * 2**20
"""glibc builds that cap the threshold at half their heap size (64 MiB) accept this value."""

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_ENV_SWITCH = "CERTBENCH_MALLOC_TUNING"
_GLIBC_ENV = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "GLIBC_TUNABLES",
)
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_applied: bool | None = None


def _skip_reason() -> str | None:
    """Why tuning should not be applied in this process, or ``None``."""
    if os.environ.get(_ENV_SWITCH, "1").strip().lower() in {"0", "false", "no", "off"}:
        return f"{_ENV_SWITCH} is off"
    for name in _GLIBC_ENV:
        if os.environ.get(name):
            return f"{name} is set"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(a in preload for a in _OTHER_ALLOCATORS):
        return "another allocator is preloaded"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    return None


def _mallopt() -> ctypes._CFuncPtr | None:
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        fn = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def tune_malloc() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (module docstring).

    Idempotent; returns whether the tuning is in effect. Never raises: on any platform or
    setting where it does not apply it returns ``False`` and changes nothing.
    """
    global _applied
    if _applied is not None:
        return _applied
    if _skip_reason() is not None:
        _applied = False
        return False
    fn = _mallopt()
    if fn is None:
        _applied = False
        return False
    mmap_ok = bool(fn(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) or bool(
        fn(_M_MMAP_THRESHOLD, FALLBACK_MMAP_THRESHOLD)
    )
    trim_ok = bool(fn(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _applied = mmap_ok and trim_ok
    return _applied
