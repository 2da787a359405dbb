"""The pipeline and executors: training, NaN handling, kill-and-resume, determinism, Ray."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from processes import while_workers_compute

from bench.assembly import build_defense
from bench.environment import seed_everything
from bench.errors import NumericalError
from bench.metrics import accuracy
from bench.pipeline import predict_all
from bench.registry import create_defense
from bench.training import TrainSettings, train
from defenses.base import Defense

ROOT = Path(__file__).resolve().parents[1]

SPEC = """
name = "resume-test"
seeds = [0]
[data]
dataset = "digits"
model = "mlp"
limit_test = 200
[train]
epochs = 2
batch_size = 64
lr = 0.003
[threat]
norms = ["l2"]
radii = [0.0, 0.25]
thresholds = [0.1]
eps = [0.5]
[attack]
name = "pgd"
params = { steps = 3, draws = 2 }
limit = 100
[[defenses]]
name = "undefended"
[[defenses]]
name = "madry"
params = { eps = 0.5, norm = "l2", steps = 3 }
[[defenses]]
name = "randomized-smoothing"
params = { sigma = 0.25, n0 = 20, n = 200, alpha = 0.01 }
"""


def _digits():
    from bench.data import load_dataset

    return load_dataset("digits")


def test_undefended_digits_reaches_090():
    ds = _digits()
    d = build_defense("undefended", {}, "mlp", input_shape=ds.input_shape, num_classes=10)
    report = train(d, ds.x_train, ds.y_train, TrainSettings(epochs=8, lr=3e-3), progress=False)
    assert report.steps == 8 * 22
    assert accuracy(predict_all(d, ds.x_test), ds.y_test) >= 0.9


def test_training_is_seeded():
    ds = _digits()
    out = []
    for _ in range(2):
        seed_everything(7)  # model initialisation
        d = build_defense("undefended", {}, "mlp", input_shape=ds.input_shape, num_classes=10)
        x, y = ds.x_train[:256], ds.y_train[:256]
        train(d, x, y, TrainSettings(epochs=1), seed=7, progress=False)
        out.append(d.logits(ds.x_test[:10]))
    assert torch.equal(out[0], out[1])


class _NaNDefense(Defense):
    def __init__(self) -> None:
        pass

    def training_loss(self, x, y, progress):
        return self.model_(x).sum() * float("nan")


def test_nan_loss_stops_with_message():
    ds = _digits()
    d = _NaNDefense()
    d.setup(
        build_defense("undefended", {}, "mlp", input_shape=ds.input_shape, num_classes=10).model_,
        input_shape=ds.input_shape,
        num_classes=10,
    )
    with pytest.raises(NumericalError, match="training loss became nan at epoch 1, step 1"):
        train(d, ds.x_train[:64], ds.y_train[:64], TrainSettings(epochs=1), progress=False)


def test_unknown_train_setting():
    from bench.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown training setting"):
        TrainSettings.from_dict({"epochz": 3})


def test_create_defense_params_recorded():
    d = create_defense("randomized-smoothing", sigma=0.5)
    assert d.get_params()["sigma"] == 0.5


# --------------------------------------------------------------------------- kill and resume


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["CERTBENCH_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _start(spec: Path, store: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.cli", "run", str(spec), "--store", str(store), "--quiet"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stored(store: Path) -> int:
    if not store.exists():
        return 0
    try:
        with sqlite3.connect(store, timeout=30) as con:
            return con.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _metrics(store: Path) -> dict[str, dict]:
    from bench.store import Store

    return {c["cell_id"]: c["metrics"] for c in Store(store).cells()}


@pytest.mark.slow
def test_kill_and_resume_stores_every_cell_once_and_matches_uninterrupted(tmp_path, monkeypatch):
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    # Reference: an uninterrupted run (in a subprocess, same environment).
    ref_store = tmp_path / "ref" / "s.sqlite"
    proc = _start(spec, ref_store)
    assert proc.wait(timeout=900) == 0, proc.stderr.read()
    assert _stored(ref_store) == 3

    store = tmp_path / "killed" / "s.sqlite"
    rng = random.Random(1234)
    # 1) a SIGKILL at a random moment while the workers train the first cells (a moment in
    # their CPU time: the whole run computes for well under a second per worker)
    proc = _start(spec, store)
    while_workers_compute(proc, rng, timeout=600, stderr=lambda: proc.stderr.read())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    # 2) a SIGKILL right after the first cell was stored
    proc = _start(spec, store)
    deadline = time.time() + 600
    while _stored(store) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)  # the cells of this spec are stored within a second of each other
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    # 3) a SIGINT (Ctrl-C) at a random moment of the resumed run (its start-up, or the cells
    # left): clean exit status, nothing half-written
    proc = _start(spec, store)
    time.sleep(rng.uniform(1.0, 3.0))
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=120)
    assert rc in (0, 130), proc.stderr.read()
    # Resume to completion.
    proc = _start(spec, store)
    assert proc.wait(timeout=900) == 0, proc.stderr.read()
    with sqlite3.connect(store) as con:
        ids = [r[0] for r in con.execute("SELECT cell_id FROM cells")]
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert len(ids) == len(set(ids)) == 3
    assert _metrics(store) == _metrics(ref_store)


# --------------------------------------------------------------------------- Ray executor


def _local_and_ray_metrics(text: str, tmp_path: Path, cells: int, **local) -> tuple:
    """Run the spec ``text`` with the local executor (``local`` options) and on a 2-CPU local
    Ray; both must run ``cells`` cells. The metrics of each store."""
    ray = pytest.importorskip("ray")
    import tomllib

    from bench.executors import run_spec
    from bench.spec import parse_spec

    spec = parse_spec(tomllib.loads(text), "ray-test")
    assert run_spec(spec, tmp_path / "local" / "s.sqlite", progress=False, **local)["ran"] == cells
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        remote = run_spec(
            spec, tmp_path / "ray" / "s.sqlite", executor="ray", progress=False, shards=2
        )
    finally:
        ray.shutdown()
    assert remote["ran"] == cells
    return _metrics(tmp_path / "local" / "s.sqlite"), _metrics(tmp_path / "ray" / "s.sqlite")


@pytest.mark.slow
def test_ray_executor_matches_local(tmp_path, monkeypatch):
    monkeypatch.setenv("CERTBENCH_NUM_THREADS", "1")
    a, b = _local_and_ray_metrics(SPEC.replace("limit = 100", "limit = 200"), tmp_path, 3)
    assert a.keys() == b.keys() and a == b


@pytest.mark.slow
def test_ray_executor_shares_pixeldps_certificate_with_local_results(tmp_path, monkeypatch):
    """PixelDP's l2 and linf cells go to the same Ray shard tasks (one clean certificate per
    shard, tests/test_jobs.py) and store the local executor's metrics."""
    text = SPEC.replace('norms = ["l2"]', 'norms = ["l2", "linf"]').replace(
        "radii = [0.0, 0.25]\nthresholds = [0.1]\neps = [0.5]",
        "radii = { l2 = [0.0, 0.25], linf = [0.0, 0.02] }\n"
        "thresholds = { l2 = [0.1], linf = [0.01] }\neps = { l2 = [0.5], linf = [0.05] }",
    )
    text = text[: text.index("[[defenses]]")] + (
        '[[defenses]]\nname = "pixeldp"\nparams = { n_draws = 50, noise_warmup = false }\n'
    )
    monkeypatch.setenv("CERTBENCH_NUM_THREADS", "1")
    a, b = _local_and_ray_metrics(text, tmp_path, 2, jobs=1)
    assert len(a) == 2 and a == b


