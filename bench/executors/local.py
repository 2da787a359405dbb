"""The local executor: cells one after another in this process, through the pipeline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from bench.pipeline import run_cell


def run_cells(
    cells: list,
    checkpoint_root: str | Path,
    *,
    device: str | None = None,
    progress: bool = True,
    desc: str = "cells",
) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Run ``cells`` in order; yields ``(cell, result)`` as each finishes."""
    bar = tqdm(cells, desc=desc, unit="cell", disable=not progress)
    for cell in bar:
        bar.set_postfix_str(f"{cell.defense}/{cell.model}/{cell.norm}")
        yield cell, run_cell(cell, checkpoint_root, device=device, progress=progress)
