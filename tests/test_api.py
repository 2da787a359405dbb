"""Bring your own model: ``bench.evaluate``, import-path models, pretrained spec rows.

The issue's acceptance test is :func:`test_evaluate_equals_certbench_run`: a CNN class defined
outside the package, trained here for one epoch on digits, gives through ``bench.evaluate``
exactly the board rows that ``certbench run`` gives for a spec naming the class by import path
with the same weights, for an undefended and a randomized-smoothing row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pandas as pd
import pytest
import torch
from torch import nn

import bench
from bench.errors import ConfigError
from bench.models import create_model

ROOT = Path(__file__).resolve().parents[1]

FRESH_NETS = '''
"""Networks certbench has never seen: a class with no arguments, and a factory."""

from torch import nn


class FreshCNN(nn.Module):
    """conv3x3(8) -> ReLU -> maxpool 2 -> linear, for 1x8x8 digits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def make_mlp(input_shape, num_classes, hidden=16):
    c, h, w = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))
'''

THREAT = dict(
    dataset="digits",
    limit=100,
    seed=1,
    norms="l2",
    radii=[0.0, 0.25],
    thresholds=[0.1],
    eps=[0.5],
    attacks={"name": "pgd", "params": {"steps": 3, "draws": 2}},
)
SMOOTHING = {"sigma": 0.25, "n0": 20, "n": 200}

SPEC = """
name = "byo"
seeds = [1]

[data]
dataset = "digits"
limit_test = 100
model = "freshnets:FreshCNN"

[threat]
norms = ["l2"]
radii = [0.0, 0.25]
thresholds = [0.1]
eps = [0.5]

[attack]
name = "pgd"
params = { steps = 3, draws = 2 }

[[defenses]]
name = "undefended"
checkpoint = "fresh.safetensors"

[[defenses]]
name = "randomized-smoothing"
checkpoint = "fresh.safetensors"
params = { sigma = 0.25, n0 = 20, n = 200 }
"""


@pytest.fixture
def fresh_nets(tmp_path, monkeypatch):
    """``freshnets.py`` in a directory of its own, importable for this test only."""
    (tmp_path / "freshnets.py").write_text(FRESH_NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("freshnets", None)


def _train_one_epoch(net: nn.Module) -> nn.Module:
    from bench.data import load_dataset

    ds = load_dataset("digits")
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    perm = torch.randperm(ds.x_train.shape[0])
    net.train()
    for i in range(0, perm.numel(), 64):
        idx = perm[i : i + 64]
        loss = nn.functional.cross_entropy(net(ds.x_train[idx]), ds.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def test_evaluate_equals_certbench_run(fresh_nets, certbench_cli):
    from freshnets import FreshCNN
    from safetensors.torch import save_file

    from bench.api import weights_sha256
    from bench.weights import sha256_file

    net = _train_one_epoch(FreshCNN())
    weights = fresh_nets / "fresh.safetensors"
    save_file(net.state_dict(), weights)
    # the same weights have the same identity, whether they come as a module or as a file
    assert weights_sha256(net) == sha256_file(weights)

    rows = pd.concat(
        [
            bench.evaluate(net, defense="undefended", **THREAT),
            bench.evaluate(net, defense="randomized-smoothing", params=SMOOTHING, **THREAT),
        ],
        ignore_index=True,
    )
    assert list(rows["model"]) == ["freshnets:FreshCNN"] * 2
    assert rows["train_seconds"].isna().all()  # scored as given, never trained

    (fresh_nets / "spec.toml").write_text(SPEC)
    run = certbench_cli(["run", "spec.toml", "--store", "s.sqlite", "--quiet"], cwd=fresh_nets)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "pretrained" in run.stderr
    publish = ["leaderboard", "publish", "--store", "s.sqlite", "--out", "boards"]
    pub = certbench_cli(publish, cwd=fresh_nets)
    assert pub.returncode == 0, pub.stderr
    board = pd.read_csv(fresh_nets / "boards" / "digits-l2.csv")

    assert list(board.columns) == [c for c in rows.columns if c not in ("dataset", "norm")]
    by_defense = board.set_index("defense")
    numbers = [c for c in board.columns if c == "accuracy" or "@" in c or "robust_acc" in c]
    numbers += ["n_test", "n_draws", "alpha", "model", "params", "attack", "seed"]
    for _, row in rows.iterrows():
        stored = by_defense.loc[row["defense"]]
        for col in numbers:
            a, b = row[col], stored[col]
            assert (pd.isna(a) and pd.isna(b)) or a == b, (row["defense"], col, a, b)
        assert pd.isna(stored["train_seconds"])
    smooth = rows.set_index("defense").loc["randomized-smoothing"]
    assert smooth["accuracy"] > 0.3 and smooth["n_draws"] == 200

    # the stored cells say where the weights came from and which they were
    from bench.store import Store

    for cell in Store(fresh_nets / "s.sqlite").cells():
        assert cell["provenance"]["weights_sha256"] == sha256_file(weights)
        assert cell["config"]["checkpoint"] == str(weights.resolve())
        assert cell["train_seconds"] is None

    # certbench eval names the same class by import path and reads the same weights
    out = fresh_nets / "eval.json"
    ev = certbench_cli(
        ["eval", "--model", "freshnets:FreshCNN", "--checkpoint", "fresh.safetensors",
         "--limit", "100", "--quiet", "--output", str(out)],
        cwd=fresh_nets,
    )  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    undefended = rows.set_index("defense").loc["undefended"]
    assert json.loads(out.read_text())["accuracy"] == undefended["accuracy"]


def test_evaluate_returns_board_columns_per_norm():
    net = create_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=16)
    df = bench.evaluate(
        net, dataset="digits", norms=["l2", "linf"], radii={"l2": [0.1], "linf": [0.01]},
        limit=20, attacks=None, name="my-mlp",
    )  # fmt: skip
    assert list(df["norm"]) == ["l2", "linf"] and set(df["dataset"]) == {"digits"}
    assert list(df["model"]) == ["my-mlp", "my-mlp"]
    assert df["guaranteed_accuracy@0.1"].isna().iloc[0]  # undefended certifies nothing
    assert "accuracy_under_attack@0.1" not in df.columns  # no attack asked for
    assert df["n_test"].tolist() == [20, 20]


def test_evaluate_shares_pixeldps_certificate_between_norms():
    """PixelDP with fixed draws certifies l2 and linf from the same draws: one evaluate call
    for both norms certifies the clean examples once and gives the rows of two calls."""
    from defenses.pixeldp import PixelDP

    net = _train_one_epoch(create_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=16))
    radii = {"l2": [0.0, 0.05], "linf": [0.0, 0.01]}
    kw = dict(
        dataset="digits", defense="pixeldp", params={"n_draws": 40}, limit=60, attacks=None,
        name="m",
    )  # fmt: skip
    calls: list[str] = []
    real = PixelDP.certify

    def counting(self, x, **k):
        calls.append(k["norm"])
        return real(self, x, **k)

    with mock.patch.object(PixelDP, "certify", counting):
        both = bench.evaluate(net, norms=["l2", "linf"], radii=radii, **kw)
        together = len(calls)
        apart = pd.concat(
            [bench.evaluate(net, norms=n, radii={n: radii[n]}, **kw) for n in ("l2", "linf")],
            ignore_index=True,
        )
    assert together == 1 and len(calls) - together == 2  # 60 examples: one chunk each
    numbers = [c for c in both.columns if c == "accuracy" or "@" in c or c == "n_draws"]
    pd.testing.assert_frame_equal(both[numbers], apart[numbers])


def test_evaluate_does_not_touch_the_callers_model():
    net = create_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=16).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bench.evaluate(net, dataset="digits", defense="randomized-smoothing",
                   params={"n0": 5, "n": 20}, limit=5, attacks=None)  # fmt: skip
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"defense": "wong-kolter"}, ["cannot wrap _Residual", "nn.Sequential"]),
        ({"eps": [-1.0]}, ["bench.evaluate", "threat.eps[0]", "positive number"]),
        ({"defense": "nope"}, ["defenses[0].name", "nope"]),
        ({"params": {"sigma": 1}}, ["sigma", "undefended"]),
        ({"attacks": "pgd", "eps": [0.1]}, ["'library:name'"]),
    ],
    ids=["wong-kolter-refuses", "bad-eps", "unknown-defense", "unknown-param", "bad-attack"],
)
def test_evaluate_errors_are_one_clear_line(kwargs, fragments):
    with pytest.raises(ConfigError) as exc:
        bench.evaluate(_Residual(), dataset="digits", limit=5, **kwargs)
    message = str(exc.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_evaluate_checks_the_model_fits_the_dataset():
    with pytest.raises(ConfigError, match=r"expected logits of shape \(1, 10\)"):
        bench.evaluate(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), dataset="digits", limit=5)
    with pytest.raises(ConfigError, match="fails on a"):
        bench.evaluate(nn.Linear(5, 10), dataset="digits", limit=5)


def test_import_bench_stays_light():
    code = "import sys, bench; assert 'torch' not in sys.modules; print(callable(bench.evaluate))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr


# ----------------------------------------------------------------------------- import paths


def test_import_path_models(fresh_nets):
    cnn = create_model("freshnets:FreshCNN", input_shape=(1, 8, 8), num_classes=10)
    assert cnn(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    mlp = create_model("freshnets:make_mlp", input_shape=(1, 8, 8), num_classes=4, hidden=8)
    assert mlp(torch.rand(2, 1, 8, 8)).shape == (2, 4) and mlp[1].out_features == 8


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("freshnets:Nope", "module 'freshnets' has no attribute 'Nope'"),
        ("nosuchpkg.nets:Net", "cannot import module 'nosuchpkg.nets'"),
        ("freshnets:nn", "not an nn.Module class or a factory"),
        ("json:JSONDecoder", "class JSONDecoder is not an nn.Module subclass"),
        ("freshnets:", "not an import path"),
    ],
)
def test_import_path_errors_name_the_path(fresh_nets, name, fragment):
    with pytest.raises(ConfigError, match="model") as exc:
        create_model(name, input_shape=(1, 8, 8), num_classes=10)
    assert fragment in str(exc.value) and name in str(exc.value)


def test_unknown_model_suggests_an_import_path():
    from bench.errors import RegistryError

    with pytest.raises(RegistryError, match=r"unknown model 'mycnn.MyCNN'.*'mypkg.nets:SmallCNN'"):
        create_model("mycnn.MyCNN", input_shape=(1, 8, 8), num_classes=10)


def test_cli_model_by_import_path_from_the_working_directory(tmp_path):
    """The console script does not put the working directory on sys.path; certbench looks
    there for a model named by import path (as `python -m` would)."""
    (tmp_path / "freshnets.py").write_text(FRESH_NETS)
    code = textwrap.dedent(
        f"""
        import sys
        sys.path[:] = [p for p in sys.path if p not in ('', '.', {str(tmp_path)!r})]
        sys.path.insert(0, {str(ROOT)!r})
        from bench.models import create_model
        m = create_model('freshnets:FreshCNN', input_shape=(1, 8, 8), num_classes=10)
        print(type(m).__name__)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "FreshCNN", out.stderr


@pytest.mark.slow
def test_notebook_example_runs(tmp_path):
    """examples/byo-model/notebook.py end to end (it asserts that `certbench run` on its spec
    gives the numbers of `bench.evaluate`)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BYO_OUT": str(tmp_path), "BYO_LIMIT": "60"}
    out = subprocess.run(
        [sys.executable, "examples/byo-model/notebook.py"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=False,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "gives the same numbers as bench.evaluate: True" in out.stdout
    assert "cannot wrap SmallCNN" in out.stdout
