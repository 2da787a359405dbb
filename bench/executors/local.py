"""The local executor: cells, and test-set shards of their evaluation, in worker processes.

``certbench run SPEC --jobs N`` (default :func:`default_jobs`: the usable cores, or
``CERTBENCH_JOBS``) runs the cells in ``N`` worker processes with one torch thread each
(:mod:`bench.executors.workers`). The schedule:

1. one training task per group of cells that share a ``train_key`` (a checkpoint is trained
   once; two processes never train the same one at once, see
   :func:`bench.pipeline.prepare_defense`), in spec order;
2. as each training ends, its cells' test sets are cut into shards
   (:func:`bench.pipeline.shard_bounds`; at most ``4 N`` per cell) and each shard becomes an
   evaluation task. Training tasks go first, then each cell's first shard (it also runs the
   attacks, on the first examples), then the other shards, so the run ends on short tasks
   and every worker stays busy even when one cell dominates.

The parent merges a cell's shards (:func:`~bench.pipeline.merge_shards`), scores it
(:func:`~bench.pipeline.cell_result`) and yields it; the driver stores it. Results are
identical to ``--jobs 1`` (which runs the cells one after another in this process, one
torch thread) and to the Ray executor: training always runs on the same number of threads
(:func:`bench.environment.training_threads`) and every noise draw and attack is seeded by
the global example index.

A worker that dies in the middle of a task (SIGKILL, out of memory) is replaced and its task
retried once; a task whose worker dies twice fails its cell(s), which are yielded as a
:class:`bench.executors.CellFailed` and left for a re-run. Any other error of a task stops
the run with that error (cells already yielded stay stored). Ctrl-C and SIGTERM stop the
workers (a checkpoint being written is cleaned up) and raise ``KeyboardInterrupt``.
"""

from __future__ import annotations

import sys
import warnings
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from bench.environment import training_threads
from bench.executors import CellFailed
from bench.executors.workers import JOBS_ENV, default_jobs, main_components, resolve_jobs
from bench.pipeline import cell_result, merge_shards, run_cell, shard_bounds

__all__ = ["JOBS_ENV", "default_jobs", "resolve_jobs", "run_cells"]

SHARDS_PER_JOB = 4
"""A cell's test set is cut into at most this many shards per worker."""
MAX_TASK_RETRIES = 1
"""How often a task whose worker died is run again before its cells fail."""


def run_cells(
    cells: list,
    checkpoint_root: str | Path,
    *,
    device: str | None = None,
    progress: bool = True,
    desc: str = "cells",
    jobs: int | None = None,
) -> Iterator[tuple[Any, dict[str, Any] | CellFailed]]:
    """Run ``cells``; yields ``(cell, result)`` as each finishes (a :class:`CellFailed`
    result for a cell whose worker died twice)."""
    jobs = resolve_jobs(jobs)
    threads = training_threads()
    in_main = main_components() if jobs > 1 and cells else []
    if in_main:
        warnings.warn(
            f"{', '.join(in_main)} registered in __main__, where worker processes cannot "
            "import it: running the cells in this process (--jobs 1)",
            RuntimeWarning,
            stacklevel=2,
        )
    if jobs == 1 or not cells or in_main:
        yield from _in_process(cells, checkpoint_root, device, progress, desc, threads)
    else:
        yield from _parallel(cells, str(checkpoint_root), device, progress, desc, jobs, threads)


def _in_process(cells, checkpoint_root, device, progress, desc, threads):
    """``--jobs 1``: the cells one after another in this process."""
    bar = tqdm(cells, desc=desc, unit="cell", disable=not progress)
    for cell in bar:
        bar.set_postfix_str(f"{cell.defense}/{cell.model}/{cell.norm}")
        yield (
            cell,
            run_cell(cell, checkpoint_root, device=device, progress=progress, num_threads=threads),
        )


