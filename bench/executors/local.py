"""The local executor: cells, and test-set shards of their evaluation, in worker processes.

``certbench run SPEC --jobs N`` (default :func:`default_jobs`: the usable cores, or
``CERTBENCH_JOBS``) runs the cells in ``N`` worker processes with one torch thread each
(:mod:`bench.workers`). The schedule:

1. one training task per group of cells that share a ``train_key`` (a checkpoint is trained
   once; two processes never train the same one at once, see
   :func:`bench.pipeline.prepare_defense`), in spec order;
2. as each training ends, its cells' test sets are cut into shards
   (:func:`bench.pipeline.shard_bounds`; at most ``4 N`` per cell) and each shard becomes an
   evaluation task. Training tasks go first, then each cell's first shard (it also runs the
   attacks, on the first examples), then the other shards, so the run ends on short tasks
   and every worker stays busy even when one cell dominates. Cells of one trained defense
   whose clean certificate does not depend on the norm (PixelDP with a fixed number of
   draws certifies ℓ1, ℓ2 and ℓ∞ from the same draws) share their shard tasks: each shard's
   clean examples are certified once for all of them
   (:func:`bench.pipeline.evaluate_shards`), with the same results.

The parent merges a cell's shards (:func:`~bench.pipeline.merge_shards`), scores it
(:func:`~bench.pipeline.cell_result`) and yields it; the driver stores it. Results are
identical to ``--jobs 1`` (which runs the cells one after another in this process, one
torch thread) and to the Ray executor: training always runs on the same number of threads
(:func:`bench.environment.training_threads`) and every noise draw and attack is seeded by
the global example index.

A worker that dies in the middle of a task (SIGKILL, out of memory) is replaced and its task
retried once; a task whose worker dies twice fails its cell(s), which are yielded as a
:class:`bench.errors.CellFailed` and left for a re-run. Any other error of a task stops
the run with that error (cells already yielded stay stored). Ctrl-C and SIGTERM stop the
workers (a checkpoint being written is cleaned up) and raise ``KeyboardInterrupt``.
"""

from __future__ import annotations

import sys
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from bench.environment import training_threads
from bench.errors import CellFailed
from bench.pipeline import (
    cell_result,
    certificate_groups,
    certifies_shared,
    evaluate_cells,
    merge_shards,
    setup_cell,
    shard_bounds,
    training_groups,
)
from bench.workers import (
    JOBS_ENV,
    ShardTask,
    TrainTask,
    default_jobs,
    main_components,
    resolve_jobs,
)

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
    """``--jobs 1``: the cells one after another in this process, each as
    :func:`~bench.pipeline.run_cell` runs it; the later cells that share the first one's
    clean certificate (:func:`~bench.pipeline.certificate_groups`) are evaluated with it
    (:func:`~bench.pipeline.evaluate_cells`)."""
    bar = tqdm(total=len(cells), desc=desc, unit="cell", disable=not progress)
    pending = list(cells)
    with bar:
        while pending:
            cell = pending.pop(0)
            bar.set_postfix_str(f"{cell.defense}/{cell.model}/{cell.norm}")
            d, train_seconds = setup_cell(
                cell, checkpoint_root, device=device, progress=progress, num_threads=threads
            )
            mates = [c for c in pending if c.train_key() == cell.train_key()]
            groups = certificate_groups([cell, *mates], lambda c, d=d: certifies_shared(d, c.norm))
            group = next(g for g in groups if g[0] is cell)
            pairs = [(d, cell)]
            for other in group[1:]:  # each cell evaluates a defense fresh from the checkpoint
                pending.remove(other)
                d_other, _ = setup_cell(other, checkpoint_root, device=device, num_threads=threads)
                pairs.append((d_other, other))
            records = evaluate_cells(pairs, train_seconds=train_seconds, progress=progress)
            for (_, c), record in zip(pairs, records, strict=True):
                bar.update(1)
                yield c, record


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


@dataclass
class _Cell:
    """A cell between its training and its record: the shards evaluated so far."""

    facts: Any
    train_seconds: float | None  # None: a pretrained cell
    n_parts: int
    parts: dict[int, Any] = field(default_factory=dict)  # shard start -> ShardResult
    eval_seconds: float = 0.0


