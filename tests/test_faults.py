"""Faults and determinism (issue #9, items 2 and 3): kill real ``certbench`` processes.

What is checked, beyond tests/test_runner.py (SIGKILL/SIGINT of ``certbench run``) and
tests/test_store.py (a kill inside ``Store.put``):

* **SIGTERM** during ``certbench run`` at random moments: exit status 130 with one
  "interrupted" line, an intact store (integrity check, every stored cell complete), every
  checkpoint complete and no temporary files; the resumed run stores every cell once, with
  metrics identical to an uninterrupted run.
* **Hard kills at the dangerous boundaries**, reached through a hook wrapper that pauses the
  real command at a named event (``HOOK_SCRIPT``): after a checkpoint's tensors are written
  but before its JSON record, in ``certbench run`` and ``certbench train``. A later run must
  never load the half checkpoint.
* **Publishing**: a process that publishes two different stores in turn, killed (SIGKILL,
  and SIGTERM through ``bench.cli.main``) at random moments: every leaderboard CSV present is
  byte-for-byte the old or the new complete version, parses with pandas and has the full
  row count; the next ``certbench leaderboard publish`` writes the new version.
* **Certification**: ``certbench certify`` killed (SIGTERM, SIGKILL) mid-way writes no
  ``--output`` file.
* **NaN**: a NaN training loss (a learning rate of 1e30, or a defense patched to return NaN
  mid-run) stops ``certbench train``/``run`` with one line and exit 2, stores nothing, leaves
  no checkpoint record, and does not block the next run.
* **Determinism**: the same spec and seed, run in this process and in a fresh process, give
  leaderboards identical in every column except created_at/train_seconds/eval_seconds
  (compared as text, so floats are compared exactly); results.csv is byte-identical.

* **Parallel runs** (issue #20): Ctrl-C/SIGTERM of ``certbench run --jobs 2`` (status 130,
  one line, no process left behind, no temporary file, identical resume); a worker killed
  with SIGKILL (its task is retried, identical results); a Ray worker killed in the middle
  of a shard (Ray retries the task, identical results); four runs started at once on one
  store (every cell stored once, all exit 0); a file-size limit while a run stores its cells
  (one line, no partial row, the next run completes); 2 000 tiny cells (store write time,
  flat memory; the README's figures). Deterministic worker deaths, claims and store errors
  are in tests/test_jobs.py.

The hooked runs pass ``--jobs 1``: the hooks pause the process they are installed in, so the
cells must run there.

Subprocess tests are ``slow`` (about 1.5-3 minutes in all on 2 cores, most of it process
start-up and imports); every subprocess has a timeout. Random kill times come from a fixed
``random.Random`` seed. Bugs it found have regression tests.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pandas as pd
import pytest
from processes import descendants, while_workers_compute

from bench.checkpoint import load_tensors, read_record
from bench.cli import main
from bench.store import Store

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # per subprocess; a run of SPEC takes ~10 s on 2 cores
PROVENANCE_COLUMNS = ("created_at", "train_seconds", "eval_seconds")
# A SIGTERM that arrives after main() has returned, while the interpreter exits, is not
# turned into exit status 130: Python either raises the KeyboardInterrupt outside main()
# (status -SIGINT) or has already restored the default action (status -SIGTERM). The work
# is complete then, which the tests check instead.
LATE_SIGTERM = (-signal.SIGINT, -signal.SIGTERM)

SPEC = """
name = "faults"
seeds = [0]
[data]
dataset = "digits"
model = "mlp"
limit_test = 100
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
limit = 50
[[defenses]]
name = "undefended"
[[defenses]]
name = "madry"
params = { eps = 0.5, norm = "l2", steps = 5 }
[[defenses]]
name = "randomized-smoothing"
params = { sigma = 0.25, n0 = 20, n = 3000, alpha = 0.01 }
"""
N_CELLS = 3

# Runs certbench with test hooks: prints "HOOK <event>#<k>" for the k-th occurrence of each
# event and, at the event named by CERTBENCH_TEST_PAUSE, sleeps so that the test can kill it
# exactly there. Events: write:<file> / written:<file> (checkpoint and --output writes),
# replace:<file> (just before any atomic rename), train, certify_all (start of the pipeline's
# loops), put / stored (around Store.put).
HOOK_SCRIPT = """
import os, sys, time
import bench.checkpoint as ck
import bench.files as files
import bench.store as store
import bench.training as training

PAUSE = os.environ.get("CERTBENCH_TEST_PAUSE", "")
seen = {}


def hook(name):
    seen[name] = seen.get(name, 0) + 1
    tag = f"{name}#{seen[name]}"
    print(f"HOOK {tag}", flush=True)
    if tag == PAUSE:
        time.sleep(600)


_write = files.atomic_write_bytes


