"""The cell pipeline: the one owner of train/load → predict/certify → attack → re-score → record.

Every way of running certbench goes through these functions: the local and Ray executors
(:mod:`bench.executors`) run whole cells or test-set shards with :func:`run_cell` /
:func:`evaluate_shard`, and the ``train``/``eval``/``certify``/``attack`` commands call the
same stages (:func:`fit`, :func:`predict_all`, :func:`certify_all`, :func:`attack_all`) on
a loaded checkpoint. Metrics always come from :class:`bench.metrics.MetricSet`.

Stages of a cell (:class:`bench.spec.CellConfig`):

1. **train or load** (:func:`prepare_defense`) — build model + defense, train it with the
   training loop (:mod:`bench.training`) or reuse the checkpoint stored under the cell's
   ``train_key``;
2. **evaluate** (:func:`evaluate_shard`) — predict, or certify at the cell's radii, every test
   example of a slice ``[start, stop)``; attack the first ``attack.limit`` of them at every
   budget and re-score the attacked inputs with the defense's own prediction. Noise draws
   are seeded by the global example index and attacks run in fixed chunks of
   :data:`ATTACK_CHUNK` examples seeded by the chunk's start, so per-example results do not
   depend on how the test set is sharded;
3. **score and record** (:func:`score`, :func:`cell_result`) — metrics from the merged
   per-example arrays and the record the store keeps (what the defense declares through
   :meth:`defenses.base.Defense.record`, timings, provenance).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from bench.assembly import build_defense, load_defense_state, save_defense
from bench.checkpoint import checkpoint_paths, load_tensors, read_record
from bench.environment import configure_threads, provenance, resolve_device, seed_everything
from bench.metrics import MetricSet
from bench.training import TrainReport, TrainSettings, train
from defenses.base import Certificate, Defense

ATTACK_CHUNK = 100
"""Examples per attack call; the chunk's start seeds the attack's random starts."""
CERTIFY_CHUNK = 100
"""Examples per predict/certify call (the Monte Carlo engine batches draws within a chunk)."""


# --------------------------------------------------------------------------- stage 1: fit


def fit(
    d: Defense,
    x: Tensor,
    y: Tensor,
    settings: TrainSettings,
    *,
    seed: int,
    checkpoint: str | Path,
    model: str,
    dataset: str,
    progress: bool = True,
    **record: Any,
) -> TrainReport:
    """Train ``d`` on ``(x, y)`` (x: ``(N, C, H, W)`` in [0, 1]) and checkpoint it.

    The checkpoint (safetensors + JSON record at ``checkpoint``) records the defense, its
    parameters, ``model``, ``dataset``, the resolved training settings, the seed, the
    training time and any extra ``record`` fields.
    """
    report = train(d, x, y, settings, seed=seed, progress=progress, desc=f"train {d.name}")
    save_defense(
        checkpoint,
        d,
        model=model,
        dataset=dataset,
        train=vars(settings),
        train_seconds=report.seconds,
        final_loss=report.final_loss,
        seed=seed,
        **record,
    )
    return report


@lru_cache(maxsize=4)
def _dataset(name: str, data_dir: str | None, limit_train: int | None, limit_test: int | None):
    from bench.data import load_dataset

    return load_dataset(name, data_dir, limit_train=limit_train, limit_test=limit_test)


def dataset_for(cell) -> Any:
    """The (cached) dataset of a cell."""
    return _dataset(cell.dataset, cell.data_dir, cell.limit_train, cell.limit_test)


def checkpoint_path(cell, checkpoint_root: str | Path) -> Path:
    """Where a cell's trained defense is checkpointed (shared by cells with the same train_key)."""
    return Path(checkpoint_root) / cell.train_key() / "defense"


def prepare_defense(
    cell, checkpoint_root: str | Path, *, device: torch.device, progress: bool
) -> tuple[Defense, float]:
    """Stage 1: the trained defense of ``cell`` (from its checkpoint, or trained now).

    Returns ``(defense, train_seconds)``.
    """
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
    report = fit(
        d,
        ds.x_train,
        ds.y_train,
        settings,
        seed=cell.seed,
        checkpoint=ck,
        model=cell.model,
        dataset=cell.dataset,
        progress=progress,
    )
    return d, report.seconds


