"""Publish leaderboards: one CSV per (dataset, norm) board, plus a tidy long-format CSV.

``publish(store, "leaderboards")`` writes, for every (dataset, norm) with stored results,
``<dataset>-<norm>.csv`` with one row per (defense, model, params) and these columns, in
this order::

    rank, defense, model, params, accuracy,
    robust_accuracy_lower, robust_accuracy_upper, headline_eps,
    guaranteed_accuracy@<r>..., robust_precision@<T>..., coverage@<T>...,
    accuracy_under_attack@<eps>...,
    attack, n_test, n_draws, alpha, seed, train_seconds, eval_seconds,
    certbench_version, torch_version, git_commit, created_at

and ``results.csv`` (``dataset, norm, defense, model, params, seed, metric, value, n,
ci_lower, ci_upper, cell_id``; one stored metric value per row, every seed) covering the same
cells: ``n`` is the number of test examples a fraction rests on and ``[ci_lower, ci_upper]``
its 95% Clopper–Pearson interval over test examples (empty when the value is not a counted
fraction). With an attack ensemble, each attack's own values are rows whose metric ends in
``[<attack label>]``.

Conventions:

* Metric keys in results are ``f"{prefix}@{value:g}"`` (``guaranteed_accuracy@0.1``); the
  columns of a board are the union, sorted by value, of the keys its cells report and of the
  radii/thresholds (and eps, for cells with an attack stage) their specs asked for.
* Accuracies are fractions in [0, 1] written as plain numbers; an undefined value (``None``,
  e.g. the guaranteed accuracy of a defense that certifies nothing) is an empty cell.
* The robust-accuracy interval: true robust accuracy at the headline budget ε (the spec's
  ``threat.headline``, else the board's smallest attack budget) lies between
  ``robust_accuracy_lower`` = guaranteed accuracy at ε (a certificate; empty when the
  defense certifies nothing) and ``robust_accuracy_upper`` = accuracy under the attack
  ensemble at ε (every attack is an upper bound).
* Cells that differ only in seed are averaged into one row (mean of the defined values);
  ``seed`` then lists the seeds, ``;``-separated (a plain integer for a single seed),
  ``train_seconds``/``eval_seconds`` are means, ``created_at`` is the latest, and text
  columns that differ between seeds are ``;``-joined. When several stored cells have the
  same seed and differ only in threat lists, their metrics are merged (newest wins).
* Rank (``rank_by``, :data:`RANK_BY`): by ``robust_accuracy_upper`` (default), by
  ``robust_accuracy_lower``, by ``accuracy``, or by accuracy under attack at the smallest /
  largest budget with a value; ties broken by ``accuracy``; rows without a value come last;
  equal (value, accuracy) share a rank (1, 2, 2, 4).
* Files are replaced atomically (temporary file in the same directory, fsync, rename), so a
  reader never sees half a leaderboard. Boards are generated, never edited by hand.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import ConfigError
from bench.files import atomic_write_bytes
from bench.metrics import metric_key
from bench.store import Store, canonical_params

METRIC_PREFIXES = (
    "guaranteed_accuracy",
    "robust_precision",
    "coverage",
    "accuracy_under_attack",
)
# which threat list of a cell's config each prefix is evaluated at
_THREAT_LIST = {
    "guaranteed_accuracy": "radii",
    "robust_precision": "thresholds",
    "coverage": "thresholds",
    "accuracy_under_attack": "eps",
}
LEAD_COLUMNS = (
    "rank",
    "defense",
    "model",
    "params",
    "accuracy",
    "robust_accuracy_lower",
    "robust_accuracy_upper",
    "headline_eps",
)
TAIL_COLUMNS = (
    "attack",
    "n_test",
    "n_draws",
    "alpha",
    "seed",
    "train_seconds",
    "eval_seconds",
    "certbench_version",
    "torch_version",
    "git_commit",
    "created_at",
)
RESULTS_COLUMNS = (
    "dataset",
    "norm",
    "defense",
    "model",
    "params",
    "seed",
    "metric",
    "value",
    "n",
    "ci_lower",
    "ci_upper",
    "cell_id",
)
CI_LEVEL = 0.95
"""Coverage of the two-sided Clopper–Pearson interval over test examples in results.csv."""
RESULTS_FILE = "results.csv"


def parse_metric_key(key: str) -> tuple[str, float | None]:
    """``"coverage@0.1"`` -> ``("coverage", 0.1)``; ``"accuracy"`` -> ``("accuracy", None)``."""
    prefix, sep, rest = key.partition("@")
    if not sep:
        return key, None
    try:
        return prefix, float(rest)
    except ValueError:
        return key, None


def _csv_bytes(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(header))
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue().encode("utf-8")


# ---------------------------------------------------------------------------- boards


@dataclass
class BoardRow:
    """One leaderboard row: a (defense, model, params) averaged over its seeds."""

    defense: str
    model: str
    params: dict[str, Any]
    label: str | None
    seeds: list[int]
    metrics: dict[str, float | None]  # seed-averaged, keyed like the results
    values: dict[str, Any] = field(default_factory=dict)  # CSV column -> value
    #: metric -> (lower, upper, n): the 95% Clopper–Pearson interval over the n test examples
    #: the value rests on (counts pooled over seeds); only for counted fractions.
    intervals: dict[str, tuple[float, float, int]] = field(default_factory=dict)

    def series(self, prefix: str) -> tuple[list[float], list[float]]:
        """``(xs, ys)`` of the defined ``prefix@x`` metrics, sorted by x (for plots)."""
        pts = []
        for key, value in self.metrics.items():
            p, x = parse_metric_key(key)
            if p == prefix and x is not None and value is not None:
                pts.append((x, value))
        pts.sort()
        return [p[0] for p in pts], [p[1] for p in pts]


@dataclass
class Board:
    """A (dataset, norm) leaderboard: ordered columns and ranked rows.

    ``headline`` is the column rows are ranked by; ``headline_eps`` the budget at which each
    row shows its robust-accuracy interval ``[robust_accuracy_lower,
    robust_accuracy_upper]`` (None when the board has no attack).
    """

    dataset: str
    norm: str
    columns: list[str]
    headline: str
    rows: list[BoardRow]
    headline_eps: float | None = None

    @property
    def filename(self) -> str:
        return f"{_safe(self.dataset)}-{_safe(self.norm)}.csv"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _mean(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return math.fsum(defined) / len(defined) if defined else None


def _join_text(values: list[Any]) -> str | None:
    uniq = sorted({str(v) for v in values if v is not None and v != ""})
    return ";".join(uniq) if uniq else None


def clopper_pearson(k: Any, n: Any, level: float = CI_LEVEL) -> tuple[Any, Any]:
    """Two-sided ``level`` Clopper–Pearson interval for ``k`` successes of ``n`` (arrays or
    scalars): each side is a one-sided bound at ``(1 - level) / 2``; ``[0, ·]`` at ``k = 0``
    and ``[·, 1]`` at ``k = n``. Covers the true proportion with probability ``>= level``.
    """
    from bench.stats import lower_confidence_bound, upper_confidence_bound

    tail = (1.0 - level) / 2.0
    return lower_confidence_bound(k, n, tail), upper_confidence_bound(k, n, tail)


def _intervals(per_seed_counts: list[Mapping[str, tuple[int, int]]]) -> dict[str, Any]:
    """metric -> (lower, upper, n) from counts pooled over seeds (metrics every seed counted)."""
    names = set.intersection(*(set(c) for c in per_seed_counts)) if per_seed_counts else set()
    out = {}
    for name in sorted(names):
        k = sum(c[name][0] for c in per_seed_counts)
        n = sum(c[name][1] for c in per_seed_counts)
        lo, hi = clopper_pearson(k, n)
        out[name] = (float(lo), float(hi), int(n))
    return out


def _same_or_max(values: list[Any]) -> Any:
    defined = [v for v in values if v is not None]
    return max(defined) if defined else None


def _row_key(cell: Mapping[str, Any]) -> tuple[str, ...]:
    """Cells with the same key differ only in seed (or threat lists) and share a row."""
    cfg = cell["config"]
    rest = {
        "data_dir": cfg.get("data_dir"),
        "limit_train": cfg.get("limit_train"),
        "limit_test": cfg.get("limit_test"),
        "train": cfg.get("train"),
        "alpha": (cfg.get("eval") or {}).get("alpha"),
        "attack": cfg.get("attack"),
    }
    return (
        cell["defense"],
        cell["model"],
        canonical_params(cell["params"]),
        json.dumps(rest, sort_keys=True),
    )


def _board_columns(cells: list[Mapping[str, Any]]) -> list[str]:
    points: dict[str, set[float]] = {p: set() for p in METRIC_PREFIXES}
    for cell in cells:
        for key in cell["metrics"]:
            prefix, x = parse_metric_key(key)
            if prefix in points and x is not None:
                points[prefix].add(x)
        threat = cell["config"].get("threat") or {}
        for prefix in METRIC_PREFIXES:
            if prefix == "accuracy_under_attack" and not cell["config"].get("attack"):
                continue
            points[prefix].update(float(v) for v in threat.get(_THREAT_LIST[prefix], []))
    metric_cols: list[str] = []
    for prefix in METRIC_PREFIXES:
        keys: dict[str, float] = {}
        for x in sorted(points[prefix]):
            keys.setdefault(metric_key(prefix, x), x)
        metric_cols.extend(keys)
    return [*LEAD_COLUMNS, *metric_cols, *TAIL_COLUMNS]


def _aggregate(group: list[Mapping[str, Any]]) -> BoardRow:
    # Several stored cells for one seed (differing only in threat lists): merge, newest wins.
    by_seed: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for cell in group:
        by_seed[int(cell["seed"])].append(cell)
    per_seed = []
    for seed in sorted(by_seed):
        cells = sorted(by_seed[seed], key=lambda c: (c["stored_at"], c["cell_id"]))
        merged_metrics: dict[str, float | None] = {}
        merged_counts: dict[str, tuple[int, int]] = {}
        for c in cells:
            merged_metrics.update(c["metrics"])
            merged_counts = {k: v for k, v in merged_counts.items() if k not in c["metrics"]}
            merged_counts.update(c.get("counts") or {})
        per_seed.append((seed, cells[-1], merged_metrics, merged_counts))

    seeds = [s for s, _, _, _ in per_seed]
    newest = [c for _, c, _, _ in per_seed]
    names = sorted({k for _, _, m, _ in per_seed for k in m})
    metrics = {k: _mean([m.get(k) for _, _, m, _ in per_seed]) for k in names}
    first = newest[0]
    labels = [c["label"] for c in newest if c.get("label")]
    values: dict[str, Any] = {
        "defense": first["defense"],
        "model": first["model"],
        "params": canonical_params(first["params"]),
        "attack": _join_text([c["attack"] for c in newest]),
        "n_test": _same_or_max([c["n_test"] for c in newest]),
        "n_draws": _same_or_max([c["n_draws"] for c in newest]),
        "alpha": _same_or_max([c["alpha"] for c in newest]),
        "seed": seeds[0] if len(seeds) == 1 else ";".join(str(s) for s in seeds),
        "train_seconds": _round(_mean([c["train_seconds"] for c in newest])),
        "eval_seconds": _round(_mean([c["eval_seconds"] for c in newest])),
        "certbench_version": _join_text([c["certbench_version"] for c in newest]),
        "torch_version": _join_text([c["torch_version"] for c in newest]),
        "git_commit": _join_text([c["git_commit"] for c in newest]),
        "created_at": _same_or_max([c["created_at"] for c in newest]),
    }
    return BoardRow(
        defense=first["defense"],
        model=first["model"],
        params=dict(first["params"]),
        label=labels[0] if labels else None,
        seeds=seeds,
        metrics=metrics,
        values=values,
        intervals=_intervals([counts for _, _, _, counts in per_seed]),
    )


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _rank(rows: list[BoardRow], headline: str) -> None:
    def score(row: BoardRow) -> tuple[float, float]:
        h = row.metrics.get(headline)
        a = row.metrics.get("accuracy")
        return (-math.inf if h is None else h, -math.inf if a is None else a)

    rows.sort(key=lambda r: (tuple(-s for s in score(r)), r.defense, r.model, r.values["params"]))
    prev, rank = None, 0
    for i, row in enumerate(rows, start=1):
        s = score(row)
        if s != prev:
            rank, prev = i, s
        row.values["rank"] = rank


RANK_BY = ("upper", "lower", "accuracy", "smallest-eps", "largest-eps")
"""Ranking choices (module docstring): the robust-accuracy interval's upper end (accuracy
under the attack ensemble at the headline budget; the default, as RobustBench ranks by
AutoAttack accuracy), its lower end (guaranteed accuracy there), clean accuracy, or accuracy
under attack at the board's smallest / largest budget."""