def write(path, data, **kwargs):
    hook(f"write:{path.name}")
    out = _write(path, data, **kwargs)
    hook(f"written:{path.name}")
    return out


ck.atomic_write_bytes = write  # checkpoints (bound at import)
files.atomic_write_bytes = write  # --output (imported at call time)
_replace = os.replace


def replace(src, dst, **kwargs):
    hook(f"replace:{os.path.basename(dst)}")
    return _replace(src, dst, **kwargs)


os.replace = replace  # every atomic write (checkpoints, --output, leaderboards) renames


def wrap(owner, attr, before, after=None):
    orig = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        hook(before)
        out = orig(*args, **kwargs)
        if after:
            hook(after)
        return out

    setattr(owner, attr, wrapper)


wrap(training, "train", "train")
import bench.pipeline as pipeline  # after the wrap: it binds training.train at import

wrap(pipeline, "certify_all", "certify_all")
wrap(store.Store, "put", "put", "stored")
from bench.cli import main

sys.exit(main(sys.argv[1:]))
"""


# --------------------------------------------------------------------------- helpers


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["CERTBENCH_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("CERTBENCH_DEBUG", None)
    env.update(extra)
    return env


class _Proc:
    """A certbench subprocess whose stdout lines are read by a thread (no pipe stalls)."""

    def __init__(self, args: list[str], **env: str) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, *args],
            env=_env(**env),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._err: list[str] = []
        threading.Thread(target=self._pump_out, daemon=True).start()
        self._err_thread = threading.Thread(target=self._pump_err, daemon=True)
        self._err_thread.start()

    def _pump_out(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _pump_err(self) -> None:
        assert self.popen.stderr is not None
        self._err.extend(self.popen.stderr)

    def wait_for(self, hook: str, timeout: float = TIMEOUT_S, *, required: bool = True) -> bool:
        """Block until the process prints ``HOOK <hook>`` (True) or ends (False, or a test
        failure when ``required``)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no 'HOOK {hook}' within {timeout} s")
            if line is None:
                if required:
                    pytest.fail(f"process ended before 'HOOK {hook}':\n{self.stderr()}")
                return False
            if line == f"HOOK {hook}":
                return True

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait(self, timeout: float = TIMEOUT_S) -> int:
        return self.popen.wait(timeout=timeout)

    def stderr(self) -> str:
        self._err_thread.join(timeout=10)
        return "".join(self._err)

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=60)


@contextlib.contextmanager
def _proc(args: list[str], **env: str) -> Iterator[_Proc]:
    p = _Proc(args, **env)
    try:
        yield p
    finally:
        p.close()


def _cli_args(*argv: Any) -> list[str]:
    return ["-m", "bench.cli", *(str(a) for a in argv)]


def _hooked_args(tmp_path: Path, *argv: Any) -> list[str]:
    script = tmp_path / "hooked_certbench.py"
    script.write_text(HOOK_SCRIPT)
    return [str(script), *(str(a) for a in argv)]


