"""Executing benchmark cells: stages, the local executor and the Ray executor.

A cell (:class:`bench.spec.CellConfig`) runs in three stages:

1. **train** — build model + defense, train with the runner's loop (or reuse the checkpoint
   stored under the cell's ``train_key``), save safetensors + JSON;
2. **evaluate shards** — certify/predict a contiguous slice ``[start, stop)`` of the test set
   and attack it, returning per-example arrays; every noise draw is seeded by the global
   example index, and attacks run in fixed chunks of :data:`ATTACK_CHUNK` examples, so the
   arrays do not depend on how the test set is sharded;
3. **finalise** — metrics from the concatenated arrays; the *driver* writes the store.

Workers (Ray tasks) only return rows; only the driver writes the store, so results are
identical whichever executor ran them.
"""

from __future__ import annotations

import hashlib
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bench.errors import ConfigError
from bench.runner import (
    TrainSettings,
    build_defense,
    certify_all,
    configure_threads,
    load_defense_state,
    predict_all,
    provenance,
    resolve_device,
    save_defense,
    seed_everything,
    train,
)

ATTACK_CHUNK = 100  # examples per attack call; fixes the attack's random starts per chunk
CERTIFY_CHUNK = 100  # examples per certify call (the engine batches draws within a chunk)


@lru_cache(maxsize=4)
def _dataset(name: str, data_dir: str | None, limit_train: int | None, limit_test: int | None):
    from bench.data import load_dataset

    return load_dataset(name, data_dir, limit_train=limit_train, limit_test=limit_test)


def dataset_for(cell) -> Any:
    """The (cached) dataset of a cell."""
    return _dataset(cell.dataset, cell.data_dir, cell.limit_train, cell.limit_test)


