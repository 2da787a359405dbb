"""Data -> template context for the site's pages; the HTML itself lives in ``templates/``.

Three kinds of page, each built from the boards of :func:`bench.leaderboard.build_boards`
and the stored cells behind their rows:

* the index: one entry per (dataset, norm) board, with its test-set size and date;
* a board: the ranked table (:mod:`bench.site.table`), the board's curves and the interval
  chart (one bar per defense from certified to empirical robust accuracy at the headline
  budget);
* a row: the defense's parameters, its training and attack settings, provenance per seed,
  per-radius curves and the paper it comes from (the defense class's ``citation``: an
  object with ``title, authors, venue, year, url, bibtex``, as ``defenses.base.Citation``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bench.leaderboard import TAIL_COLUMNS, Board, parse_metric_key
from bench.metrics import metric_key
from bench.site.charts import IntervalBar, Series, has_band, interval_chart, line_chart
from bench.site.table import (
    LOWER,
    METRIC_GROUPS,
    UPPER,
    Cell,
    Group,
    RowPage,
    board_slug,
    csv_text,
    headline_eps,
    intervals_of,
    json_text,
    metric_cell,
    norm_label,
    number_text,
    row_pages,
    table_columns,
)

DefenseLookup = Callable[[str], Any]
"""``name -> Defense class`` (or ``None`` when not registered here)."""


# ---------------------------------------------------------------------------- charts


def _series(
    pages: Sequence[RowPage], prefix: str, *, dashed: bool = False, suffix: str = ""
) -> list[Series]:
    """One chart series per row that has ``prefix@x`` values, with its confidence band."""
    out = []
    for page in pages:
        xs, ys = page.row.series(prefix)
        if not xs:
            continue
        cis = intervals_of(page.row)
        keys = [metric_key(prefix, x) for x in xs]
        low = [cis.get(k, (None, None, 0))[0] for k in keys]
        high = [cis.get(k, (None, None, 0))[1] for k in keys]
        out.append(
            Series(
                name=page.name + suffix,
                xs=xs,
                ys=ys,
                color=page.color,
                low=low,
                high=high,
                dashed=dashed,
                marker="s" if dashed else "o",
            )
        )
    return out


def curve_charts(board: Board, pages: Sequence[RowPage], chart_id: str) -> list[dict[str, str]]:
    """The board's curves (or one row's, when ``pages`` has one entry) as figures:
    ``[{"svg": ..., "caption": ...}]``, one per panel that has data."""
    sym = norm_label(board.norm)
    unit = "input units, pixels in [0, 1]"
    who = "this defense" if len(pages) == 1 else f"{len(pages)} rows of the board"
    figures = []
    panels = [
        (
            "guaranteed",
            _series(pages, "guaranteed_accuracy"),
            "Certified: guaranteed accuracy vs radius",
            f"{sym} radius r ({unit})",
            "guaranteed accuracy",
            "Fraction of test examples predicted correctly and certified at radius r.",
        ),
        (
            "attack",
            _series(pages, "accuracy_under_attack"),
            "Empirical: accuracy under attack vs budget",
            f"{sym} attack budget ε ({unit})",
            "accuracy under attack",
            "Fraction of test examples still predicted correctly under the attacks at ε.",
        ),
        (
            "pixeldp",
            _series(pages, "robust_precision", suffix=": precision")
            + _series(pages, "coverage", dashed=True, suffix=": coverage"),
            "PixelDP: robust precision and coverage vs threshold",
            f"{sym} robustness threshold T ({unit})",
            "fraction",
            "Robust precision (solid lines): accuracy among the examples certified at T; "
            "coverage (dashed lines): the fraction of examples certified at T.",
        ),
    ]
    for key, series, title, xlabel, ylabel, caption in panels:
        if not series:
            continue
        band = any(has_band(s) for s in series)
        desc = (
            f"Line chart of {ylabel} against {xlabel} for {who}"
            + (", with shaded 95% confidence bands" if band else "")
            + ". The values are listed in the table on this page."
        )
        svg = line_chart(
            series,
            chart_id=f"{chart_id}-{key}",
            title=title,
            xlabel=xlabel,
            ylabel=ylabel,
            desc=desc,
        )
        note = " Shaded bands: 95% confidence intervals." if band else ""
        figures.append({"svg": svg, "caption": caption + note})
    return figures


def interval_figure(board: Board, pages: Sequence[RowPage], eps: float) -> dict[str, str]:
    """The interval chart at the headline budget ``eps``: one bar per row."""
    sym = norm_label(board.norm)
    bars = []
    for p in pages:
        iv = p.interval
        assert iv is not None
        bars.append(
            IntervalBar(
                name=p.name,
                color=p.color,
                lower=iv.lower,
                upper=iv.upper,
                clean=p.row.metrics.get("accuracy"),
                lower_ci=iv.lower_ci[:2] if iv.lower_ci else None,
                upper_ci=iv.upper_ci[:2] if iv.upper_ci else None,
            )
        )
    title = f"Robust accuracy at {sym} ε = {eps:g}: certified to attacked"
    desc = (
        f"Horizontal bar chart, one bar per row of the board, ranked as in the table. Each bar "
        f"spans the interval in which the defense's true robust accuracy at {sym} ε = {eps:g} "
        "lies: from its guaranteed (certified) accuracy to its accuracy under attack. Hatched "
        "bars start at 0 because the defense certifies nothing there (or end at clean "
        "accuracy when no attack ran). Black whiskers are 95% confidence intervals, diamonds "
        "clean accuracy. The numbers are in the table's robust accuracy columns."
    )
    svg = interval_chart(
        bars,
        chart_id=f"{board_slug(board)}-interval",
        title=title,
        xlabel="robust accuracy (fraction of test examples)",
        desc=desc,
    )
    caption = (
        "Each bar spans certified (left end) to attacked (right end) robust accuracy; hatched "
        "bars: nothing certified (or no attack ran); diamonds: clean accuracy; whiskers: 95% "
        "confidence intervals."
    )
    return {"svg": svg, "caption": caption}


# ---------------------------------------------------------------------------- pages


def board_summary(board: Board) -> dict[str, Any]:
    """What the index shows of a board (and the board page's header)."""
    n_tests = sorted({r.values.get("n_test") for r in board.rows} - {None})
    dates = [str(r.values["created_at"]) for r in board.rows if r.values.get("created_at")]
    eps = headline_eps(board)
    prefix, x = parse_metric_key(board.headline)
    headline = (
        f"accuracy under attack at ε = {x:g}" if prefix == "accuracy_under_attack" else prefix
    )
    return {
        "slug": board_slug(board),
        "href": f"{board_slug(board)}.html",
        "csv": f"data/{board.filename}",
        "dataset": board.dataset,
        "norm": board.norm,
        "norm_label": norm_label(board.norm),
        "title": f"{board.dataset}, {norm_label(board.norm)} threat model",
        "n_test": _span(n_tests),
        "rows": len(board.rows),
        "date": max(dates)[:10] if dates else "—",
        "headline": headline,
        "eps": eps,
    }


def _span(values: Sequence[Any]) -> str:
    """``[450]`` -> ``"450"``; ``[50, 450]`` -> ``"50–450"``; ``[]`` -> a dash."""
    if not values:
        return "—"
    return str(values[0]) if values[0] == values[-1] else f"{values[0]}–{values[-1]}"


def board_context(board: Board, cells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Context of ``board.html`` (and the row pages, under ``"pages"``)."""
    eps = headline_eps(board)
    pages = row_pages(board, cells)
    layout = table_columns(board, eps)
    return {
        "board": board_summary(board),
        "layout": layout,
        "has_hidden": any(isinstance(g, Group) and g.hidden for g in layout),
        "pages": pages,
        "interval": interval_figure(board, pages, eps) if eps is not None else None,
        "figures": curve_charts(board, pages, board_slug(board)),
    }


def _settings(cell: Mapping[str, Any]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The training, evaluation, threat and attack settings of a stored cell."""
    cfg = cell["config"]
    data = [
        ("dataset", cfg.get("dataset")),
        ("data directory", cfg.get("data_dir") or "(standard location)"),
        ("training examples", cfg.get("limit_train") or "all"),
        ("test examples", cfg.get("limit_test") or "all"),
        ("device", cfg.get("device")),
    ]
    raw_attack = cfg.get("attack") or {}
    if isinstance(raw_attack, list):  # an ensemble: one entry per attack
        attack = {f"attack {i + 1}": a for i, a in enumerate(raw_attack)}
    else:
        attack = dict(raw_attack)
    threat = dict(cfg.get("threat") or {})
    sections = [
        ("Data", data),
        ("Training", sorted((cfg.get("train") or {}).items()) or [("(defaults)", "")]),
        ("Evaluation", sorted((cfg.get("eval") or {}).items())),
        ("Threat model", [("norm", norm_label(cell["norm"])), *sorted(threat.items())]),
        (
            "Attack",
            [(k, attack[k]) for k in sorted(attack)] if attack else [("(none)", "no attack ran")],
        ),
    ]
    return [
        (title, [(k, json_text(v) if v != "" else "") for k, v in kv]) for title, kv in sections
    ]


def citation_context(cls: Any) -> dict[str, Any] | None:
    """The ``citation`` a defense class declares, as template data; ``None`` if none."""
    cite = getattr(cls, "citation", None) if cls is not None else None
    if cite is None:
        return None
    authors = getattr(cite, "authors", "")
    if not isinstance(authors, str):
        authors = ", ".join(str(a) for a in authors)
    return {
        "title": str(getattr(cite, "title", "") or ""),
        "authors": authors,
        "venue": str(getattr(cite, "venue", "") or ""),
        "year": str(getattr(cite, "year", "") or ""),
        "url": str(getattr(cite, "url", "") or ""),
        "bibtex": str(getattr(cite, "bibtex", "") or "").strip(),
    }


def defense_context(name: str, lookup: DefenseLookup) -> dict[str, Any]:
    """What the row page says about the defense class: docstring, capabilities, paper."""
    cls = lookup(name)
    if cls is None:
        return {"registered": False, "citation": None}
    doc = (getattr(cls, "__doc__", None) or "").strip().splitlines()
    return {
        "registered": True,
        "summary": doc[0] if doc else "",
        "randomized": bool(getattr(cls, "randomized", False)),
        "certifies": ", ".join(norm_label(n) for n in getattr(cls, "certifies", ())) or "nothing",
        "source": f"{cls.__module__}.{cls.__qualname__}",
        "citation": citation_context(cls),
    }


RECORD_LABELS = {
    "rank": "rank on the board",
    "defense": "defense",
    "model": "model",
    "params": "parameters",
    "attack": "attack",
    "n_test": "test examples",
    "n_draws": "noise draws per example",
    "alpha": "alpha (certificates hold with probability ≥ 1 − alpha)",
    "seed": "seed(s)",
    "train_seconds": "training seconds (mean over seeds)",
    "eval_seconds": "evaluation seconds (mean over seeds)",
    "certbench_version": "certbench version",
    "torch_version": "torch version",
    "git_commit": "git commit",
    "created_at": "created (latest over seeds)",
}


def row_context(board: Board, page: RowPage, lookup: DefenseLookup) -> dict[str, Any]:
    """Context of ``row.html`` for one row of ``board``."""
    row = page.row
    cis = intervals_of(row)
    results = [
        {
            "label": "clean accuracy",
            "cell": metric_cell("accuracy", row.metrics.get("accuracy"), cis.get("accuracy")),
        }
    ]
    for prefix, group in METRIC_GROUPS.items():
        for col in board.columns:
            p, x = parse_metric_key(col)
            if p == prefix and x is not None:
                cell = metric_cell(col, row.metrics.get(col), cis.get(col))
                results.append({"label": group.label(x), "cell": cell})
    record = []
    for key in ("rank", "defense", "model", "params", *TAIL_COLUMNS):
        value = row.values.get(key)
        cell = Cell(key, csv_text(value), number_text(value), numeric=False)
        record.append({"label": RECORD_LABELS.get(key, key), "cell": cell})
    provenance = []
    for c in page.stored:
        prov = c.get("provenance") or {}
        provenance.append(
            {
                "seed": c["seed"],
                "cell_id": c["cell_id"],
                "created_at": c.get("created_at") or "—",
                "certbench_version": c.get("certbench_version") or "—",
                "torch_version": c.get("torch_version") or "—",
                "git_commit": c.get("git_commit") or "—",
                "weights_sha256": prov.get("weights_sha256") or "—",
                "specs": ", ".join(c.get("specs") or []) or "—",
            }
        )
    interval = None
    eps = headline_eps(board)
    if page.interval is not None and eps is not None:
        iv = page.interval
        interval = {
            "eps": f"{eps:g}",
            "lower": metric_cell(LOWER, iv.lower, iv.lower_ci),
            "upper": metric_cell(UPPER, iv.upper, iv.upper_ci),
            "lower_from": iv.lower_from,
            "upper_from": iv.upper_from,
        }
    return {
        "board": board_summary(board),
        "page": page,
        "title": page.name,
        "params": sorted((k, json_text(v)) for k, v in row.params.items()),
        "defense": defense_context(row.defense, lookup),
        "results": results,
        "record": record,
        "interval": interval,
        "settings": _settings(page.stored[-1]) if page.stored else [],
        "provenance": provenance,
        "figures": curve_charts(board, [page], f"{board_slug(board)}-{page.slug}"),
    }
