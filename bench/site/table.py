"""The board table: one row per board row, every value exactly as in the board's CSV.

Each cell carries the CSV text of its value (``data-value``, what sorting and the tests
read) and a rounded display text, plus the 95% confidence interval where the board has one.
The columns are rank, defense, model, parameters, clean accuracy, the robust-accuracy
interval at the headline budget (certified lower end, attacked upper end), then the metric
groups of the board: guaranteed accuracy per radius, accuracy under attack per budget, and
PixelDP's robust precision and coverage per threshold (shown on request).

Optional data (issue #17 adds it; older boards lack it) is read with ``getattr``:
``BoardRow.intervals`` (metric column -> 95% Clopper-Pearson ``(lower, upper, n)``),
``Board.headline_eps`` and the row values ``robust_accuracy_lower``/``_upper``. Without
them the interval at the headline budget ε is derived from the board's columns: lower =
guaranteed accuracy at the smallest radius r >= ε (certified at r implies robust at every
ε <= r), upper = accuracy under attack at ε.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from matplotlib.colors import to_hex

from bench.leaderboard import Board, BoardRow, _row_key, parse_metric_key
from bench.metrics import metric_key
from bench.plots import NORM_SYMBOL, display_names
from bench.store import canonical_params

_MISSING = object()
LOWER, UPPER = "robust_accuracy_lower", "robust_accuracy_upper"
CONFIDENCE = "95% Clopper–Pearson interval"


@dataclass(frozen=True)
class MetricGroup:
    """How the table and the row pages name the ``prefix@x`` columns of one metric."""

    name: str  # "guaranteed accuracy (certified)"
    what: str  # what x is: "radius"
    symbol: str  # "r"
    optional: bool  # shown only on request (PixelDP's robust precision and coverage)

    @property
    def heading(self) -> str:
        return f"{self.name} at {self.what} {self.symbol}"

    def label(self, x: float) -> str:
        return f"{self.name} at {self.symbol} = {x:g}"


# metric prefix -> its group, in table order: certified, empirical, then PixelDP's
METRIC_GROUPS = {
    "guaranteed_accuracy": MetricGroup("guaranteed accuracy (certified)", "radius", "r", False),
    "accuracy_under_attack": MetricGroup("accuracy under attack", "budget", "ε", False),
    "robust_precision": MetricGroup("robust precision", "threshold", "T", True),
    "coverage": MetricGroup("coverage", "threshold", "T", True),
}


# ---------------------------------------------------------------------------- formatting


def csv_text(value: Any) -> str:
    """A value exactly as the board CSV writes it (csv module: ``str``; ``None`` -> empty)."""
    return "" if value is None else str(value)


def fraction(value: float | None) -> str:
    """A fraction for display: three decimals; an undefined value is a dash."""
    return "—" if value is None else f"{value:.3f}"


def number_text(value: Any) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def params_text(params: Mapping[str, Any]) -> str:
    """``{"n": 1000, "sigma": 0.25}`` -> ``n=1000, sigma=0.25`` (sorted keys)."""
    return ", ".join(f"{k}={json_text(v)}" for k, v in sorted(params.items())) or "(none)"


def json_text(value: Any) -> str:
    if value is None:
        return "none"
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def norm_label(norm: str) -> str:
    """``"linf"`` -> ``"ℓ∞"``."""
    return NORM_SYMBOL.get(norm, norm)


def slug(text: str) -> str:
    """A file-name-safe, lowercase version of ``text``."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "x"


def board_slug(board: Board) -> str:
    """``digits-l2``: the board's CSV name without ``.csv``, used for its page and folder."""
    return board.filename[: -len(".csv")]


# ---------------------------------------------------------------------------- intervals


@dataclass(frozen=True)
class Interval:
    """The robust accuracy of one row at the headline budget lies in [lower, upper]."""

    lower: float | None
    upper: float | None
    lower_from: str | None  # the board column the lower end comes from
    upper_from: str | None
    lower_ci: tuple[float | None, float | None, int] | None
    upper_ci: tuple[float | None, float | None, int] | None


def intervals_of(row: BoardRow) -> dict[str, tuple[float | None, float | None, int]]:
    """The row's 95% confidence intervals per metric column (empty before issue #17)."""
    return dict(getattr(row, "intervals", None) or {})


def headline_eps(board: Board) -> float | None:
    """The budget of the board's headline: ``Board.headline_eps`` when the board has it, else
    the ε of an ``accuracy_under_attack`` headline, else the smallest ε with a value."""
    eps = getattr(board, "headline_eps", _MISSING)
    if eps is not _MISSING:
        return eps
    prefix, x = parse_metric_key(board.headline)
    if prefix == "accuracy_under_attack" and x is not None:
        return x
    with_values = [
        x
        for c in board.columns
        for p, x in [parse_metric_key(c)]
        if p == "accuracy_under_attack" and any(r.metrics.get(c) is not None for r in board.rows)
    ]
    return min(with_values) if with_values else None


