"""Leaderboard CSVs and plots from synthetic results (no runner needed)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import bench.leaderboard as lb
from bench.errors import ConfigError
from bench.files import atomic_write_bytes
from bench.leaderboard import RESULTS_COLUMNS, build_boards, publish
from bench.plots import display_names, plot_boards
from bench.spec import CellConfig
from bench.store import Store

ATTACK = {"library": "certbench", "name": "pgd", "params": {"steps": 20}, "limit": None}
L2_THREAT = {"radii": [0.0, 0.1], "thresholds": [0.05], "eps": [0.1, 0.3]}
PROV = {"certbench_version": "0.1.0", "torch_version": "2.13.0", "git_commit": "abc123"}


TRAIN = {"epochs": 2, "batch_size": 64, "optimizer": "adam", "lr": 1e-3}


def cell(
    defense: str,
    *,
    seed: int = 0,
    norm: str = "l2",
    spec: str = "quick",
    params: dict | None = None,
    attack: dict | None = ATTACK,
    threat: dict | None = None,
    label: str | None = None,
) -> CellConfig:
    return CellConfig(
        spec_name=spec,
        dataset="digits",
        data_dir=None,
        limit_train=None,
        limit_test=200,
        model="cnn",
        defense=defense,
        label=label,
        params=params or {},
        norm=norm,
        seed=seed,
        train=dict(TRAIN),
        eval={"batch_size": 1000, "alpha": 0.05},
        threat=threat if threat is not None else dict(L2_THREAT),
        attack=attack,
        device="cpu",
    )


def result(
    metrics: dict[str, float | None],
    *,
    n_draws: int | None = 100,
    created: str = "2026-01-01T00:00:00+00:00",
    attack: str | None = "certbench:pgd",
    train_s: float = 2.0,
) -> dict[str, Any]:
    return {
        "metrics": metrics,
        "n_test": 200,
        "n_draws": n_draws,
        "alpha": 0.05,
        "attack": attack,
        "train_seconds": train_s,
        "eval_seconds": 1.0,
        "provenance": {**PROV, "created_at": created},
    }


def pix_metrics(acc: float, ga0: float, ga1: float, aua: float) -> dict[str, float | None]:
    return {
        "accuracy": acc,
        "guaranteed_accuracy@0": ga0,
        "guaranteed_accuracy@0.1": ga1,
        "robust_precision@0.05": 0.9,
        "coverage@0.05": 0.5,
        "accuracy_under_attack@0.1": aua,
        "accuracy_under_attack@0.3": 0.25,
    }


# Values are dyadic fractions, so seed means are exact and the rank tie below is exact.
CELLS = [
    # non-certifying baseline: no guaranteed accuracy (None), robust precision = accuracy
    (
        cell("undefended"),
        result(
            {
                "accuracy": 0.9375,
                "guaranteed_accuracy@0": None,
                "guaranteed_accuracy@0.1": None,
                "robust_precision@0.05": 0.9375,
                "coverage@0.05": None,
                "accuracy_under_attack@0.1": 0.25,
                "accuracy_under_attack@0.3": 0.0,
            },
            n_draws=None,
        ),
    ),
    # two seeds of one configuration -> one averaged row
    (
        cell("pixeldp", seed=0, params={"construction_bound": 0.1}, label="PixelDP"),
        result(pix_metrics(0.75, 0.75, 0.5, 0.5), created="2026-01-01T00:00:00+00:00", train_s=2.0),
    ),
    (
        cell("pixeldp", seed=1, params={"construction_bound": 0.1}, label="PixelDP"),
        result(
            pix_metrics(0.875, 0.875, 0.625, 0.75), created="2026-01-02T00:00:00+00:00", train_s=4.0
        ),
    ),
    # ties the averaged row exactly on (headline 0.625, accuracy 0.8125)
    (
        cell("pixeldp", params={"construction_bound": 0.3}, label="PixelDP"),
        result(pix_metrics(0.8125, 0.8125, 0.5, 0.625)),
    ),
    # best clean accuracy but no attack result: ranked last
    (
        cell("smoothing", params={"sigma": 0.25}),
        result(
            {
                "accuracy": 0.99,
                "guaranteed_accuracy@0": 0.875,
                "guaranteed_accuracy@0.1": 0.75,
            },
            attack=None,
        ),
    ),
    # a second board with accuracy only
    (
        cell(
            "undefended",
            norm="linf",
            attack=None,
            threat={"radii": [], "thresholds": [], "eps": []},
        ),
        result({"accuracy": 0.9375}, n_draws=None, attack=None),
    ),
]

L2_COLUMNS = [
    "rank",
    "defense",
    "model",
    "params",
    "accuracy",
    "robust_accuracy_lower",
    "robust_accuracy_upper",
    "headline_eps",
    "guaranteed_accuracy@0",
    "guaranteed_accuracy@0.1",
    "robust_precision@0.05",
    "coverage@0.05",
    "accuracy_under_attack@0.1",
    "accuracy_under_attack@0.3",
    "attack",
    "n_test",
    "n_draws",
    "alpha",
    "seed",
    "train_seconds",
    "eval_seconds",
    "certbench_version",
    "torch_version",
    "git_commit",
    "created_at",
]
TEXT_COLUMNS = {
    "defense",
    "model",
    "params",
    "attack",
    "certbench_version",
    "torch_version",
    "git_commit",
    "created_at",
}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "runs" / "certbench.sqlite")
    for c, r in CELLS:
        assert s.put(c, r)
    return s


def test_publish_writes_boards_and_results(store, tmp_path):
    out = tmp_path / "leaderboards"
    paths = publish(store, out)
    assert [p.name for p in paths] == ["digits-l2.csv", "digits-linf.csv", "results.csv"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)  # no temps


def test_board_columns_order_and_values(store, tmp_path):
    publish(store, tmp_path)
    df = pd.read_csv(tmp_path / "digits-l2.csv")
    assert list(df.columns) == L2_COLUMNS
    # numbers are numbers (NaN for empty cells), not strings
    for col in L2_COLUMNS:
        if col not in TEXT_COLUMNS | {"seed"}:
            assert pd.api.types.is_numeric_dtype(df[col]), (col, df[col].dtype)
    assert df["rank"].dtype.kind == "i" and df["n_test"].dtype.kind == "i"

    rows = {(r.defense, r.params): r for r in df.itertuples()}
    assert len(rows) == 4
    avg = df[(df.defense == "pixeldp") & (df.params == '{"construction_bound":0.1}')].iloc[0]
    assert avg["accuracy"] == (0.75 + 0.875) / 2
    assert avg["guaranteed_accuracy@0.1"] == (0.5 + 0.625) / 2
    assert avg["accuracy_under_attack@0.1"] == (0.5 + 0.75) / 2
    assert avg["seed"] == "0;1"  # several seeds averaged
    assert avg["train_seconds"] == 3.0 and avg["n_draws"] == 100
    assert avg["created_at"] == "2026-01-02T00:00:00+00:00"  # latest
    assert avg["attack"] == "certbench:pgd" and avg["git_commit"] == "abc123"

    und = df[df.defense == "undefended"].iloc[0]
    assert pd.isna(und["guaranteed_accuracy@0"]) and pd.isna(und["n_draws"])
    assert und["robust_precision@0.05"] == und["accuracy"] == 0.9375
    sm = df[df.defense == "smoothing"].iloc[0]
    assert pd.isna(sm["accuracy_under_attack@0.1"]) and pd.isna(sm["attack"])

    # accuracies are fractions in [0, 1]
    acc_cols = [c for c in L2_COLUMNS if c == "accuracy" or "@" in c]
    assert ((df[acc_cols].fillna(0) >= 0) & (df[acc_cols].fillna(0) <= 1)).all().all()


def test_none_is_an_empty_cell(store, tmp_path):
    publish(store, tmp_path)
    with open(tmp_path / "digits-l2.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    und = next(r for r in rows if r["defense"] == "undefended")
    assert und["guaranteed_accuracy@0"] == "" and und["guaranteed_accuracy@0.1"] == ""
    assert und["n_draws"] == ""
    assert und["accuracy"] == "0.9375" and und["n_test"] == "200"


def test_rank_by_attack_headline_then_accuracy(store, tmp_path):
    publish(store, tmp_path)
    df = pd.read_csv(tmp_path / "digits-l2.csv")
    got = list(zip(df["rank"], df["defense"], df["params"], strict=True))
    # headline = accuracy_under_attack@0.1 (smallest eps); the two PixelDP rows tie exactly on
    # (0.625, 0.8125) and share rank 1; smoothing has no attack result and comes last.
    assert got == [
        (1, "pixeldp", '{"construction_bound":0.1}'),
        (1, "pixeldp", '{"construction_bound":0.3}'),
        (3, "undefended", "{}"),
        (4, "smoothing", '{"sigma":0.25}'),
    ]


def test_rank_by_largest_eps_or_accuracy(tmp_path):
    # A is best at the small budget, B at the large one, C has the best clean accuracy.
    s = Store(tmp_path / "s.sqlite")
    rows = (("a", 0.75, 0.5, 0.0), ("b", 0.5, 0.375, 0.25), ("c", 1.0, 0.0, 0.0))
    for name, acc, small, large in rows:
        metrics = {"accuracy": acc, "accuracy_under_attack@0.1": small}
        metrics["accuracy_under_attack@0.3"] = large
        assert s.put(cell("madry", params={"tag": name}), result(metrics))

    def order(**kw):
        publish(s, tmp_path / "out", **kw)
        df = pd.read_csv(tmp_path / "out" / "digits-l2.csv")
        return [(r, json.loads(p)["tag"]) for r, p in zip(df["rank"], df["params"], strict=True)]

    assert order() == [(1, "a"), (2, "b"), (3, "c")]  # no declared headline: smallest eps
    assert order(rank_by="smallest-eps") == order()
    assert order(rank_by="largest-eps") == [(1, "b"), (2, "c"), (3, "a")]  # ties: accuracy
    assert order(rank_by="accuracy") == [(1, "c"), (2, "a"), (3, "b")]
    with pytest.raises(ConfigError, match="rank_by must be one of upper, lower, accuracy"):
        publish(s, tmp_path / "out", rank_by="median")


def test_accuracy_only_board(store, tmp_path):
    publish(store, tmp_path)
    df = pd.read_csv(tmp_path / "digits-linf.csv")
    assert list(df.columns) == [*lb.LEAD_COLUMNS, *lb.TAIL_COLUMNS]
    assert df["seed"].dtype.kind == "i" and df["accuracy"].tolist() == [0.9375]
    assert df["rank"].tolist() == [1]


def test_results_csv_long_format(store, tmp_path):
    publish(store, tmp_path)
    df = pd.read_csv(tmp_path / "results.csv")
    assert list(df.columns) == list(RESULTS_COLUMNS)
    assert len(df) == sum(len(r["metrics"]) for _, r in CELLS)
    assert pd.api.types.is_float_dtype(df["value"]) and df["seed"].dtype.kind == "i"
    row = df[(df.defense == "pixeldp") & (df.seed == 1) & (df.metric == "accuracy")]
    assert row["value"].tolist() == [0.875] and row["norm"].tolist() == ["l2"]
    assert row["cell_id"].tolist() == [CELLS[2][0].cell_id()]
    assert (
        df[(df.defense == "undefended") & (df.metric == "guaranteed_accuracy@0")]["value"]
        .isna()
        .all()
    )


def test_spec_filter(store, tmp_path):
    store.put(
        cell("madry", spec="other", params={"eps": 0.3}),
        result({"accuracy": 0.5, "accuracy_under_attack@0.1": 0.375}),
    )
    paths = publish(store, tmp_path, spec_name="other")
    assert [p.name for p in paths] == ["digits-l2.csv", "results.csv"]
    df = pd.read_csv(tmp_path / "digits-l2.csv")
    assert df["defense"].tolist() == ["madry"]
    assert set(pd.read_csv(tmp_path / "results.csv")["defense"]) == {"madry"}


def test_empty_store_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no finished cells"):
        publish(Store(tmp_path / "s.sqlite"), tmp_path / "out")
    with pytest.raises(ConfigError, match="no finished cells of spec 'x'"):
        plot_boards(Store(tmp_path / "s.sqlite"), tmp_path / "out", spec_name="x")


def test_failed_write_leaves_previous_board(store, tmp_path, monkeypatch):
    out = tmp_path / "lb"
    out.mkdir()
    old = out / "digits-l2.csv"
    old.write_text("previous board\n")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        publish(store, out)
    assert old.read_text() == "previous board\n"
    assert [p.name for p in out.iterdir()] == ["digits-l2.csv"]  # temp file cleaned up

    monkeypatch.undo()
    publish(store, out)
    assert old.read_text().startswith("rank,defense,model,params,accuracy,")


def test_atomic_write_replaces(tmp_path):
    target = tmp_path / "x.csv"
    target.write_text("a")
    atomic_write_bytes(target, b"b")
    assert target.read_bytes() == b"b" and list(tmp_path.iterdir()) == [target]


def test_atomic_write_removes_temporaries_of_dead_writers_only(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    host = "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname())
    target = tmp_path / "x.csv"
    stale = tmp_path / f".x.csv.{host}.{dead_pid}.abc123.tmp"  # a SIGKILLed writer's
    live = tmp_path / f".x.csv.{host}.{os.getpid()}.def456.tmp"  # a writer still running
    remote = tmp_path / f".x.csv.otherhost.{dead_pid}.ghi789.tmp"  # another host's writer
    other = tmp_path / f".y.csv.{host}.{dead_pid}.jkl000.tmp"  # another target's
    for p in (stale, live, remote, other):
        p.write_bytes(b"partial")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert not stale.exists()
    assert live.exists() and remote.exists() and other.exists()


def test_board_display_names(store):
    l2 = next(b for b in build_boards(store) if b.norm == "l2")
    names = dict(
        zip([(r.defense, r.values["params"]) for r in l2.rows], display_names(l2), strict=True)
    )
    assert names[("pixeldp", '{"construction_bound":0.1}')] == "PixelDP (construction_bound=0.1)"
    assert names[("undefended", "{}")] == "undefended"


def test_plots_are_nonempty_pngs(store, tmp_path):
    from matplotlib.image import imread

    paths = plot_boards(store, tmp_path / "plots")
    assert [p.name for p in paths] == ["digits-l2.png", "digits-linf.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    l2, linf = (imread(p) for p in paths)
    # four panels in a 2x2 grid (guaranteed accuracy, precision/coverage, attack, interval)
    # vs one bar chart
    assert l2.shape[1] > 1.8 * linf.shape[1] and l2.shape[0] > 1.6 * linf.shape[0]
    assert l2.std() > 0.01  # not a blank canvas


def test_svg_plot_titles_and_panels(store):
    from bench.plots import _panels, render_board

    l2 = build_boards(store)[0]
    assert _panels(l2) == ["guaranteed", "threshold", "attack", "interval"]
    svg = render_board(l2, fmt="svg").decode()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    from matplotlib.figure import Figure

    from bench.plots import _curve_panel

    ax = Figure().subplots()
    _curve_panel(ax, l2, "threshold", [f"C{i}" for i in range(len(l2.rows))], "ℓ2", "px")
    assert "PixelDP" not in ax.get_title()  # the panel is about every certifying defense
    # defenses that certify nothing draw no precision/coverage (coverage is undefined); the
    # board has one threshold, so the panel is grouped bars
    from matplotlib.colors import to_rgb

    drawn = {to_rgb(p.get_facecolor()) for p in ax.patches}
    undefended = [to_rgb(f"C{i}") for i, r in enumerate(l2.rows) if r.defense == "undefended"]
    certifying = [to_rgb(f"C{i}") for i, r in enumerate(l2.rows) if r.defense == "pixeldp"]
    assert undefended and certifying and certifying[0] in drawn
    assert not drawn & set(undefended)


# --------------------------------------------------------------------------- intervals


@pytest.mark.parametrize(("k", "n"), [(7, 10), (0, 10), (10, 10), (1, 1), (433, 450)])
def test_results_csv_intervals_match_scipy_and_statsmodels(tmp_path, k, n):
    """95% Clopper–Pearson over test examples, from the stored counts (hand-made here)."""
    from scipy.stats import beta
    from statsmodels.stats.proportion import proportion_confint

    s = Store(tmp_path / "s.sqlite")
    res = result({"accuracy": k / n})
    res["counts"] = {"accuracy": (k, n)}
    assert s.put(cell("undefended", attack=None), res)
    publish(s, tmp_path / "lb")
    df = pd.read_csv(tmp_path / "lb" / "results.csv")
    row = df[df.metric == "accuracy"].iloc[0]
    lo = 0.0 if k == 0 else beta.ppf(0.025, k, n - k + 1)
    hi = 1.0 if k == n else beta.ppf(0.975, k + 1, n - k)
    assert row["n"] == n
    assert row["ci_lower"] == pytest.approx(lo, abs=1e-12)
    assert row["ci_upper"] == pytest.approx(hi, abs=1e-12)
    sm_lo, sm_hi = proportion_confint(k, n, alpha=0.05, method="beta")
    assert row["ci_lower"] == pytest.approx(sm_lo, abs=1e-10)
    assert row["ci_upper"] == pytest.approx(sm_hi, abs=1e-10)
    assert row["ci_lower"] <= row["value"] <= row["ci_upper"]
    (board,) = build_boards(s)
    assert board.rows[0].intervals["accuracy"] == pytest.approx((lo, hi, n), abs=1e-12)


def test_uncounted_metrics_have_empty_intervals(store, tmp_path):
    publish(store, tmp_path / "lb")
    df = pd.read_csv(tmp_path / "lb" / "results.csv")
    assert {"n", "ci_lower", "ci_upper"} <= set(df.columns)
    assert df["n"].isna().all() and df["ci_lower"].isna().all()


def test_board_intervals_pool_the_counts_of_seeds(tmp_path):
    from scipy.stats import beta

    s = Store(tmp_path / "s.sqlite")
    for seed, k in ((0, 150), (1, 170)):
        res = result({"accuracy": k / 200})
        res["counts"] = {"accuracy": (k, 200)}
        assert s.put(cell("undefended", seed=seed, attack=None), res)
    (board,) = build_boards(s)
    lo, hi, n = board.rows[0].intervals["accuracy"]
    assert n == 400 and board.rows[0].metrics["accuracy"] == pytest.approx(0.8)
    assert lo == pytest.approx(beta.ppf(0.025, 320, 81)) and hi == pytest.approx(
        beta.ppf(0.975, 321, 80)
    )


def test_headline_interval_and_rank_by_upper_or_lower(tmp_path):
    """The interval [guaranteed, under attack] at the spec's headline budget; rank by its
    upper end by default, by its lower end on request (non-certifying rows last)."""
    s = Store(tmp_path / "s.sqlite")
    threat = {**L2_THREAT, "headline": 0.3}
    rows = (  # name, accuracy, guaranteed@0.3, under attack@0.1, @0.3
        ("emp", 0.95, None, 0.9, 0.6),
        ("cert", 0.8, 0.5, 0.7, 0.55),
        ("weak", 0.9, 0.1, 0.8, 0.2),
    )
    for name, acc, ga, small, large in rows:
        metrics = {"accuracy": acc, "guaranteed_accuracy@0.3": ga}
        metrics |= {"accuracy_under_attack@0.1": small, "accuracy_under_attack@0.3": large}
        assert s.put(cell("madry", params={"tag": name}, threat=threat), result(metrics))
    (board,) = build_boards(s)
    assert board.headline_eps == 0.3 and board.headline == "robust_accuracy_upper"
    got = {r.params["tag"]: (r.values["robust_accuracy_lower"], r.values["robust_accuracy_upper"])
           for r in board.rows}  # fmt: skip
    assert got == {"emp": (None, 0.6), "cert": (0.5, 0.55), "weak": (0.1, 0.2)}
    assert [r.params["tag"] for r in board.rows] == ["emp", "cert", "weak"]
    (by_lower,) = build_boards(s, rank_by="lower")
    assert [r.params["tag"] for r in by_lower.rows] == ["cert", "weak", "emp"]
    publish(s, tmp_path / "lb")
    df = pd.read_csv(tmp_path / "lb" / "digits-l2.csv")
    assert list(df.columns[4:8]) == [
        "accuracy",
        "robust_accuracy_lower",
        "robust_accuracy_upper",
        "headline_eps",
    ]
    assert (df["headline_eps"] == 0.3).all()
