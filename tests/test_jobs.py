"""Parallel local execution (``--jobs``), the thread policy, claims of concurrent runs and
store errors (issue #20). Subprocess kills and the slow figures are in tests/test_faults.py.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import tomllib
import torch

from bench import environment
from bench.cli import main
from bench.errors import StoreError, ValidationError
from bench.executors import run_spec
from bench.pipeline import ATTACK_CHUNK, shard_bounds
from bench.spec import parse_spec
from bench.store import CLAIM_LEASE_S, Claimant, Store

ROOT = Path(__file__).resolve().parents[1]

# Every built-in defense, l2 and linf (cells of one defense share a train_key: one training),
# a test set of 250 (three shards, the last one short) and an attack over two chunks.
SPEC = """
name = "jobs"
seeds = [0]
[data]
dataset = "digits"
model = "mlp"
limit_train = 400
limit_test = 250
[train]
epochs = 1
batch_size = 64
lr = 0.003
[threat]
norms = ["l2", "linf"]
radii = { l2 = [0.0, 0.25], linf = [0.0, 0.02] }
thresholds = { l2 = [0.1], linf = [0.01] }
eps = { l2 = [0.5], linf = [0.05] }
[attack]
name = "pgd"
params = { steps = 2, draws = 2 }
limit = 120
[[defenses]]
name = "undefended"
[[defenses]]
name = "madry"
params = { eps = 0.5, norm = "l2", steps = 2 }
[[defenses]]
name = "wong-kolter"
params = { eps = 0.02, norm = "linf" }
[[defenses]]
name = "randomized-smoothing"
params = { sigma = 0.25, n0 = 10, n = 200, alpha = 0.01 }
[[defenses]]
name = "pixeldp"
params = { n_draws = 50, noise_warmup = false }
"""
N_CELLS = 10

DIES_SPEC = """
name = "dies"
[data]
dataset = "digits"
model = "mlp"
limit_train = 300
limit_test = 250
[train]
epochs = 1
[threat]
norms = ["l2"]
[[defenses]]
name = "test-dies"
params = {{ marker_dir = "{marker}", deaths = {deaths}, where = "{where}" }}
[[defenses]]
name = "undefended"
"""


def _spec(text: str, name: str = "jobs"):
    return parse_spec(tomllib.loads(text), name)


def _metrics(store: Path) -> dict[str, Any]:
    return {c["cell_id"]: (c["metrics"], c["counts"]) for c in Store(store).cells()}


def _cli(*argv: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("certbench: ")]
    lines = [ln for ln in lines if not ln.startswith("certbench: warning")]
    assert len(lines) == 1 and lines[0].startswith("certbench: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def dies_defense():
    """Register tests/faulty_defense.py's defense for one test."""
    from bench.registry import DEFENSES

    sys.path.insert(0, str(Path(__file__).parent))
    import faulty_defense

    DEFENSES.add(faulty_defense.DiesOnce)
    yield faulty_defense.DiesOnce
    DEFENSES._entries.pop("test-dies", None)


# --------------------------------------------------------------------------- sharding


def test_shard_bounds_cover_the_set_and_start_at_attack_chunks() -> None:
    for n in (0, 1, 99, 100, 101, 250, 450, 10_000):
        for shards in (1, 2, 3, 8, 1000):
            bounds = shard_bounds(n, shards)
            assert len(bounds) <= shards
            assert all(a % ATTACK_CHUNK == 0 and a < b for a, b in bounds)
            covered = [i for a, b in bounds for i in range(a, b)]
            assert covered == list(range(n))


# --------------------------------------------------------------------------- --jobs


def test_jobs_2_gives_the_results_and_checkpoints_of_jobs_1(tmp_path: Path) -> None:
    spec = _spec(SPEC)
    one = run_spec(spec, tmp_path / "one" / "s.sqlite", progress=False, jobs=1)
    two = run_spec(spec, tmp_path / "two" / "s.sqlite", progress=False, jobs=2)
    assert one["ran"] == two["ran"] == N_CELLS and not one["failed"] and not two["failed"]
    assert one["rows"] == two["rows"]  # in spec order
    assert _metrics(tmp_path / "one" / "s.sqlite") == _metrics(tmp_path / "two" / "s.sqlite")
    # training is deterministic per cell: the same bytes, trained once per train_key
    ck1 = sorted((tmp_path / "one" / "checkpoints").glob("*/defense.safetensors"))
    ck2 = sorted((tmp_path / "two" / "checkpoints").glob("*/defense.safetensors"))
    assert len(ck1) == len(ck2) == N_CELLS // 2
    assert [p.read_bytes() for p in ck1] == [p.read_bytes() for p in ck2]
    stored = Store(tmp_path / "two" / "s.sqlite").cells()
    assert all(c["provenance"]["executor"] == "local" for c in stored)
    assert all(c["eval_seconds"] > 0 and c["train_seconds"] > 0 for c in stored)