def _headline_eps(cells: list[Mapping[str, Any]], rows: list[BoardRow], board: str) -> float | None:
    """The budget declared by the cells' specs (``threat.headline``), else the smallest budget
    with a value; None when no row was attacked."""
    declared = sorted(
        {float(h) for c in cells if (h := (c["config"].get("threat") or {}).get("headline"))}
    )
    if len(declared) > 1:
        warnings.warn(
            f"board {board}: specs declare different headline budgets {declared}; "
            f"using {declared[0]:g}",
            RuntimeWarning,
            stacklevel=3,
        )
    if declared:
        return declared[0]
    attacked = sorted(
        x
        for x in {
            parse_metric_key(k)[1]
            for r in rows
            for k, v in r.metrics.items()
            if v is not None and parse_metric_key(k)[0] == "accuracy_under_attack"
        }
        if x is not None
    )
    return attacked[0] if attacked else None


def _interval_columns(row: BoardRow, h: float | None) -> None:
    lower = upper = None
    if h is not None:
        lower = row.metrics.get(metric_key("guaranteed_accuracy", h))
        upper = row.metrics.get(metric_key("accuracy_under_attack", h))
    row.metrics["robust_accuracy_lower"] = lower
    row.metrics["robust_accuracy_upper"] = upper
    for end, key in (("lower", "guaranteed_accuracy"), ("upper", "accuracy_under_attack")):
        if h is not None and metric_key(key, h) in row.intervals:
            row.intervals[f"robust_accuracy_{end}"] = row.intervals[metric_key(key, h)]
    row.values["robust_accuracy_lower"] = lower
    row.values["robust_accuracy_upper"] = upper
    row.values["headline_eps"] = h


