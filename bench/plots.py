"""Leaderboard plots: one PNG per (dataset, norm) board, every defense a line.

Panels (each drawn only when some row has data for it):

1. guaranteed accuracy vs certified radius r (ℓp radius in input units, pixels in [0, 1]);
2. robust precision (solid) and coverage (dashed) vs PixelDP robustness threshold T;
3. accuracy under attack vs attack budget ε.

A board with none of these (clean accuracy only) gets a bar chart of accuracy. Figures are
rendered with matplotlib's Agg canvas directly (no pyplot, no global backend switch) and
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


def _panels(board: Board) -> list[str]:
    def has(prefix: str) -> bool:
        return any(r.series(prefix)[0] for r in board.rows)

    panels = []
    if has("guaranteed_accuracy"):
        panels.append("guaranteed")
    if has("robust_precision") or has("coverage"):
        panels.append("pixeldp")
    if has("accuracy_under_attack"):
        panels.append("attack")
    return panels


def render_board(board: Board) -> bytes:
    """PNG bytes of ``board``'s figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sym = NORM_SYMBOL.get(board.norm, board.norm)
    unit = "input units, pixels in [0, 1]"
    panels = _panels(board) or ["accuracy"]
    names = display_names(board)
    legend_width = 0.0 if panels == ["accuracy"] else 3.6
    fig = Figure(figsize=(5.2 * len(panels) + legend_width, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colors = [f"C{i % 10}" for i in range(len(board.rows))]
    for ax, panel in zip(axes, panels, strict=True):
        if panel == "accuracy":
            acc = [r.metrics.get("accuracy") for r in board.rows]
            ax.bar(range(len(acc)), [0.0 if a is None else a for a in acc], color=colors)
            ax.set_xticks(range(len(acc)), names, rotation=30, ha="right", fontsize=8)
            ax.set_ylabel("clean accuracy (fraction)")
            ax.set_title("accuracy")
        else:
            _line_panel(ax, board, panel, names, colors, sym, unit)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
    if panels != ["accuracy"]:
        # One legend for the figure (a defense has the same colour in every panel), outside
        # the axes so no curve hides behind it.
        from matplotlib.lines import Line2D

        handles = [
            Line2D([], [], color=c, marker="o", label=n) for n, c in zip(names, colors, strict=True)
        ]
        fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    fig.suptitle(f"{board.dataset}, {sym} threat model")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _line_panel(
    ax: Any, board: Board, panel: str, names: list[str], colors: list[str], sym: str, unit: str
) -> None:
    drawn = False
    for row, name, color in zip(board.rows, names, colors, strict=True):
        if panel == "guaranteed":
            xs, ys = row.series("guaranteed_accuracy")
            if xs:
                ax.plot(xs, ys, marker="o", color=color, label=name)
                drawn = True
        elif panel == "attack":
            xs, ys = row.series("accuracy_under_attack")
            if xs:
                ax.plot(xs, ys, marker="o", color=color, label=name)
                drawn = True
        else:
            xs, ys = row.series("robust_precision")
            if xs:
                ax.plot(xs, ys, marker="o", color=color, label=f"{name}: precision")
                drawn = True
            xs, ys = row.series("coverage")
            if xs:
                ax.plot(xs, ys, marker="s", ls="--", color=color, label=f"{name}: coverage")
                drawn = True
    if panel == "guaranteed":
        ax.set_xlabel(f"{sym} radius r ({unit})")
        ax.set_ylabel("guaranteed accuracy (fraction)")
        ax.set_title("certified: guaranteed accuracy vs radius")
    elif panel == "attack":
        ax.set_xlabel(f"{sym} attack budget ε ({unit})")
        ax.set_ylabel("accuracy under attack (fraction)")
        ax.set_title("empirical: accuracy under attack")
    else:
        ax.set_xlabel(f"{sym} robustness threshold T ({unit})")
        ax.set_ylabel("robust precision (solid) / coverage (dashed)")
        ax.set_title("PixelDP: robust precision and coverage vs T")
    if not drawn:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)


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
