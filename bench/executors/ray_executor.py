"""Ray executor: cells, and test-set shards of their evaluation, as Ray tasks.

``certbench run SPEC --executor ray [--address auto]`` (extra ``certbench[ray]``). For each
cell one task trains the defense (or finds its checkpoint) and saves it under the store's
checkpoint directory; then ``shards`` tasks each run :func:`bench.pipeline.evaluate_shard` on
a contiguous slice of the test set and return its per-example results. Only the driver
merges them, scores the cell and writes the store, with the same pipeline functions as the
local executor.

Shard boundaries are multiples of :data:`bench.pipeline.ATTACK_CHUNK` and every noise draw
is seeded by the global example index, so the per-example results, and hence the metrics,
are identical to the local executor's for the same trained weights. Training itself is
deterministic for a fixed seed *and thread count*; each task pins torch to the CPUs Ray gives
it (``num_cpus``, default 1), so run the local executor with ``CERTBENCH_NUM_THREADS`` equal
to that number when comparing bit for bit.

On a cluster the checkpoint directory (next to the store) must be on storage every node
sees; tasks ask for ``num_gpus=1`` when the device is CUDA.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bench.allocator import tune_malloc
from bench.environment import configure_threads, resolve_device
from bench.errors import ConfigError
from bench.pipeline import (
    ATTACK_CHUNK,
    DefenseFacts,
    ShardResult,
    cell_result,
    dataset_for,
    evaluate_shard,
    merge_shards,
    prepare_defense,
)


def _shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """Split ``[0, n)`` into at most ``shards`` slices starting at multiples of ATTACK_CHUNK."""
    chunks = max(1, -(-n // ATTACK_CHUNK))
    shards = max(1, min(shards, chunks))
    per = -(-chunks // shards)
    bounds = []
    for s in range(shards):
        a, b = s * per * ATTACK_CHUNK, min(n, (s + 1) * per * ATTACK_CHUNK)
        if a < b:
            bounds.append((a, b))
    return bounds


def _worker(cell, ckroot: str, device: str | None, threads: int):
    configure_threads(threads)
    tune_malloc()
    return prepare_defense(
        cell, ckroot, device=resolve_device(device or cell.device), progress=False
    )


def _train_task(
    cell, ckroot: str, device: str | None, threads: int
) -> tuple[DefenseFacts, float | None]:
    d, train_seconds = _worker(cell, ckroot, device, threads)  # None: a pretrained cell
    return DefenseFacts.of(d, cell.norm), None if train_seconds is None else float(train_seconds)


def _shard_task(cell, ckroot: str, device: str | None, threads: int, a: int, b: int) -> ShardResult:
    d, _ = _worker(cell, ckroot, device, threads)
    return evaluate_shard(d, cell, a, b)


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
    opts = {"num_cpus": num_cpus_per_task, "num_gpus": gpus}
    train_remote = ray.remote(_train_task).options(**opts)
    shard_remote = ray.remote(_shard_task).options(**opts)
    ckroot = str(checkpoint_root)
    if shards is None:
        shards = max(1, int(ray.available_resources().get("CPU", 1)) // num_cpus_per_task)

    # Train every cell first (independent tasks), then evaluate the shards of each.
    train_refs = [train_remote.remote(c, ckroot, dev, num_cpus_per_task) for c in cells]
    bar = tqdm(total=len(cells), desc=desc, unit="cell", disable=not progress)
    try:
        for cell, tref in zip(cells, train_refs, strict=True):
            facts, train_seconds = ray.get(tref)
            n_test = int(dataset_for(cell).y_test.numel())
            t0 = time.perf_counter()
            parts = ray.get(
                [
                    shard_remote.remote(cell, ckroot, dev, num_cpus_per_task, a, b)
                    for a, b in _shard_bounds(n_test, shards)
                ]
            )
            result = cell_result(
                cell,
                facts,
                merge_shards(parts),
                train_seconds=train_seconds,
                eval_seconds=time.perf_counter() - t0,
                executor="ray",
            )
            bar.update(1)
            yield cell, result
    finally:
        bar.close()
