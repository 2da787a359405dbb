"""The SQLite results store: exactly-once puts, typed columns, concurrency, crash safety."""

from __future__ import annotations

import multiprocessing
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.errors import ConfigError, NumericalError
from bench.spec import CellConfig
from bench.store import Store

ROOT = Path(__file__).resolve().parents[1]
N_METRICS = 4


TRAIN = {"epochs": 2, "batch_size": 64, "optimizer": "adam", "lr": 1e-3}


def make_cell(**kw: Any) -> CellConfig:
    base = dict(
        spec_name="quick",
        dataset="digits",
        data_dir=None,
        limit_train=None,
        limit_test=200,
        model="cnn",
        defense="pixeldp",
        label=None,
        params={"epsilon": 1.0},
        norm="l2",
        seed=0,
        train=dict(TRAIN),
        eval={"batch_size": 1000, "alpha": 0.05},
        threat={"radii": [0.0, 0.1], "thresholds": [0.05], "eps": [0.1]},
        attack=None,
        device="cpu",
    )
    base.update(kw)
    return CellConfig(**base)


def make_result(acc: float = 0.9, **kw: Any) -> dict[str, Any]:
    result = {
        "metrics": {
            "accuracy": acc,
            "guaranteed_accuracy@0": acc - 0.1,
            "guaranteed_accuracy@0.1": None,
            "coverage@0.05": 0.5,
        },
        "n_test": 200,
        "n_draws": 100,
        "alpha": 0.05,
        "attack": None,
        "train_seconds": 1.5,
        "eval_seconds": 0.25,
        "provenance": {
            "certbench_version": "0.1.0",
            "torch_version": "2.13.0",
            "git_commit": "abc123",
            "created_at": "2026-01-01T00:00:00+00:00",
            "host": "test",
        },
    }
    result.update(kw)
    return result


def raw(path: Path, sql: str, args: tuple = ()) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql, args).fetchall()


def assert_consistent(path: Path) -> None:
    """Integrity check passes and every stored cell has its complete metric set."""
    assert raw(path, "PRAGMA integrity_check") == [("ok",)]
    assert raw(path, "PRAGMA foreign_key_check") == []
    counts = raw(
        path,
        "SELECT c.cell_id, COUNT(m.metric) FROM cells c "
        "LEFT JOIN metrics m ON m.cell_id = c.cell_id GROUP BY c.cell_id",
    )
    assert all(n == N_METRICS for _, n in counts), counts
    orphans = raw(
        path, "SELECT COUNT(*) FROM metrics WHERE cell_id NOT IN (SELECT cell_id FROM cells)"
    )
    assert orphans == [(0,)]


def test_put_get_round_trip(tmp_path):
    store = Store(tmp_path / "deep" / "dir" / "s.sqlite")
    cell, result = make_cell(), make_result()
    assert not store.has(cell.cell_id())
    assert store.put(cell, result) is True
    assert store.has(cell.cell_id()) and cell.cell_id() in store and len(store) == 1
    got = store.get(cell.cell_id())
    assert got["metrics"] == result["metrics"]
    assert got["config"] == cell.to_dict()
    assert got["params"] == {"epsilon": 1.0} and got["seed"] == 0 and got["norm"] == "l2"
    assert got["train_key"] == cell.train_key()
    assert got["n_test"] == 200 and got["n_draws"] == 100 and got["alpha"] == 0.05
    assert got["train_seconds"] == 1.5 and got["eval_seconds"] == 0.25
    assert got["git_commit"] == "abc123" and got["provenance"]["host"] == "test"
    assert got["specs"] == ["quick"]
    assert store.get("0" * 16) is None
    assert raw(store.path, "PRAGMA journal_mode") == [("wal",)]