def headline_interval(board: Board, row: BoardRow, eps: float) -> Interval:
    """Certified (lower) and empirical (upper) robust accuracy of ``row`` at ``eps``."""
    cis = intervals_of(row)
    if LOWER in row.values or UPPER in row.values:  # the board states the interval itself
        lower, upper = row.values.get(LOWER), row.values.get(UPPER)
        return Interval(lower, upper, None, None, cis.get(LOWER), cis.get(UPPER))
    aua = metric_key("accuracy_under_attack", eps)
    radii = sorted(
        x
        for c in board.columns
        for p, x in [parse_metric_key(c)]
        if p == "guaranteed_accuracy" and x is not None and x >= eps
    )
    certified = metric_key("guaranteed_accuracy", radii[0]) if radii else None
    lower = row.metrics.get(certified) if certified else None
    upper = row.metrics.get(aua)
    return Interval(
        lower=lower,
        upper=upper,
        lower_from=certified if lower is not None else None,
        upper_from=aua if upper is not None else None,
        lower_ci=cis.get(certified) if certified else None,
        upper_ci=cis.get(aua),
    )


# ---------------------------------------------------------------------------- columns


@dataclass(frozen=True)
class Column:
    """One column of the board table. ``key`` is the CSV column (``data-column``)."""

    key: str
    label: str  # header text
    name: str  # accessible name of the sort button (contains the label)
    numeric: bool
    hidden: bool = False  # shown only on request (robust precision and coverage)

    @property
    def first_order(self) -> str:
        """Direction of the first click: best first for metrics, 1..n for rank and text."""
        return "descending" if self.numeric and self.key != "rank" else "ascending"


@dataclass(frozen=True)
class Group:
    """A header cell spanning ``columns`` (e.g. guaranteed accuracy at every radius)."""

    key: str
    label: str
    columns: list[Column]
    hidden: bool = False


def table_columns(board: Board, eps: float | None) -> list[Column | Group]:
    """The header layout of ``board``'s table: single columns and groups of columns."""
    sym = norm_label(board.norm)
    out: list[Column | Group] = [
        Column("rank", "rank", "rank", numeric=True),
        Column("defense", "defense", "defense", numeric=False),
        Column("model", "model", "model", numeric=False),
        Column("params", "parameters", "parameters", numeric=False),
        Column("accuracy", "clean accuracy", "clean accuracy", numeric=True),
    ]
    if eps is not None:
        label = f"robust accuracy at {sym} ε = {eps:g}"
        out.append(
            Group(
                "robust",
                label,
                [
                    Column(LOWER, "certified ≥", f"{label}, certified lower end", True),
                    Column(UPPER, "≤ attacked", f"{label}, attacked upper end", True),
                ],
            )
        )
    by_prefix: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for col in board.columns:
        prefix, x = parse_metric_key(col)
        if prefix in METRIC_GROUPS and x is not None:
            by_prefix[prefix].append((x, col))
    for prefix, group in METRIC_GROUPS.items():
        if by_prefix[prefix]:
            cols = [
                Column(col, f"{x:g}", group.label(x), True, hidden=group.optional)
                for x, col in sorted(by_prefix[prefix])
            ]
            out.append(Group(prefix, f"{group.heading} ({sym})", cols, hidden=group.optional))
    return out


def flat_columns(layout: Sequence[Column | Group]) -> list[Column]:
    """The columns of a header layout, left to right."""
    return [c for item in layout for c in (item.columns if isinstance(item, Group) else [item])]


# ---------------------------------------------------------------------------- cells


@dataclass
class Cell:
    """One table cell: ``value`` is the exact CSV text, ``text`` the display."""

    column: str
    value: str
    text: str
    numeric: bool = True
    href: str | None = None
    ci: str | None = None
    ci_title: str | None = None
    note: str | None = None
    title: str | None = None  # tooltip of the text
    hidden: bool = False


def metric_cell(
    column: str,
    value: float | None,
    ci: tuple[float | None, float | None, int] | None,
    *,
    hidden: bool = False,
) -> Cell:
    cell = Cell(column=column, value=csv_text(value), text=fraction(value), hidden=hidden)
    if ci and ci[0] is not None and ci[1] is not None and value is not None:
        cell.ci = f"{ci[0]:.3f}–{ci[1]:.3f}"
        cell.ci_title = f"{CONFIDENCE} over {ci[2]} test examples"
    return cell


