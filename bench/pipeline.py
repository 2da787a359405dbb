"""The cell pipeline: the one owner of train/load → predict/certify → attack → re-score → record.

Every way of running certbench goes through these functions: the local and Ray executors
(:mod:`bench.executors`) run whole cells or test-set shards with :func:`run_cell` /
:func:`evaluate_shard`, and the ``train``/``eval``/``certify``/``attack`` commands call the
same stages (:func:`fit`, :func:`predict_all`, :func:`certify_all`, :func:`attack_all`) on
a loaded checkpoint. Metrics always come from :class:`bench.metrics.MetricSet`.

Stages of a cell (:class:`bench.spec.CellConfig`):

1. **train or load** (:func:`prepare_defense`) — build model + defense, train it with the
   training loop (:mod:`bench.training`) or reuse the checkpoint stored under the cell's
   ``train_key``; a pretrained cell loads its model's weights instead and is never trained;
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

import copy
import hashlib
import inspect
import math
import queue
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from bench.assembly import build_defense, load_defense_state, load_weights, save_defense
from bench.checkpoint import checkpoint_paths, load_tensors, read_record
from bench.environment import (
    adapt_threads,
    adaptive,
    configure_threads,
    intra_op_threads,
    provenance,
    resolve_device,
    seed_everything,
    training_threads,
    usable_cores,
)
from bench.errors import ConfigError
from bench.files import exclusive_lock
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
def _dataset(
    name: str,
    data_dir: str | None,
    limit_train: int | None,
    limit_test: int | None,
    train: bool = True,
):
    from bench.data import load_dataset

    return load_dataset(name, data_dir, limit_train=limit_train, limit_test=limit_test, train=train)


def dataset_for(cell) -> Any:
    """The (cached) dataset of a cell (the test split only for a pretrained cell: its training
    files need not exist)."""
    if cell.pretrained:
        return _dataset(cell.dataset, cell.data_dir, cell.limit_train, cell.limit_test, False)
    return _dataset(cell.dataset, cell.data_dir, cell.limit_train, cell.limit_test)


def checkpoint_path(cell, checkpoint_root: str | Path) -> Path:
    """Where a cell's trained defense is checkpointed (shared by cells with the same train_key)."""
    return Path(checkpoint_root) / cell.train_key() / "defense"