def _run_main(*argv: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with (
        mock.patch.dict(os.environ, {"CERTBENCH_NUM_THREADS": "1"}),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _one_line(err: str, prefix: str = "certbench: error: ") -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("certbench: warn")]
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert "Traceback" not in err
    return lines[0]


def _interrupted(err: str) -> None:
    """The stderr of a command stopped by SIGTERM: progress lines (``[spec] stored ...``)
    and then exactly one 'interrupted' line; no error, no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("certbench: interrupted"), err
    assert "re-run to resume" in lines[-1]
    assert not any(ln.startswith(("certbench: error", "certbench: internal")) for ln in lines)
    assert "Traceback" not in err


def _check_store(path: Path) -> int:
    """Integrity of a store after a kill; returns the number of stored cells."""
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(path, timeout=60)) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
        if "cells" not in tables:  # killed while creating the schema: the next run does it
            return 0
        ids = [r[0] for r in con.execute("SELECT cell_id FROM cells")]
        assert len(ids) == len(set(ids))
        for cid in ids:  # a put is all-or-nothing: a stored cell has all its metrics
            (n,) = con.execute("SELECT COUNT(*) FROM metrics WHERE cell_id = ?", (cid,)).fetchone()
            assert n >= 1, f"cell {cid} stored without metrics"
        (orphans,) = con.execute(
            "SELECT COUNT(*) FROM metrics WHERE cell_id NOT IN (SELECT cell_id FROM cells)"
        ).fetchone()
        assert orphans == 0
    return len(ids)


def _check_checkpoints(root: Path, *, temp_files_allowed: bool) -> list[Path]:
    """Every checkpoint with a record is complete; returns tensors files without a record."""
    if not root.exists():
        return []
    for record in root.glob("*/defense.json"):
        assert read_record(record)["format"] == "certbench-checkpoint"
        assert load_tensors(record.with_suffix(".safetensors"))
    if not temp_files_allowed:
        hidden = [p for p in root.rglob(".*")]
        assert not hidden, f"temporary files left behind: {hidden}"
    return [p for p in root.glob("*/defense.safetensors") if not p.with_suffix(".json").exists()]


def _metrics(store: Path) -> dict[str, dict[str, float | None]]:
    return {c["cell_id"]: c["metrics"] for c in Store(store).cells()}


def _boards(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.csv"))}


def _same_boards(a: Path, b: Path) -> None:
    """Identical leaderboards except the provenance columns; results.csv byte-identical."""
    files_a, files_b = _boards(a), _boards(b)
    assert sorted(files_a) == sorted(files_b) and "results.csv" in files_a
    assert files_a["results.csv"] == files_b["results.csv"]
    for name in files_a:
        fa = pd.read_csv(a / name, dtype=str, keep_default_na=False)
        fb = pd.read_csv(b / name, dtype=str, keep_default_na=False)
        assert list(fa.columns) == list(fb.columns)
        keep = [c for c in fa.columns if c not in PROVENANCE_COLUMNS]
        pd.testing.assert_frame_equal(fa[keep], fb[keep])


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "faults.toml"
    path.write_text(SPEC)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, spec_file: Path) -> dict[str, Any]:
    """An uninterrupted run of SPEC in this process, and its published leaderboards."""
    root = tmp_path_factory.mktemp("reference")
    store = root / "s.sqlite"
    rc, _, err = _run_main("run", spec_file, "--store", store, "--quiet")
    assert rc == 0, err
    rc, _, err = _run_main("leaderboard", "publish", "--store", store, "--out", root / "lb")
    assert rc == 0, err
    metrics = _metrics(store)
    assert len(metrics) == N_CELLS
    return {"store": store, "lb": root / "lb", "metrics": metrics}


# --------------------------------------------------------------------------- determinism


@pytest.mark.slow
def test_rerun_in_a_fresh_process_gives_identical_leaderboards(
    reference: dict[str, Any], spec_file: Path, tmp_path: Path
) -> None:
    store = tmp_path / "s.sqlite"
    with _proc(_cli_args("run", spec_file, "--store", store, "--quiet")) as p:
        assert p.wait() == 0, p.stderr()
    assert _metrics(store) == reference["metrics"]
    rc, _, err = _run_main("leaderboard", "publish", "--store", store, "--out", tmp_path / "lb")
    assert rc == 0, err
    _same_boards(reference["lb"], tmp_path / "lb")
    # the provenance columns exist and are filled in both
    board = pd.read_csv(tmp_path / "lb" / "digits-l2.csv")
    assert len(board) == N_CELLS and board["created_at"].notna().all()


# --------------------------------------------------------------------------- run: SIGTERM


@pytest.mark.slow
def test_sigterm_during_run_then_resume(
    reference: dict[str, Any], spec_file: Path, tmp_path: Path
) -> None:
    """Two SIGTERMs, each at a random moment after a randomly chosen stage began (training,
    certification, storing a cell; cells done in an earlier attempt are skipped, so a later
    attempt may end before its stage), then an in-process resume."""
    store = tmp_path / "s.sqlite"
    ckroot = tmp_path / "checkpoints"
    rng = random.Random(9_2026)
    stages = (
        ["train#1", "train#2", "train#3", "certify_all#1", "put#1", "stored#1", "put#2"],
        ["train#1", "certify_all#1", "put#1", "stored#1"],  # fewer cells are left to run
    )
    outcomes = []
    for choices in stages:
        stage = rng.choice(choices)
        # --jobs 1: the hooks pause this process, so the cells must run in it
        args = _hooked_args(tmp_path, "run", spec_file, "--store", store, "--quiet", "--jobs", "1")
        with _proc(args) as p:
            if p.wait_for(stage, required=False):
                time.sleep(rng.uniform(0.0, 0.5))
                p.signal(signal.SIGTERM)
            rc = p.wait()
            err = p.stderr()
        stored = _check_store(store)
        if rc in LATE_SIGTERM:  # the signal came after main() returned: the run was complete
            assert stored == N_CELLS, err
        else:
            assert rc in (0, 130), err
        if rc == 130:
            _interrupted(err)
        outcomes.append((stage, rc, stored))
        _check_checkpoints(ckroot, temp_files_allowed=False)
    rc, _, err = _run_main("run", spec_file, "--store", store, "--quiet")
    assert rc == 0, err
    assert _check_store(store) == N_CELLS
    assert _metrics(store) == reference["metrics"], outcomes


# --------------------------------------------------------------------------- run: half checkpoint


@pytest.mark.slow
def test_kill_between_tensors_and_record_in_run_is_retrained(
    reference: dict[str, Any], spec_file: Path, tmp_path: Path
) -> None:
    """SIGKILL after the first cell's tensors are written, before its JSON record: the
    resumed run must retrain that cell (not load the half checkpoint) and match."""
    store = tmp_path / "s.sqlite"
    args = _hooked_args(tmp_path, "run", spec_file, "--store", store, "--quiet", "--jobs", "1")
    with _proc(args, CERTBENCH_TEST_PAUSE="written:defense.safetensors#1") as p:
        p.wait_for("written:defense.safetensors#1")
        p.signal(signal.SIGKILL)
        assert p.wait() == -signal.SIGKILL
    assert _check_store(store) == 0
    half = _check_checkpoints(tmp_path / "checkpoints", temp_files_allowed=True)
    assert len(half) == 1  # the tensors, without a record
    rc, _, err = _run_main("run", spec_file, "--store", store, "--quiet")
    assert rc == 0, err
    assert _metrics(store) == reference["metrics"]
    assert not _check_checkpoints(tmp_path / "checkpoints", temp_files_allowed=True)


# --------------------------------------------------------------------------- train


def _train_args(out: Path, *extra: str) -> list[str]:
    return [
        "train", "--dataset", "digits", "--model", "mlp", "--quiet", "--out", str(out),
        "--output", str(out.parent / "train.json"), *extra,
    ]  # fmt: skip


def _eval(out: Path) -> tuple[int, str]:
    rc, _, err = _run_main("eval", "--dataset", "digits", "--checkpoint", out, "--limit", "50")
    return rc, err


@pytest.mark.slow
def test_kill_during_train_leaves_nothing_a_later_command_loads(tmp_path: Path) -> None:
    out = tmp_path / "ck" / "model"
    rng = random.Random(11)
    # 1) a SIGKILL at a random moment of a 40-epoch training
    with _proc(_hooked_args(tmp_path, *_train_args(out, "--epochs", "40"))) as p:
        p.wait_for("train#1")
        time.sleep(rng.uniform(0.0, 1.5))
        p.signal(signal.SIGKILL)
        rc = p.wait()
    assert rc in (0, -signal.SIGKILL)
    rc_eval, err = _eval(out)
    if out.with_suffix(".json").exists():  # a record is only written after the tensors
        assert rc_eval == 0, err
    else:
        assert rc_eval == 2 and "checkpoint record not found" in _one_line(err)
    assert (tmp_path / "ck" / "train.json").exists() == (rc == 0)
    # 2) a SIGKILL after the tensors are written, before the record
    shutil.rmtree(tmp_path / "ck", ignore_errors=True)
    with _proc(
        _hooked_args(tmp_path, *_train_args(out, "--epochs", "1")),
        CERTBENCH_TEST_PAUSE="written:model.safetensors#1",
    ) as p:
        p.wait_for("written:model.safetensors#1")
        p.signal(signal.SIGKILL)
        assert p.wait() == -signal.SIGKILL
    assert out.with_suffix(".safetensors").is_file() and not out.with_suffix(".json").exists()
    assert not (tmp_path / "ck" / "train.json").exists()
    rc_eval, err = _eval(out)
    assert rc_eval == 2 and "checkpoint record not found" in _one_line(err)
    # the next train completes the checkpoint
    rc, _, err = _run_main(*_train_args(out, "--epochs", "1"))
    assert rc == 0, err
    assert _eval(out)[0] == 0


@pytest.mark.slow
def test_kill_while_overwriting_a_checkpoint_leaves_no_stale_pair(tmp_path: Path) -> None:
    out = tmp_path / "ck" / "model"
    rc, _, err = _run_main(*_train_args(out, "--epochs", "1", "--lr", "0.001"))
    assert rc == 0, err
    with _proc(
        _hooked_args(tmp_path, *_train_args(out, "--epochs", "2", "--lr", "0.01")),
        CERTBENCH_TEST_PAUSE="written:model.safetensors#1",
    ) as p:
        p.wait_for("written:model.safetensors#1")
        p.signal(signal.SIGKILL)
        assert p.wait() == -signal.SIGKILL
    rc, err = _eval(out)
    # either the half-written checkpoint is refused, or its record describes its tensors
    # (here the record still says epochs=1, lr=0.001: the tensors are the lr=0.01 ones)
    assert rc == 2 or read_record(out)["train"]["lr"] == 0.01, err


# --------------------------------------------------------------------------- certify


@pytest.mark.slow
def test_kill_during_certify_writes_no_output(tmp_path: Path) -> None:
    ck = tmp_path / "rs"
    rc, _, err = _run_main(
        *_train_args(
            ck,
            "--defense",
            "randomized-smoothing",
            "--epochs",
            "1",
            "--limit-train",
            "64",
            "--limit",
            "5",
        ),
        "--param",
        "n=1000",
    )
    assert rc == 0, err
    output = tmp_path / "certify.json"
    certify = [
        "certify", "--dataset", "digits", "--checkpoint", ck, "--norm", "l2", "--eps", "0.25",
        "--param", "n=20000", "--limit", "60", "--quiet", "--output", output,
    ]  # fmt: skip
    rng = random.Random(5)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with _proc(_hooked_args(tmp_path, *certify)) as p:
            p.wait_for("certify_all#1")
            time.sleep(rng.uniform(0.0, 1.0))
            p.signal(sig)
            rc = p.wait()
            err = p.stderr()
        if rc == 0 or (sig == signal.SIGTERM and rc in LATE_SIGTERM):
            # finished before the signal: a complete output
            assert json.loads(output.read_text())["n_test"] == 60
            output.unlink()
            continue
        assert not output.exists()
        assert [p.name for p in tmp_path.glob(".certify.json*")] == []  # no temp files
        if sig == signal.SIGTERM:
            assert rc == 130
            _interrupted(err)
        else:
            assert rc == -signal.SIGKILL


# --------------------------------------------------------------------------- publish


def _synthetic_store(path: Path, n_models: int, shift: float) -> Store:
    """A store with 2 boards (l2, linf) × n_models rows × 2 seeds of made-up results."""
    from bench.spec import CellConfig

    store = Store(path)
    for norm in ("l2", "linf"):
        for m in range(n_models):
            for seed in (0, 1):
                cell = CellConfig(
                    spec_name="pub",
                    dataset="digits",
                    data_dir=None,
                    limit_train=None,
                    limit_test=100,
                    model="mlp",
                    defense="randomized-smoothing",
                    label=None,
                    params={"sigma": 0.1 + m / 100},
                    norm=norm,
                    seed=seed,
                    train={"epochs": 1},
                    eval={"batch_size": 100, "alpha": 0.05},
                    threat={"radii": [0.0, 0.25, 0.5], "thresholds": [0.1], "eps": []},
                    attack=None,
                )
                acc = (m * 7 + seed * 3) % 50 / 100 + shift
                metrics = {
                    "accuracy": acc,
                    "guaranteed_accuracy@0": acc,
                    "guaranteed_accuracy@0.25": acc / 2,
                    "guaranteed_accuracy@0.5": acc / 3,
                    "robust_precision@0.1": 0.9,
                    "coverage@0.1": 0.5,
                }
                result = {"metrics": metrics, "n_test": 100, "n_draws": 1000, "alpha": 0.05}
                store.put(cell, {**result, "train_seconds": 1.0, "eval_seconds": 2.0})
    return store


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Stores A (old) and B (new) and their published boards: name -> (bytes, rows)."""
    from bench.leaderboard import publish

    root = tmp_path_factory.mktemp("publish")
    versions: dict[str, Any] = {}
    for name, n_models, shift in (("A", 30, 0.0), ("B", 45, 0.25)):
        store = _synthetic_store(root / name / "s.sqlite", n_models, shift)
        publish(store, root / name / "lb")
        versions[name] = {
            "store": store.path,
            "files": {
                p.name: (p.read_bytes(), len(pd.read_csv(p)))
                for p in sorted((root / name / "lb").glob("*.csv"))
            },
        }
    assert versions["A"]["files"].keys() == versions["B"]["files"].keys()
    return versions


def _check_published(out: Path, versions: dict[str, Any]) -> list[str]:
    """Every CSV present is A's or B's complete file; returns which version each is."""
    which = []
    for p in sorted(out.glob("*.csv")):
        data = p.read_bytes()
        match = [v for v in ("A", "B") if versions[v]["files"][p.name][0] == data]
        assert match, f"{p.name} is neither the old nor the new complete version"
        assert len(pd.read_csv(p)) == versions[match[0]]["files"][p.name][1]
        which.append(f"{p.name}:{match[0]}")
    return which


PUBLISH_LOOP = """
import contextlib, io, sys
from pathlib import Path
from bench.cli import main
out, stores = sys.argv[1], sys.argv[2:]
i = 0
try:
    while True:
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main(["leaderboard", "publish", "--store", stores[i % 2], "--out", out])
        if rc:
            sys.exit(rc)
        i += 1
        if i == 2:
            Path(out, "..", "looping").touch()
except KeyboardInterrupt:  # a SIGTERM outside main(): same status as inside
    sys.exit(130)
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_kill_during_publish_leaves_old_or_new_complete_boards(
    two_versions: dict[str, Any], tmp_path: Path, sig: int
) -> None:
    rng = random.Random(int(sig))
    script = tmp_path / "publish_loop.py"
    script.write_text(PUBLISH_LOOP)
    for trial in range(3):
        out = tmp_path / f"t{trial}" / "lb"
        out.mkdir(parents=True)
        stores = [str(two_versions[v]["store"]) for v in ("A", "B")]
        with _proc([str(script), str(out), *stores]) as p:
            deadline = time.monotonic() + TIMEOUT_S
            while not (out.parent / "looping").exists() and time.monotonic() < deadline:
                assert p.popen.poll() is None, p.stderr()
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.5))
            p.signal(sig)
            rc = p.wait()
            err = p.stderr()
        assert rc == (130 if sig == signal.SIGTERM else -signal.SIGKILL), err
        _check_published(out, two_versions)
        temp = [q.name for q in out.iterdir() if q.name.startswith(".")]
        if sig == signal.SIGTERM:  # the interrupted write removed its temporary file
            assert not temp, f"temporary files left behind: {temp}"
        # the next publish replaces everything with the new version
        rc, _, err = _run_main("leaderboard", "publish", "--store", stores[1], "--out", out)
        assert rc == 0, err
        assert all(w.endswith(":B") for w in _check_published(out, two_versions))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_kill_at_the_rename_of_results_csv(
    two_versions: dict[str, Any], tmp_path: Path, sig: int
) -> None:
    """Killed with the boards already renamed and results.csv's temporary file written but
    not renamed: boards new, results.csv old, both complete; SIGTERM removes the temporary
    file, SIGKILL leaves it (hidden, never read as a board)."""
    out = tmp_path / "lb"
    a, b = (str(two_versions[v]["store"]) for v in ("A", "B"))
    assert _run_main("leaderboard", "publish", "--store", a, "--out", out)[0] == 0
    args = _hooked_args(tmp_path, "leaderboard", "publish", "--store", b, "--out", out)
    with _proc(args, CERTBENCH_TEST_PAUSE="replace:results.csv#1") as p:
        p.wait_for("replace:results.csv#1")
        p.signal(sig)
        rc = p.wait()
        err = p.stderr()
    which = _check_published(out, two_versions)
    assert which == ["digits-l2.csv:B", "digits-linf.csv:B", "results.csv:A"]
    temp = [q.name for q in out.iterdir() if q.name.startswith(".")]
    if sig == signal.SIGTERM:
        assert rc == 130 and not temp
        _interrupted(err)
    else:
        assert rc == -signal.SIGKILL
        assert len(temp) == 1 and temp[0].startswith(".results.csv.")
    assert _run_main("leaderboard", "publish", "--store", b, "--out", out)[0] == 0
    assert all(w.endswith(":B") for w in _check_published(out, two_versions))


# --------------------------------------------------------------------------- NaN


SPEC_ONE_CELL = """
name = "nan"
[data]
dataset = "digits"
model = "mlp"
limit_train = {limit_train}
limit_test = 60
[train]
epochs = 1
batch_size = 64
lr = {lr}
[threat]
norms = ["l2"]
[[defenses]]
name = "undefended"
"""


def _nothing_stored(store: Path) -> None:
    assert _check_store(store) == 0
    assert not list(store.parent.glob("checkpoints/*/defense.json"))


def test_nan_loss_in_train_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "ck" / "model"
    rc, _, err = _run_main(*_train_args(out, "--epochs", "1", "--lr", "1e30"))
    assert rc == 2
    line = _one_line(err)
    assert "training loss became nan" in line and "train.lr=1e+30" in line
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())


def test_nan_loss_in_run_stores_nothing_and_does_not_block_the_next_run(tmp_path: Path) -> None:
    from defenses.undefended import Undefended

    spec = tmp_path / "nan.toml"
    spec.write_text(SPEC_ONE_CELL.format(limit_train=300, lr=0.003))
    store = tmp_path / "s.sqlite"
    original = Undefended.training_loss
    calls = []

    def nan_at_third_step(self, x, y, progress):  # type: ignore[no-untyped-def]
        calls.append(progress.step)
        loss = original(self, x, y, progress)
        return loss * float("nan") if progress.step == 2 else loss

    with mock.patch.object(Undefended, "training_loss", nan_at_third_step):  # this process
        rc, _, err = _run_main("run", spec, "--store", store, "--quiet", "--jobs", "1")
    assert rc == 2 and calls == [0, 1, 2]
    assert "training loss became nan at epoch 1, step 3" in _one_line(err)
    _nothing_stored(store)
    rc, _, err = _run_main("run", spec, "--store", store, "--quiet")
    assert rc == 0, err
    assert _check_store(store) == 1


def test_blow_up_at_the_last_step_is_not_published(tmp_path: Path) -> None:
    spec = tmp_path / "blowup.toml"
    spec.write_text(SPEC_ONE_CELL.format(limit_train=64, lr=1e37))
    store = tmp_path / "s.sqlite"
    rc, _, err = _run_main("run", spec, "--store", store, "--quiet")
    assert rc == 2 and "nan" in _one_line(err).lower()
    _nothing_stored(store)


def test_overflowing_learning_rate_is_a_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "ck" / "model"
    rc, _, err = _run_main(*_train_args(out, "--epochs", "1", "--lr", "1e38"))
    assert rc == 2, err
    _one_line(err)


# --------------------------------------------------------------------------- parallel runs
# (issue #20: --jobs workers, Ray workers, concurrent runs, a full disk, many cells)


def _while_workers_compute(p: _Proc, rng: random.Random) -> int:
    """:func:`processes.while_workers_compute` for a :class:`_Proc`."""
    return while_workers_compute(p.popen, rng, timeout=TIMEOUT_S, stderr=p.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_with_workers_stops_them_and_the_run_resumes(
    reference: dict[str, Any], spec_file: Path, tmp_path: Path, sig: int
) -> None:
    """Ctrl-C or SIGTERM while workers compute: exit 130 with one line, no process left
    behind, no temporary file, an intact store; the resumed run matches."""
    store = tmp_path / "s.sqlite"
    rng = random.Random(int(sig))
    with _proc(_cli_args("run", spec_file, "--store", store, "--quiet", "--jobs", "2")) as p:
        _while_workers_compute(p, rng)
        family = descendants(p.popen.pid)
        p.signal(sig)
        rc = p.wait()
        err = p.stderr()
    assert rc == 130, err
    _interrupted(err)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{q}").exists() for q in family) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [q for q in family if Path(f"/proc/{q}").exists()]
    assert not left, f"processes left behind: {left}"
    _check_store(store)
    _check_checkpoints(tmp_path / "checkpoints", temp_files_allowed=False)
    rc, _, err = _run_main("run", spec_file, "--store", store, "--quiet")
    assert rc == 0, err
    assert _check_store(store) == N_CELLS
    assert _metrics(store) == reference["metrics"]


@pytest.mark.slow
def test_sigkill_of_a_worker_retries_its_task(
    reference: dict[str, Any], spec_file: Path, tmp_path: Path
) -> None:
    """A --jobs worker killed with SIGKILL at a random moment: its task runs again in a
    fresh worker, the run completes and its results match an uninterrupted run."""
    store = tmp_path / "s.sqlite"
    rng = random.Random(20)
    with _proc(_cli_args("run", spec_file, "--store", store, "--quiet", "--jobs", "2")) as p:
        # while the workers train (a kill in a shard: test_jobs.py)
        os.kill(_while_workers_compute(p, rng), signal.SIGKILL)
        rc = p.wait()
        err = p.stderr()
    assert rc == 0, err
    assert _check_store(store) == N_CELLS
    assert _metrics(store) == reference["metrics"]
    _check_checkpoints(tmp_path / "checkpoints", temp_files_allowed=True)


@pytest.mark.slow
def test_ray_worker_killed_mid_shard_is_retried_and_nothing_is_lost(
    reference: dict[str, Any], spec_file: Path, tmp_path: Path, monkeypatch
) -> None:
    ray = pytest.importorskip("ray")
    from bench.executors import run_spec
    from bench.spec import load_spec

    monkeypatch.setenv("CERTBENCH_NUM_THREADS", "1")
    store = tmp_path / "s.sqlite"
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["summary"] = run_spec(
                load_spec(spec_file), store, executor="ray", progress=False, shards=2
            )
        except BaseException as exc:  # reported by the test thread
            outcome["error"] = exc

    killed = []
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        deadline = time.monotonic() + TIMEOUT_S
        while not killed and thread.is_alive() and time.monotonic() < deadline:
            for entry in Path("/proc").iterdir():
                with contextlib.suppress(OSError):
                    if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(
                        b"ray::_shard_task"
                    ):
                        time.sleep(0.3)  # in the middle of the shard
                        os.kill(int(entry.name), signal.SIGKILL)
                        killed.append(int(entry.name))
                        break
            time.sleep(0.02)
        thread.join(timeout=TIMEOUT_S)
    finally:
        ray.shutdown()
    assert killed, "no shard task was seen running"
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert summary["ran"] == N_CELLS and not summary["failed"]
    assert _check_store(store) == N_CELLS
    assert _metrics(store) == reference["metrics"]


@pytest.mark.slow
def test_four_runs_at_once_store_every_cell_once(
    reference: dict[str, Any], spec_file: Path, tmp_path: Path
) -> None:
    store = tmp_path / "s.sqlite"
    procs = [
        _Proc(_cli_args("run", spec_file, "--store", store, "--output", tmp_path / f"{i}.json"))
        for i in range(4)
    ]
    try:
        codes = [p.wait() for p in procs]
        errs = [p.stderr() for p in procs]
    finally:
        for p in procs:
            p.close()
    assert codes == [0] * 4, errs
    stored_lines = [ln for e in errs for ln in e.splitlines() if "[faults] stored" in ln]
    assert len(stored_lines) == N_CELLS  # each cell computed and stored by one run
    assert not any("Traceback" in e or "error" in e for e in errs)
    for i in range(4):  # and every run reports every cell
        summary = json.loads((tmp_path / f"{i}.json").read_text())
        assert len(summary["rows"]) == N_CELLS and summary["ran"] + summary["skipped"] == N_CELLS
    assert _check_store(store) == N_CELLS
    assert _metrics(store) == reference["metrics"]
    with contextlib.closing(sqlite3.connect(store)) as con:
        assert con.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0


TINY_SPEC = """
name = "tiny"
seeds = [{seeds}]
[data]
dataset = "digits"
model = "mlp"
limit_train = 100
limit_test = 20
[train]
epochs = 1
[threat]
norms = ["l2", "linf"]
[[defenses]]
name = "undefended"
"""


def _limited(limit: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_full_disk_while_storing_is_one_line_and_leaves_no_partial_row(tmp_path: Path) -> None:
    """File writes limited (RLIMIT_FSIZE: what a full disk looks like to SQLite) while a run
    stores its cells (checkpoints trained beforehand): exit 2 with one line naming the store,
    only complete cells stored; the next run completes them, identical to a run without
    the limit."""
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY_SPEC.format(seeds=", ".join(str(s) for s in range(20))))
    rc, _, err = _run_main("run", spec, "--store", tmp_path / "a.sqlite", "--quiet")
    assert rc == 0, err
    store = tmp_path / "b.sqlite"
    args = [sys.executable, *_cli_args("run", spec, "--store", store, "--quiet")]
    proc = subprocess.run(
        args, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
        preexec_fn=_limited(192 * 1024),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    err = "\n".join(ln for ln in proc.stderr.splitlines() if not ln.startswith("[tiny] stored"))
    line = _one_line(err)
    assert str(store) in line and ("disk" in line or "full" in line), line
    stored = _check_store(store)
    assert stored < 40
    rc, _, err = _run_main("run", spec, "--store", store, "--quiet")
    assert rc == 0, err
    assert _check_store(store) == 40
    assert _metrics(store) == _metrics(tmp_path / "a.sqlite")


@pytest.mark.slow
def test_two_thousand_tiny_cells(tmp_path: Path, monkeypatch) -> None:
    """The driver and the store with 2 000 cells (results made up at once, so the store is
    what is measured): every write under 50 ms at the median, memory flat. The figures in
    the README come from this test (printed with -s)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_jobs import many_cells

    got = many_cells(tmp_path, 2000, monkeypatch)
    times = got["times"]
    median, p99 = times[len(times) // 2], times[int(len(times) * 0.99)]
    print(
        f"\n2000 cells: store write median {median * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, "
        f"max {times[-1] * 1e3:.1f} ms; run {got['total']:.1f} s, re-run {got['rerun']:.2f} s; "
        f"RSS after each tenth (MB): {[round(r) for r in got['rss']]}"
    )
    assert median < 0.05
    assert got["rss"][-1] - got["rss"][0] < 20
    assert got["rerun"] < 10


@pytest.mark.slow
def test_two_thousand_tiny_cells_through_the_workers(tmp_path: Path) -> None:
    """2 000 real cells (1 000 trainings) with --jobs 2: the parent's memory stays flat
    (its resident size sampled while the cells are stored)."""
    spec = tmp_path / "tiny.toml"
    spec.write_text(
        TINY_SPEC.format(seeds=", ".join(str(s) for s in range(1000)))
        .replace("limit_train = 100", "limit_train = 20")
        .replace("limit_test = 20", "limit_test = 5")
    )
    store = tmp_path / "s.sqlite"
    t0 = time.perf_counter()
    samples: list[tuple[int, float]] = []  # (cells stored, parent RSS in MB)
    with _proc(_cli_args("run", spec, "--store", store, "--quiet", "--jobs", "2")) as p:
        while p.popen.poll() is None and time.perf_counter() - t0 < 3600:
            with contextlib.suppress(OSError, ValueError, sqlite3.Error):
                status = Path(f"/proc/{p.popen.pid}/status").read_text()
                rss = int(status.split("VmRSS:")[1].split()[0]) / 1024
                with contextlib.closing(sqlite3.connect(store, timeout=60)) as con:
                    n = con.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
                samples.append((n, rss))
            time.sleep(1.0)
        rc = p.wait()
        err = p.stderr()
    seconds = time.perf_counter() - t0
    assert rc == 0, err[-2000:]
    assert _check_store(store) == 2000
    early = max(r for n, r in samples if 200 <= n < 600)
    late = max(r for n, r in samples if n >= 1600)
    print(
        f"\n2000 real cells, --jobs 2: {seconds:.0f} s; parent RSS (MB) after 200-600 cells "
        f"{early:.0f}, after 1600 {late:.0f}"
    )
    assert late - early < 30