# ---------------------------------------------------------------------------- rows


@dataclass
class RowPage:
    """A board row and everything its page shows."""

    row: BoardRow
    slug: str
    name: str  # legend name (label or defense, plus distinguishing params)
    color: str
    cells: list[Cell]
    interval: Interval | None
    stored: list[dict[str, Any]] = field(default_factory=list)  # the row's stored cells

    @property
    def hex_color(self) -> str:
        """``color`` (a matplotlib cycle colour, ``"C3"``) as CSS ``#rrggbb``."""
        return to_hex(self.color)

    @property
    def filter_text(self) -> str:
        r = self.row
        parts = [r.label, r.defense, r.model, canonical_params(r.params), params_text(r.params)]
        return " ".join(p for p in parts if p).lower()


def row_slugs(board: Board) -> list[str]:
    """Stable file names for the rows: defense-model-<hash of params>, numbered on clashes
    (the same defense, model and params run with different settings)."""
    out, seen = [], defaultdict(int)
    for r in board.rows:
        digest = hashlib.sha256(canonical_params(r.params).encode()).hexdigest()[:8]
        base = slug(f"{r.defense}-{r.model}-{digest}")
        seen[base] += 1
        out.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return out


def stored_cells(board: Board, cells: Sequence[Mapping[str, Any]]) -> list[list[dict]]:
    """The stored cells behind each row of ``board`` (newest last).

    Uses ``BoardRow.cell_ids`` when the board carries them; otherwise regroups the cells the
    way the board did and matches groups to rows by (defense, model, params), then seeds and
    date when one (defense, model, params) has several rows.
    """
    mine = [dict(c) for c in cells if (c["dataset"], c["norm"]) == (board.dataset, board.norm)]
    by_id = {c["cell_id"]: c for c in mine}
    groups: dict[tuple[str, ...], list[dict]] = defaultdict(list)
    for c in mine:
        groups[_row_key(c)].append(c)
    out = []
    for row in board.rows:
        ids = getattr(row, "cell_ids", None)
        if ids:
            found = [by_id[i] for i in ids if i in by_id]
        else:
            key = (row.defense, row.model, row.values["params"])
            candidates = [g for k, g in sorted(groups.items()) if k[:3] == key]
            exact = [
                g
                for g in candidates
                if sorted({int(c["seed"]) for c in g}) == row.seeds
                and max(str(c["created_at"]) for c in g) == str(row.values.get("created_at"))
            ]
            found = (exact or candidates or [[]])[0]
        out.append(sorted(found, key=lambda c: (c["seed"], c["stored_at"], c["cell_id"])))
    return out


def row_pages(board: Board, cells: Sequence[Mapping[str, Any]]) -> list[RowPage]:
    """Every row of ``board`` with its table cells, colour, file name and stored cells."""
    eps = headline_eps(board)
    columns = flat_columns(table_columns(board, eps))
    names = display_names(board)
    pages = []
    for i, (row, name, row_slug, stored) in enumerate(
        zip(board.rows, names, row_slugs(board), stored_cells(board, cells), strict=True)
    ):
        interval = headline_interval(board, row, eps) if eps is not None else None
        href = f"{board_slug(board)}/{row_slug}.html"
        out = [_cell(col, row, interval, href) for col in columns]
        pages.append(RowPage(row, row_slug, name, f"C{i % 10}", out, interval, stored))
    return pages


def _cell(col: Column, row: BoardRow, interval: Interval | None, href: str) -> Cell:
    """The cell of ``row`` in column ``col``; ``href`` is the row page (from the board)."""
    value = row.values.get(col.key)
    if col.key == "defense":
        note = row.defense if row.label and row.label != row.defense else None
        return Cell("defense", csv_text(value), row.label or row.defense, False, href, note=note)
    if col.key == "params":
        return Cell("params", csv_text(value), params_text(row.params), numeric=False)
    if col.key == "model":
        return Cell("model", csv_text(value), row.model, numeric=False)
    if col.key == "rank":
        return Cell("rank", csv_text(value), number_text(value))
    if col.key in (LOWER, UPPER):
        assert interval is not None
        if col.key == UPPER:
            return metric_cell(UPPER, interval.upper, interval.upper_ci)
        cell = metric_cell(LOWER, interval.lower, interval.lower_ci)
        if interval.lower is None:
            cell.text = "none"
            cell.title = "no certificate at this budget (none, or no radius ≥ ε evaluated)"
        return cell
    cis = intervals_of(row)
    return metric_cell(col.key, row.metrics.get(col.key), cis.get(col.key), hidden=col.hidden)