def test_jobs_option_and_environment_are_checked(tmp_path: Path, monkeypatch) -> None:
    from bench.workers import default_jobs, resolve_jobs

    monkeypatch.delenv("CERTBENCH_JOBS", raising=False)
    assert default_jobs() == environment.usable_cores()
    monkeypatch.setenv("CERTBENCH_JOBS", "3")
    assert resolve_jobs(None) == 3 and resolve_jobs(1) == 1
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("CERTBENCH_JOBS", bad)
        with pytest.raises(ValidationError, match="CERTBENCH_JOBS must be an integer >= 1"):
            resolve_jobs(None)
    monkeypatch.delenv("CERTBENCH_JOBS")
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC)
    rc, _, err = _cli("run", spec, "--store", tmp_path / "s.sqlite", "--jobs", "0")
    assert rc == 2 and "--jobs" in _error_line(err) and "integer >= 1" in err
    rc, _, err = _cli("run", spec, "--executor", "ray", "--jobs", "2")
    assert rc == 2 and "--jobs is for the local executor" in _error_line(err)


def test_a_worker_killed_in_a_shard_is_replaced_and_the_shard_retried(
    tmp_path: Path, dies_defense
) -> None:
    marker = tmp_path / "marks"
    marker.mkdir()
    spec = _spec(DIES_SPEC.format(marker=marker, deaths=1, where="predict"), "dies")
    got = run_spec(spec, tmp_path / "a" / "s.sqlite", progress=False, jobs=2)
    assert got["ran"] == 2 and not got["failed"]
    assert len(list(marker.glob("died-*"))) == 1  # the worker died once, in a shard
    # the reference, in this process (the marker is spent: nothing dies)
    ref = run_spec(spec, tmp_path / "b" / "s.sqlite", progress=False, jobs=1)
    assert ref["ran"] == 2
    assert _metrics(tmp_path / "a" / "s.sqlite") == _metrics(tmp_path / "b" / "s.sqlite")


def test_a_worker_killed_in_training_is_retried(tmp_path: Path, dies_defense) -> None:
    marker = tmp_path / "marks"
    marker.mkdir()
    spec = _spec(DIES_SPEC.format(marker=marker, deaths=1, where="train"), "dies")
    got = run_spec(spec, tmp_path / "s.sqlite", progress=False, jobs=2)
    assert got["ran"] == 2 and not got["failed"] and len(list(marker.glob("died-*"))) == 1


def test_a_task_whose_worker_dies_twice_fails_its_cell_with_one_line(
    tmp_path: Path, dies_defense
) -> None:
    marker = tmp_path / "marks"
    marker.mkdir()
    spec = tmp_path / "dies.toml"
    spec.write_text(DIES_SPEC.format(marker=marker, deaths=2, where="predict"))
    store = tmp_path / "s.sqlite"
    rc, out, err = _cli("run", spec, "--store", store, "--quiet", "--jobs", "2")
    assert rc == 2
    line = _error_line(err)
    assert "1 cell(s) failed" in line and "test-dies/mlp/l2 seed=0" in line
    assert "died (signal 9), twice" in line and "re-run" in line
    assert len(Store(store)) == 1  # the other cell is stored
    assert "undefended" in out  # and printed
    rc, _, err = _cli("run", spec, "--store", store, "--quiet", "--jobs", "2")
    assert rc == 0, err
    assert len(Store(store)) == 2


def test_a_defense_defined_in_main_runs_in_this_process(tmp_path: Path) -> None:
    from bench.registry import DEFENSES
    from defenses.undefended import Undefended

    cls = type("MainDefense", (Undefended,), {"name": "test-main", "__module__": "__main__"})
    DEFENSES.add(cls)
    try:
        text = DIES_SPEC.split("[[defenses]]")[0] + '[[defenses]]\nname = "test-main"\n'
        with pytest.warns(RuntimeWarning, match="defense test-main registered in __main__"):
            got = run_spec(_spec(text, "main"), tmp_path / "s.sqlite", progress=False, jobs=2)
        assert got["ran"] == 1
    finally:
        DEFENSES._entries.pop("test-main", None)