def _ranking_column(rank_by: str, rows: list[BoardRow], columns: list[str]) -> str:
    if rank_by in ("upper", "lower"):
        return f"robust_accuracy_{rank_by}"
    if rank_by == "accuracy":
        return "accuracy"
    aua = [c for c in columns if parse_metric_key(c)[0] == "accuracy_under_attack"]
    aua = [c for c in aua if any(r.metrics.get(c) is not None for r in rows)]
    if not aua:
        return "accuracy"
    pick = min if rank_by == "smallest-eps" else max
    return pick(aua, key=lambda c: parse_metric_key(c)[1])


def build_boards(
    store: Store, *, spec_name: str | None = None, rank_by: str = "upper"
) -> list[Board]:
    """Every (dataset, norm) board of the stored cells (of ``spec_name`` only, if given).

    ``rank_by``: one of :data:`RANK_BY` (module docstring).
    """
    if rank_by not in RANK_BY:
        raise ConfigError(f"rank_by must be one of {', '.join(RANK_BY)}; got {rank_by!r}")
    by_board: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for cell in store.cells(spec_name=spec_name):
        by_board[(cell["dataset"], cell["norm"])].append(cell)
    boards = []
    for (dataset, norm), cells in sorted(by_board.items()):
        columns = _board_columns(cells)
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
        for cell in cells:
            groups[_row_key(cell)].append(cell)
        rows = [_aggregate(g) for _, g in sorted(groups.items())]
        seen: dict[tuple[str, str, str], int] = defaultdict(int)
        for r in rows:
            seen[(r.defense, r.model, r.values["params"])] += 1
        dupes = [k for k, n in seen.items() if n > 1]
        if dupes:
            warnings.warn(
                f"board {dataset}-{norm}: {len(dupes)} (defense, model, params) appear in "
                f"several rows because their training/eval/attack settings differ (e.g. "
                f"{dupes[0][0]} {dupes[0][1]} {dupes[0][2]}); publish one spec at a time "
                "(spec_name=...) to avoid mixing them",
                RuntimeWarning,
                stacklevel=2,
            )
        h = _headline_eps(cells, rows, f"{dataset}-{norm}")
        for r in rows:
            _interval_columns(r, h)
        headline = _ranking_column(rank_by, rows, columns)
        _rank(rows, headline)
        for r in rows:
            for col in columns:
                if col == "accuracy" or "@" in col:
                    r.values[col] = r.metrics.get(col)
        boards.append(
            Board(
                dataset=dataset,
                norm=norm,
                columns=columns,
                headline=headline,
                rows=rows,
                headline_eps=h,
            )
        )
    return boards


