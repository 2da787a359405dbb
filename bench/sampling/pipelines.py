"""CPU pipelines: forward passes dealt to worker threads, each with its share of the cores.

Part of every pass is serial: torch's CPU Gaussian sampler (one Mersenne Twister stream), the
argmax and count, the Python around them. With one pass at a time on all cores, the other
cores wait through it. On CPU the passes are therefore dealt to ``workers`` threads (default:
one per intra-op thread of the caller), each running its passes with its share of the
intra-op threads, so one pipeline's serial steps overlap another's forward pass (speed-ups:
benchmarks/RESULTS.md). A pipeline takes whole units of work (a pass, or the passes of a block
split across passes, whose cached noise it generates once) and keeps its own buffers and
counts, summed at the end; pipelines that run out of work hand their threads to the ones
still running. No draw depends on which pipeline ran a pass, so counts do not depend on
``workers``. The pipelines share the memory budget (:mod:`bench.sampling.memory`): two large
passes in flight fight for the caches.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable

import torch

from bench.errors import ValidationError
from bench.sampling.plan import Segment, split_segments, unit_rows
from bench.sampling.runner import Runner, Samples

__all__ = [
    "MAX_CPU_WORKERS",
    "WORKERS_ENV",
    "Pipeline",
    "is_out_of_memory",
    "pipeline_count",
    "run_threads",
]

MAX_CPU_WORKERS = 8
"""Upper bound on the default number of CPU pipelines (``workers`` of
:func:`~bench.sampling.sample`): each holds its own pass buffers and activations, and all share
one interpreter lock."""


WORKERS_ENV = "CERTBENCH_SAMPLER_WORKERS"
"""Environment variable giving the default ``workers`` of :func:`~bench.sampling.sample` (e.g.
``1`` for a model whose forward is not safe to call from two threads at once)."""


def pipeline_count(workers: int | None, device: torch.device, threads: int) -> int:
    """How many pipelines a call asks for: 1 off the CPU, else ``workers`` or (by default)
    :data:`WORKERS_ENV` or one per intra-op thread of the caller (``threads``), at most
    :data:`MAX_CPU_WORKERS`. The passes actually run on ``min(that, units of work)``."""
    if workers is None and os.environ.get(WORKERS_ENV, "").strip():
        value = os.environ[WORKERS_ENV].strip()
        try:
            workers = int(value)
        except ValueError:
            workers = 0
        if workers < 1:
            raise ValidationError(f"{WORKERS_ENV} must be an integer >= 1, got {value!r}")
    if device.type != "cpu":
        return 1
    return max(1, min(threads, MAX_CPU_WORKERS) if workers is None else workers)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA/CPU allocation failures (torch raises them as RuntimeError subclasses)."""
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    if oom and isinstance(exc, oom):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg
    )


class Pipeline:
    """A :class:`Runner` and its pass-size limit, lowered when a pass runs out of memory."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.batch_size = self.limit = runner.batch_size

    def run(self, chunk: list[Segment], results: list[Samples]) -> None:
        """Evaluate one planned pass (cut to the current limit) and add its statistics."""
        if self.limit == self.batch_size:  # no out-of-memory so far: the pass as planned
            self._process(chunk, results)
        else:
            for piece in split_segments(chunk, self.limit):
                self._process(piece, results)

    def _process(self, piece: list[Segment], results: list[Samples]) -> None:
        """Run one pass; on out-of-memory halve the pass size and retry its pieces.

        The draws of a row depend only on its block's seed, never on how rows are grouped
        into passes, so a retried pass gives exactly the counts the original would have.
        """
        rows = sum(r1 - r0 for *_, r0, r1 in piece)
        if rows > self.limit:  # the limit fell since this piece was cut
            for sub_piece in split_segments(piece, self.limit):
                self._process(sub_piece, results)
            return
        try:
            self.runner.run(piece, results)
            return
        except Exception as exc:
            if not is_out_of_memory(exc) or rows <= 1:
                raise
        device = self.runner.x.device
        if device.type == "cuda":
            torch.cuda.empty_cache()
        self.limit = max(1, rows // 2)
        warnings.warn(
            f"out of memory in a forward pass of {rows} rows; retrying with {self.limit}",
            RuntimeWarning,
            stacklevel=2,
        )
        self.runner = self.runner.resized(self.limit)
        for sub_piece in split_segments(piece, self.limit):
            self._process(sub_piece, results)


def run_threads(
    units: list[list[list[Segment]]],
    workers: int,
    threads: int,
    pipeline: Callable[[], Pipeline],
    zero_results: Callable[[], list[Samples]],
    bar: object | None,
    *,
    ordered: bool,
) -> list[list[Samples]]:
    """Run ``units`` on ``workers`` CPU pipelines, each in its own thread; return each
    worker's statistics (in worker order).

    Each pipeline runs torch with ``threads // workers`` intra-op threads (at least one) and
    widens to ``threads // active`` when others have finished, so the last units still use
    every core. The serial steps of a pass (the Gaussian sampler, argmax, counting, Python)
    then overlap with another pipeline's forward pass instead of idling the other cores.
    Units are taken in plan order as workers free up; with ``ordered`` (float sums, whose
    rounding depends on the order of addition) worker ``w`` takes units ``w, w + workers,
    ...``, so the sums do not depend on timing. The caller's thread count is restored on
    return. The first error (in plan order) is re-raised after every worker has stopped.
    """
    lock = threading.Lock()
    parts = [zero_results() for _ in range(workers)]
    state = {"next": 0, "active": workers, "stop": False}
    errors: list[tuple[int, BaseException]] = []
    finished = threading.Event()

    def claim(w: int, done: int) -> int | None:
        with lock:
            if state["stop"]:
                return None
            if ordered:
                index = w + done * workers
            else:
                index = state["next"]
                state["next"] = index + 1
            return index if index < len(units) else None

    def work(w: int) -> None:
        index = -1
        try:
            current = 0
            line = None
            done = 0
            with torch.inference_mode():
                while (index := claim(w, done)) is not None:
                    want = max(1, threads // max(1, state["active"]))
                    if want != current:
                        torch.set_num_threads(want)
                        current = want
                    if line is None:
                        line = pipeline()
                    for chunk in units[index]:
                        if state["stop"]:  # another pipeline failed, or the caller stopped
                            return
                        line.run(chunk, parts[w])
                    done += 1
                    if bar is not None:
                        with lock:
                            bar.update(unit_rows(units[index]))  # type: ignore[attr-defined]
        except BaseException as exc:
            with lock:
                errors.append((index, exc))
                state["stop"] = True
        finally:
            with lock:
                state["active"] -= 1
                if state["active"] == 0:
                    finished.set()

    pool = [
        threading.Thread(target=work, args=(w,), name=f"certbench-sampler-{w}", daemon=True)
        for w in range(workers)
    ]
    try:
        for t in pool:
            t.start()
        # Wait on an event, not in Thread.join: on Python 3.11 an exception raised inside
        # join (Ctrl-C) can mark a running thread as finished. Short waits let this thread
        # run the signal handler when the signal was delivered to another thread.
        while not finished.wait(0.05):
            pass
    except BaseException:  # e.g. KeyboardInterrupt: stop after the passes in flight
        with lock:
            state["stop"] = True
            state["active"] -= sum(t.ident is None for t in pool)  # never started
            if state["active"] <= 0:
                finished.set()
        finished.wait()
        raise
    finally:
        torch.set_num_threads(threads)
    for t in pool:
        t.join()
    if errors:
        raise min(errors, key=lambda item: item[0])[1]
    return parts