def test_cells_sharing_a_checkpoint_train_once(tmp_path: Path) -> None:
    text = SPEC.split("[[defenses]]")[0] + '[[defenses]]\nname = "undefended"\n'
    spec = _spec(text.replace("seeds = [0]", "seeds = [0, 1]"))
    writes = []
    from bench import checkpoint

    real = checkpoint.atomic_write_bytes

    def counting(path, data, **kw):  # only the in-process run (--jobs 1) is counted here
        writes.append(Path(path).name)
        return real(path, data, **kw)

    with mock.patch.object(checkpoint, "atomic_write_bytes", counting):
        run_spec(spec, tmp_path / "one" / "s.sqlite", progress=False, jobs=1)
    assert writes.count("defense.safetensors") == 2  # 2 seeds x (l2, linf): two trainings
    run_spec(spec, tmp_path / "two" / "s.sqlite", progress=False, jobs=2)
    records = sorted((tmp_path / "two" / "checkpoints").glob("*/defense.json"))
    assert len(records) == 2


_TRAIN_TWICE = """
import sys, torch
sys.path.insert(0, {root!r})
from bench.registry import load_plugins
from bench.spec import CellConfig
from bench.pipeline import prepare_defense
import bench.training as training
load_plugins()
real = training.train
def counting(*a, **k):
    with open({log!r}, "a") as fh:
        fh.write("trained\\n")
    return real(*a, **k)
training.train = counting
import bench.pipeline as pipeline
pipeline.train = counting
cell = CellConfig.from_dict({cell!r})
prepare_defense(cell, {root_ck!r}, device=torch.device("cpu"), progress=False)
"""


