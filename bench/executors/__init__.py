"""Executors run the cells of a spec; the driver (this module) writes the store.

``run_spec`` expands a spec into cells, skips those already stored, hands the rest to an
executor and stores each result as it arrives, in one transaction per cell, so a run killed
at any point resumes with the unfinished cells only. Executors live in their own modules
(:mod:`bench.executors.local`, :mod:`bench.executors.ray_executor`), never import each
other, and run every cell through the one pipeline (:mod:`bench.pipeline`), so a cell's
results do not depend on which executor ran it.

An executor module provides ``run_cells(cells, checkpoint_root, *, device, progress, desc,
**options) -> Iterator[(cell, result)]`` and yields every cell it is given, with its result
(:func:`bench.pipeline.cell_result`) or a :class:`CellFailed`.

Several ``certbench run`` processes may share one store: each claims the cells it computes
(:meth:`bench.store.Store.claim`, renewed by a heartbeat while it runs), waits for the cells
another live process claimed, and takes over the claims of processes that died. Every cell
is computed and stored once. An executor yields a :class:`CellFailed` instead of a result
for a cell it gave up on (e.g. its worker process died twice); the run stores the others
and reports the failures at the end, and a re-run computes the failed cells.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.errors import CellFailed, CertbenchError, ConfigError

__all__ = ["EXECUTORS", "CellFailed", "run_spec"]

EXECUTORS = {"local": "bench.executors.local", "ray": "bench.executors.ray_executor"}
"""Executor name -> module (imported only when chosen)."""

WAIT_POLL_S = 1.0
"""How often a run waiting for cells that another process computes looks at the store."""


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
    detach_stale: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Run every cell of ``spec`` not yet in the store; the driver writes each result.

    ``force`` re-runs and replaces stored cells (those another run computes meanwhile are
    taken as they are). ``options`` go to the executor (local: ``jobs``; Ray: ``address``,
    ``shards``). Returns ``{"ran", "skipped", "rows", "failed", "detached"}``: cells computed
    here, cells found stored (or computed by another run), one summary row per cell in spec
    order (for printing), a :class:`CellFailed` per cell the executor gave up on, and how many
    cells stored under ``spec.name`` were detached from it because the spec no longer has
    them (it was edited; with ``detach_stale``, for a spec run as written): they leave its
    boards and stay in the store.
    """
    from bench.store import Claimant, Store

    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; allowed: {', '.join(EXECUTORS)}")
    store = Store(store_path)
    cells = spec.cells()
    by_id = {c.cell_id(): c for c in cells}
    module = importlib.import_module(EXECUTORS[executor])
    claimant = Claimant.current()
    rows: dict[str, dict[str, Any]] = {}  # summary rows of the cells computed here
    failed: list[CellFailed] = []
    pending = list(by_id)  # neither stored (for this run) nor failed yet
    redo = set(pending) if force else set()  # cells to compute even if stored
    theirs: set[str] = set()  # cells another run claimed: stored by it, they are done
    mine: set[str] = set()  # claimed by this run, not yet stored
    with store.held_open(), _Heartbeat(store, claimant):
        detached = store.detach_stale(spec.name, by_id) if detach_stale else 0
        try:
            while pending:
                found = store.claim(pending, claimant, redo=redo - theirs)
                theirs.update(found.elsewhere)
                # a cell first computed under another spec belongs to this one too
                store.link_many(by_id[cid] for cid in found.stored)
                mine = set(found.mine)
                gone = mine | set(found.stored)
                pending = [cid for cid in pending if cid not in gone]
                if not mine:
                    if pending:
                        time.sleep(WAIT_POLL_S)  # other runs compute what is left
                    continue
                results = module.run_cells(
                    [by_id[cid] for cid in found.mine],
                    store.checkpoint_root(),
                    device=device,
                    progress=progress,
                    desc=spec.name,
                    **options,
                )
                with contextlib.closing(results):
                    for cell, result in results:
                        cid = cell.cell_id()
                        if isinstance(result, CellFailed):  # reported once, at the end
                            failed.append(result)
                            store.release([cid], claimant)
                        else:
                            store.put(cell, result, replace=cid in redo)
                            rows[cid] = _summary_row(cell, result)
                            _log_cell(spec.name, cell, result)
                        mine.discard(cid)
                if mine:
                    raise RuntimeError(
                        f"executor {executor!r} returned without {len(mine)} cell(s)"
                    )
        finally:
            with contextlib.suppress(CertbenchError):
                store.release(mine, claimant)
    ran = len(rows)
    failed_ids = {f.cell.cell_id() for f in failed}
    missing = [cid for cid in by_id if cid not in rows and cid not in failed_ids]
    if missing:
        for got in store.cells(spec_name=spec.name):
            if got["cell_id"] in by_id and got["cell_id"] not in rows:
                rows[got["cell_id"]] = _summary_row(by_id[got["cell_id"]], got)
    skipped = len(cells) - ran - len(failed)
    ordered = [rows[cid] for cid in by_id if cid in rows]
    return {
        "ran": ran,
        "skipped": skipped,
        "rows": ordered,
        "failed": failed,
        "detached": detached,
    }


class _Heartbeat:
    """Renews this run's claims every quarter lease, in a background thread."""

    def __init__(self, store, claimant) -> None:
        from bench.store import CLAIM_LEASE_S

        self.store, self.claimant = store, claimant
        self.period = CLAIM_LEASE_S / 4
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="certbench-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.period):
            with contextlib.suppress(Exception):  # a missed beat only shortens the lease
                self.store.heartbeat(self.claimant)

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def _log_cell(spec_name: str, cell, result: dict[str, Any]) -> None:
    from tqdm.auto import tqdm

    acc = result["metrics"].get("accuracy")
    train_s = result["train_seconds"]
    trained = "pretrained" if train_s is None else f"{train_s:.1f} s train"
    tqdm.write(  # above the progress bars, which are redrawn below it
        f"[{spec_name}] stored {cell.label or cell.defense} {cell.model} {cell.norm} "
        f"seed={cell.seed}: accuracy {acc:.4f} ({trained}, "
        f"{result['eval_seconds']:.1f} s eval)",
        file=sys.stderr,
    )
