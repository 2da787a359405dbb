"""The certbench command line: results, and one-line errors with a non-zero exit."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest

from bench.cli import main


def _run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _train_digits_mlp(capsys, ck, epochs: int, *extra: str) -> tuple[int, str, str]:
    """``certbench train`` of the digits MLP (lr 0.003) into checkpoint ``ck``."""
    args = ["--model", "mlp", "--epochs", str(epochs), "--lr", "0.003", "--out", str(ck)]
    return _run(capsys, "train", "--dataset", "digits", *args, "--quiet", *extra)


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("certbench: warning")]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert "Traceback" not in err
    assert lines[0].startswith("certbench: error: ")
    return lines[0]


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("run", "train", "eval", "certify", "attack", "defenses", "leaderboard", "plot"):
        assert cmd in out


def test_unknown_model_is_one_line(capsys):
    rc, _, err = _run(capsys, "train", "--model", "nope", "--out", "/tmp/x", "--epochs", "1")
    assert rc == 2
    assert "unknown model 'nope'" in _one_line_error(err)


def test_missing_data_dir_is_one_line(capsys, tmp_path):
    rc, _, err = _run(
        capsys,
        "eval",
        "--dataset",
        "fashion-mnist",
        "--data-dir",
        str(tmp_path / "none"),
        "--model",
        "wk-small",
        "--checkpoint",
        "x.pth",
    )
    assert rc == 2
    line = _one_line_error(err)
    assert str(tmp_path / "none") in line and "does not exist" in line


def test_corrupted_idx_is_one_line(capsys, tmp_path, fashion_dir):
    for f in fashion_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(bad.read_bytes())
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x02" + raw[4:1000]))  # wrong magic, truncated
    rc, _, err = _run(
        capsys,
        "eval",
        "--dataset",
        "fashion-mnist",
        "--data-dir",
        str(tmp_path),
        "--model",
        "wk-small",
        "--checkpoint",
        "x.pth",
    )
    assert rc == 2
    line = _one_line_error(err)
    assert "t10k-images-idx3-ubyte.gz" in line and "magic" in line


def test_bad_argument_is_one_line(capsys):
    rc, _, err = _run(capsys, "certify", "--norm", "l7", "--checkpoint", "x")
    assert rc == 2
    assert "l7" in _one_line_error(err)


def test_bad_param_value_is_one_line(capsys, tmp_path):
    rc, _, err = _run(
        capsys,
        "train",
        "--defense",
        "randomized-smoothing",
        "--param",
        "sigma=-1",
        "--out",
        str(tmp_path / "ck"),
        "--epochs",
        "1",
    )
    assert rc == 2
    assert "sigma" in _one_line_error(err)


def test_train_then_eval_digits(capsys, tmp_path):
    ck = tmp_path / "undef"
    rc, _, err = _train_digits_mlp(capsys, ck, 8, "--output", str(tmp_path / "train.json"))
    assert rc == 0, err
    trained = json.loads((tmp_path / "train.json").read_text())
    assert trained["test_accuracy"] >= 0.9
    rc, _, err = _run(
        capsys,
        "eval",
        "--dataset",
        "digits",
        "--checkpoint",
        str(ck),
        "--quiet",
        "--output",
        str(tmp_path / "eval.json"),
    )
    assert rc == 0, err
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["accuracy"] == trained["test_accuracy"]
    assert isinstance(evaluated["accuracy"], float)


def test_eval_released_wong_kolter_weights(capsys, tmp_path, fashion_dir, wk_reference):
    rc, _, err = _run(
        capsys,
        "eval",
        "--dataset",
        "fashion-mnist",
        "--model",
        "wk-small",
        "--checkpoint",
        str(wk_reference),
        "--quiet",
        "--output",
        str(tmp_path / "e.json"),
    )
    assert rc == 0, err
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["n_test"] == 10000
    assert res["accuracy"] == pytest.approx(0.7827, abs=5e-5)


@pytest.mark.parametrize(
    ("limit", "expected"),
    [(100, (75, 60)), pytest.param(1000, (793, 653), marks=pytest.mark.slow)],
    ids=["first-100", "first-1000"],
)
def test_certify_released_wong_kolter(capsys, tmp_path, fashion_dir, wk_reference, limit, expected):
    """Exact (correct, certified) counts at linf 0.1 on the first test images; the 1000-image
    slice is the CI part of the full reproduction in the README (7827 / 6547 of 10 000)."""
    rc, _, err = _run(
        capsys,
        "certify",
        "--defense",
        "wong-kolter",
        "--model",
        "wk-small",
        "--checkpoint",
        str(wk_reference),
        "--dataset",
        "fashion-mnist",
        "--norm",
        "linf",
        "--eps",
        "0.1",
        "--limit",
        str(limit),
        "--quiet",
        "--output",
        str(tmp_path / "c.json"),
    )
    assert rc == 0, err
    res = json.loads((tmp_path / "c.json").read_text())
    assert (res["n_correct"], res["n_certified"]) == expected


def test_defenses_list_and_show(capsys):
    rc, out, _ = _run(capsys, "defenses", "list")
    assert rc == 0
    for name in ("undefended", "pixeldp", "randomized-smoothing", "madry", "wong-kolter"):
        assert name in out
    rc, out, _ = _run(capsys, "defenses", "show", "pixeldp")
    assert rc == 0 and "construction_bound" in out and "randomized: True" in out
    rc, _, err = _run(capsys, "defenses", "show", "nope")
    assert rc == 2 and "known defenses" in _one_line_error(err)


def test_bad_spec_is_one_line(capsys, tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text('name = "x"\n[data]\ndataset = "digitz"\n[[defenses]]\nname = "undefended"\n')
    rc, _, err = _run(capsys, "run", str(spec), "--store", str(tmp_path / "s.sqlite"))
    assert rc == 2
    line = _one_line_error(err)
    assert "bad.toml" in line and "digitz" in line


def test_attack_command_curve(capsys, tmp_path):
    ck = tmp_path / "undef"
    rc, _, err = _train_digits_mlp(capsys, ck, 5)
    assert rc == 0, err
    rc, _, err = _run(
        capsys,
        "attack",
        "--checkpoint",
        str(ck),
        "--dataset",
        "digits",
        "--norm",
        "linf",
        "--eps",
        "0.05",
        "0.2",
        "--limit",
        "60",
        "--attack-param",
        "steps=10",
        "--quiet",
        "--output",
        str(tmp_path / "a.json"),
    )
    assert rc == 0, err
    rows = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert [r["eps"] for r in rows] == [0.05, 0.2]
    # a stronger budget never helps the defender (same seed, nested balls, 10-step PGD)
    assert rows[1]["accuracy_under_attack"] <= rows[0]["accuracy_under_attack"]
    assert rows[1]["accuracy_under_attack"] < 0.5


def test_leaderboard_publish_rank_by(capsys, tmp_path):
    from bench.spec import CellConfig
    from bench.store import Store

    store = Store(tmp_path / "s.sqlite")
    for tag, acc, aua in (("x", 0.9, 0.1), ("y", 0.6, 0.5)):
        cell = CellConfig(
            spec_name="t", dataset="digits", data_dir=None, limit_train=None, limit_test=10,
            model="cnn", defense="undefended", label=None, params={"tag": tag}, norm="l2",
            seed=0, train={}, eval={}, threat={"radii": [0.0], "thresholds": [], "eps": [0.1]},
            attack=None, device="cpu",
        )  # fmt: skip
        metrics = {"accuracy": acc, "accuracy_under_attack@0.1": aua}
        assert store.put(cell, {"metrics": metrics, "n_test": 10})
    out = tmp_path / "lb"
    rc, _, err = _run(capsys, "leaderboard", "publish", "--store", str(store.path), "--out",
                      str(out), "--rank-by", "accuracy")  # fmt: skip
    assert rc == 0, err
    first = (out / "digits-l2.csv").read_text().splitlines()[1]
    assert first.startswith('1,undefended,cnn,"{""tag"":""x""}"')  # best clean accuracy
    rc, _, err = _run(capsys, "leaderboard", "publish", "--store", str(store.path), "--out",
                      str(out), "--rank-by", "median")  # fmt: skip
    assert rc == 2 and "--rank-by" in err and "Traceback" not in err


CONSISTENCY_SPEC = """
name = "cli-consistency"
seeds = [3]
[data]
dataset = "digits"
model = "cnn"
limit_test = 100
[train]
epochs = 2
lr = 0.003
[threat]
norms = ["l2"]
radii = [0.0, 0.25]
eps = [0.5]
[attack]
name = "pgd"
params = { steps = 3, draws = 2 }
[[defenses]]
name = "randomized-smoothing"
params = { sigma = 0.25, n0 = 20, n = 200, alpha = 0.01 }
"""


@pytest.mark.slow
def test_cli_certify_and_attack_reproduce_the_board_cell(capsys, tmp_path):
    """One pipeline: `certbench certify`/`attack` on a cell's checkpoint with the cell's seed
    give exactly the cell's guaranteed accuracy (radius >= r, the board's rule) and accuracy
    under attack (same per-chunk attack seeds), for a randomized defense."""
    from bench.store import Store

    spec = tmp_path / "spec.toml"
    spec.write_text(CONSISTENCY_SPEC)
    store_path = tmp_path / "s.sqlite"
    rc, _, err = _run(capsys, "run", str(spec), "--store", str(store_path), "--quiet")
    assert rc == 0, err
    store = Store(store_path)
    (cell,) = store.cells()
    ck = store.checkpoint_dir(cell["train_key"]) / "defense"
    common = ["--checkpoint", str(ck), "--dataset", "digits", "--limit", "100", "--seed", "3"]
    rc, _, err = _run(capsys, "certify", *common, "--norm", "l2", "--eps", "0.25", "--quiet",
                      "--output", str(tmp_path / "c.json"))  # fmt: skip
    assert rc == 0, err
    certified = json.loads((tmp_path / "c.json").read_text())["certified_accuracy"]
    assert certified == cell["metrics"]["guaranteed_accuracy@0.25"]
    rc, _, err = _run(capsys, "attack", *common, "--norm", "l2", "--eps", "0.5",
                      "--attack-param", "steps=3", "--attack-param", "draws=2", "--quiet",
                      "--output", str(tmp_path / "a.json"))  # fmt: skip
    assert rc == 0, err
    (row,) = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert row["accuracy_under_attack"] == cell["metrics"]["accuracy_under_attack@0.5"]


def test_run_table_shows_every_board_column(capsys):
    """Rows of different boards have different metric columns; none is dropped (review (d))."""
    from bench.cli import _print_table

    _print_table(
        [
            {"defense": "a", "norm": "l2", "guaranteed_accuracy@1": 0.5},
            {"defense": "b", "norm": "linf", "guaranteed_accuracy@0.1": 0.25},
        ]
    )
    header, _, first, second = capsys.readouterr().out.splitlines()
    assert "guaranteed_accuracy@1" in header and "guaranteed_accuracy@0.1" in header
    assert "0.5000" in first and "0.2500" in second


def test_eval_certify_attack_need_only_the_test_files(capsys, tmp_path):
    """A data directory holding only t10k-* files is enough to evaluate a checkpoint."""
    import numpy as np
    import torch

    from bench.models import create_model

    rng = np.random.default_rng(0)
    n = 20
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    data = tmp_path / "fmnist"
    data.mkdir()
    header = (0x00000803).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (n, 28, 28))
    (data / "t10k-images-idx3-ubyte").write_bytes(header + images.tobytes())
    header = (0x00000801).to_bytes(4, "big") + n.to_bytes(4, "big")
    (data / "t10k-labels-idx1-ubyte").write_bytes(header + labels.tobytes())
    torch.manual_seed(0)
    weights = tmp_path / "w.pth"
    torch.save(create_model("wk-small", input_shape=(1, 28, 28), num_classes=10).state_dict(),
               weights)  # fmt: skip
    common = ["--dataset", "fashion-mnist", "--data-dir", str(data), "--checkpoint",
              str(weights), "--model", "wk-small", "--quiet"]  # fmt: skip
    rc, _, err = _run(capsys, "eval", *common)
    assert rc == 0, err
    rc, _, err = _run(capsys, "certify", *common, "--defense", "wong-kolter", "--norm", "linf",
                      "--eps", "0.01")  # fmt: skip
    assert rc == 0, err
    rc, _, err = _run(capsys, "attack", *common, "--norm", "linf", "--eps", "0.1",
                      "--attack-param", "steps=2")  # fmt: skip
    assert rc == 0, err
    rc, _, err = _run(capsys, "train", "--dataset", "fashion-mnist", "--data-dir", str(data),
                      "--out", str(tmp_path / "ck"), "--quiet")  # fmt: skip
    assert rc == 2 and "train-images-idx3-ubyte" in _one_line_error(err)


def test_attacks_list_shows_adapters_with_norms(capsys):
    rc, out, err = _run(capsys, "attacks", "list")
    assert rc == 0, err
    lines = {ln.split()[0]: ln for ln in out.splitlines()[2:]}
    assert "certbench:pgd" in lines and "linf,l2" in lines["certbench:pgd"]
    assert (
        "linf" in lines["torchattacks:fgsm"] and "l2" not in lines["torchattacks:fgsm"].split()[1]
    )
    rc, out, _ = _run(capsys, "attacks", "list", "autoattack:*")
    assert rc == 0 and all(ln.startswith("autoattack:") for ln in out.splitlines()[2:])