def test_two_processes_needing_one_checkpoint_train_it_once(tmp_path: Path) -> None:
    cell = _spec(SPEC.replace("epochs = 1", "epochs = 15")).cells()[0]  # a few seconds
    log = tmp_path / "trained.log"
    code = _TRAIN_TWICE.format(
        root=str(ROOT), log=str(log), cell=cell.to_dict(), root_ck=str(tmp_path / "ck")
    )
    env = dict(os.environ, CERTBENCH_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert log.read_text().splitlines() == ["trained"]


# --------------------------------------------------------------------------- thread policy


def _sample(wall: float, busy: float, own: float):
    return environment._CpuSample(wall, busy, own)


def test_threads_follow_the_free_cores(monkeypatch) -> None:
    monkeypatch.delenv("CERTBENCH_NUM_THREADS", raising=False)
    monkeypatch.setattr(environment, "usable_cores", lambda: 4)
    monkeypatch.setattr(environment.time, "sleep", lambda s: None)
    before = torch.get_num_threads()
    try:
        # over 1 s: others kept 2.6 cores busy -> 1.4 free -> 1 thread (slack 0.25)
        samples = iter([_sample(0.0, 0.0, 0.0), _sample(1.0, 3.0, 0.4)])
        monkeypatch.setattr(environment, "_cpu_sample", lambda: next(samples))
        assert environment.configure_threads() == 1 and torch.get_num_threads() == 1
        # the others stop: the next chunk takes every core
        monkeypatch.setattr(environment, "_cpu_sample", lambda: _sample(3.0, 5.0, 2.4))
        assert environment.adapt_threads() == 4 and torch.get_num_threads() == 4
        # a busy loop starts next to us (we used 4 cores, it got 0.8 of one): 3 threads
        monkeypatch.setattr(environment, "_cpu_sample", lambda: _sample(4.0, 9.0, 5.6))
        assert environment.adapt_threads() == 3
        # too short an interval says nothing: unchanged
        monkeypatch.setattr(environment, "_cpu_sample", lambda: _sample(4.01, 9.0, 5.6))
        assert environment.adapt_threads() == 3
        # a fixed count (argument or CERTBENCH_NUM_THREADS) is never adapted
        assert environment.configure_threads(2) == 2
        assert environment.adapt_threads() == 2
        monkeypatch.setenv("CERTBENCH_NUM_THREADS", "1")
        assert environment.configure_threads() == 1 and environment.adapt_threads() == 1
        monkeypatch.setenv("CERTBENCH_NUM_THREADS", "lots")
        with pytest.raises(ValidationError, match="CERTBENCH_NUM_THREADS must be an integer"):
            environment.configure_threads()
    finally:
        torch.set_num_threads(before)


def test_training_threads_are_fixed(monkeypatch) -> None:
    monkeypatch.delenv("CERTBENCH_NUM_THREADS", raising=False)
    assert environment.training_threads() == 1
    monkeypatch.setenv("CERTBENCH_NUM_THREADS", "3")
    assert environment.training_threads() == 3


def test_free_cores_sees_a_busy_loop() -> None:
    if environment._cpu_sample() is None:
        pytest.skip("needs /proc/stat")
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        free = environment.free_cores(0.5)
    finally:
        loop.kill()
        loop.wait()
    assert free <= environment.usable_cores() - 0.7  # the loop holds most of a core


def test_evaluation_does_not_depend_on_the_thread_count(tmp_path: Path) -> None:
    """The adaptive policy may change the thread count between chunks: the certificates,
    predictions and attacks of every built-in defense must not change with it."""
    from bench.pipeline import evaluate_shard, prepare_defense

    before = torch.get_num_threads()
    try:
        for cell in _spec(SPEC).cells()[::2]:  # the l2 cell of every defense
            torch.set_num_threads(1)
            d, _ = prepare_defense(cell, tmp_path, device=torch.device("cpu"), progress=False)
            outs = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                outs.append(evaluate_shard(d, cell, 0, 150))
            a, b = outs
            assert torch.equal(a.pred, b.pred), cell.defense
            assert (a.radius is None) == (b.radius is None)
            assert a.radius is None or torch.equal(a.radius, b.radius), cell.defense
            for label, by_eps in a.adv.items():
                for eps, (p, _) in by_eps.items():
                    assert torch.equal(p, b.adv[label][eps][0]), cell.defense
    finally:
        torch.set_num_threads(before)


def test_ray_driver_evaluates_cells_sharing_a_certificate_in_one_set_of_shards(
    tmp_path: Path,
) -> None:
    """The Ray executor's driver sends the two PixelDP cells to the same shard tasks (each
    certifies its examples once for both norms) and every other cell alone, and the records
    are those of the local executor. Ray itself is replaced by a stand-in that runs each task
    in this process; tests/test_runner.py runs the real thing."""
    from bench.executors import local
    from bench.executors.ray_executor import _Driver, _shard_task, _train_task
    from bench.pipeline import training_groups

    cells = [c for c in _spec(SPEC).cells() if c.defense in ("pixeldp", "undefended")]
    ckroot = str(tmp_path / "ray")
    submitted: list[tuple[tuple[str, ...], int, int]] = []

    class Remote:
        def remote(self, group, root, device, threads, a, b):
            submitted.append((tuple(c.norm for c in group), a, b))
            return _shard_task(group, root, device, threads, a, b)

    class Ray:
        @staticmethod
        def get(refs):
            return refs

    groups = training_groups(cells)
    train_refs = {k: _train_task(g, ckroot, "cpu", 1) for k, g in groups.items()}
    driver = _Driver(Ray(), Remote(), train_refs, groups, ckroot, "cpu", 1, 2)
    records: dict[str, Any] = {}
    for c in cells:
        if c.cell_id() not in records:
            records.update(driver.evaluate(c))
    assert sorted(submitted) == sorted(
        [(("l2", "linf"), a, b) for a, b in shard_bounds(250, 2)]
        + [((norm,), a, b) for norm in ("l2", "linf") for a, b in shard_bounds(250, 2)]
    )
    ref = dict(local.run_cells(cells, tmp_path / "local", jobs=1, progress=False))
    assert [records[c.cell_id()]["metrics"] for c in cells] == [ref[c]["metrics"] for c in cells]


def test_in_process_certification_runs_chunks_side_by_side(tmp_path: Path, monkeypatch) -> None:
    """In-process evaluation (adaptive threads) certifies a deterministic defense's chunks on
    one thread per usable core, each with its own copy of the defense and one intra-op
    thread: the certificates of the one-chunk-at-a-time loop; a randomized defense (own
    Monte Carlo pipelines) and a worker process (not adaptive) keep that loop."""
    import threading

    from bench import pipeline
    from bench.pipeline import certify_all, dataset_for, prepare_defense

    cell = next(c for c in _spec(SPEC).cells() if c.defense == "wong-kolter" and c.norm == "linf")
    d, _ = prepare_defense(cell, tmp_path, device=torch.device("cpu"), progress=False)
    x = dataset_for(cell).x_test[:250]
    kw = dict(norm="linf", radii=[0.0, 0.01, 0.02], batch_size=50)
    seen: list[tuple[str, int, int]] = []

    def recorder(real):
        def recording(self, x, **k):
            seen.append((threading.current_thread().name, id(self), torch.get_num_threads()))
            return real(self, x, **k)

        return recording

    before = torch.get_num_threads()
    with mock.patch.object(type(d), "certify", recorder(type(d).certify)):
        ref = certify_all(d, x, **kw)  # tests are not adaptive: one chunk at a time
        assert {name for name, _, _ in seen} == {threading.current_thread().name}
        seen.clear()
        monkeypatch.setattr(pipeline, "adaptive", lambda: True)
        monkeypatch.setattr(pipeline, "usable_cores", lambda: 3)
        got = certify_all(d, x, **kw)
    assert len(seen) == 5  # 250 examples in chunks of 50
    assert len({name for name, _, _ in seen}) > 1  # side by side
    assert threading.current_thread().name not in {name for name, _, _ in seen}
    assert id(d) not in {obj for _, obj, _ in seen} and len({obj for _, obj, _ in seen}) <= 3
    assert {n for _, _, n in seen} == {1} and torch.get_num_threads() == before
    assert torch.equal(ref.labels, got.labels) and torch.equal(
        ref.radius("linf"), got.radius("linf")
    )
    # an error in a chunk stops the call: the chunks not started yet are dropped
    calls: list[int] = []

    def failing(self, x, **k):
        calls.append(int(k["indices"][0]))
        if k["indices"][0] == 0:
            raise RuntimeError("chunk 0 fails")
        time.sleep(0.05)
        return real_wk(self, x, **k)

    real_wk = type(d).certify
    with (
        mock.patch.object(type(d), "certify", failing),
        pytest.raises(RuntimeError, match="chunk 0 fails"),
    ):
        certify_all(d, x, norm="linf", radii=[0.0], batch_size=10)  # 25 chunks
    assert 0 in calls and len(calls) < 25 and torch.get_num_threads() == before
    # a randomized defense keeps the loop (its engine has its own CPU pipelines)
    pix = next(c for c in _spec(SPEC).cells() if c.defense == "pixeldp")
    dp, _ = prepare_defense(pix, tmp_path, device=torch.device("cpu"), progress=False)
    seen.clear()
    with mock.patch.object(type(dp), "certify", recorder(type(dp).certify)):
        certify_all(dp, x[:150], norm="l2", batch_size=50)
    assert {name for name, _, _ in seen} == {threading.current_thread().name}


def test_cells_sharing_a_certificate_certify_each_shard_once(tmp_path: Path) -> None:
    """PixelDP with fixed draws certifies l2 and linf from the same draws: evaluate_shards
    certifies the clean examples once for both cells, with the results of separate runs;
    sequential PixelDP and Wong-Kolter certify per norm (their certificate depends on it)."""
    from bench.pipeline import (
        certificate_groups,
        certifies_shared,
        evaluate_shard,
        evaluate_shards,
        prepare_defense,
        shares_certificate,
    )

    def cells_of(name: str, params: dict[str, Any] | None = None) -> list:
        cells = [c for c in _spec(SPEC).cells() if c.defense == name]
        if params is not None:
            cells = [type(c)(**{**c.__dict__, "params": {**c.params, **params}}) for c in cells]
        return cells

    cpu = torch.device("cpu")
    pix = cells_of("pixeldp")
    assert [c.norm for c in pix] == ["l2", "linf"]
    pairs = [(prepare_defense(c, tmp_path, device=cpu, progress=False)[0], c) for c in pix]
    assert all(certifies_shared(d, c.norm) for d, c in pairs)
    assert shares_certificate(pairs[0][0], pix)
    alone = [evaluate_shard(d, c, 100, 250) for d, c in pairs]
    calls: list[str] = []
    real = type(pairs[0][0]).certify

    def counting(self, x, **kw):
        calls.append(kw["norm"])
        return real(self, x, **kw)

    with mock.patch.object(type(pairs[0][0]), "certify", counting):
        shared = evaluate_shards(pairs, 100, 250)
        clean_calls = len(calls)
        # the clean examples [100, 250) in chunks of 100: 2 certify calls for both cells
        # (the attack limit is 120: the re-scoring of attacked inputs certifies per norm)
        separate = [evaluate_shard(d, c, 100, 250) for d, c in pairs]
    assert (len(calls) - clean_calls) - clean_calls == 2  # separately: two more clean calls
    for a, b in zip(alone, shared, strict=True):
        assert torch.equal(a.pred, b.pred) and torch.equal(a.radius, b.radius)
        assert a.adv.keys() == b.adv.keys()
        for label in a.adv:
            for eps, (p, r) in a.adv[label].items():
                assert torch.equal(p, b.adv[label][eps][0]) and torch.equal(r, b.adv[label][eps][1])
    assert all(torch.equal(a.pred, s.pred) for a, s in zip(alone, separate, strict=True))
    # --jobs 1 evaluates them together too, with the records of the worker executor
    from bench.executors import local

    sizes: list[int] = []
    real_cells = local.evaluate_cells

    def recording_cells(pairs, **k):
        sizes.append(len(pairs))
        return real_cells(pairs, **k)

    some = [c for c in _spec(SPEC).cells() if c.defense in ("pixeldp", "undefended")]
    with mock.patch.object(local, "evaluate_cells", recording_cells):
        one = dict(local.run_cells(some, tmp_path / "one", jobs=1, progress=False))
    assert sorted(sizes) == [1, 1, 2]
    two = dict(local.run_cells(some, tmp_path / "two", jobs=2, progress=False))
    assert [one[c]["metrics"] for c in some] == [two[c]["metrics"] for c in some]
    # grouping in the executor: the two PixelDP cells together, every other cell alone
    cells = _spec(SPEC).cells()
    facts = {c.cell_id(): c.defense == "pixeldp" for c in cells}
    groups = certificate_groups(cells, lambda c: facts[c.cell_id()])
    assert sorted(len(g) for g in groups) == [1] * 8 + [2]
    assert [c.norm for g in groups if len(g) == 2 for c in g] == ["l2", "linf"]
    # what does not share: a sequential test, a norm-specific bound, different test sets
    seq = cells_of("pixeldp", {"sequential": True, "max_n": 200})
    d_seq = prepare_defense(seq[0], tmp_path, device=cpu, progress=False)[0]
    assert d_seq.shared_certificate_norms() == () and not shares_certificate(d_seq, seq)
    wk = cells_of("wong-kolter")
    d_wk = prepare_defense(wk[0], tmp_path, device=cpu, progress=False)[0]
    assert not shares_certificate(d_wk, wk)
    other = type(pix[1])(**{**pix[1].__dict__, "limit_test": 100})
    assert not shares_certificate(pairs[0][0], [pix[0], other])
    assert not shares_certificate(pairs[0][0], pix[:1])


# --------------------------------------------------------------------------- claims


def _cell(i: int):
    from test_store import make_cell

    return make_cell(seed=i)


def _result():
    from test_store import make_result

    return make_result()


def test_claims_are_exclusive_among_live_runs(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    ids = [_cell(i).cell_id() for i in range(4)]
    store.put(_cell(3), _result())
    me = Claimant.current()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        other = Claimant(me.host, sleeper.pid, _start(sleeper.pid), "other-token")
        got = store.claim(ids[:1], other)
        assert got.mine == ids[:1]
        got = store.claim(ids, me)
        assert got.mine == ids[1:3] and got.elsewhere == ids[:1] and got.stored == ids[3:]
        assert store.claim(ids, me).mine == ids[1:3]  # re-claiming one's own is fine
        # a forced re-run claims stored cells too
        assert store.claim(ids, me, redo={ids[3]}).mine == ids[1:]
        # storing a cell drops its claim; releasing drops the rest
        store.put(_cell(1), _result())
        store.release(ids[2:], me)
        with sqlite3.connect(tmp_path / "s.sqlite") as con:
            left = {r[0] for r in con.execute("SELECT cell_id FROM claims")}
        assert left == {ids[0]}
    finally:
        sleeper.kill()
        sleeper.wait()
    # the claimer is dead now: its claim is taken over
    assert store.claim(ids[:1], me).mine == ids[:1]


def _start(pid: int) -> str:
    from bench.store import _process_start

    return _process_start(pid)


def test_stale_claims_are_taken_over(tmp_path: Path, monkeypatch) -> None:
    store = Store(tmp_path / "s.sqlite")
    ids = [_cell(i).cell_id() for i in range(2)]
    me = Claimant.current()
    far = Claimant("another-host", 1, "", "far")  # cannot be checked: the lease decides
    assert store.claim(ids, far).mine == ids
    assert store.claim(ids, me).elsewhere == ids
    store.heartbeat(far)
    assert store.claim(ids, me).elsewhere == ids
    later = time.time() + CLAIM_LEASE_S + 1
    with monkeypatch.context() as m:
        m.setattr("bench.store.time.time", lambda: later)
        assert store.claim(ids, me).mine == ids  # the lease ran out
    store.release(ids, me)
    # a live process whose start time differs from the claim's reused the claimer's pid
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = Claimant(me.host, sleeper.pid, _start(sleeper.pid), "alive")
        reused = Claimant(me.host, sleeper.pid, "1", "reused")
        assert store.claim(ids[:1], alive).mine == ids[:1]
        assert store.claim(ids[:1], me).elsewhere == ids[:1]
        store.release(ids[:1], alive)
        assert store.claim(ids[:1], reused).mine == ids[:1]
        assert store.claim(ids[:1], me).mine == ids[:1]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_waiting_run_reports_cells_another_run_stores(tmp_path: Path, monkeypatch) -> None:
    """A run finds every cell claimed by a live process; when that process stores them, the
    run prints them without computing anything."""
    import bench.executors as executors

    spec = _spec(SPEC.split("[[defenses]]")[0] + '[[defenses]]\nname = "undefended"\n')
    path = tmp_path / "s.sqlite"
    ref = run_spec(spec, tmp_path / "ref" / "s.sqlite", progress=False, jobs=1)
    ref_cells = {c["cell_id"]: c for c in Store(tmp_path / "ref" / "s.sqlite").cells()}
    store = Store(path)
    ids = [c.cell_id() for c in spec.cells()]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    other = Claimant(Claimant.current().host, sleeper.pid, _start(sleeper.pid), "other")
    store.claim(ids, other)
    polls = []

    def sleep(seconds: float) -> None:  # the other run stores one cell per poll
        polls.append(seconds)
        cell = spec.cells()[len(polls) - 1]
        store.put(cell, ref_cells[cell.cell_id()])

    monkeypatch.setattr(executors.time, "sleep", sleep)
    try:
        got = run_spec(spec, path, progress=False, jobs=2)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert got["ran"] == 0 and got["skipped"] == 2 and len(polls) == 2
    assert got["rows"] == ref["rows"]


# --------------------------------------------------------------------------- store errors


def test_read_only_store_is_one_line_and_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC.split("[[defenses]]")[0] + '[[defenses]]\nname = "undefended"\n')
    store = tmp_path / "s.sqlite"
    Store(store)  # an empty store
    real = sqlite3.connect

    def read_only(path, *args, **kwargs):  # what a read-only file or file system gives
        return real(f"file:{path}?mode=ro", *args, uri=True, **kwargs)

    monkeypatch.setattr("bench.store.sqlite3.connect", read_only)
    rc, _, err = _cli("run", spec, "--store", store, "--quiet")
    assert rc == 2
    line = _error_line(err)
    assert str(store) in line and "readonly database" in line
    monkeypatch.undo()
    assert len(Store(store)) == 0


def test_a_failing_write_of_a_result_leaves_no_partial_row(tmp_path: Path, monkeypatch) -> None:
    """The disk fills up in the middle of storing a cell: one line, exit 2, and neither the
    cell's row nor any of its metrics are stored; the next run stores it."""
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC.split("[[defenses]]")[0] + '[[defenses]]\nname = "undefended"\n')
    store = tmp_path / "s.sqlite"
    real = sqlite3.connect

    class Full(sqlite3.Connection):
        def executemany(self, *a, **k):  # put(): after the cells row, before the metrics
            raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr("bench.store.sqlite3.connect", lambda *a, **k: real(*a, factory=Full, **k))
    rc, _, err = _cli("run", spec, "--store", store, "--quiet", "--jobs", "2")
    assert rc == 2 and "database or disk is full" in _error_line(err)
    monkeypatch.undo()
    with sqlite3.connect(store) as con:
        assert con.execute("SELECT COUNT(*) FROM cells").fetchone()[0] == 0
        assert con.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == 0
        assert con.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0  # released
    rc, _, err = _cli("run", spec, "--store", store, "--quiet", "--jobs", "2")
    assert rc == 0, err
    assert len(Store(store)) == 2


