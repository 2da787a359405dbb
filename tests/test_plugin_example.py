"""The worked plugin example installs into a throwaway site directory and runs end to end.

This is the issue's acceptance test for third-party plugins: a package certbench has never
seen, declaring one entry point in its own pyproject.toml, shows up in `certbench defenses
list` and runs through `certbench run` into the results, with no edit to certbench.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "defense-plugin"


@pytest.fixture(scope="module")
def plugin_site(install_package) -> Path:
    return install_package(EXAMPLE)


@pytest.fixture
def certbench(certbench_cli):
    """``certbench(args, site, cwd)``: the CLI in a fresh process with ``site`` on its path."""

    def run(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
        return certbench_cli(args, cwd=cwd, paths=[site])

    return run


def test_plugin_listed(plugin_site, certbench, tmp_path):
    out = certbench(["defenses", "list"], plugin_site, tmp_path)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("bit-depth"))
    assert "certbench-bitdepth-example" in line
    show = certbench(["defenses", "show", "bit-depth"], plugin_site, tmp_path)
    assert show.returncode == 0 and "bits per pixel" in show.stdout


@pytest.mark.slow
def test_plugin_runs_through_certbench_run(plugin_site, certbench, tmp_path):
    store = tmp_path / "store.sqlite"
    out = certbench(
        ["run", str(EXAMPLE / "plugin.toml"), "--store", str(store), "--quiet"],
        plugin_site,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    from bench.store import Store

    cells = Store(store).cells()
    by_defense = {c["defense"]: c for c in cells}
    assert set(by_defense) == {"undefended", "bit-depth"}
    acc = by_defense["bit-depth"]["metrics"]["accuracy"]
    assert isinstance(acc, float) and 0.5 < acc <= 1.0


def test_plugin_absent_without_install(certbench, tmp_path):
    env_site = tmp_path / "empty"
    env_site.mkdir()
    out = certbench(["defenses", "list"], env_site, tmp_path)
    assert out.returncode == 0
    assert "bit-depth" not in out.stdout
