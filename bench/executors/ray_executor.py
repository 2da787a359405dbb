"""Ray executor: cells, and test-set shards of their evaluation, as Ray tasks.

``certbench run SPEC --executor ray [--address auto]`` (extra ``certbench[ray]``). For each
cell one task trains the defense (or finds its checkpoint) and saves it under the store's
checkpoint directory; then ``shards`` tasks each run :func:`bench.pipeline.evaluate_shards` on
a contiguous slice of the test set and return its per-example results. Only the driver
merges them, scores the cell and writes the store, with the same pipeline functions as the
local executor.

Shard boundaries are multiples of :data:`bench.pipeline.ATTACK_CHUNK` and every noise draw
is seeded by the global example index, so the per-example results, and hence the metrics,
are identical to the local executor's for the same trained weights. Training itself is
deterministic for a fixed seed *and thread count*; each task pins torch to the CPUs Ray gives
it (``num_cpus``, default 1), the number the local executor trains with unless
``CERTBENCH_NUM_THREADS`` says otherwise (:func:`bench.environment.training_threads`), so the
two give the same checkpoints and metrics by default (tested).

Cells that share a ``train_key`` are trained by one task. Cells of one trained defense whose
clean certificate does not depend on the norm (PixelDP with a fixed number of draws, see
:func:`bench.pipeline.certificate_groups`) share their shard tasks, as with the local
executor: each shard's clean examples are certified once for all of them
(:func:`bench.pipeline.evaluate_shards`), with the same results. A task whose worker process dies
(killed, out of memory, a node lost) is run again by Ray, up to :data:`TASK_RETRIES` times;
tasks are pure functions of their arguments (a retried training writes the same checkpoint
atomically, a retried shard returns the same results), so nothing is lost or counted twice.
A cell whose task still fails is yielded as a :class:`bench.errors.CellFailed`; an error
raised by the task itself (e.g. a NaN loss) stops the run with that error.

On a cluster the checkpoint directory (next to the store) must be on storage every node
sees; tasks ask for ``num_gpus=1`` when the device is CUDA.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bench.allocator import tune_malloc
from bench.environment import configure_threads, resolve_device
from bench.errors import CellFailed, CertbenchError, ConfigError
from bench.pipeline import (
    DefenseFacts,
    ShardResult,
    cell_result,
    certificate_groups,
    dataset_for,
    evaluate_shards,
    merge_shards,
    prepare_defense,
    shard_bounds,
    training_groups,
)

TASK_RETRIES = 3
"""Times Ray re-runs a task whose worker died (``max_retries``; errors raised by the task
itself are not retried)."""


def _worker(cell, ckroot: str, device: str | None, threads: int):
    configure_threads(threads)
    tune_malloc()
    return prepare_defense(
        cell, ckroot, device=resolve_device(device or cell.device), progress=False
    )


def _train_task(
    cells: list, ckroot: str, device: str | None, threads: int
) -> tuple[dict[str, DefenseFacts], float | None]:
    d, train_seconds = _worker(cells[0], ckroot, device, threads)  # None: a pretrained cell
    facts = {c.cell_id(): DefenseFacts.of(d, c.norm) for c in cells}
    return facts, None if train_seconds is None else float(train_seconds)


def _shard_task(
    cells: tuple, ckroot: str, device: str | None, threads: int, a: int, b: int
) -> list[ShardResult]:
    """Examples ``[a, b)`` of ``cells`` (one cell, or a group that shares its clean
    certificate), each with its own defense fresh from the checkpoint; a result per cell."""
    pairs = [(_worker(c, ckroot, device, threads)[0], c) for c in cells]
    return evaluate_shards(pairs, a, b)


def run_cells(
    cells: list,
    checkpoint_root: str | Path,
    *,
    device: str | None = None,
    progress: bool = True,
    desc: str = "ray cells",
    address: str | None = None,
    shards: int | None = None,
    num_cpus_per_task: int = 1,
) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Run ``cells`` as Ray tasks; yields ``(cell, result)`` in cell order as each completes."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("--executor ray needs Ray: pip install 'certbench[ray]'") from exc
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            kwargs["address"] = address
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        ray.init(**kwargs)
    dev = str(resolve_device(device)) if device not in (None, "", "auto") else device
    gpus = (
        1
        if (dev or "").startswith("cuda") or (dev in (None, "auto") and torch.cuda.is_available())
        else 0
    )
    opts = {
        "num_cpus": num_cpus_per_task,
        "num_gpus": gpus,
        "max_retries": TASK_RETRIES,
        "retry_exceptions": False,
    }
    train_remote = ray.remote(_train_task).options(**opts)
    shard_remote = ray.remote(_shard_task).options(**opts)
    ckroot = str(checkpoint_root)
    if shards is None:
        shards = max(1, int(ray.available_resources().get("CPU", 1)) // num_cpus_per_task)

    # Train every group of cells first (independent tasks), then evaluate the shards of each.
    groups = training_groups(cells)
    train_refs = {
        key: train_remote.remote(group, ckroot, dev, num_cpus_per_task)
        for key, group in groups.items()
    }
    driver = _Driver(ray, shard_remote, train_refs, groups, ckroot, dev, num_cpus_per_task, shards)
    bar = tqdm(total=len(cells), desc=desc, unit="cell", disable=not progress)
    done: dict[str, Any] = {}  # results of cells evaluated with an earlier cell's group
    try:
        for cell in cells:
            if cell.cell_id() not in done:
                done.update(driver.evaluate(cell))
            bar.update(1)
            yield cell, done.pop(cell.cell_id())
    finally:
        bar.close()


@dataclass
class _Driver:
    """The driver's side of evaluating a trained cell: its shard tasks, then its record."""

    ray: Any
    shard_remote: Any  # the remote _shard_task
    train_refs: dict[str, Any]  # train_key -> the training task's result
    groups: dict[str, list]  # train_key -> its cells
    ckroot: str
    device: str | None
    threads: int
    shards: int

    def evaluate(self, cell: Any) -> dict[str, Any]:
        """Evaluate ``cell`` and the cells that share its clean certificate
        (:func:`~bench.pipeline.certificate_groups`) in one set of shard tasks;
        ``{cell_id: record}``, a :class:`CellFailed` for each when a task was lost."""
        try:
            all_facts, train_seconds = _get(self.ray, self.train_refs[cell.train_key()])
        except _TaskLost as lost:  # the training's other cells fail with the same error
            return {cell.cell_id(): CellFailed(cell, str(lost))}
        groups = certificate_groups(
            self.groups[cell.train_key()], lambda c: all_facts[c.cell_id()].shared
        )
        group = next(g for g in groups if cell in g)
        n_test = int(dataset_for(cell).y_test.numel())
        t0 = time.perf_counter()
        try:
            parts = _get(
                self.ray,
                [
                    self.shard_remote.remote(group, self.ckroot, self.device, self.threads, a, b)
                    for a, b in shard_bounds(n_test, self.shards)
                ],
            )
        except _TaskLost as lost:
            return {c.cell_id(): CellFailed(c, str(lost)) for c in group}
        seconds = (time.perf_counter() - t0) / len(group)  # split evenly, as the local executor
        return {
            c.cell_id(): cell_result(
                c,
                all_facts[c.cell_id()],
                merge_shards([part[i] for part in parts]),
                train_seconds=train_seconds,
                eval_seconds=seconds,
                executor="ray",
            )
            for i, c in enumerate(group)
        }


class _TaskLost(Exception):
    """A task Ray could not complete (its worker died more than TASK_RETRIES times)."""


def _get(ray: Any, refs: Any) -> Any:
    """``ray.get`` with a task's own error re-raised as itself, and a lost task as
    :class:`_TaskLost`."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, CertbenchError):
            raise cause from None
        raise
    except ray.exceptions.RayError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _TaskLost(f"Ray task failed after {TASK_RETRIES} retries: {first}") from exc