_FILL = """
import sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from bench.errors import StoreError
from bench.store import Store
from test_store import make_cell, make_result
store = Store({path!r})
stored = 0
try:
    for seed in range(100_000):
        store.put(make_cell(seed=seed), make_result())
        stored += 1
except StoreError as exc:
    print(stored, exc, sep="\\n")
"""


def test_a_full_file_system_gives_a_store_error_and_no_partial_row(tmp_path: Path) -> None:
    """A file-size limit (what a full disk looks like to SQLite: ENOSPC or EFBIG) reached
    while cells are being stored."""
    path = tmp_path / "s.sqlite"
    code = _FILL.format(root=str(ROOT), tests=str(ROOT / "tests"), path=str(path))
    limit = 256 * 1024

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [sys.executable, "-c", code], preexec_fn=limit_files, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stored, message = proc.stdout.splitlines()[:2]
    assert int(stored) > 10
    assert str(path) in message and ("disk" in message or "full" in message), message
    store = Store(path)
    assert len(store) == int(stored)
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        (orphans,) = con.execute(
            "SELECT COUNT(*) FROM metrics WHERE cell_id NOT IN (SELECT cell_id FROM cells)"
        ).fetchone()
        assert orphans == 0
        per_cell = {n for (n,) in con.execute("SELECT COUNT(*) FROM metrics GROUP BY cell_id")}
        assert per_cell == {4}