# --------------------------------------------------------------------------- stage 2: evaluate


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _chunk_seed(seed: int, start: int) -> int:
    h = hashlib.sha256(f"{seed}:{start}".encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def predict_all(
    d: Defense,
    x: Tensor,
    *,
    seed: int = 0,
    batch_size: int = CERTIFY_CHUNK,
    eval_batch_size: int | None = None,
    progress: bool = False,
    offset: int = 0,
) -> Tensor:
    """Predictions ``(N,)`` int64 (``-1`` = abstain) for rows ``x`` ``(N, C, H, W)`` in [0, 1].

    Rows are the test examples ``offset … offset + N − 1``: their global indices seed every
    noise draw, so results do not depend on ``batch_size`` or on sharding.
    """
    out = []
    for a, b in tqdm(
        list(_chunks(x.shape[0], batch_size)), desc="predict", disable=not progress, leave=False
    ):
        idx = torch.arange(offset + a, offset + b)
        with torch.no_grad():
            out.append(
                d.predict(
                    x[a:b].to(d.device), seed=seed, indices=idx, batch_size=eval_batch_size
                ).cpu()
            )
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def certify_all(
    d: Defense,
    x: Tensor,
    *,
    norm: str,
    seed: int = 0,
    radii: Sequence[float] | None = None,
    batch_size: int = CERTIFY_CHUNK,
    eval_batch_size: int | None = None,
    progress: bool = False,
    offset: int = 0,
) -> Certificate:
    """Certificates for every row of ``x`` (as :func:`predict_all`; ``radii`` as for
    :meth:`defenses.base.Defense.certify`)."""
    labels, radius, bound = [], [], ""
    extra: dict[str, list[Tensor]] = {}
    for a, b in tqdm(
        list(_chunks(x.shape[0], batch_size)),
        desc=f"certify {d.name}",
        disable=not progress,
        leave=False,
        unit="chunk",
    ):
        cert = d.certify(
            x[a:b].to(d.device),
            norm=norm,
            seed=seed,
            indices=torch.arange(offset + a, offset + b),
            batch_size=eval_batch_size,
            radii=radii,
        )
        labels.append(cert.labels.cpu())
        radius.append(cert.radius(norm).cpu().to(torch.float64))
        bound = cert.bound
        for k, v in cert.extra.items():
            extra.setdefault(k, []).append(v.cpu())
    if not labels:
        empty = torch.empty(0, dtype=torch.float64)
        return Certificate(torch.empty(0, dtype=torch.int64), {norm: empty}, bound=bound)
    return Certificate(
        labels=torch.cat(labels),
        radii={norm: torch.cat(radius)},
        bound=bound,
        extra={k: torch.cat(v) for k, v in extra.items()},
    )


def attack_all(
    d: Defense,
    x: Tensor,
    y: Tensor,
    *,
    norm: str,
    eps: float,
    attack: Mapping[str, Any],
    seed: int,
    thresholds: Sequence[float] | None = None,
    offset: int = 0,
    eval_batch_size: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Attack rows ``x`` ``(N, C, H, W)`` (test examples ``offset …``) at budget ``eps`` and
    re-score the attacked inputs with the defense's own prediction.

    ``attack`` is ``{"library", "name", "params"}``. Attacks run in chunks of
    :data:`ATTACK_CHUNK` examples; a chunk starting at global index ``a`` is attacked with
    seed ``_chunk_seed(seed, a)``, so the result depends only on ``seed`` and the examples.
    ``offset`` must be a multiple of :data:`ATTACK_CHUNK`.

    Returns ``(pred_adv, radius_adv)``: ``(N,)`` predictions on the attacked inputs and, when
    the defense certifies ``norm``, their certified radii (else ``None``).
    """
    from attacks import attack as run_attack
    from attacks import rescore

    if offset % ATTACK_CHUNK:
        raise ValueError(f"offset {offset} is not a multiple of ATTACK_CHUNK ({ATTACK_CHUNK})")
    certifies = norm in d.certifies
    preds, radii = [], []
    for a, b in _chunks(x.shape[0], ATTACK_CHUNK):
        xa, ya = x[a:b].to(d.device), y[a:b].to(d.device)
        x_adv = run_attack(
            d,
            xa,
            ya,
            norm=norm,
            eps=float(eps),
            library=attack.get("library", "certbench"),
            name=attack.get("name", "pgd"),
            seed=_chunk_seed(seed, offset + a),
            **dict(attack.get("params", {})),
        )
        p_adv, r_adv = rescore(
            d,
            x_adv,
            ya,
            norm=norm,
            seed=seed,
            indices=torch.arange(offset + a, offset + b),
            batch_size=eval_batch_size,
            certify=certifies,
        )
        preds.append(p_adv.cpu())
        radii.append(None if r_adv is None else r_adv.cpu())
    if not preds:
        return torch.empty(0, dtype=torch.int64), None
    radius = None if any(r is None for r in radii) else torch.cat(radii)
    return torch.cat(preds), radius


@dataclass
class ShardResult:
    """Per-example results of test examples ``[start, stop)`` (CPU tensors).

    Attributes:
        y: ``(N,)`` true labels.
        pred: ``(N,)`` clean predictions (``-1`` = abstain).
        radius: ``(N,)`` float64 certified radii, or ``None`` when the defense does not
            certify the cell's norm.
        adv: eps -> ``(pred_adv, radius_adv | None)`` for the attacked prefix of the slice.
    """

    y: Tensor
    pred: Tensor
    radius: Tensor | None
    adv: dict[float, tuple[Tensor, Tensor | None]] = field(default_factory=dict)


def evaluate_shard(
    d: Defense, cell, start: int, stop: int, *, progress: bool = False
) -> ShardResult:
    """Stage 2 for test examples ``[start, stop)`` of ``cell``'s dataset.

    ``start`` must be a multiple of :data:`ATTACK_CHUNK` (shards then attack the same chunks
    as a whole-set run).
    """
    ds = dataset_for(cell)
    x, y = ds.x_test[start:stop], ds.y_test[start:stop]
    eval_bs = cell.eval.get("batch_size")
    radii = cell.threat.get("radii", [])
    if cell.norm in d.certifies:
        cert = certify_all(
            d,
            x,
            norm=cell.norm,
            seed=cell.seed,
            radii=radii,
            eval_batch_size=eval_bs,
            progress=progress,
            offset=start,
        )
        pred, radius = cert.labels, cert.radius(cell.norm)
    else:
        pred = predict_all(d, x, seed=cell.seed, eval_batch_size=eval_bs, offset=start)
        radius = None
    out = ShardResult(y=y.clone(), pred=pred, radius=radius)
    if cell.attack:
        limit = cell.attack.get("limit") or ds.y_test.numel()
        a_stop = min(stop, limit)
        for eps in cell.threat.get("eps", []):
            if a_stop <= start:
                break
            out.adv[float(eps)] = attack_all(
                d,
                ds.x_test[start:a_stop],
                ds.y_test[start:a_stop],
                norm=cell.norm,
                eps=float(eps),
                attack=cell.attack,
                seed=cell.seed,
                offset=start,
                eval_batch_size=eval_bs,
            )
    return out


def merge_shards(shards: Sequence[ShardResult]) -> ShardResult:
    """Concatenate shard results in test-set order."""

    def cat(values):
        return None if any(v is None for v in values) else torch.cat(list(values))

    merged = ShardResult(
        y=cat([s.y for s in shards]),
        pred=cat([s.pred for s in shards]),
        radius=cat([s.radius for s in shards]),
    )
    for eps in sorted({e for s in shards for e in s.adv}):
        parts = [s.adv[eps] for s in shards if eps in s.adv]
        merged.adv[eps] = (cat([p for p, _ in parts]), cat([r for _, r in parts]))
    return merged


# --------------------------------------------------------------------------- stage 3: score


def score(
    merged: ShardResult,
    *,
    radii: Sequence[float] = (),
    thresholds: Sequence[float] = (),
    certifies: bool,
) -> tuple[dict[str, float | None], dict[str, tuple[int, int]]]:
    """The metrics of a cell from its per-example results (:class:`bench.metrics.MetricSet`)
    and the counts ``(k, n)`` behind each fraction.

    Clean metrics are over every example; attack metrics over the attacked prefix.
    """
    ms = MetricSet(
        radii=list(radii),
        thresholds=list(thresholds),
        eps_list=sorted(merged.adv),
        certifies=certifies,
    )
    ms.update(y=merged.y, pred=merged.pred, radius=merged.radius)
    metrics, counts = ms.compute(), ms.counts()
    if merged.adv:
        n_adv = min(p.numel() for p, _ in merged.adv.values())
        ms_adv = MetricSet(
            thresholds=list(thresholds), eps_list=sorted(merged.adv), certifies=certifies
        )
        ms_adv.update(
            y=merged.y[:n_adv],
            pred=merged.pred[:n_adv],
            radius=None if merged.radius is None else merged.radius[:n_adv],
            pred_adv={e: p[:n_adv] for e, (p, _) in merged.adv.items()},
            radius_adv={e: r[:n_adv] for e, (_, r) in merged.adv.items() if r is not None} or None,
        )
        adv_counts = ms_adv.counts()
        for k, v in ms_adv.compute().items():
            if "under_attack" in k:
                metrics[k] = v
                if k in adv_counts:
                    counts[k] = adv_counts[k]
    return metrics, counts


def attack_label(attack: Mapping[str, Any] | None) -> str | None:
    """``library:name(param=value,…)`` of an attack config, for the board's ``attack`` column."""
    if not attack:
        return None
    params = attack.get("params", {})
    extra = ",".join(f"{k}={v}" for k, v in sorted(params.items()))
    label = f"{attack.get('library', 'certbench')}:{attack.get('name', 'pgd')}"
    return label + (f"({extra})" if extra else "")


@dataclass(frozen=True)
class DefenseFacts:
    """What the driver needs to know about a cell's trained defense (picklable, so a Ray
    worker can return it instead of the defense)."""

    certifies: bool
    randomized: bool
    n_draws: int | None
    alpha: float | None
    bound: str | None

    @classmethod
    def of(cls, d: Defense, norm: str) -> DefenseFacts:
        rec = d.record()
        return cls(
            certifies=norm in d.certifies,
            randomized=bool(d.randomized),
            n_draws=None if rec.n_draws is None else int(rec.n_draws),
            alpha=None if rec.alpha is None else float(rec.alpha),
            bound=rec.bound,
        )


def cell_result(
    cell,
    facts: DefenseFacts,
    merged: ShardResult,
    *,
    train_seconds: float,
    eval_seconds: float,
    executor: str = "local",
) -> dict[str, Any]:
    """The record of a finished cell, as :meth:`bench.store.Store.put` takes it."""
    metrics, counts = score(
        merged,
        radii=cell.threat.get("radii", []),
        thresholds=cell.threat.get("thresholds", []),
        certifies=facts.certifies,
    )
    prov: dict[str, Any] = {**provenance(), "executor": executor}
    if facts.bound is not None:
        prov["bound"] = facts.bound
    return {
        "metrics": metrics,
        "counts": counts,
        "n_test": int(merged.y.numel()),
        "n_draws": facts.n_draws,
        "alpha": facts.alpha,
        "attack": attack_label(cell.attack),
        "train_seconds": float(train_seconds),
        "eval_seconds": float(eval_seconds),
        "provenance": prov,
    }


def run_cell(
    cell,
    checkpoint_root: str | Path,
    *,
    device: str | None = None,
    progress: bool = False,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Run one cell end to end in this process and return its record (no store write)."""
    configure_threads(num_threads)
    dev = resolve_device(device or cell.device)
    d, train_seconds = prepare_defense(cell, checkpoint_root, device=dev, progress=progress)
    t0 = time.perf_counter()
    n_test = int(dataset_for(cell).y_test.numel())
    merged = evaluate_shard(d, cell, 0, n_test, progress=progress)
    return cell_result(
        cell,
        DefenseFacts.of(d, cell.norm),
        merged,
        train_seconds=train_seconds,
        eval_seconds=time.perf_counter() - t0,
    )
