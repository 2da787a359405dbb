"""Small frictions of the command line: `run --limit`, `publish` never mixes specs silently,
`--epochs 0` is refused, and help and argument errors answer without importing torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


LIGHT = """
import sys
from bench.cli import main
try:
    rc = main({args!r})
except SystemExit as exc:  # --help
    rc = exc.code
heavy = sorted(m for m in ("torch", "scipy", "pandas") if m in sys.modules)
print(rc, ",".join(heavy) or "-")
"""


@pytest.mark.parametrize(
    ("args", "rc"),
    [
        (["--help"], 0),
        (["run", "--help"], 0),
        (["run"], 2),
        (["certify", "--norm", "l7", "--checkpoint", "x"], 2),
        (["run", "missing-spec.toml"], 2),
        (["nope"], 2),
    ],
    ids=["help", "run-help", "missing-argument", "bad-choice", "missing-spec", "bad-command"],
)
def test_help_and_argument_errors_do_not_import_torch(args, rc):
    """They answer in well under a second because nothing heavy is imported (timing is left to
    benchmarks; what is checked here is the cause)."""
    code = LIGHT.format(args=args)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == [str(rc), "-"], out.stdout + out.stderr


SPEC = """
name = "tiny"
[data]
dataset = "digits"
model = "mlp"
[train]
epochs = 1
lr = 0.003
[threat]
norms = ["l2"]
radii = [0.0]
[[defenses]]
name = "undefended"
"""


def test_run_limit(capsys, tmp_path):
    from bench.store import Store

    spec = tmp_path / "tiny.toml"
    spec.write_text(SPEC)
    store = tmp_path / "s.sqlite"
    rc, _, err = _run(capsys, "run", str(spec), "--store", str(store), "--limit", "20", "--quiet")
    assert rc == 0, err
    (cell,) = Store(store).cells()
    assert cell["n_test"] == 20 and cell["limit_test"] == 20
    rc, _, err = _run(capsys, "run", str(spec), "--store", str(store), "--limit", "0")
    assert rc == 2 and "--limit" in err and "Traceback" not in err


def test_train_epochs_zero_is_refused(capsys, tmp_path):
    rc, _, err = _run(capsys, "train", "--epochs", "0", "--out", str(tmp_path / "ck"))
    assert rc == 2 and "--epochs 0 trains nothing" in err
    assert len(err.strip().splitlines()) == 1


def _store_with_specs(path: Path, *names: str):
    from bench.spec import CellConfig
    from bench.store import Store

    store = Store(path)
    for i, name in enumerate(names):
        cell = CellConfig(
            spec_name=name, dataset="digits", data_dir=None, limit_train=None, limit_test=10,
            model="cnn", defense="undefended", label=None, params={"i": i}, norm="l2", seed=0,
            train={}, eval={}, threat={"radii": [0.0], "thresholds": [], "eps": []},
            attack=None,
        )  # fmt: skip
        store.put(cell, {"metrics": {"accuracy": 0.5}, "n_test": 10})
    return store


def test_publish_refuses_to_mix_specs(capsys, tmp_path):
    store = _store_with_specs(tmp_path / "s.sqlite", "quick", "mine")
    out = tmp_path / "boards"
    common = ["leaderboard", "publish", "--store", str(store.path), "--out", str(out)]

    rc, _, err = _run(capsys, *common)
    assert rc == 2 and not out.exists()
    line = err.strip()
    assert "2 specs (mine, quick)" in line and "--spec-name" in line and "--all-specs" in line

    rc, _, err = _run(capsys, *common, "--spec-name", "quick")
    assert rc == 0, err
    assert (out / "specs.txt").read_text().splitlines()[1:] == ["quick"]

    rc, _, err = _run(capsys, *common, "--all-specs")
    assert rc == 0, err
    assert (out / "specs.txt").read_text().splitlines()[1:] == ["mine", "quick"]


def test_publish_refuses_to_replace_another_specs_boards(capsys, tmp_path):
    out = tmp_path / "boards"
    first = _store_with_specs(tmp_path / "a.sqlite", "quick")
    rc, _, err = _run(capsys, "leaderboard", "publish", "--store", str(first.path),
                      "--out", str(out))  # fmt: skip
    assert rc == 0, err  # one spec, a fresh directory: nothing to mix
    other = _store_with_specs(tmp_path / "b.sqlite", "mine")
    common = ["leaderboard", "publish", "--store", str(other.path), "--out", str(out)]
    rc, _, err = _run(capsys, *common)
    assert rc == 2
    assert "holds the boards of spec quick, not of mine" in err and "--spec-name mine" in err
    rc, _, err = _run(capsys, *common, "--spec-name", "mine")
    assert rc == 0, err


def test_tox_bench_publishes_one_spec():
    """`tox -e bench` publishes the quick spec by name into the tracked leaderboards/."""
    text = (ROOT / "tox.ini").read_text()
    publish = [ln for ln in text.splitlines() if "leaderboard publish" in ln]
    assert publish and all("--spec-name quick" in ln for ln in publish)