def test_store_error_is_a_certbench_error() -> None:
    from bench.errors import CertbenchError

    assert issubclass(StoreError, CertbenchError)


# --------------------------------------------------------------------------- many cells


def _stub_executor(n_metrics: int = 30):
    """An executor module that returns made-up results at once (measures the driver)."""
    import types

    module = types.ModuleType("certbench_stub_executor")

    def run_cells(cells, checkpoint_root, *, device=None, progress=True, desc=""):
        for i, cell in enumerate(cells):
            metrics = {"accuracy": 0.5, **{f"m{j}": (i + j) % 7 / 7 for j in range(n_metrics)}}
            yield (
                cell,
                {
                    "metrics": metrics,
                    "n_test": 7,
                    "n_draws": None,
                    "alpha": None,
                    "attack": None,
                    "train_seconds": 0.0,
                    "eval_seconds": 0.0,
                    "provenance": {"certbench_version": "0", "executor": "stub"},
                },
            )

    module.run_cells = run_cells
    return module


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def many_cells(tmp_path: Path, n: int, monkeypatch) -> dict[str, Any]:
    """Run a spec of ``n`` (even) cells through the driver with a stub executor; returns the time
    of each store write and the process's memory after every tenth of them."""
    import bench.executors as executors
    from bench import store as store_module

    module = _stub_executor()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(executors.EXECUTORS, "stub", module.__name__)
    seeds = ", ".join(str(s) for s in range(n // 2))  # x (l2, linf)
    text = SPEC.split("[[defenses]]")[0].replace("seeds = [0]", f"seeds = [{seeds}]")
    spec = _spec(text + '[[defenses]]\nname = "undefended"\n')
    assert len(spec.cells()) == n
    times: list[float] = []
    rss: list[float] = []
    real_put = store_module.Store.put

    def timed_put(self, cell, result, **kw):
        t0 = time.perf_counter()
        out = real_put(self, cell, result, **kw)
        times.append(time.perf_counter() - t0)
        if len(times) % max(1, n // 10) == 0:
            rss.append(_rss_mb())
        return out

    monkeypatch.setattr(store_module.Store, "put", timed_put)
    t0 = time.perf_counter()
    got = run_spec(spec, tmp_path / "s.sqlite", executor="stub", progress=False)
    total = time.perf_counter() - t0
    assert got["ran"] == n and len(Store(tmp_path / "s.sqlite")) == n
    t1 = time.perf_counter()
    again = run_spec(spec, tmp_path / "s.sqlite", executor="stub", progress=False)
    rerun = time.perf_counter() - t1
    assert again["ran"] == 0 and again["skipped"] == n and len(again["rows"]) == n
    return {"times": sorted(times), "rss": rss, "total": total, "rerun": rerun}


def test_two_hundred_tiny_cells_store_quickly_in_flat_memory(tmp_path: Path, monkeypatch):
    got = many_cells(tmp_path, 200, monkeypatch)
    times = got["times"]
    assert times[len(times) // 2] < 0.05  # median store write (fsync included)
    assert got["rss"][-1] - got["rss"][1] < 20  # MB
    assert got["rerun"] < 0.05 * 200  # a re-run skips them without per-cell queries
