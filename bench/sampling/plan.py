"""Planning: which rows go into which forward pass, and which passes form a unit of work.

A forward pass is a list of *segments* ``(local example, request slot, block, block rows,
first row, end row)``: rows ``[first, end)`` of one (example, request, block). Since a row's
noise depends only on its block's seed, any grouping of rows into passes gives the same draws;
the plan only decides how full the passes are.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

__all__ = ["Segment", "plan_passes", "split_segments", "unit_rows", "work_units"]

Segment = tuple[int, int, int, int, int, int]
"""(local example, request slot, block, block rows, first row, end row) of a forward pass."""


def plan_passes(
    num_examples: int,
    requests: list[tuple[int, int]],
    block_size: int,
    batch_size: int,
    first_block: int = 0,
) -> Iterator[list[Segment]]:
    """Group the rows into forward passes of <= batch_size rows.

    Rows are ordered by request (``(stream, n)``), then example, then draw, so that small
    blocks (e.g. Cohen's ``n0`` selection draws) of many examples share passes. Whole blocks
    are packed together; a block larger than ``batch_size`` is split into
    ``ceil(rows / batch_size)`` near-equal pieces, one forward pass each.

    ``first_block``: a request's ``n`` draws are draws ``[first_block * block_size,
    first_block * block_size + n)`` of its stream, i.e. blocks ``first_block, ...`` (a
    sequential test's later rounds continue the draws of its earlier ones). A block keeps the
    rows it has when the draws start at 0, so the draws are those of a single request for
    ``first_block * block_size + n`` draws, from draw ``first_block * block_size`` on.
    """
    chunk: list[Segment] = []
    used = 0
    for slot, (_, n) in enumerate(requests):
        for e in range(num_examples):
            for i in range(-(-n // block_size)):
                b = first_block + i
                rows = min(block_size, n - i * block_size)
                if rows <= batch_size:
                    if used + rows > batch_size:
                        yield chunk
                        chunk, used = [], 0
                    chunk.append((e, slot, b, rows, 0, rows))
                    used += rows
                    continue
                if chunk:
                    yield chunk
                    chunk, used = [], 0
                pieces = -(-rows // batch_size)
                bounds = [rows * p // pieces for p in range(pieces + 1)]
                for r0, r1 in itertools.pairwise(bounds):
                    yield [(e, slot, b, rows, r0, r1)]
    if chunk:
        yield chunk


def split_segments(chunk: list[Segment], max_rows: int) -> Iterator[list[Segment]]:
    """Cut a pass's segments into passes of at most ``max_rows`` rows (segments may split)."""
    piece: list[Segment] = []
    used = 0
    for e, slot, b, rows, r0, r1 in chunk:
        while r0 < r1:
            take = min(r1 - r0, max_rows - used)
            piece.append((e, slot, b, rows, r0, r0 + take))
            used += take
            r0 += take
            if used == max_rows:
                yield piece
                piece, used = [], 0
    if piece:
        yield piece


def work_units(plan: Iterator[list[Segment]]) -> Iterator[list[list[Segment]]]:
    """Group a plan's passes into units of work: the passes of a block split across passes
    stay together (one runner generates the block's noise once and slices it); every other
    pass is a unit of its own."""
    unit: list[list[Segment]] = []
    for chunk in plan:
        split = len(chunk) == 1 and chunk[0][5] - chunk[0][4] < chunk[0][3]
        if unit and split and chunk[0][4] > 0:  # a later piece of the block being split
            unit.append(chunk)
            continue
        if unit:
            yield unit
        unit = [chunk]
    if unit:
        yield unit


def unit_rows(unit: list[list[Segment]]) -> int:
    """Rows in a unit of work (for the progress bar)."""
    return sum(seg[5] - seg[4] for chunk in unit for seg in chunk)
