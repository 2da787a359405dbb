"""SVG charts for the site, drawn with matplotlib's SVG canvas (no pyplot) and inlined.

Each function returns one self-contained ``<svg>`` element as text, ready to sit inside an
HTML page viewed from ``file://``:

* text stays text (``svg.fonttype = "none"``): no glyph outlines, no external fonts, and a
  screen reader can read the labels;
* ids are prefixed with the chart's id, because several charts share one page;
* the output is deterministic (fixed hash salt, no date, no metadata block), so regenerating
  an unchanged site changes no byte;
* the root carries ``role="img"`` and a ``<title>``/``<desc>`` pair: the chart's alt text.

Accuracies are fractions in [0, 1]; radii, thresholds and budgets are in input units of the
board's norm (pixels in [0, 1]).
"""

from __future__ import annotations

import functools
import html
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

# text stays text; labels are plain text (a "$" in a defense's label is not maths)
_RC = {"svg.fonttype": "none", "font.size": 9, "text.parse_math": False}


def _styled(draw: Callable[..., str]) -> Callable[..., str]:
    """Run ``draw`` under the site's matplotlib settings (read as the artists are made)."""

    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> str:
        with matplotlib.rc_context(_RC):
            return draw(*args, **kwargs)

    return wrapper


@dataclass(frozen=True)
class Series:
    """One line of a line chart: ``ys`` at ``xs`` (same length), optionally a confidence
    band ``low``..``high`` per point (``None`` where unknown)."""

    name: str
    xs: Sequence[float]
    ys: Sequence[float]
    color: str
    low: Sequence[float | None] | None = None
    high: Sequence[float | None] | None = None
    dashed: bool = False
    marker: str = "o"


@dataclass(frozen=True)
class IntervalBar:
    """One defense in the interval chart: its true robust accuracy at the budget lies in
    [``lower``, ``upper``]. ``lower`` is the guaranteed (certified) accuracy, ``None`` when
    the defense certifies nothing (the bar then starts at 0); ``upper`` is the accuracy under
    the attacks, ``None`` when no attack ran (clean accuracy, a trivial upper bound, is used).
    ``lower_ci``/``upper_ci``: the 95% intervals of the two ends, where known."""

    name: str
    color: str
    lower: float | None
    upper: float | None
    clean: float | None
    lower_ci: tuple[float | None, float | None] | None = None
    upper_ci: tuple[float | None, float | None] | None = None


@_styled
def line_chart(
    series: Sequence[Series],
    *,
    chart_id: str,
    title: str,
    xlabel: str,
    ylabel: str,
    desc: str,
) -> str:
    """A line chart of ``series`` (accuracy-like values on a [0, 1] y axis) as inline SVG."""
    legend = len(series) > 1 or any(s.dashed for s in series)
    fig = Figure(figsize=(6.8 if legend else 5.0, 3.4), layout="constrained")
    ax = fig.subplots()
    for s in series:
        ls = "--" if s.dashed else "-"
        ax.plot(s.xs, s.ys, ls=ls, marker=s.marker, ms=4, color=s.color, label=s.name)
        band = _band(s)
        if band is not None:
            xs, lo, hi = band
            ax.fill_between(xs, lo, hi, color=s.color, alpha=0.15, lw=0)
    if not series:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if legend:
        fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    return _svg(fig, chart_id, title, desc)


def has_band(s: Series) -> bool:
    """Whether ``s`` has a confidence band at some point."""
    return _band(s) is not None


def _band(s: Series) -> tuple[list[float], list[float], list[float]] | None:
    if s.low is None or s.high is None:
        return None
    pts = [
        (x, lo, hi)
        for x, lo, hi in zip(s.xs, s.low, s.high, strict=True)
        if lo is not None and hi is not None
    ]
    if not pts:
        return None
    return [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]


@_styled
def interval_chart(
    bars: Sequence[IntervalBar], *, chart_id: str, title: str, xlabel: str, desc: str
) -> str:
    """Horizontal bars, one per defense (first on top), from certified to empirical robust
    accuracy, with the 95% intervals of both ends as whiskers and clean accuracy as a
    diamond; the numbers are repeated as tick labels on the right."""
    height = 1.3 + 0.42 * max(1, len(bars))
    fig = Figure(figsize=(7.6, height), layout="constrained")
    ax = fig.subplots()
    ys = list(range(len(bars)))[::-1]
    right_labels = []
    for y, bar in zip(ys, bars, strict=True):
        start = 0.0 if bar.lower is None else bar.lower
        end = bar.upper if bar.upper is not None else bar.clean
        trivial = bar.lower is None or bar.upper is None
        if end is not None:
            ax.barh(
                y,
                max(end - start, 0.004),
                left=start,
                height=0.6,
                # open bars: the hatch takes the edge colour, so the face must differ
                color="white" if trivial else to_rgba(bar.color, 0.85),
                hatch="//" if trivial else None,
                edgecolor=bar.color,
            )
        for value, ci in ((bar.lower, bar.lower_ci), (bar.upper, bar.upper_ci)):
            if value is not None and ci and ci[0] is not None and ci[1] is not None:
                ax.errorbar(
                    value,
                    y,
                    xerr=[[value - ci[0]], [ci[1] - value]],
                    fmt="none",
                    ecolor="black",
                    elinewidth=1,
                    capsize=3,
                )
        if bar.clean is not None:
            ax.plot(bar.clean, y, marker="D", ms=4, color="black", ls="none")
        right_labels.append(_interval_label(bar))
    ax.set_yticks(ys, [b.name for b in bars])
    ax.set_xlim(0, 1.0)
    ax.set_ylim(-0.7, len(bars) - 0.3)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    twin = ax.twinx()
    twin.set_ylim(ax.get_ylim())
    twin.set_yticks(ys, right_labels, fontsize=8)
    return _svg(fig, chart_id, title, desc)


def _interval_label(bar: IntervalBar) -> str:
    low = "nothing certified" if bar.lower is None else f"{bar.lower:.3f}"
    high = "no attack" if bar.upper is None else f"{bar.upper:.3f}"
    return f"{low} – {high}"


# ---------------------------------------------------------------------------- SVG text

_ID = re.compile(r'\bid="([^"]+)"')
_URL_REF = re.compile(r"url\(#([^)]+)\)")
_HREF_REF = re.compile(r'href="#([^"]+)"')
_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.DOTALL)


def _svg(fig: Figure, chart_id: str, title: str, desc: str) -> str:
    """``fig`` as an inline ``<svg>`` element with prefixed ids and its alt text."""
    FigureCanvasSVG(fig)
    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": chart_id}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue().decode("utf-8")
    text = _METADATA.sub("", text[text.index("<svg") :])
    text = _ID.sub(lambda m: f'id="{chart_id}-{m.group(1)}"', text)
    text = _URL_REF.sub(lambda m: f"url(#{chart_id}-{m.group(1)})", text)
    text = _HREF_REF.sub(lambda m: f'href="#{chart_id}-{m.group(1)}"', text)
    label = f'role="img" aria-labelledby="{chart_id}-title {chart_id}-desc" class="chart"'
    text = text.replace("<svg ", f"<svg {label} ", 1)
    head_end = text.index(">") + 1
    alt = (
        f'<title id="{chart_id}-title">{html.escape(title)}</title>'
        f'<desc id="{chart_id}-desc">{html.escape(desc)}</desc>'
    )
    return text[:head_end] + alt + text[head_end:].strip() + "\n"