def _chunk_seed(seed: int, start: int) -> int:
    h = hashlib.sha256(f"{seed}:{start}".encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def checkpoint_path(cell, checkpoint_root: str | Path) -> Path:
    """Where a cell's trained defense is checkpointed (shared by cells with the same train_key)."""
    return Path(checkpoint_root) / cell.train_key() / "defense"


# --------------------------------------------------------------------------- stages


def prepare_defense(cell, checkpoint_root: str | Path, *, device: torch.device, progress: bool):
    """Stage 1: the trained defense of ``cell`` (from its checkpoint, or trained now).

    Returns ``(defense, train_seconds)``.
    """
    from bench.checkpoint import checkpoint_paths, load_tensors, read_record

    ds = dataset_for(cell)
    seed_everything(cell.seed)
    d = build_defense(
        cell.defense,
        dict(cell.params),
        cell.model,
        input_shape=ds.input_shape,
        num_classes=ds.num_classes,
        device=device,
    )
    ck = checkpoint_path(cell, checkpoint_root)
    tensors, record_path = checkpoint_paths(ck)
    if record_path.is_file() and tensors.is_file():
        record = read_record(ck)
        load_defense_state(d, load_tensors(tensors), source=str(tensors))
        d.model_.to(device)
        return d, float(record.get("train_seconds", 0.0))
    settings = TrainSettings.for_defense(d, dict(cell.train))
    report = train(
        d,
        ds.x_train,
        ds.y_train,
        settings,
        seed=cell.seed,
        progress=progress,
        desc=f"train {cell.defense}",
    )
    save_defense(
        ck,
        d,
        model=cell.model,
        dataset=cell.dataset,
        train=vars(settings),
        train_seconds=report.seconds,
        final_loss=report.final_loss,
        seed=cell.seed,
    )
    return d, report.seconds


def evaluate_shard(d, cell, start: int, stop: int, *, progress: bool = False) -> dict[str, Any]:
    """Stage 2: per-example results for test examples ``[start, stop)``.

    Returns ``{"y", "pred", "radius" (or None), "adv": {eps: (pred_adv, radius_adv|None)}}``
    as CPU tensors. ``start`` must be a multiple of :data:`ATTACK_CHUNK` for shard
    independence of the attack stage.
    """
    ds = dataset_for(cell)
    x, y = ds.x_test[start:stop], ds.y_test[start:stop]
    eval_bs = cell.eval.get("batch_size")
    certifies = cell.norm in d.certifies
    if certifies:
        cert = certify_all(
            d,
            x,
            norm=cell.norm,
            seed=cell.seed,
            batch_size=CERTIFY_CHUNK,
            eval_batch_size=eval_bs,
            progress=progress,
            offset=start,
        )
        pred, radius = cert.labels, cert.radius(cell.norm)
    else:
        pred = predict_all(
            d, x, seed=cell.seed, batch_size=CERTIFY_CHUNK, eval_batch_size=eval_bs, offset=start
        )
        radius = None
    out: dict[str, Any] = {"y": y.clone(), "pred": pred, "radius": radius, "adv": {}}
    attack_cfg = cell.attack
    if attack_cfg:
        from attacks import attack, rescore

        limit = attack_cfg.get("limit") or ds.y_test.numel()
        a_stop = min(stop, limit)
        for eps in cell.threat.get("eps", []):
            preds, radii = [], []
            for a in range(start, a_stop, ATTACK_CHUNK):
                b = min(a_stop, a + ATTACK_CHUNK)
                xa = ds.x_test[a:b].to(d.device)
                ya = ds.y_test[a:b].to(d.device)
                x_adv = attack(
                    d,
                    xa,
                    ya,
                    norm=cell.norm,
                    eps=float(eps),
                    library=attack_cfg.get("library", "certbench"),
                    name=attack_cfg.get("name", "pgd"),
                    seed=_chunk_seed(cell.seed, a),
                    **dict(attack_cfg.get("params", {})),
                )
                p_adv, r_adv = rescore(
                    d,
                    x_adv,
                    ya,
                    norm=cell.norm,
                    seed=cell.seed,
                    indices=torch.arange(a, b),
                    batch_size=eval_bs,
                    certify=certifies,
                )
                preds.append(p_adv.cpu())
                radii.append(r_adv.cpu() if r_adv is not None else None)
            if preds:
                out["adv"][float(eps)] = (
                    torch.cat(preds),
                    torch.cat(radii) if all(r is not None for r in radii) else None,
                )
    return out


def merge_shards(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate shard outputs in test-set order."""

    def cat(key):
        vals = [s[key] for s in shards]
        return None if any(v is None for v in vals) else torch.cat(vals)

    merged = {"y": cat("y"), "pred": cat("pred"), "radius": cat("radius"), "adv": {}}
    eps_keys = sorted({e for s in shards for e in s["adv"]})
    for eps in eps_keys:
        parts = [s["adv"][eps] for s in shards if eps in s["adv"]]
        p = torch.cat([q[0] for q in parts])
        r = None if any(q[1] is None for q in parts) else torch.cat([q[1] for q in parts])
        merged["adv"][eps] = (p, r)
    return merged


def finalise(cell, d_certifies: bool, merged: dict[str, Any]) -> dict[str, float | None]:
    """Stage 3: the metrics of a cell from its per-example arrays."""
    from bench.metrics import MetricSet

    ms = MetricSet(
        radii=list(cell.threat.get("radii", [])),
        thresholds=list(cell.threat.get("thresholds", [])),
        eps_list=sorted(merged["adv"]),
        certifies=d_certifies,
    )
    y, pred, radius = merged["y"], merged["pred"], merged["radius"]
    ms.update(y=y, pred=pred, radius=radius)
    metrics = ms.compute()
    # Attack metrics are over the attacked subset (attack.limit), computed by the same class.
    if merged["adv"]:
        n_adv = min(v[0].numel() for v in merged["adv"].values())
        ms_adv = MetricSet(
            radii=[],
            thresholds=list(cell.threat.get("thresholds", [])),
            eps_list=sorted(merged["adv"]),
            certifies=d_certifies,
        )
        ms_adv.update(
            y=y[:n_adv],
            pred=pred[:n_adv],
            radius=None if radius is None else radius[:n_adv],
            pred_adv={e: v[0][:n_adv] for e, v in merged["adv"].items()},
            radius_adv={e: v[1][:n_adv] for e, v in merged["adv"].items() if v[1] is not None}
            or None,
        )
        for k, v in ms_adv.compute().items():
            if "under_attack" in k:
                metrics[k] = v
    return metrics


def _attack_label(cell) -> str | None:
    if not cell.attack:
        return None
    params = cell.attack.get("params", {})
    extra = ",".join(f"{k}={v}" for k, v in sorted(params.items()))
    return f"{cell.attack.get('library', 'certbench')}:{cell.attack.get('name', 'pgd')}" + (
        f"({extra})" if extra else ""
    )


def _n_draws(d) -> int | None:
    params = d.get_params()
    for key in ("n_draws", "n"):
        if key in params and params[key] is not None:
            return int(params[key])
    return None


def _alpha(d, cell) -> float | None:
    params = d.get_params()
    for key in ("alpha", "eta"):
        if key in params and params[key] is not None:
            return float(params[key])
    return cell.eval.get("alpha") if d.randomized else None


def run_cell(
    cell,
    checkpoint_root: str | Path,
    *,
    device: str | None = None,
    progress: bool = False,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Run one cell end to end in this process and return its result record (no store write)."""
    configure_threads(num_threads)
    dev = resolve_device(device or cell.device)
    d, train_seconds = prepare_defense(cell, checkpoint_root, device=dev, progress=progress)
    t0 = time.perf_counter()
    n_test = int(dataset_for(cell).y_test.numel())
    merged = evaluate_shard(d, cell, 0, n_test, progress=progress)
    metrics = finalise(cell, cell.norm in d.certifies, merged)
    return {
        "metrics": metrics,
        "n_test": n_test,
        "n_draws": _n_draws(d) if d.randomized else None,
        "alpha": _alpha(d, cell),
        "attack": _attack_label(cell),
        "train_seconds": float(train_seconds),
        "eval_seconds": time.perf_counter() - t0,
        "provenance": provenance(),
    }


# --------------------------------------------------------------------------- executors


def _summary_row(cell, result: dict[str, Any]) -> dict[str, Any]:
    """One printed line per cell: accuracy, the largest-radius guaranteed accuracy, the
    smallest-budget accuracy under attack (when present)."""
    m = result["metrics"]
    row: dict[str, Any] = {
        "defense": cell.label or cell.defense,
        "model": cell.model,
        "norm": cell.norm,
        "seed": cell.seed,
        "accuracy": m.get("accuracy"),
    }
    guaranteed = [k for k in m if k.startswith("guaranteed_accuracy@")]
    attacked = [k for k in m if k.startswith("accuracy_under_attack@")]
    if guaranteed:
        row[guaranteed[-1]] = m[guaranteed[-1]]
    if attacked:
        row[attacked[0]] = m[attacked[0]]
    return row


def run_spec(
    spec,
    store_path: str | Path,
    *,
    executor: str = "local",
    device: str | None = None,
    address: str | None = None,
    force: bool = False,
    progress: bool = True,
    shards: int | None = None,
) -> dict[str, Any]:
    """Run every cell of ``spec`` not yet in the store; the driver writes each result.

    A cell is stored in one transaction as soon as it finishes, so a run killed at any point
    resumes with the unfinished cells only (``force`` re-runs and replaces stored cells).
    """
    from bench.store import Store

    store = Store(store_path)
    cells = spec.cells()
    todo = [c for c in cells if force or not store.has(c.cell_id())]
    done = [c for c in cells if c not in todo]
    for c in done:
        store.link(c)  # a cell first computed under another spec belongs to this one too
    ckroot = store.checkpoint_root()
    rows: list[dict[str, Any]] = []
    if executor == "local":
        results = _run_local(todo, ckroot, device=device, progress=progress, spec_name=spec.name)
    elif executor == "ray":
        from bench.ray_executor import run_cells_ray

        results = run_cells_ray(
            todo, ckroot, device=device, address=address, shards=shards, progress=progress
        )
    else:
        raise ConfigError(f"unknown executor {executor!r}; allowed: local, ray")
    for cell, result in results:
        store.put(cell, result, replace=force)
        rows.append(_summary_row(cell, result))
        _log_cell(spec.name, cell, result)
    for c in done:
        got = store.get(c.cell_id())
        if got is not None:
            rows.append(_summary_row(c, got))
    return {"ran": len(todo), "skipped": len(done), "rows": rows}


def _run_local(cells, ckroot, *, device, progress, spec_name):
    bar = tqdm(cells, desc=spec_name, unit="cell", disable=not progress)
    for cell in bar:
        bar.set_postfix_str(f"{cell.defense}/{cell.model}/{cell.norm}")
        yield cell, run_cell(cell, ckroot, device=device, progress=progress)


def _log_cell(spec_name: str, cell, result: dict[str, Any]) -> None:
    acc = result["metrics"].get("accuracy")
    print(
        f"[{spec_name}] stored {cell.label or cell.defense} {cell.model} {cell.norm} "
        f"seed={cell.seed}: accuracy {acc:.4f} ({result['train_seconds']:.1f} s train, "
        f"{result['eval_seconds']:.1f} s eval)",
        file=sys.stderr,
    )
