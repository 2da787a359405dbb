"""Executors run the cells of a spec; the driver (this module) writes the store.

``run_spec`` expands a spec into cells, skips those already stored, hands the rest to an
executor and stores each result as it arrives, in one transaction per cell, so a run killed
at any point resumes with the unfinished cells only. Executors live in their own modules
(:mod:`bench.executors.local`, :mod:`bench.executors.ray_executor`), never import each
other, and run every cell through the one pipeline (:mod:`bench.pipeline`), so a cell's
results do not depend on which executor ran it.

An executor module provides ``run_cells(cells, checkpoint_root, *, device, progress,
**options) -> Iterator[(cell, result)]``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from bench.errors import ConfigError

EXECUTORS = {"local": "bench.executors.local", "ray": "bench.executors.ray_executor"}
"""Executor name -> module (imported only when chosen)."""


def _summary_row(cell, result: dict[str, Any]) -> dict[str, Any]:
    """One printed line per cell: accuracy and, at the headline budget (the spec's, else the
    smallest attack budget), guaranteed accuracy and accuracy under attack."""
    from bench.metrics import metric_key

    m = result["metrics"]
    row: dict[str, Any] = {
        "defense": cell.label or cell.defense,
        "model": cell.model,
        "norm": cell.norm,
        "seed": cell.seed,
        "accuracy": m.get("accuracy"),
    }
    h = cell.threat.get("headline")
    if h is None and cell.threat.get("eps") and cell.attack:
        h = min(cell.threat["eps"])
    if h is not None:
        row["eps"] = h
        row["guaranteed"] = m.get(metric_key("guaranteed_accuracy", h))
        row["under_attack"] = m.get(metric_key("accuracy_under_attack", h))
    return row


def run_spec(
    spec,
    store_path: str | Path,
    *,
    executor: str = "local",
    device: str | None = None,
    force: bool = False,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Run every cell of ``spec`` not yet in the store; the driver writes each result.

    ``force`` re-runs and replaces stored cells. ``options`` go to the executor (Ray:
    ``address``, ``shards``). Returns ``{"ran", "skipped", "rows"}`` (one summary row per
    cell, for printing).
    """
    from bench.store import Store

    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; allowed: {', '.join(EXECUTORS)}")
    store = Store(store_path)
    cells = spec.cells()
    todo = [c for c in cells if force or not store.has(c.cell_id())]
    done = [c for c in cells if c not in todo]
    for c in done:
        store.link(c)  # a cell first computed under another spec belongs to this one too
    module = importlib.import_module(EXECUTORS[executor])
    results = module.run_cells(
        todo,
        store.checkpoint_root(),
        device=device,
        progress=progress,
        desc=spec.name,
        **options,
    )
    rows: list[dict[str, Any]] = []
    for cell, result in results:
        store.put(cell, result, replace=force)
        rows.append(_summary_row(cell, result))
        _log_cell(spec.name, cell, result)
    for c in done:
        got = store.get(c.cell_id())
        if got is not None:
            rows.append(_summary_row(c, got))
    return {"ran": len(todo), "skipped": len(done), "rows": rows}


def _log_cell(spec_name: str, cell, result: dict[str, Any]) -> None:
    acc = result["metrics"].get("accuracy")
    train_s = result["train_seconds"]
    trained = "pretrained" if train_s is None else f"{train_s:.1f} s train"
    print(
        f"[{spec_name}] stored {cell.label or cell.defense} {cell.model} {cell.norm} "
        f"seed={cell.seed}: accuracy {acc:.4f} ({trained}, "
        f"{result['eval_seconds']:.1f} s eval)",
        file=sys.stderr,
    )
