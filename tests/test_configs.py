"""Every shipped spec in configs/ parses and expands (so users never hit a broken example)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.spec import load_spec

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path):
    spec = load_spec(path)
    cells = spec.cells()
    assert cells and len({c.cell_id() for c in cells}) == len(cells)


def test_quick_board_has_all_five_defenses():
    spec = load_spec(CONFIGS[0].parent / "quick.toml")
    names = {c.defense for c in spec.cells()}
    assert names == {"undefended", "madry", "wong-kolter", "randomized-smoothing", "pixeldp"}
    assert spec.cells()[0].dataset == "digits"