PIXELDP_ALL = """
name = "pixeldp-all"
[data]
dataset = "digits"
model = "cnn"
limit_test = 20
[train]
epochs = 1
[threat]
norms = ["l2"]
radii = [0.0, 0.05]
thresholds = [0.05]
eps = [0.1]
[[defenses]]
name = "pixeldp"
params = { mechanism = "gaussian", attack_norm = "l2", n_draws = 100, noise_warmup = false }
grid = { placement = ["image", "first-layer"], sensitivity_control = ["bound", "optimise"] }
[[defenses]]
name = "pixeldp"
params = { mechanism = "gaussian", attack_norm = "l1", n_draws = 100, noise_warmup = false }
grid = { placement = ["image", "first-layer"], sensitivity_control = ["bound", "optimise"] }
[[defenses]]
name = "pixeldp"
params = { mechanism = "laplace", attack_norm = "l1", n_draws = 100, noise_warmup = false }
grid = { placement = ["image", "first-layer"], sensitivity_control = ["bound", "optimise"] }
"""


@pytest.mark.slow
def test_every_pixeldp_configuration_runs_through_certbench_run(tmp_path):
    """All placements × mechanisms × sensitivity options train and certify via the pipeline."""
    import tomllib

    from bench.executors import run_spec
    from bench.spec import parse_spec
    from bench.store import Store

    spec = parse_spec(tomllib.loads(PIXELDP_ALL), "pixeldp-all")
    summary = run_spec(spec, tmp_path / "s.sqlite", progress=False)
    assert summary["ran"] == 12
    cells = Store(tmp_path / "s.sqlite").cells()
    seen = set()
    for c in cells:
        m = c["metrics"]
        assert 0.0 <= m["accuracy"] <= 1.0
        assert m["guaranteed_accuracy@0"] == m["accuracy"]  # every prediction has radius >= 0
        assert m["guaranteed_accuracy@0.05"] <= m["accuracy"]
        p = c["params"]
        seen.add((p["mechanism"], p["attack_norm"], p["placement"], p["sensitivity_control"]))
    assert len(seen) == 12