def _add_intervals(rows: list[dict[str, Any]]) -> None:
    """``n``, ``ci_lower``, ``ci_upper`` of each long-format row (empty without counts)."""
    counted = [r for r in rows if r.get("total") is not None]
    for r in rows:
        r["n"] = r.get("total")
        r["ci_lower"] = r["ci_upper"] = None
    if counted:
        lo, hi = clopper_pearson([r["count"] for r in counted], [r["total"] for r in counted])
        for r, a, b in zip(counted, lo.tolist(), hi.tolist(), strict=True):
            r["ci_lower"], r["ci_upper"] = a, b


def publish(
    store: Store,
    out_dir: str | Path,
    *,
    spec_name: str | None = None,
    rank_by: str = "upper",
) -> list[Path]:
    """Write every board's ``<dataset>-<norm>.csv`` and ``results.csv`` under ``out_dir``.

    ``rank_by`` picks the ranking headline (:data:`RANK_BY`).

    Returns the written paths (boards first, ``results.csv`` last). Raises
    :class:`ConfigError` when the store holds no finished cells (for ``spec_name``).
    """
    out = Path(out_dir)
    boards = build_boards(store, spec_name=spec_name, rank_by=rank_by)
    if not boards:
        which = f" of spec '{spec_name}'" if spec_name else ""
        raise ConfigError(
            f"{store.path}: no finished cells{which} to publish; run `certbench run` first"
        )
    written = []
    for board in boards:
        data = _csv_bytes(
            board.columns, ([r.values.get(c) for c in board.columns] for r in board.rows)
        )
        written.append(atomic_write_bytes(out / board.filename, data))
    long_rows = sorted(
        store.long_results(spec_name=spec_name),
        key=lambda r: (
            r["dataset"],
            r["norm"],
            r["defense"],
            r["model"],
            r["params"],
            r["seed"],
            r["metric"],
            r["cell_id"],
        ),
    )
    _add_intervals(long_rows)
    data = _csv_bytes(RESULTS_COLUMNS, ([r[c] for c in RESULTS_COLUMNS] for r in long_rows))
    written.append(atomic_write_bytes(out / RESULTS_FILE, data))
    return written