class _Progress:
    """A bar of finished cells and one status line per worker (what it is doing)."""

    def __init__(self, total: int, desc: str, jobs: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="cell", disable=not enabled)
        # the status lines move the cursor: on a terminal only, not in a log file
        self.enabled = enabled and sys.stderr.isatty()
        self.lines = [
            tqdm(
                total=0, position=i + 1, bar_format="{desc}", leave=False, disable=not self.enabled
            )
            for i in range(jobs)
        ]

    def working(self, index: int, text: str) -> None:
        if self.enabled:
            self.lines[index].set_description_str(f"  worker {index + 1}: {text}")

    def cell_done(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        for line in self.lines:
            line.close()
        self.bar.close()


def _task_key(task: Any) -> tuple:
    if hasattr(task, "cells"):
        return ("train", *(c.cell_id() for c in task.cells))
    return ("shard", task.cell.cell_id(), task.start)


def _parallel(cells, checkpoint_root, device, progress, desc, jobs, threads):
    from bench.executors.workers import ShardTask, TrainTask, WorkerDied, WorkerPool

    groups: dict[str, list] = {}
    for cell in cells:
        groups.setdefault(cell.train_key(), []).append(cell)
    trains = deque(TrainTask(tuple(g), checkpoint_root, device) for g in groups.values())
    shards: deque = deque()
    state: dict[str, dict[str, Any]] = {}  # cell_id -> facts, parts, timings
    failed: set[str] = set()
    retries: dict[Any, int] = {}
    show = _Progress(len(cells), desc, jobs, progress)

    def fail(task: Any, why: str) -> list[tuple[Any, CellFailed]]:
        victims = list(task.cells) if isinstance(task, TrainTask) else [task.cell]
        out = []
        for cell in victims:
            cid = cell.cell_id()
            if cid in failed:
                continue
            failed.add(cid)
            state.pop(cid, None)
            out.append((cell, CellFailed(cell, why)))
        keep = [s for s in shards if s.cell.cell_id() not in failed]
        shards.clear()
        shards.extend(keep)
        return out

    try:
        with WorkerPool(jobs, threads=threads) as pool:
            while trains or shards or pool.busy():
                for w in pool.idle():
                    if trains:
                        task = trains.popleft()
                    elif shards:
                        task = shards.popleft()
                    else:
                        show.working(w.index, "idle")
                        continue
                    pool.submit(w, task)
                    show.working(w.index, task.label)
                for _, task, outcome in pool.wait(timeout=1.0):
                    if isinstance(outcome, WorkerDied):
                        key = _task_key(task)
                        retries[key] = retries.get(key, 0) + 1
                        if retries[key] <= MAX_TASK_RETRIES:
                            (trains if isinstance(task, TrainTask) else shards).appendleft(task)
                            continue
                        for cell, failure in fail(task, f"{outcome}, twice"):
                            show.cell_done()
                            yield cell, failure
                        continue
                    if isinstance(outcome, BaseException):
                        raise outcome
                    result, seconds = outcome[1]
                    if isinstance(task, TrainTask):
                        for cell in task.cells:
                            facts, n_test = result[cell.cell_id()]
                            bounds = shard_bounds(n_test, SHARDS_PER_JOB * jobs)
                            state[cell.cell_id()] = {
                                "facts": facts,
                                "train_seconds": seconds,
                                "eval_seconds": 0.0,
                                "parts": {},
                                "n_parts": len(bounds),
                            }
                            tasks = [
                                ShardTask(cell, checkpoint_root, device, a, b) for a, b in bounds
                            ]
                            # the first shard also runs the attacks (the first `limit` examples):
                            # the longest task of a cell goes first, so the run ends on short ones
                            shards.appendleft(tasks[0])
                            shards.extend(tasks[1:])
                        continue
                    st = state.get(task.cell.cell_id())
                    if st is None:  # the cell failed meanwhile
                        continue
                    st["parts"][task.start] = result
                    st["eval_seconds"] += seconds
                    if len(st["parts"]) == st["n_parts"]:
                        del state[task.cell.cell_id()]
                        merged = merge_shards([st["parts"][a] for a in sorted(st["parts"])])
                        show.cell_done()
                        yield (
                            task.cell,
                            cell_result(
                                task.cell,
                                st["facts"],
                                merged,
                                train_seconds=st["train_seconds"],
                                eval_seconds=st["eval_seconds"],
                            ),
                        )
    finally:
        show.close()