def prepare_defense(
    cell, checkpoint_root: str | Path, *, device: torch.device, progress: bool
) -> tuple[Defense, float | None]:
    """Stage 1: the trained defense of ``cell`` (from its checkpoint, or trained now), or,
    for a pretrained cell, its model with the cell's weights (never trained).

    Returns ``(defense, train_seconds)``; ``train_seconds`` is ``None`` for a pretrained cell.
    """
    ds = dataset_for(cell)
    seed_everything(cell.seed)
    weights = None
    if cell.pretrained:
        if cell.checkpoint is None:
            raise ConfigError(
                f"cell {cell.cell_id()}: pretrained (weights {cell.weights_sha256[:16]}...) "
                "but no checkpoint file names its weights"
            )
        weights = load_weights(cell.checkpoint, sha256=cell.weights_sha256)
    d = build_defense(
        cell.defense,
        dict(cell.params),
        cell.model,
        input_shape=ds.input_shape,
        num_classes=ds.num_classes,
        device=device,
        base_state=weights,
        base_source=cell.checkpoint or "",
    )
    if cell.pretrained:
        return d, None
    ck = checkpoint_path(cell, checkpoint_root)
    tensors, record_path = checkpoint_paths(ck)

    def load() -> tuple[Defense, float] | None:
        if not (record_path.is_file() and tensors.is_file()):
            return None
        record = read_record(ck)
        load_defense_state(d, load_tensors(tensors), source=str(tensors))
        d.model_.to(device)
        return d, float(record.get("train_seconds", 0.0))

    found = load()
    if found is not None:
        return found
    # Two processes (workers, concurrent runs) may need the same checkpoint at once: the one
    # holding the lock trains it, the other waits and then loads it.
    with exclusive_lock(ck.with_suffix(".lock")):
        found = load()
        if found is not None:
            return found
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


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """Split test examples ``[0, n)`` into at most ``shards`` contiguous slices whose starts
    are multiples of :data:`ATTACK_CHUNK` (as :func:`evaluate_shard` requires); every
    executor shards a test set with it."""
    chunks = max(1, -(-n // ATTACK_CHUNK))
    shards = max(1, min(shards, chunks))
    per = -(-chunks // shards)
    bounds = []
    for s in range(shards):
        a, b = s * per * ATTACK_CHUNK, min(n, (s + 1) * per * ATTACK_CHUNK)
        if a < b:
            bounds.append((a, b))
    return bounds


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
        adapt_threads()
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
    labels: Tensor | None = None,
    norms: Sequence[str] | None = None,
) -> Certificate:
    """Certificates for every row of ``x`` (as :func:`predict_all`; ``radii`` and ``labels``
    as for :meth:`defenses.base.Defense.certify`; ``labels`` are passed only when given, so
    a defense whose certify predates the keyword keeps working). The result holds the radii
    of ``norms`` (default: ``norm`` alone), each as the defense's certificate reports it."""
    true_labels = labels
    keep = list(norms) if norms is not None else [norm]
    labels, bound = [], ""
    radius: dict[str, list[Tensor]] = {n: [] for n in keep}
    extra: dict[str, list[Tensor]] = {}

    def one(defense: Defense, a: int, b: int) -> Certificate:
        given = {} if true_labels is None else {"labels": true_labels[a:b].to(d.device)}
        return defense.certify(
            x[a:b].to(d.device),
            norm=norm,
            seed=seed,
            indices=torch.arange(offset + a, offset + b),
            batch_size=eval_batch_size,
            radii=radii,
            **given,
        )

    chunks = list(_chunks(x.shape[0], batch_size))
    bar = tqdm(
        total=len(chunks), desc=f"certify {d.name}", disable=not progress, leave=False, unit="chunk"
    )
    with bar:
        for cert in _certify_chunks(d, chunks, one, bar):
            labels.append(cert.labels.cpu())
            for n in keep:
                radius[n].append(cert.radius(n).cpu().to(torch.float64))
            bound = cert.bound
            for k, v in cert.extra.items():
                extra.setdefault(k, []).append(v.cpu())
    if not labels:
        empty = torch.empty(0, dtype=torch.float64)
        return Certificate(torch.empty(0, dtype=torch.int64), {n: empty for n in keep}, bound=bound)
    return Certificate(
        labels=torch.cat(labels),
        radii={n: torch.cat(r) for n, r in radius.items()},
        bound=bound,
        extra={k: torch.cat(v) for k, v in extra.items()},
    )


def _certify_chunks(
    d: Defense,
    chunks: list[tuple[int, int]],
    one: Callable[[Defense, int, int], Certificate],
    bar: Any,
) -> Iterator[Certificate]:
    """``one(defense, a, b)`` of every chunk, in order.

    In-process evaluation (:func:`bench.environment.adaptive`) of a deterministic defense
    on the CPU runs the chunks side by side: one Python thread per usable core, each with
    its own copy of the defense and one intra-op thread. Independent chunks
    slow down by their share of the cores when another process takes one, where intra-op
    parallelism waits at every operation for the thread that lost its core (README,
    "Threads and parallel jobs"). The certificates are those of the one-chunk-at-a-time
    loop (evaluation does not depend on the thread count; tested). A randomized defense's
    Monte Carlo engine has its own CPU pipelines, and a worker process has one thread:
    one chunk at a time, re-choosing the threads between chunks (:func:`adapt_threads`).
    """
    # every usable core, busy or not: independent threads lose only their share of a core
    # that another process takes (as `certbench run`'s workers), never wait on one another
    threads = usable_cores() if adaptive() else 1
    if threads > 1 and len(chunks) > 1 and not d.randomized and d.device.type == "cpu":
        try:
            copies = [copy.deepcopy(d) for _ in range(min(threads, len(chunks)))]
        except Exception:  # a defense that cannot be copied: one chunk at a time
            copies = []
        if copies:
            free = queue.SimpleQueue()
            for c in copies:
                free.put(c)

            def run(ab: tuple[int, int]) -> Certificate:
                defense = free.get()
                try:
                    return one(defense, *ab)
                finally:
                    free.put(defense)

            pool = ThreadPoolExecutor(len(copies), thread_name_prefix="certbench-chunk")
            try:
                with intra_op_threads(1):
                    for cert in pool.map(run, chunks):
                        bar.update(1)
                        yield cert
            finally:  # Ctrl-C or an error: the chunks not started are dropped, not run
                pool.shutdown(wait=True, cancel_futures=True)
            return
    for a, b in chunks:
        adapt_threads()
        yield one(d, a, b)
        bar.update(1)


def takes_labels(d: Defense) -> bool:
    """Whether ``d.certify`` accepts the true labels (``labels=``, :class:`Defense`'s
    contract); a plugin written before the keyword existed does not get them."""
    return "labels" in inspect.signature(d.certify).parameters


def attack_all(
    d: Defense,
    x: Tensor,
    y: Tensor,
    *,
    norm: str,
    eps: float,
    attack: Mapping[str, Any],
    seed: int,
    offset: int = 0,
    eval_batch_size: int | None = None,
    thresholds: Sequence[float] | None = None,
    on_chunk: Callable[[int], Any] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Attack rows ``x`` ``(N, C, H, W)`` (test examples ``offset …``) at budget ``eps`` and
    re-score the attacked inputs with the defense's own prediction.

    ``attack`` is ``{"library", "name", "params"}``. Attacks run in chunks of
    :data:`ATTACK_CHUNK` examples; a chunk starting at global index ``a`` is attacked with
    seed ``_chunk_seed(seed, a)``, so the result depends only on ``seed`` and the examples.
    ``offset`` must be a multiple of :data:`ATTACK_CHUNK`. ``thresholds`` are the radii the
    attacked inputs' certificates will be scored at (robust precision under attack).

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
        adapt_threads()
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
            radii=thresholds,
        )
        preds.append(p_adv.cpu())
        radii.append(None if r_adv is None else r_adv.cpu())
        if on_chunk is not None:
            on_chunk(1)
    if not preds:
        return torch.empty(0, dtype=torch.int64), None
    radius = None if any(r is None for r in radii) else torch.cat(radii)
    return torch.cat(preds), radius


def attack_list(attack: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None) -> list[dict]:
    """A cell's attack config as a list of attacks: ``None`` -> ``[]``, one ``[attack]``
    table -> ``[it]``, an ensemble (``[[attacks]]``) -> its tables. Each is ``{"library",
    "name", "params", "limit", "eps"}`` (``limit``: first N test examples; ``eps``: the
    budgets it runs at, ``None`` = every budget of the threat model)."""
    if not attack:
        return []
    items = [attack] if isinstance(attack, Mapping) else list(attack)
    return [
        {
            "library": a.get("library", "certbench"),
            "name": a.get("name", "pgd"),
            "params": dict(a.get("params") or {}),
            "limit": a.get("limit"),
            "eps": None if a.get("eps") is None else [float(e) for e in a["eps"]],
        }
        for a in items
    ]


def worst_case(
    y: Tensor, results: Sequence[tuple[Tensor, Tensor | None]]
) -> tuple[Tensor, Tensor | None]:
    """Per-example worst case over attacks that ran on the same examples ``(N,)``.

    An example stays robust only if every attack failed on it (each result re-scored with
    the defense's own prediction). For robust precision under attack the chosen result is,
    per example, a successful attack with the largest certified radius, else the failed
    attack with the smallest radius: the worst case at every threshold at once.
    """
    preds = torch.stack([p for p, _ in results])  # (A, N)
    wrong = preds != y.view(1, -1)
    if any(r is None for _, r in results):
        first_wrong = wrong.double().argmax(dim=0)
        return preds.gather(0, first_wrong.view(1, -1)).squeeze(0), None
    radii = torch.stack([r for _, r in results])  # type: ignore[misc]
    broken = wrong.any(dim=0)
    widest_break = torch.where(wrong, radii, -math.inf).argmax(dim=0)
    narrowest_hold = radii.argmin(dim=0)
    pick = torch.where(broken, widest_break, narrowest_hold).view(1, -1)
    return preds.gather(0, pick).squeeze(0), radii.gather(0, pick).squeeze(0)


@dataclass
class ShardResult:
    """Per-example results of test examples ``[start, stop)`` (CPU tensors).

    Attributes:
        y: ``(N,)`` true labels.
        pred: ``(N,)`` clean predictions (``-1`` = abstain).
        radius: ``(N,)`` float64 certified radii, or ``None`` when the defense does not
            certify the cell's norm.
        adv: attack label -> eps -> ``(pred_adv, radius_adv | None)`` on the attacked prefix
            of the slice (its length is the attack's coverage).
        draws: ``(N,)`` int64 Monte Carlo draws the clean certificates spent per example,
            when the defense reports them (``Certificate.extra["draws"]``), else ``None``.
    """

    y: Tensor
    pred: Tensor
    radius: Tensor | None
    adv: dict[str, dict[float, tuple[Tensor, Tensor | None]]] = field(default_factory=dict)
    draws: Tensor | None = None


def clean_certificate(
    d: Defense,
    cell,
    start: int,
    stop: int,
    *,
    norms: Sequence[str] | None = None,
    progress: bool = False,
) -> Certificate:
    """The certificates of ``cell``'s clean test examples ``[start, stop)`` at its radii and
    thresholds (holding the radii of ``norms``, default the cell's norm)."""
    ds = dataset_for(cell)
    x, y = ds.x_test[start:stop], ds.y_test[start:stop]
    thresholds = cell.threat.get("thresholds", [])
    return certify_all(
        d,
        x,
        norm=cell.norm,
        seed=cell.seed,
        # every radius the metrics score a certificate at: the radii and the thresholds
        radii=sorted({*cell.threat.get("radii", []), *thresholds}),
        eval_batch_size=cell.eval.get("batch_size"),
        progress=progress,
        offset=start,
        # the true labels, for the clean certification only (never for attacked inputs)
        labels=y if takes_labels(d) else None,
        norms=norms,
    )


def evaluate_shard(
    d: Defense,
    cell,
    start: int,
    stop: int,
    *,
    progress: bool = False,
    clean: Certificate | None = None,
) -> ShardResult:
    """Stage 2 for test examples ``[start, stop)`` of ``cell``'s dataset.

    ``start`` must be a multiple of :data:`ATTACK_CHUNK` (shards then attack the same chunks
    as a whole-set run). ``clean``: the clean certificate of these examples when it is
    already computed (:func:`evaluate_shards`; it must hold the cell's norm), else it is
    computed here.
    """
    ds = dataset_for(cell)
    x, y = ds.x_test[start:stop], ds.y_test[start:stop]
    eval_bs = cell.eval.get("batch_size")
    thresholds = cell.threat.get("thresholds", [])
    if cell.norm in d.certifies:
        cert = (
            clean
            if clean is not None
            else clean_certificate(d, cell, start, stop, progress=progress)
        )
        pred, radius = cert.labels, cert.radius(cell.norm)
        draws = cert.extra.get("draws")
    else:
        pred = predict_all(d, x, seed=cell.seed, eval_batch_size=eval_bs, offset=start)
        radius = draws = None
    out = ShardResult(y=y.clone(), pred=pred, radius=radius, draws=draws)
    n_test = ds.y_test.numel()
    jobs = []
    for a in attack_list(cell.attack):
        a_stop = min(stop, a["limit"] or n_test)
        budgets = a["eps"] if a["eps"] is not None else cell.threat.get("eps", [])
        jobs += [(a, float(e), a_stop) for e in budgets if a_stop > start]
    bar = tqdm(
        total=sum(-(-(b - start) // ATTACK_CHUNK) for _, _, b in jobs),
        desc=f"attack {d.name}",
        unit="chunk",
        disable=not progress or not jobs,
        leave=False,
    )
    with bar:
        for a, eps, a_stop in jobs:
            bar.set_postfix_str(f"{a['library']}:{a['name']} eps={eps:g}")
            out.adv.setdefault(attack_label(a), {})[eps] = attack_all(
                d,
                ds.x_test[start:a_stop],
                ds.y_test[start:a_stop],
                norm=cell.norm,
                eps=eps,
                attack=a,
                seed=cell.seed,
                offset=start,
                eval_batch_size=eval_bs,
                thresholds=thresholds,
                on_chunk=bar.update,
            )
    return out


def certifies_shared(d: Defense, norm: str) -> bool:
    """Whether ``d`` certifies ``norm`` in a certificate it shares with other norms
    (:meth:`~defenses.base.Defense.shared_certificate_norms`)."""
    return norm in d.certifies and norm in d.shared_certificate_norms()


def _share_key(cell) -> tuple:
    """What cells must have in common to share a clean certificate: the trained defense
    (its ``train_key``: data, model, params, seed, training), the test examples and the
    evaluation settings."""
    return (cell.train_key(), cell.seed, cell.limit_test, repr(sorted(cell.eval.items())))


def training_groups(cells: Sequence[Any]) -> dict[str, list]:
    """``cells`` by ``train_key`` (in the order of each key's first cell): the cells of one
    group share trained weights, so an executor trains each group once."""
    groups: dict[str, list] = {}
    for c in cells:
        groups.setdefault(c.train_key(), []).append(c)
    return groups


def certificate_groups(cells: Sequence[Any], shared: Callable[[Any], bool]) -> list[tuple]:
    """``cells`` in groups whose clean certificate is computed once (:func:`evaluate_shards`):
    cells with :func:`_share_key` in common for which ``shared(cell)`` holds
    (:func:`certifies_shared` of their defense), and every other cell alone; in the order of
    each group's first cell."""
    groups: dict[tuple, list] = {}
    for c in cells:
        key = ("shared", *_share_key(c)) if shared(c) else ("alone", c.cell_id())
        groups.setdefault(key, []).append(c)
    return [tuple(g) for g in groups.values()]


def shares_certificate(d: Defense, cells: Sequence[Any]) -> bool:
    """Whether the clean certificates of ``cells`` (two or more cells) come from one
    :meth:`~defenses.base.Defense.certify` call of ``d``: all certify their norm in ``d``'s
    shared certificate and have the same trained defense, test examples and settings."""
    return (
        len(cells) >= 2
        and all(certifies_shared(d, c.norm) for c in cells)
        and len({_share_key(c) for c in cells}) == 1
    )


def evaluate_shards(
    pairs: Sequence[tuple[Defense, Any]], start: int, stop: int, *, progress: bool = False
) -> list[ShardResult]:
    """:func:`evaluate_shard` of each ``(defense, cell)`` pair, in order, on examples
    ``[start, stop)``; where the cells share their clean certificate
    (:func:`shares_certificate`), it is computed once, by the first pair's defense, and each
    cell reads its own norm's radius from it. The results are those of separate
    :func:`evaluate_shard` calls: the defense declares that its certificate does not depend
    on the norm asked for."""
    clean = None
    cells = [c for _, c in pairs]
    if pairs and shares_certificate(pairs[0][0], cells):
        d, first = pairs[0]
        seed_everything(first.seed)
        clean = clean_certificate(
            d, first, start, stop, norms=sorted({c.norm for c in cells}), progress=progress
        )
    out = []
    for d, c in pairs:
        seed_everything(c.seed)  # each cell starts from the state a task of its own has
        out.append(evaluate_shard(d, c, start, stop, progress=progress, clean=clean))
    return out


def merge_shards(shards: Sequence[ShardResult]) -> ShardResult:
    """Concatenate shard results in test-set order."""

    def cat(values):
        return None if any(v is None for v in values) else torch.cat(list(values))

    merged = ShardResult(
        y=cat([s.y for s in shards]),
        pred=cat([s.pred for s in shards]),
        radius=cat([s.radius for s in shards]),
        draws=cat([s.draws for s in shards]),
    )
    for label in dict.fromkeys(k for s in shards for k in s.adv):
        for eps in sorted({e for s in shards for e in s.adv.get(label, {})}):
            parts = [s.adv[label][eps] for s in shards if eps in s.adv.get(label, {})]
            merged.adv.setdefault(label, {})[eps] = (
                cat([p for p, _ in parts]),
                cat([r for _, r in parts]),
            )
    return merged


# --------------------------------------------------------------------------- stage 3: score


def _under_attack(
    merged: ShardResult,
    eps: float,
    adv: tuple[Tensor, Tensor | None],
    *,
    thresholds: Sequence[float],
    certifies: bool,
) -> tuple[dict[str, float | None], dict[str, tuple[int, int]]]:
    """The ``*_under_attack`` metrics at ``eps`` of one attacked prefix."""
    p_adv, r_adv = adv
    n = p_adv.numel()
    ms = MetricSet(thresholds=list(thresholds), eps_list=[eps], certifies=certifies)
    ms.update(
        y=merged.y[:n],
        pred=merged.pred[:n],
        radius=None if merged.radius is None else merged.radius[:n],
        pred_adv={eps: p_adv},
        radius_adv=None if r_adv is None else {eps: r_adv},
    )
    values, counts = ms.compute(), ms.counts()
    keep = [k for k in values if "under_attack" in k]
    return {k: values[k] for k in keep}, {k: counts[k] for k in keep if k in counts}


def ensemble(merged: ShardResult, eps: float) -> tuple[Tensor, Tensor | None]:
    """The per-example worst case at ``eps`` over every attack that ran at that budget.

    It covers the longest attacked prefix; an example beyond an attack's own limit is judged
    by the attacks that did run on it (:func:`worst_case`).
    """
    runs = [by_eps[eps] for by_eps in merged.adv.values() if eps in by_eps]
    n = max(p.numel() for p, _ in runs)
    y = merged.y[:n]
    padded = []
    for p, r in runs:  # an attack that did not reach an example cannot have broken it
        gap = n - p.numel()
        p = torch.cat([p, y[p.numel() :]])
        if r is not None:
            r = torch.cat([r, torch.full((gap,), math.inf, dtype=r.dtype)])
        padded.append((p, r))
    return worst_case(y, padded)


def score(
    merged: ShardResult,
    *,
    radii: Sequence[float] = (),
    thresholds: Sequence[float] = (),
    certifies: bool,
) -> tuple[dict[str, float | None], dict[str, tuple[int, int]]]:
    """The metrics of a cell from its per-example results (:class:`bench.metrics.MetricSet`)
    and the counts ``(k, n)`` behind each fraction.

    Clean metrics are over every example. ``accuracy_under_attack@eps`` (and robust
    precision under attack) is the per-example worst case over the attack ensemble
    (:func:`ensemble`), over the examples attacked at ``eps``; with several attacks each
    one's own values are added under ``metric[label]`` (:func:`attack_metric_key`).
    """
    budgets = sorted({e for by_eps in merged.adv.values() for e in by_eps})
    ms = MetricSet(radii=list(radii), thresholds=list(thresholds), certifies=certifies)
    ms.update(y=merged.y, pred=merged.pred, radius=merged.radius)
    metrics, counts = ms.compute(), ms.counts()
    opts = {"thresholds": thresholds, "certifies": certifies}
    for eps in budgets:
        values, cnt = _under_attack(merged, eps, ensemble(merged, eps), **opts)
        metrics.update(values)
        counts.update(cnt)
    if len(merged.adv) > 1:
        for label, by_eps in merged.adv.items():
            for eps, adv in sorted(by_eps.items()):
                values, cnt = _under_attack(merged, eps, adv, **opts)
                metrics.update({attack_metric_key(k, label): v for k, v in values.items()})
                counts.update({attack_metric_key(k, label): c for k, c in cnt.items()})
    return metrics, counts


def attack_metric_key(metric: str, label: str) -> str:
    """The name under which one attack's own value of an ensemble metric is stored:
    ``accuracy_under_attack@0.1[autoattack:standard]``."""
    return f"{metric}[{label}]"


def split_attack_metric_key(name: str) -> tuple[str, str | None]:
    """Inverse of :func:`attack_metric_key`: ``(metric, label)``, label ``None`` if plain."""
    if name.endswith("]") and "[" in name:
        metric, _, label = name[:-1].partition("[")
        return metric, label
    return name, None


def attack_label(attack: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None) -> str | None:
    """``library:name(param=value,…)`` of one attack config; an ensemble's labels joined
    by `` + `` (the board's ``attack`` column)."""
    if not attack:
        return None
    if not isinstance(attack, Mapping):  # an ensemble (an attack listed twice, e.g. at
        # different budgets or limits, is named once)
        return " + ".join(dict.fromkeys(str(attack_label(a)) for a in attack))
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
    method: str | None = None
    shared: bool = False  # the norm's certificate is shared with other norms (certifies_shared)

    @classmethod
    def of(cls, d: Defense, norm: str) -> DefenseFacts:
        rec = d.record()
        return cls(
            shared=certifies_shared(d, norm),
            certifies=norm in d.certifies,
            randomized=bool(d.randomized),
            n_draws=None if rec.n_draws is None else int(rec.n_draws),
            alpha=None if rec.alpha is None else float(rec.alpha),
            bound=rec.bound,
            # a randomized defense that does not say how it spends its draws uses a fixed n
            method=rec.method or ("fixed-n" if d.randomized else None),
        )


def cell_result(
    cell,
    facts: DefenseFacts,
    merged: ShardResult,
    *,
    train_seconds: float | None,
    eval_seconds: float,
    executor: str = "local",
) -> dict[str, Any]:
    """The record of a finished cell, as :meth:`bench.store.Store.put` takes it.

    ``train_seconds`` is ``None`` for a pretrained cell (nothing was trained); its weights'
    SHA-256 goes into the provenance (``weights_sha256``).
    ``n_draws`` is what the defense declares, except where the clean certificates reported
    the draws they spent (sequential tests): then their mean per example, rounded to the
    nearest integer (the store's column is an integer). The method (``fixed-n`` /
    ``sequential-<sequence>``) goes into the provenance.
    """
    metrics, counts = score(
        merged,
        radii=cell.threat.get("radii", []),
        thresholds=cell.threat.get("thresholds", []),
        certifies=facts.certifies,
    )
    prov: dict[str, Any] = {**provenance(), "executor": executor}
    if facts.bound is not None:
        prov["bound"] = facts.bound
    if cell.weights_sha256 is not None:
        prov["weights_sha256"] = cell.weights_sha256
    if facts.method is not None:
        prov["method"] = facts.method
    n_draws = facts.n_draws
    if merged.draws is not None and merged.draws.numel():
        n_draws = round(float(merged.draws.double().mean()))
    return {
        "metrics": metrics,
        "counts": counts,
        "n_test": int(merged.y.numel()),
        "n_draws": n_draws,
        "alpha": facts.alpha,
        "attack": attack_label(cell.attack),
        "train_seconds": None if train_seconds is None else float(train_seconds),
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
    """Run one cell end to end in this process and return its record (no store write).

    ``num_threads`` defaults to :func:`bench.environment.training_threads`, so the cell
    trains as it would in any executor.
    """
    d, train_seconds = setup_cell(
        cell, checkpoint_root, device=device, progress=progress, num_threads=num_threads
    )
    return evaluate_cell(d, cell, train_seconds=train_seconds, progress=progress)


def setup_cell(
    cell,
    checkpoint_root: str | Path,
    *,
    device: str | None = None,
    progress: bool = False,
    num_threads: int | None = None,
) -> tuple[Defense, float | None]:
    """Stage 1 of :func:`run_cell` in this process: the threads set (``num_threads``, default
    :func:`bench.environment.training_threads`), then :func:`prepare_defense` on ``device``
    (default the cell's)."""
    configure_threads(training_threads() if num_threads is None else num_threads)
    dev = resolve_device(device or cell.device)
    return prepare_defense(cell, checkpoint_root, device=dev, progress=progress)


def evaluate_cells(
    pairs: Sequence[tuple[Defense, Any]],
    *,
    train_seconds: float | None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """:func:`evaluate_cell` of each ``(defense, cell)`` pair, in order; cells that share
    their clean certificate (:func:`shares_certificate`) are certified once, on the whole
    test set, with the results of separate calls (the time is split evenly between them)."""
    cells = [c for _, c in pairs]
    if not (pairs and shares_certificate(pairs[0][0], cells)):
        return [
            evaluate_cell(d, c, train_seconds=train_seconds, progress=progress) for d, c in pairs
        ]
    t0 = time.perf_counter()
    n_test = int(dataset_for(cells[0]).y_test.numel())
    merged = evaluate_shards(pairs, 0, n_test, progress=progress)
    seconds = (time.perf_counter() - t0) / len(pairs)
    return [
        cell_result(
            c, DefenseFacts.of(d, c.norm), m, train_seconds=train_seconds, eval_seconds=seconds
        )
        for (d, c), m in zip(pairs, merged, strict=True)
    ]


def evaluate_cell(
    d: Defense, cell, *, train_seconds: float | None, progress: bool = False
) -> dict[str, Any]:
    """Stages 2 and 3 of ``cell`` for a set-up defense ``d``, on the whole test set: its
    record (:func:`cell_result`). :func:`run_cell` and :func:`evaluate_cells` call it."""
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
