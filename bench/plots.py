"""Leaderboard plots: one PNG per (dataset, norm) board, every defense a line.

Panels (each drawn only when some row has data for it), in a 2-column grid:

1. guaranteed accuracy vs certified radius r (ℓp radius in input units, pixels in [0, 1]),
   the axis cut one grid point after the last radius anything certifies;
2. robust precision (solid) and coverage (dashed) vs robustness threshold T, for the
   defenses that certify (the others have no coverage);
3. accuracy under the attack ensemble vs attack budget ε;
4. the robust-accuracy interval at the headline budget: one bar per defense from guaranteed
   (certified) to under-attack accuracy (hatched from 0 when nothing is certified).

95% Clopper–Pearson intervals over test examples are drawn as bands (curves) or bars
(single values); a panel with a single threshold or budget is drawn as grouped bars. A
board with none of these (clean accuracy only) gets a bar chart of accuracy. Figures are
rendered with matplotlib's canvases directly (no pyplot, no global backend switch) and
written atomically to ``<out_dir>/<dataset>-<norm>.png``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from bench.errors import ConfigError
from bench.files import atomic_write_bytes
from bench.leaderboard import Board, BoardRow, build_boards
from bench.store import Store

NORM_SYMBOL = {"l1": "ℓ1", "l2": "ℓ2", "linf": "ℓ∞"}


def display_names(board: Board) -> list[str]:
    """Legend entry per row: label (or defense name), the params that vary among rows of the
    same defense, and the model when the board mixes models."""
    by_defense: dict[str, list[BoardRow]] = {}
    for row in board.rows:
        by_defense.setdefault(row.defense, []).append(row)
    several_models = len({r.model for r in board.rows}) > 1
    names = []
    for row in board.rows:
        peers = by_defense[row.defense]
        keys = sorted({k for r in peers for k in r.params})
        varying = [k for k in keys if len({repr(r.params.get(k)) for r in peers}) > 1]
        parts = [
            f"{k}={row.params.get(k)!r}"
            if isinstance(row.params.get(k), str)
            else f"{k}={row.params.get(k)}"
            for k in varying
        ]
        if several_models:
            parts.insert(0, row.model)
        name = row.label or row.defense
        names.append(f"{name} ({', '.join(parts)})" if parts else name)
    return names


def _certifies(row: BoardRow) -> bool:
    return bool(row.series("coverage")[0]) or bool(row.series("guaranteed_accuracy")[0])


def _panels(board: Board) -> list[str]:
    def has(prefix: str) -> bool:
        return any(r.series(prefix)[0] for r in board.rows)

    panels = []
    if has("guaranteed_accuracy"):
        panels.append("guaranteed")
    if has("coverage"):
        panels.append("threshold")
    if has("accuracy_under_attack"):
        panels.append("attack")
    if board.headline_eps is not None and any(
        r.metrics.get("robust_accuracy_upper") is not None for r in board.rows
    ):
        panels.append("interval")
    return panels


def render_board(board: Board, *, fmt: str = "png") -> bytes:
    """``board``'s figure as PNG (``fmt="png"``) or SVG (``fmt="svg"``) bytes.

    Up to four panels in a 2-column grid (certified curve, robust precision and coverage,
    accuracy under attack, the robust-accuracy interval at the headline budget), one legend
    below them; 95% intervals over test examples as bands (curves) or bars (single values).
    """
    from matplotlib.figure import Figure

    sym = NORM_SYMBOL.get(board.norm, board.norm)
    unit = "pixels in [0, 1]"
    panels = _panels(board) or ["accuracy"]
    names = display_names(board)
    colors = [f"C{i % 10}" for i in range(len(board.rows))]
    ncols = 1 if len(panels) == 1 else 2
    nrows = -(-len(panels) // ncols)
    legend_rows = 0 if panels == ["accuracy"] else -(-len(names) // 2)
    fig = Figure(
        figsize=(5.2 * ncols, 4.0 * nrows + 0.35 * legend_rows + 0.6), layout="constrained"
    )
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax, panel in zip(axes, panels, strict=False):
        if panel == "accuracy":
            _accuracy_panel(ax, board, names, colors)
        elif panel == "interval":
            _interval_panel(ax, board, names, colors, sym)
        else:
            _curve_panel(ax, board, panel, colors, sym, unit)
        ax.grid(True, alpha=0.3)
    if panels != ["accuracy"]:
        # One legend for the figure (a defense has the same colour in every panel), below
        # the panels so no curve hides behind it.
        from matplotlib.lines import Line2D

        handles = [
            Line2D([], [], color=c, marker="o", lw=2, label=n)
            for n, c in zip(names, colors, strict=True)
        ]
        fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=10,
                   frameon=False)  # fmt: skip
    fig.suptitle(f"{board.dataset}, {sym} threat model", fontsize=13)
    buf = io.BytesIO()
    if fmt == "svg":
        from matplotlib.backends.backend_svg import FigureCanvasSVG

        FigureCanvasSVG(fig)
    else:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
    fig.savefig(buf, format=fmt, dpi=100)
    return buf.getvalue()


def _accuracy_panel(ax: Any, board: Board, names: list[str], colors: list[str]) -> None:
    acc = [r.metrics.get("accuracy") for r in board.rows]
    ax.bar(range(len(acc)), [0.0 if a is None else a for a in acc], color=colors)
    _error_bars(ax, range(len(acc)), [r.intervals.get("accuracy") for r in board.rows])
    ax.set_xticks(range(len(acc)), names, rotation=30, ha="right", fontsize=9)
    ax.set_ylabel("clean accuracy (fraction)")
    ax.set_title("accuracy")
    ax.set_ylim(0, 1.02)


def _error_bars(ax: Any, xs: Any, intervals: list[Any], color: Any = "k") -> None:
    for x, iv in zip(xs, intervals, strict=True):
        if iv is not None:
            ax.plot([x, x], [iv[0], iv[1]], color=color, lw=1.2, alpha=0.8)


def _interval_panel(ax: Any, board: Board, names: list[str], colors: list[str], sym: str) -> None:
    """One bar per defense from certified (lower) to empirical (upper) robust accuracy."""
    rows = list(enumerate(board.rows))
    for i, row in rows:
        lo, hi = row.metrics.get("robust_accuracy_lower"), row.metrics.get("robust_accuracy_upper")
        if hi is None:
            continue
        start = 0.0 if lo is None else lo
        ax.barh(i, hi - start, left=start, color=colors[i], alpha=0.35 if lo is None else 0.85,
                height=0.6, hatch="//" if lo is None else None)  # fmt: skip
        ax.plot([hi], [i], marker="|", color=colors[i], markersize=14, mew=2)
        if lo is not None:
            ax.plot([lo], [i], marker="|", color=colors[i], markersize=14, mew=2)
    ax.set_yticks([i for i, _ in rows], names, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("robust accuracy (fraction)")
    ax.set_title(
        f"robust accuracy at {sym} ε = {board.headline_eps:g}:\n"
        "certified (left end) to under attack (right end)",
        fontsize=10,
    )


def _x_limit(board: Board, prefix: str) -> float | None:
    """The right end of a curve panel: the grid point after the last one where some row
    is above 0 (a board's radius grid may run far past what anything certifies)."""
    xs = sorted({x for r in board.rows for x in r.series(prefix)[0]})
    live = [x for r in board.rows for x, y in zip(*r.series(prefix), strict=True) if y > 0]
    if not xs or not live:
        return None
    after = [x for x in xs if x > max(live)]
    return after[0] if after else xs[-1]


def _curve_panel(ax: Any, board: Board, panel: str, colors: list[str], sym: str, unit: str) -> None:
    prefixes = {
        "guaranteed": ["guaranteed_accuracy"],
        "attack": ["accuracy_under_attack"],
        "threshold": ["robust_precision", "coverage"],
    }[panel]
    points = sorted({x for r in board.rows for p in prefixes for x in r.series(p)[0]})
    single = len(points) == 1
    rows = [
        (i, r)
        for i, r in enumerate(board.rows)
        if panel != "threshold" or _certifies(r)  # nothing certified: no precision/coverage
    ]
    width = 0.8 / max(1, len(rows) * len(prefixes))
    for slot, (i, row) in enumerate(rows):
        for j, prefix in enumerate(prefixes):
            xs, ys = row.series(prefix)
            if not xs:
                continue
            ivs = [row.intervals.get(f"{prefix}@{x:g}") for x in xs]
            style = {"ls": "--", "marker": "s"} if prefix == "coverage" else {"marker": "o"}
            if single:  # one threshold / budget: grouped bars, not degenerate lines
                pos = (slot * len(prefixes) + j) * width - 0.4 + width / 2
                ax.bar(pos, ys[0], width=width, color=colors[i],
                       alpha=0.5 if prefix == "coverage" else 0.9,
                       hatch="//" if prefix == "coverage" else None)  # fmt: skip
                _error_bars(ax, [pos], ivs[:1])
                continue
            ax.plot(xs, ys, color=colors[i], lw=1.8, **style)
            band = [(x, iv) for x, iv in zip(xs, ivs, strict=True) if iv is not None]
            if len(band) > 1:
                bx, lo, hi = zip(*((x, iv[0], iv[1]) for x, iv in band), strict=True)
                ax.fill_between(bx, lo, hi, color=colors[i], alpha=0.12, lw=0)
    if single:
        label = {"guaranteed": "r", "attack": "ε", "threshold": "T"}[panel]
        ax.set_xticks([0.0], [f"{label} = {points[0]:g}"])
        ax.set_xlim(-0.5, 0.5)
    else:
        limit = _x_limit(board, prefixes[0]) if panel == "guaranteed" else None
        if limit is not None:
            ax.set_xlim(-0.02 * limit, limit * 1.02)
    ax.set_ylim(-0.02, 1.02)
    if panel == "guaranteed":
        ax.set_xlabel(f"{sym} radius r ({unit})")
        ax.set_ylabel("guaranteed accuracy (fraction)")
        ax.set_title("certified: guaranteed accuracy vs radius", fontsize=10)
    elif panel == "attack":
        ax.set_xlabel(f"{sym} attack budget ε ({unit})")
        ax.set_ylabel("accuracy under attack (fraction)")
        ax.set_title("empirical: accuracy under the attack ensemble", fontsize=10)
    else:
        ax.set_xlabel(f"{sym} robustness threshold T ({unit})")
        ax.set_ylabel("robust precision (solid) / coverage (dashed)")
        ax.set_title("certifying defenses: robust precision and coverage vs T", fontsize=10)


def plot_boards(store: Store, out_dir: str | Path, *, spec_name: str | None = None) -> list[Path]:
    """Write ``<dataset>-<norm>.png`` for every board under ``out_dir``; returns the paths."""
    out = Path(out_dir)
    boards = build_boards(store, spec_name=spec_name)
    if not boards:
        which = f" of spec '{spec_name}'" if spec_name else ""
        raise ConfigError(
            f"{store.path}: no finished cells{which} to plot; run `certbench run` first"
        )
    written = []
    for board in boards:
        name = board.filename[: -len(".csv")] + ".png"
        written.append(atomic_write_bytes(out / name, render_board(board)))
    return written