def test_numbers_are_stored_as_numbers(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    cell = make_cell()
    store.put(cell, make_result())
    cid = cell.cell_id()
    types = raw(
        store.path,
        "SELECT typeof(n_test), typeof(n_draws), typeof(alpha), "
        "typeof(train_seconds), typeof(eval_seconds), typeof(seed) "
        "FROM cells WHERE cell_id = ?",
        (cid,),
    )
    assert types == [("integer", "integer", "real", "real", "real", "integer")]
    values = dict(
        raw(store.path, "SELECT metric, typeof(value) FROM metrics WHERE cell_id = ?", (cid,))
    )
    assert values == {
        "accuracy": "real",
        "guaranteed_accuracy@0": "real",
        "guaranteed_accuracy@0.1": "null",
        "coverage@0.05": "real",
    }


def test_put_twice_stores_once_and_keeps_first(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    cell = make_cell()
    assert store.put(cell, make_result(0.9)) is True
    assert store.put(cell, make_result(0.1)) is False
    # same experiment from another spec, label and device: still the same cell
    assert (
        store.put(make_cell(spec_name="other", label="PixelDP", device="cuda"), make_result(0.2))
        is False
    )
    assert len(store) == 1
    assert store.get(cell.cell_id())["metrics"]["accuracy"] == 0.9
    assert raw(store.path, "SELECT COUNT(*) FROM metrics") == [(N_METRICS,)]
    # ...but it is now listed under both specs, with each spec's label
    assert [c["label"] for c in store.cells(spec_name="other")] == ["PixelDP"]
    assert store.get(cell.cell_id())["specs"] == ["other", "quick"]


def test_replace_overwrites_in_one_transaction(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    cell = make_cell()
    store.put(cell, make_result(0.9))
    new = make_result(0.5, metrics={"accuracy": 0.5})
    assert store.put(cell, new, replace=True) is True
    assert store.get(cell.cell_id())["metrics"] == {"accuracy": 0.5}
    assert raw(store.path, "SELECT COUNT(*) FROM metrics") == [(1,)] and len(store) == 1


def test_accepts_dict_cells_and_filters(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    cells = [
        make_cell(seed=s, norm=n, dataset=d)
        for s in (0, 1)
        for n in ("l2", "linf")
        for d in ("digits", "mnist")
    ]
    for c in cells:
        assert store.put(c.to_dict(), make_result())
    assert len(store.cells()) == 8
    assert len(store.cells(dataset="mnist")) == 4
    assert len(store.cells(dataset="mnist", norm="linf")) == 2
    assert store.cells(spec_name="nope") == []
    assert len(store.long_results()) == 8 * N_METRICS


def test_link_adds_cell_to_other_spec(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    cell = make_cell()
    store.put(cell, make_result())
    assert store.cells(spec_name="second") == []
    store.link(make_cell(spec_name="second", label="mine"))
    store.link(make_cell(spec_name="second", label="mine"))  # idempotent
    rows = store.cells(spec_name="second")
    assert [r["cell_id"] for r in rows] == [cell.cell_id()] and rows[0]["label"] == "mine"


@pytest.mark.parametrize(
    ("change", "exc", "fragment"),
    [
        ({"metrics": {"accuracy": float("nan")}}, NumericalError, "metric 'accuracy'"),
        ({"metrics": {"accuracy": float("inf")}}, NumericalError, "metric 'accuracy'"),
        ({"metrics": {"accuracy": "0.9"}}, ConfigError, "metric 'accuracy'"),
        ({"metrics": [0.9]}, ConfigError, "'metrics'"),
        ({"n_test": None}, ConfigError, "'n_test'"),
        ({"n_test": 1.5}, ConfigError, "'n_test'"),
        ({"alpha": "0.05"}, ConfigError, "'alpha'"),
        ({"train_seconds": float("nan")}, ConfigError, "'train_seconds'"),
        ({"attack": 3}, ConfigError, "'attack'"),
    ],
)
def test_bad_results_rejected_and_nothing_stored(tmp_path, change, exc, fragment):
    store = Store(tmp_path / "s.sqlite")
    with pytest.raises(exc, match=fragment):
        store.put(make_cell(), make_result(**change))
    assert len(store) == 0
    assert raw(store.path, "SELECT COUNT(*) FROM metrics") == [(0,)]


def test_numpy_scalars_accepted(tmp_path):
    np = pytest.importorskip("numpy")
    store = Store(tmp_path / "s.sqlite")
    store.put(make_cell(), make_result(metrics={"accuracy": np.float32(0.5)}))
    assert store.get(make_cell().cell_id())["metrics"] == {"accuracy": 0.5}


def test_not_a_database(tmp_path):
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError, match="not a usable certbench store"):
        Store(path)


def test_checkpoint_dir(tmp_path):
    store = Store(tmp_path / "runs" / "s.sqlite")
    key = make_cell().train_key()
    d = store.checkpoint_dir(key)
    assert d == tmp_path / "runs" / "checkpoints" / key and d.is_dir()
    assert store.checkpoint_root() == d.parent
    for bad in ("../../etc", "ABCDEF0123456789", "", "abc"):
        with pytest.raises(ConfigError, match="train key"):
            store.checkpoint_dir(bad)


# ---------------------------------------------------------------------------- concurrency

N_SHARED, N_OWN = 20, 10


def _writer(path: str, who: int) -> list[bool]:
    store = Store(path)
    out = []
    for i in range(N_SHARED):  # both processes write these
        out.append(store.put(make_cell(seed=i), make_result(0.5 + who / 10)))
    for i in range(N_OWN):  # only this process writes these
        out.append(store.put(make_cell(seed=1000 * (who + 1) + i), make_result()))
    return out


def test_concurrent_puts_from_two_processes(tmp_path):
    path = tmp_path / "s.sqlite"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.starmap(_writer, [(str(path), 0), (str(path), 1)])
    # each shared cell stored by exactly one process; every own cell stored
    shared = [a + b for a, b in zip(results[0][:N_SHARED], results[1][:N_SHARED], strict=True)]
    assert shared == [1] * N_SHARED
    assert all(results[0][N_SHARED:]) and all(results[1][N_SHARED:])
    store = Store(path)
    assert len(store) == N_SHARED + 2 * N_OWN
    assert_consistent(path)


# ---------------------------------------------------------------------------- crash safety

_KILL_IN_PUT = """
import os, sqlite3, sys
sys.path.insert(0, {root!r})
import bench.store as bs
sys.path.insert(0, {tests!r})
from test_store import make_cell, make_result

class Dying(sqlite3.Connection):
    def executemany(self, *a, **k):  # put(): after the cells row, before the metrics/commit
        os._exit(9)

real_connect = sqlite3.connect
bs.sqlite3.connect = lambda *a, **k: real_connect(*a, factory=Dying, **k)
store = bs.Store({path!r})
store.put(make_cell(seed=1), make_result())
"""


def test_process_dying_inside_put_leaves_no_trace(tmp_path):
    path = tmp_path / "s.sqlite"
    store = Store(path)
    assert store.put(make_cell(seed=0), make_result())
    code = _KILL_IN_PUT.format(root=str(ROOT), tests=str(ROOT / "tests"), path=str(path))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=60)
    assert proc.returncode == 9, proc.stderr.decode()
    store = Store(path)
    assert store.has(make_cell(seed=0).cell_id())
    assert not store.has(make_cell(seed=1).cell_id())  # the half-written cell is gone
    assert_consistent(path)
    assert store.put(make_cell(seed=1), make_result()) is True  # and can be written again
    assert_consistent(path)


_WRITE_FOREVER = """
import sys
sys.path.insert(0, {root!r})
from bench.store import Store
sys.path.insert(0, {tests!r})
from test_store import make_cell, make_result
store = Store({path!r})
seed = 0
while True:
    store.put(make_cell(seed=seed), make_result())
    if seed == 5:
        print("going", flush=True)
    seed += 1
"""


def test_sigkill_mid_writing_leaves_consistent_db(tmp_path):
    path = tmp_path / "s.sqlite"
    code = _WRITE_FOREVER.format(root=str(ROOT), tests=str(ROOT / "tests"), path=str(path))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdout.readline().strip() == b"going", proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)  # whenever it is: inside a put or between puts
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    store = Store(path)
    n = len(store)
    assert n >= 6
    assert_consistent(path)
    # resuming: stored cells are skipped, the rest can be written
    assert store.put(make_cell(seed=0), make_result()) is False
    assert store.put(make_cell(seed=n + 10), make_result()) is True
    assert_consistent(path)


def test_counts_round_trip_and_must_match_the_value(tmp_path):
    s = Store(tmp_path / "s.sqlite")
    res = make_result(acc=0.9, counts={"accuracy": (180, 200), "coverage@0.05": (100, 200)})
    assert s.put(make_cell(), res)
    got = s.get(make_cell().cell_id())
    assert got["counts"] == {"accuracy": (180, 200), "coverage@0.05": (100, 200)}
    rows = {r["metric"]: (r["count"], r["total"]) for r in s.long_results()}
    assert rows["accuracy"] == (180, 200) and rows["guaranteed_accuracy@0"] == (None, None)
    with pytest.raises(ConfigError, match="counts of metric 'accuracy'"):
        s.put(make_cell(seed=1), make_result(acc=0.9, counts={"accuracy": (10, 200)}))
    with pytest.raises(ConfigError, match="counts of metric 'accuracy'"):
        s.put(make_cell(seed=2), make_result(acc=0.9, counts={"accuracy": (9, 8)}))


def test_a_schema_1_store_is_upgraded_in_place(tmp_path):
    """A store written before counts existed keeps its cells and gains the columns."""
    path = tmp_path / "old.sqlite"
    s = Store(path)
    assert s.put(make_cell(), make_result())
    with sqlite3.connect(path) as con:  # turn it back into a schema-1 store
        con.execute("ALTER TABLE metrics DROP COLUMN count")
        con.execute("ALTER TABLE metrics DROP COLUMN total")
        con.execute("PRAGMA user_version = 1")
    s2 = Store(path)
    assert raw(path, "PRAGMA user_version")[0][0] == 2
    got = s2.get(make_cell().cell_id())
    assert got["metrics"]["accuracy"] == 0.9 and got["counts"] == {}
    assert s2.put(make_cell(seed=1), make_result(counts={"accuracy": (180, 200)}))
    assert s2.get(make_cell(seed=1).cell_id())["counts"] == {"accuracy": (180, 200)}


def test_detach_stale_leaves_the_spec_but_keeps_the_cell(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    old, new = make_cell(), make_cell(params={"epsilon": 2.0})
    store.put(old, make_result())
    store.put(new, make_result(acc=0.5))
    store.link(make_cell(spec_name="other"))
    assert store.detach_stale("quick", [new.cell_id()]) == 1
    assert [r["cell_id"] for r in store.cells(spec_name="quick")] == [new.cell_id()]
    assert [r["cell_id"] for r in store.cells(spec_name="other")] == [old.cell_id()]
    assert len(store) == 2  # nothing is deleted
    assert store.detach_stale("quick", [new.cell_id()]) == 0


def test_an_edited_spec_run_again_boards_only_its_current_cells(tmp_path):
    """Editing a spec (here: a stronger attack) and re-running it puts the new cells on its
    board in place of the old; a --limit run (other cells beside the full ones) detaches
    nothing."""
    import contextlib
    import io

    from bench.cli import main

    text = """
name = "edited"
[data]
dataset = "digits"
model = "mlp"
limit_train = 200
limit_test = 40
[train]
epochs = 1
[threat]
norms = ["linf"]
eps = [0.05]
[attack]
name = "pgd"
params = { steps = 1 }
[[defenses]]
name = "undefended"
"""
    spec, db = tmp_path / "spec.toml", tmp_path / "s.sqlite"

    def run(*extra: str) -> str:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            argv = ["run", str(spec), "--store", str(db), "--jobs", "1", "--quiet", *extra]
            assert main(argv) == 0
        return err.getvalue()

    spec.write_text(text)
    run()
    (first,) = Store(db).cells(spec_name="edited")
    spec.write_text(text.replace("steps = 1", "steps = 3"))
    assert "no longer in it" not in run("--limit", "20")
    assert len(Store(db).cells(spec_name="edited")) == 2  # the full cell and the --limit one
    message = run()
    assert "2 stored cell(s) of spec 'edited' are no longer in it" in message
    (second,) = Store(db).cells(spec_name="edited")
    assert second["cell_id"] != first["cell_id"] and second["config"]["attack"]["params"] == {
        "steps": 3
    }
    assert len(Store(db)) == 3