class _Schedule:
    """What the workers do next: trainings first, then shards (module docstring); and what
    becomes of a finished or lost task."""

    def __init__(self, cells: list, checkpoint_root: str, device: str | None, jobs: int) -> None:
        self.checkpoint_root, self.device, self.jobs = checkpoint_root, device, jobs
        self.trains = deque(
            TrainTask(tuple(g), checkpoint_root, device) for g in training_groups(cells).values()
        )
        self.shards: deque = deque()
        self.cells: dict[str, _Cell] = {}  # trained, not yet complete
        self.failed: set[str] = set()
        self.deaths: dict[tuple, int] = {}

    def next_task(self) -> Any | None:
        if self.trains:
            return self.trains.popleft()
        return self.shards.popleft() if self.shards else None

    def trained(self, task: Any, result: dict[str, tuple[Any, int]], seconds: float) -> None:
        """A training finished: queue the shards of its cells (cells that share their clean
        certificate, :func:`~bench.pipeline.certificate_groups`, in the same tasks)."""
        groups = certificate_groups(task.cells, lambda c: result[c.cell_id()][0].shared)
        for group in groups:
            n_test = result[group[0].cell_id()][1]
            bounds = shard_bounds(n_test, SHARDS_PER_JOB * self.jobs)
            for cell in group:
                self.cells[cell.cell_id()] = _Cell(result[cell.cell_id()][0], seconds, len(bounds))
            tasks = [ShardTask(group, self.checkpoint_root, self.device, a, b) for a, b in bounds]
            # the first shard also runs the attacks (on the first `limit` examples): the
            # longest task of a cell goes first, so that the run ends on short ones
            self.shards.appendleft(tasks[0])
            self.shards.extend(tasks[1:])

    def evaluated(self, task: Any, results: list, seconds: float) -> list[tuple[Any, dict]]:
        """A shard task finished: ``(cell, record)`` of each of its cells that is now
        complete (its time split evenly between its cells)."""
        done = []
        for cell, result in zip(task.cells, results, strict=True):
            cid = cell.cell_id()
            st = self.cells.get(cid)
            if st is None:  # the cell failed meanwhile
                continue
            st.parts[task.start] = result
            st.eval_seconds += seconds / len(task.cells)
            if len(st.parts) < st.n_parts:
                continue
            del self.cells[cid]
            record = cell_result(
                cell,
                st.facts,
                merge_shards([st.parts[a] for a in sorted(st.parts)]),
                train_seconds=st.train_seconds,
                eval_seconds=st.eval_seconds,
            )
            done.append((cell, record))
        return done

    def died(self, task: Any, why: Exception) -> list[tuple[Any, CellFailed]]:
        """A worker died running ``task``: queue it again, or fail its cells when it has
        already been retried :data:`MAX_TASK_RETRIES` times."""
        training = isinstance(task, TrainTask)
        key = (
            ("train", task.cells[0].train_key())
            if training
            else (tuple(c.cell_id() for c in task.cells), task.start)
        )
        self.deaths[key] = self.deaths.get(key, 0) + 1
        if self.deaths[key] <= MAX_TASK_RETRIES:
            (self.trains if training else self.shards).appendleft(task)
            return []
        out = []
        for cell in task.cells:
            if cell.cell_id() not in self.failed:
                self.failed.add(cell.cell_id())
                self.cells.pop(cell.cell_id(), None)
                out.append((cell, CellFailed(cell, f"{why}, twice")))
        keep = [t for t in self.shards if all(c.cell_id() not in self.failed for c in t.cells)]
        self.shards = deque(keep)
        return out


def _parallel(cells, checkpoint_root, device, progress, desc, jobs, threads):
    from bench.workers import WorkerDied, WorkerPool

    schedule = _Schedule(cells, checkpoint_root, device, jobs)
    show = _Progress(len(cells), desc, jobs, progress)
    try:
        with WorkerPool(jobs, threads=threads) as pool:
            while schedule.trains or schedule.shards or pool.busy():
                for w in pool.idle():
                    task = schedule.next_task()
                    if task is None:
                        show.working(w.index, "idle")
                        continue
                    pool.submit(w, task)
                    show.working(w.index, task.label)
                for _, task, outcome in pool.wait(timeout=1.0):
                    if isinstance(outcome, WorkerDied):
                        for cell, failure in schedule.died(task, outcome):
                            show.cell_done()
                            yield cell, failure
                        continue
                    if isinstance(outcome, BaseException):
                        raise outcome  # the task's own error stops the run
                    result, seconds = outcome[1]
                    if isinstance(task, TrainTask):
                        schedule.trained(task, result, seconds)
                        continue
                    for cell, record in schedule.evaluated(task, result, seconds):
                        show.cell_done()
                        yield cell, record
    finally:
        show.close()
