"""Property-based fuzzing of every reader (issue #9, item 1).

Each generated input goes through the reader's Python API *and* through the ``certbench``
command line (``bench.cli.main`` in-process), and must end in exactly one of two ways:

* it is accepted: the reader returns a well-formed value (a spec whose cells have unique
  16-hex-digit ids, a dataset with finite pixels in [0, 1] and labels in range, a dict of
  tensors) and the command exits 0 and writes its outputs; or
* it is refused: the reader raises its :class:`~bench.errors.CertbenchError` subclass with a
  message that names the file, and the command prints exactly one line
  ``certbench: error: ...`` on stderr, exits 2 and writes none of its outputs (no checkpoint,
  no ``--output`` JSON, no store).

Nothing may run code from a file (pickles carry a ``__reduce__`` that would create a marker
file; the marker must never exist), and nothing may hang (each call runs under a SIGALRM
guard of :data:`HANG_S` seconds).

Inputs tried per run (hypothesis with ``derandomize=True``: the same inputs on every run and
in CI; the counts are ``max_examples`` of each test):

* spec, structured TOML:   300 documents (a valid spec plus 1-4 random edits: set, add,
  delete; values of every TOML type, NaN/inf, huge ints, odd strings and keys)
* spec, raw bytes:         150 byte-level mutations of a hand-written spec with headers
* IDX (mnist):             200 datasets (truncation, byte flips, wrong magic/type, wrong
  dims and counts, labels out of range, appended bytes, gzip or plain, missing files)
* CIFAR-10, structured:    150 batch pickles (dtypes, shapes, NaN/inf/out-of-range pixels,
  label lists/arrays, keys, protocols 0-5, an embedded code-executing object)
* CIFAR-10, raw bytes:     100 truncated / byte-flipped / spliced batch pickles
* SVHN:                    120 ``.mat`` pairs (generated X/y of many dtypes and shapes with
  NaN/inf and bad labels, plus truncated and byte-flipped files)
* safetensors checkpoints: 150 (header JSON edits: dtype, shape, offsets, names; header
  length; truncation; byte flips; NaN/inf weights)
* checkpoint JSON records: 150 (every field set to random JSON incl. NaN/Infinity, deleted,
  not a dict, not JSON, not UTF-8)
* ``.pth`` state dicts:    120 (``torch.save`` zip and legacy formats and raw pickles of
  wrong/NaN/renamed tensors, non-tensor objects, a code-executing object; truncation)

Total: 1440 generated inputs.

Bugs this suite exposed (all fixed) have regression tests at the end of the module;
while they are open, the fuzz tests tolerate exactly their signatures (:data:`KNOWN_BUGS`,
counted as hypothesis events) so the suite stays green and keeps looking for new ones.
Delete an entry of :data:`KNOWN_BUGS` once its bug is fixed.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gzip
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import bench.data.digits
from bench.checkpoint import load_tensors
from bench.cli import main
from bench.data import load_dataset, read_idx
from bench.errors import CheckpointError, ConfigError, DataError
from bench.spec import CellConfig, load_spec

HANG_S = 60.0  # generous: CI machines are shared; a reader that needs this long is hung


def _settings(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# Signatures (on the CLI's stderr) of bugs this suite found that are not fixed yet; see the
# xfail tests at the end. A fuzz example that hits one is recorded as an event, not a failure.
KNOWN_BUGS: dict[str, re.Pattern[str]] = {}


def _known_bug(err: str) -> str | None:
    for name, pattern in KNOWN_BUGS.items():
        if pattern.search(err):
            event(f"known bug: {name}")
            return name
    return None


# --------------------------------------------------------------------------- harness


class _Hang(BaseException):
    """Raised by the SIGALRM guard when a reader runs longer than HANG_S."""


@contextlib.contextmanager
def _no_hang(seconds: float = HANG_S) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover
        yield
        return

    def on_alarm(signum, frame):  # type: ignore[no-untyped-def]
        raise _Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _cli(*argv: Any) -> tuple[int, str, str]:
    """Run ``certbench ARGV`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with _no_hang(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _error_line(err: str) -> str:
    """The one ``certbench: error:`` line of a refused input (warnings aside)."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("certbench: warn")]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert lines[0].startswith("certbench: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _expect_refused(rc: int, err: str, *, names: str | None = None) -> str | None:
    """Exit 2 and one error line (naming ``names`` if given); returns the line, or None for
    a known bug."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("certbench: warn")]
    if (rc != 2 or len(lines) != 1) and _known_bug(err):
        return None
    assert rc == 2, f"exit status {rc}, stderr:\n{err}"
    line = _error_line(err)
    if names is not None:
        assert names in line, f"{names!r} not named in: {line}"
    return line


def _absent(*paths: Path) -> None:
    for p in paths:
        assert not p.exists(), f"a refused input left {p} behind"


@contextlib.contextmanager
def _tmpdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="certbench-fuzz-") as d:
        yield Path(d).resolve()


class _Evil:
    """Unpickling this runs ``touch MARKER``: a reader that executes it has failed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _check_dataset(ds: Any) -> None:
    """The invariants every loaded dataset must satisfy."""
    assert ds.num_classes >= 1
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == torch.float32 and x.ndim == 4
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
        assert torch.isfinite(x).all() and (x >= 0).all() and (x <= 1).all()
        assert ((y >= 0) & (y < ds.num_classes)).all()
    assert ds.x_train.shape[1:] == ds.x_test.shape[1:]


def _data_cli(name: str, root: Path) -> None:
    """``certbench train`` (0 epochs, tiny limits) on a fuzzed data directory: loads and
    validates both splits, then either checkpoints or refuses with nothing written."""
    out = root / "ck" / "model"
    output = root / "train.json"
    rc, _, err = _cli(
        "train", "--dataset", name, "--data-dir", root, "--model", "mlp", "--epochs", "0",
        "--limit-train", "4", "--limit", "4", "--out", out, "--output", output, "--quiet",
    )  # fmt: skip
    if rc == 0:
        assert output.is_file() and out.with_suffix(".json").is_file()
        return
    _expect_refused(rc, err)
    _absent(root / "ck", output)


def _data_outcome(name: str, root: Path) -> str:
    """Load ``name`` from ``root`` with the API and the CLI; 'ok' or 'refused'."""
    try:
        with _no_hang():
            ds = load_dataset(name, root)
    except DataError as exc:
        msg = str(exc)
        assert msg.startswith(str(root)), f"message does not name a file under {root}: {msg}"
        _data_cli(name, root)
        return "refused"
    _check_dataset(ds)
    _data_cli(name, root)
    return "ok"


# =========================================================================== specs

SPEC_FIELDS = [
    "name", "seeds", "device", "store", "data", "train", "eval", "threat", "attack",
    "defenses", "dataset", "data_dir", "limit_train", "limit_test", "model", "epochs",
    "batch_size", "optimizer", "lr", "momentum", "weight_decay", "alpha", "norms", "norm",
    "radii", "thresholds", "eps", "library", "params", "limit", "label", "grid", "sigma",
    "n0", "n", "n_predict", "steps", "draws", "step_size", "epsilon", "construction_bound",
    "mechanism", "seed", "nmae", "Name", "",
]  # fmt: skip

_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=6)
SPEC_KEYS = st.sampled_from(SPEC_FIELDS) | _TEXT
SPEC_SCALARS = st.one_of(
    st.sampled_from(
        [
            0, 1, -1, 2, 3, 64, 2**31, 2**63 - 1, 2**64, -(2**63), 0.0, -0.0, 0.1, 0.5, 1.0,
            1e-300, 1e300, math.inf, -math.inf, math.nan, True, False, "", "digits", "mnist",
            "fashion-mnist", "cifar10", "svhn", "imagefolder", "digitz", "l1", "l2", "linf",
            "l3", "mlp", "cnn", "nope", "undefended", "pixeldp", "madry",
            "randomized-smoothing", "wong-kolter", "adam", "sgd", "auto", "cpu", "cuda",
            "cuda:0", "cuda:x", "pgd", "fgsm", "certbench", "torchattacks", "art",
            "autoattack", "gaussian", "laplace", "quick", "a b", "ü", "x\ny", "\x00", "\x7f",
        ]
    ),
    st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True),
    _TEXT,
    st.booleans(),
)  # fmt: skip
SPEC_VALUES = st.recursive(
    SPEC_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(SPEC_KEYS, inner, max_size=3),
    max_leaves=8,
)

BASE_SPEC: dict[str, Any] = {
    "name": "fuzz",
    "seeds": [0, 1],
    "device": "cpu",
    "data": {"dataset": "digits", "limit_train": 100, "limit_test": 50, "model": "mlp"},
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.01, "optimizer": "adam"},
    "eval": {"batch_size": 100, "alpha": 0.05},
    "threat": {
        "norms": ["l2", "linf"],
        "radii": [0.0, 0.25],
        "thresholds": [0.1],
        "eps": {"l2": [0.5], "linf": [0.1]},
    },
    "attack": {"library": "certbench", "name": "pgd", "params": {"steps": 3}, "limit": 20},
    "defenses": [
        {"name": "undefended"},
        {
            "name": "randomized-smoothing",
            "label": "RS",
            "params": {"sigma": 0.25, "n0": 10, "n": 100},
            "grid": {"alpha": [0.01, 0.001]},
            "train": {"epochs": 2},
        },
        {"name": "madry", "params": {"eps": 0.1, "norm": "linf", "steps": 3}},
        {"name": "pixeldp", "model": ["mlp", "cnn"], "params": {"n_draws": 50}},
    ],
}


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.extend(_paths(v, (*prefix, i)))
    return out


SPEC_PATHS = _paths(BASE_SPEC)


def _toml_key(key: str) -> str:
    return _toml_str(key)


def _toml_str(s: str) -> str:
    # JSON escapes '"', '\\' and control characters the way TOML basic strings do, except
    # DEL, which TOML requires escaped
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def _to_toml(doc: Any) -> str:
    """Serialise a document (a table of TOML values) with inline tables and arrays."""
    if not isinstance(doc, dict):  # the root replaced by a non-table: still a TOML file
        return f"value = {_toml_value(doc)}\n"
    return "".join(f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in doc.items())


def _apply_edit(doc: Any, edit: tuple) -> Any:
    op, path, key, value = edit
    parent, target = None, doc
    try:
        for step in path:
            parent, target = target, target[step]
    except (KeyError, IndexError, TypeError):
        return doc  # an earlier edit removed this path
    if op == "set":
        if parent is None:
            return value
        parent[path[-1]] = value
    elif op == "add":
        if isinstance(target, dict):
            target[key] = value
        elif isinstance(target, list):
            target.append(value)
    elif op == "delete" and parent is not None:
        del parent[path[-1]]
    return doc


SPEC_EDITS = st.tuples(
    st.sampled_from(["set", "set", "add", "delete"]),
    st.sampled_from(SPEC_PATHS),
    SPEC_KEYS,
    SPEC_VALUES,
)


def _check_spec_file(path: Path, store: Path) -> str:
    """load_spec and ``certbench run`` (executor stubbed) agree; returns the outcome."""
    try:
        with _no_hang():
            spec = load_spec(path)
    except ConfigError as exc:
        outcome, msg = "refused", str(exc)
        assert msg.startswith(f"{path}: "), msg
    else:
        outcome, msg = "ok", ""
        cells = spec.cells()
        assert cells
        ids = [c.cell_id() for c in cells]
        assert len(set(ids)) == len(ids)
        assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)
        for c in cells[:3]:
            json.dumps(c.to_dict(), allow_nan=False)
            again = CellConfig.from_dict(c.to_dict())
            assert again.cell_id() == c.cell_id() and again.train_key() == c.train_key()
    stub = mock.Mock(return_value={"ran": 0, "skipped": 0, "rows": []})
    with mock.patch("bench.executors.run_spec", stub):
        rc, _, err = _cli("run", path, "--store", store, "--quiet")
    if outcome == "ok":
        if rc != 0 and _known_bug(err):
            return "known bug"
        assert rc == 0, err
        assert stub.call_count == 1 and stub.call_args.args[1] == str(store)
    else:
        if _expect_refused(rc, err) is None:
            return "known bug"
        assert stub.call_count == 0
        assert msg.splitlines()[0] in err
    _absent(store)
    return outcome


@_settings(300)
@given(st.lists(SPEC_EDITS, min_size=1, max_size=4))
def test_fuzz_spec_structured(edits: list[tuple]) -> None:
    doc = copy.deepcopy(BASE_SPEC)
    for edit in edits:
        doc = _apply_edit(doc, edit)
    with _tmpdir() as tmp:
        path = tmp / "spec.toml"
        path.write_text(_to_toml(doc), encoding="utf-8")
        event(_check_spec_file(path, tmp / "store" / "s.sqlite"))


BASE_SPEC_TEXT = b"""\
name = "fuzz-raw"
seeds = [0, 1]
[data]
dataset = "digits"
limit_test = 50
model = "mlp"
[train]
epochs = 1
lr = 1e-3
[threat]
norms = ["l2"]
radii = [0.0, 0.25]
thresholds = [0.1]
eps = { l2 = [0.5] }
[attack]
name = "pgd"
params = { steps = 3 }
[[defenses]]
name = "undefended"
[[defenses]]
name = "randomized-smoothing"
params = { sigma = 0.25, n0 = 10, n = 100 }
grid = { alpha = [0.01, 0.001] }
[defenses.train]
epochs = 2
"""

_TOML_BYTES = st.sampled_from(list(b"[]{}=,.\"'\n#-+0123456789e_ \t\\")) | st.integers(0, 255)
RAW_EDITS = st.one_of(
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.lists(_TOML_BYTES, max_size=4)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 12)),
    st.tuples(st.just("replace"), st.integers(0, 10**6), _TOML_BYTES),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
)


@_settings(150)
@given(st.lists(RAW_EDITS, min_size=1, max_size=4))
def test_fuzz_spec_raw_bytes(edits: list[tuple]) -> None:
    data = bytearray(BASE_SPEC_TEXT)
    for op, pos, arg in edits:
        pos %= len(data) + 1
        if op == "insert":
            data[pos:pos] = bytes(arg)
        elif op == "delete":
            del data[pos : pos + arg]
        elif op == "replace" and pos < len(data):
            data[pos] = arg
        elif op == "truncate":
            del data[pos:]
    with _tmpdir() as tmp:
        path = tmp / "spec.toml"
        path.write_bytes(bytes(data))
        event(_check_spec_file(path, tmp / "store" / "s.sqlite"))


# =========================================================================== IDX

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_IDX_BIG = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(_IDX_BIG[code]).tobytes()


def _idx_base() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (6, 3, 4), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 6, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 3, 4), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 5, dtype=np.uint8),
    }


_IDX_FILE = st.sampled_from(IDX_FILES)
IDX_EDITS = st.one_of(
    st.tuples(st.just("truncate"), _IDX_FILE, st.integers(0, 120)),
    st.tuples(st.just("flip"), _IDX_FILE, st.integers(0, 120), st.integers(0, 255)),
    st.tuples(
        st.just("magic"),
        _IDX_FILE,
        st.sampled_from(
            [b"\0\0\x08\x03", b"\0\0\x08\x01", b"\0\0\x08\x02", b"\0\0\x0d\x03", b"\x1f\x8b\0\0"]
        )
        | st.binary(min_size=4, max_size=4),
    ),
    st.tuples(
        st.just("dim"),
        _IDX_FILE,
        st.integers(0, 2),
        st.sampled_from([0, 1, 4, 5, 6, 7, 2**16, 2**31, 2**32 - 1]) | st.integers(0, 12),
    ),
    st.tuples(st.just("append"), _IDX_FILE, st.binary(min_size=1, max_size=8)),
    st.tuples(
        st.just("label"),
        st.sampled_from(IDX_FILES[1::2]),
        st.integers(0, 10),
        st.sampled_from([9, 10, 11, 127, 128, 255]) | st.integers(0, 255),
    ),
    st.tuples(
        st.just("retype"),
        _IDX_FILE,
        st.sampled_from(sorted(_IDX_BIG)),
        st.sampled_from([None, math.nan, math.inf, -math.inf, -1.0, 256.0, 0.5, 1e10]),
    ),
    st.tuples(st.just("replace"), _IDX_FILE, st.binary(max_size=40)),
    st.tuples(st.just("remove"), _IDX_FILE, st.just(None)),
    st.tuples(st.just("corrupt-gzip"), _IDX_FILE, st.integers(0, 60)),
)


def _apply_idx_edit(files: dict[str, bytes | None], arrays: dict[str, np.ndarray], edit) -> None:  # type: ignore[no-untyped-def]
    op, name, *args = edit
    raw = files[name]
    if raw is None:
        return
    if op == "truncate":
        files[name] = raw[: args[0]]
    elif op == "flip" and raw:
        b = bytearray(raw)
        b[args[0] % len(b)] = args[1]
        files[name] = bytes(b)
    elif op == "magic":
        files[name] = args[0] + raw[4:]
    elif op == "dim":
        k = 4 + 4 * args[0]
        files[name] = raw[:k] + struct.pack(">I", args[1]) + raw[k + 4 :]
    elif op == "append":
        files[name] = raw + args[0]
    elif op == "label" and len(raw) > 8:
        b = bytearray(raw)
        b[8 + args[0] % (len(b) - 8)] = args[1]
        files[name] = bytes(b)
    elif op == "retype":
        code, special = args
        arr = arrays[name].astype(np.float64)
        if special is not None:
            arr.flat[0] = special
        with np.errstate(invalid="ignore", over="ignore"):
            files[name] = _idx_bytes(arr if code in (0x0D, 0x0E) else arr.astype(np.int64), code)
    elif op == "replace":
        files[name] = args[0]
    elif op == "remove":
        files[name] = None
    elif op == "corrupt-gzip":
        files[name] = gzip.compress(raw)[: args[0]] + b"\x1f\x8b"  # marks it as gzip


@_settings(200)
@given(st.lists(IDX_EDITS, min_size=1, max_size=3), st.lists(st.booleans(), min_size=4, max_size=4))
def test_fuzz_idx(edits: list[tuple], gz: list[bool]) -> None:
    arrays = _idx_base()
    files: dict[str, bytes | None] = {n: _idx_bytes(a) for n, a in arrays.items()}
    for edit in edits:
        _apply_idx_edit(files, arrays, edit)
    with _tmpdir() as root:
        for (name, raw), zipped in zip(files.items(), gz, strict=True):
            if raw is None:
                continue
            if zipped and not raw.startswith(b"\x1f\x8b"):
                (root / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (root / name).write_bytes(raw)
        # the generic reader, on each file: an array or a DataError naming the file
        for f in sorted(root.iterdir()):
            try:
                with _no_hang():
                    read_idx(f)
            except DataError as exc:
                assert str(exc).startswith(f"{f}: ")
        event(_data_outcome("mnist", root))


# =========================================================================== CIFAR-10

CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _cifar_batch(rng: np.random.Generator, n: int) -> dict[bytes, Any]:
    return {
        b"batch_label": b"fuzz",
        b"labels": rng.integers(0, 10, n).tolist(),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }


def _cifar_dir(root: Path) -> Path:
    base = root / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(1)
    for i, name in enumerate(CIFAR_FILES):
        (base / name).write_bytes(pickle.dumps(_cifar_batch(rng, 2 + i % 2), protocol=4))
    return base


_DTYPES = ["uint8", "int16", "int64", "uint16", "float32", "float64", "bool", "complex64", "U2"]


CIFAR_PERTURBATIONS = st.one_of(
    st.tuples(st.just("shape"), st.sampled_from([(-1, 3071), (-1, 3, 32, 32), (3072,), (-1,)])),
    st.tuples(st.just("dtype"), st.sampled_from(_DTYPES)),
    st.tuples(
        st.just("pixel"),
        st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 255.5, 256.0, 1e9]),
    ),
    st.tuples(
        st.just("labels"),
        st.one_of(
            st.lists(st.integers(-2, 12) | st.sampled_from([10**10, 2**63, -(2**63)]), max_size=5),
            st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=4),
            st.builds(
                lambda xs, dt: np.array(xs).astype(dt),
                st.lists(st.integers(-1, 11), max_size=4),
                st.sampled_from(["int64", "uint8", "float64", "int8"]),
            ),
            SPEC_SCALARS,
        ),
    ),
    st.tuples(st.just("data"), SPEC_VALUES),  # not an array at all
    st.tuples(st.just("drop"), st.sampled_from(["data", "labels"])),
    st.tuples(st.just("wrap"), st.sampled_from(["list", "tuple"])),
)


@st.composite
def cifar_payloads(draw) -> tuple[Any, int, str | None]:  # type: ignore[no-untyped-def]
    """(object to pickle, protocol, where to hide the evil object or None): a valid batch
    (uint8 (N, 3072) data, N labels in 0..9) with 0-3 perturbations."""
    n = draw(st.integers(0, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    data: Any = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels: Any = rng.integers(0, 10, n).tolist()
    as_bytes = draw(st.booleans())
    protocol = draw(st.integers(3, 5)) if as_bytes else draw(st.integers(0, 5))
    k = (lambda s: s.encode()) if as_bytes else (lambda s: s)
    wrap = None
    for op, arg in draw(st.lists(CIFAR_PERTURBATIONS, max_size=3)):
        if op == "shape" and isinstance(data, np.ndarray):
            with contextlib.suppress(ValueError):
                data = data.reshape(arg) if arg[0] != -1 or data.size else data.reshape(0, *arg[1:])
        elif op == "dtype" and isinstance(data, np.ndarray):
            data = data.astype(arg)
        elif op == "pixel" and isinstance(data, np.ndarray) and data.size:
            data = (data.real if data.dtype.kind == "c" else data).astype(np.float64)
            data.flat[draw(st.integers(0, data.size - 1))] = arg
        elif op == "labels":
            labels = arg
        elif op == "data":
            data = arg
        elif op == "drop":
            data, labels = (None, labels) if arg == "data" else (data, None)
        elif op == "wrap":
            wrap = arg
    batch: Any = {k("filenames"): [k("a")] * n}
    if data is not None:
        batch[k("data")] = data
    if labels is not None:
        batch[k("labels")] = labels
    if wrap is not None:
        batch = [batch] if wrap == "list" else (batch,)
    where = draw(st.sampled_from([None, None, None, None, "top", "labels", "filenames", "key"]))
    return batch, protocol, where


def _hide_evil(batch: Any, where: str | None, marker: Path) -> Any:
    evil = _Evil(marker)
    if where is None:
        return batch
    if where == "top" or not isinstance(batch, dict):
        return evil
    target = {"labels": "labels", "filenames": "filenames"}.get(where)
    for k in list(batch):
        if target is not None and k in (target, target.encode()):
            batch[k] = [evil]
            return batch
    batch["extra"] = evil
    return batch


@_settings(150)
@given(cifar_payloads(), st.sampled_from(CIFAR_FILES))
def test_fuzz_cifar_structured(payload: tuple[Any, int, str | None], target: str) -> None:
    batch, protocol, where = payload
    with _tmpdir() as root:
        marker = root / "pwned"
        base = _cifar_dir(root)
        (base / target).write_bytes(pickle.dumps(_hide_evil(batch, where, marker), protocol))
        outcome = _data_outcome("cifar10", root)
        assert not marker.exists(), "a CIFAR pickle executed code"
        if where is not None:
            assert outcome == "refused"
        event(outcome)


CIFAR_RAW_EDITS = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(b"")),
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.binary(min_size=1, max_size=1)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=9)),
    st.tuples(
        st.just("splice"),
        st.integers(0, 10**6),
        st.sampled_from(
            [
                b"cos\nsystem\n",
                b"cposix\nsystem\n(S'true'\ntR.",
                b"c__builtin__\neval\n",
                b"\x8e" + struct.pack("<Q", 2**20),  # BINBYTES8 of 1 MiB, data missing
                b"\x95" + struct.pack("<Q", 2**20),  # FRAME of 1 MiB, data missing
                b"B" + struct.pack("<I", 2**20),  # BINBYTES of 1 MiB, data missing
                b"(" * 64,
                b"]" * 16 + b"." ,
            ]
        ),
    ),
)  # fmt: skip


@_settings(100)
@given(
    st.sampled_from([0, 2, 4, 5]),
    st.sampled_from(CIFAR_FILES),
    st.lists(CIFAR_RAW_EDITS, min_size=1, max_size=3),
)
def test_fuzz_cifar_raw_bytes(protocol: int, target: str, edits: list[tuple]) -> None:
    with _tmpdir() as root:
        base = _cifar_dir(root)
        # protocol 0/2 pickle bytes through _codecs.encode (refused): use str keys there
        batch = _cifar_batch(np.random.default_rng(2), 2)
        if protocol < 3:
            batch = {k.decode(): v for k, v in batch.items() if k != b"filenames"}
        data = bytearray(pickle.dumps(batch, protocol=protocol))
        for op, pos, arg in edits:
            pos %= len(data) + 1
            if op == "truncate":
                del data[pos:]
            elif op == "flip" and pos < len(data):
                data[pos] = arg[0]
            else:
                data[pos:pos] = arg
        (base / target).write_bytes(bytes(data))
        event(_data_outcome("cifar10", root))


# =========================================================================== SVHN


def _svhn_xy(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {
        "X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
        "y": rng.integers(1, 11, (n, 1)).astype(np.uint8),
    }


@st.composite
def svhn_arrays(draw) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(0, 3))
    mats = _svhn_xy(rng, n)
    shape = draw(st.sampled_from([None, None, (32, 32, 2, n), (32, 32, 3), (8, 8, 3, n)]))
    if shape is not None:
        mats["X"] = rng.integers(0, 256, shape).astype(np.uint8)
    dtype = draw(st.sampled_from([None, None, "float64", "float32", "int16", "bool", "complex128"]))
    if dtype is not None:
        mats["X"] = mats["X"].astype(dtype)
    special = draw(st.sampled_from([None, math.nan, math.inf, -math.inf, -1.0, 256.0, 300.0]))
    if special is not None and mats["X"].size and mats["X"].dtype.kind == "f":
        mats["X"].flat[draw(st.integers(0, mats["X"].size - 1))] = special
    y_kind = draw(st.sampled_from(["ok", "ok", "values", "shape", "float", "text"]))
    if y_kind == "values":
        y = draw(st.lists(st.integers(-1, 12) | st.just(255), min_size=n, max_size=n))
        mats["y"] = np.array(y, dtype=np.int64).reshape(n, 1)
    elif y_kind == "shape":
        mats["y"] = np.ones((draw(st.integers(0, 4)), draw(st.integers(1, 2))), np.uint8)
    elif y_kind == "float":
        y = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=n, max_size=n))
        mats["y"] = np.array(y, dtype=np.float64).reshape(n, 1)
    elif y_kind == "text":
        mats["y"] = np.array(["1"] * n)
    for missing in draw(st.lists(st.sampled_from(["X", "y"]), max_size=1)):
        mats.pop(missing)
    return mats


SVHN_BYTES = st.one_of(
    st.none(),
    st.tuples(st.just("truncate"), st.integers(0, 5000)),
    st.tuples(st.just("flip"), st.integers(0, 5000), st.integers(0, 255)),
    st.tuples(st.just("header"), st.integers(0, 200), st.binary(min_size=4, max_size=8)),
)


@_settings(120)
@given(
    svhn_arrays(),
    st.sampled_from(["train_32x32.mat", "test_32x32.mat"]),
    st.booleans(),
    SVHN_BYTES,
)
def test_fuzz_svhn(mats: dict[str, Any], target: str, compress: bool, corrupt) -> None:  # type: ignore[no-untyped-def]
    import scipy.io

    with _tmpdir() as root:
        rng = np.random.default_rng(3)
        for name in ("train_32x32.mat", "test_32x32.mat"):
            scipy.io.savemat(root / name, _svhn_xy(rng, 3))
        path = root / target
        scipy.io.savemat(path, mats, do_compression=compress)
        if corrupt is not None:
            data = bytearray(path.read_bytes())
            if corrupt[0] == "truncate":
                del data[corrupt[1] :]
            elif corrupt[0] == "flip":
                data[corrupt[1] % len(data)] = corrupt[2]
            else:  # overwrite part of the 128-byte header / first data element tag
                pos = 100 + corrupt[1]
                data[pos : pos + len(corrupt[2])] = corrupt[2]
            path.write_bytes(bytes(data))
        event(_data_outcome("svhn", root))


# =========================================================================== checkpoints


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A valid certbench checkpoint (undefended mlp on digits) and a plain ``.pth``."""
    from bench.assembly import build_defense, save_defense

    root = tmp_path_factory.mktemp("template")
    torch.manual_seed(0)
    d = build_defense("undefended", {}, "mlp", input_shape=(1, 8, 8), num_classes=10)
    save_defense(root / "ck", d, model="mlp", dataset="digits")
    torch.save(d.model_.state_dict(), root / "w.pth")
    return {
        "safetensors": (root / "ck.safetensors").read_bytes(),
        "record": (root / "ck.json").read_bytes(),
        "pth": (root / "w.pth").read_bytes(),
    }


# digits is re-read from scikit-learn's CSV on every load; the checkpoint fuzzers evaluate
# hundreds of checkpoints on it, so they share one (read-only) copy
_cached_digits = functools.lru_cache(maxsize=2)(bench.data.digits._load_digits)


def _eval_cli(root: Path, checkpoint: Path, *extra: str) -> tuple[int, str]:
    """``certbench eval`` of a checkpoint on 20 digits; checks the outputs contract."""
    output = root / "eval.json"
    with mock.patch("bench.data.digits._load_digits", _cached_digits):
        rc, _, err = _cli(
            "eval", "--dataset", "digits", "--limit", "20", "--checkpoint", checkpoint,
            "--output", output, "--quiet", *extra,
        )  # fmt: skip
    if rc == 0:
        assert json.loads(output.read_text())["n_test"] == 20
    else:
        _expect_refused(rc, err)
        _absent(output)
    return rc, err


def _check_tensors(path: Path) -> str:
    try:
        with _no_hang():
            state = load_tensors(path)
    except CheckpointError as exc:
        assert str(exc).startswith(f"{path}: "), str(exc)
        return "refused"
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    return "ok"


def _split_safetensors(raw: bytes) -> tuple[dict[str, Any], bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join_safetensors(header: dict[str, Any], data: bytes, length_delta: int = 0) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", max(0, len(text) + length_delta)) + text + data


ST_TENSOR_NAMES = ["1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"]
ST_EDITS = st.one_of(
    st.tuples(
        st.just("dtype"),
        st.sampled_from(ST_TENSOR_NAMES),
        st.sampled_from(["F32", "F64", "F16", "BF16", "I64", "I32", "U8", "BOOL", "X", ""]),
    ),
    st.tuples(
        st.just("shape"),
        st.sampled_from(ST_TENSOR_NAMES),
        st.lists(st.integers(-2, 200) | st.sampled_from([2**31, 2**62]), max_size=3),
    ),
    st.tuples(
        st.just("offsets"),
        st.sampled_from(ST_TENSOR_NAMES),
        st.lists(st.integers(-1, 100_000) | st.sampled_from([2**63, 2**64 - 1]), max_size=3),
    ),
    st.tuples(st.just("rename"), st.sampled_from(ST_TENSOR_NAMES), SPEC_KEYS),
    st.tuples(st.just("drop"), st.sampled_from(ST_TENSOR_NAMES), st.none()),
    st.tuples(st.just("metadata"), st.just("__metadata__"), SPEC_VALUES),
    st.tuples(st.just("length"), st.just(""), st.integers(-20, 20)),
    st.tuples(st.just("nan"), st.sampled_from(ST_TENSOR_NAMES), st.sampled_from([0x7FC0, 0x7F80])),
    st.tuples(st.just("truncate"), st.just(""), st.integers(0, 200_000)),
    st.tuples(
        st.just("flip"), st.just(""), st.tuples(st.integers(0, 200_000), st.integers(0, 255))
    ),
)


@_settings(150)
@given(st.lists(ST_EDITS, min_size=1, max_size=3))
def test_fuzz_safetensors(template: dict[str, bytes], edits: list[tuple]) -> None:
    header, data = _split_safetensors(template["safetensors"])
    data = bytearray(data)
    delta, cut, flips = 0, None, []
    for op, name, arg in edits:
        if op in ("dtype", "shape", "offsets") and name in header:
            header[name][{"dtype": "dtype", "shape": "shape", "offsets": "data_offsets"}[op]] = arg
        elif op == "rename" and name in header:
            header[arg] = header.pop(name)
        elif op == "drop":
            header.pop(name, None)
        elif op == "metadata":
            header["__metadata__"] = arg
        elif op == "length":
            delta = arg
        elif op == "nan" and name in header:
            start, stop = header[name]["data_offsets"]
            if isinstance(start, int) and 0 <= start < stop <= len(data) and stop - start >= 4:
                data[start : start + 4] = struct.pack("<I", arg << 16)  # a NaN or inf float32
        elif op == "truncate":
            cut = arg
        elif op == "flip":
            flips.append(arg)
    raw = bytearray(_join_safetensors(header, bytes(data), delta))
    for pos, value in flips:
        raw[pos % len(raw)] = value
    if cut is not None:
        del raw[cut:]
    with _tmpdir() as root:
        (root / "ck.safetensors").write_bytes(bytes(raw))
        (root / "ck.json").write_bytes(template["record"])
        tensors = _check_tensors(root / "ck.safetensors")
        rc, _ = _eval_cli(root, root / "ck")
        if tensors == "refused":
            assert rc != 0
        event(f"tensors {tensors}, eval rc {rc}")


RECORD_SCALARS = st.one_of(
    st.sampled_from(
        [
            0, 1, -1, 3, 10, 11, 2**40, 2**63, -(2**63), 10.0, 10.5, math.nan, math.inf,
            -math.inf, True, False, None, "", "10", "mlp", "cnn", "wk-small", "nope",
            "undefended", "madry", "pixeldp", "randomized-smoothing", "wong-kolter",
            "certbench-checkpoint", "digits",
        ]
    ),
    st.integers(-5, 300),
    _TEXT,
)  # fmt: skip
RECORD_VALUES = st.recursive(
    RECORD_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(SPEC_KEYS, inner, max_size=3),
    max_leaves=6,
)
RECORD_FIELDS = [
    "format", "format_version", "defense", "params", "model", "dataset", "input_shape",
    "num_classes", "train",
]  # fmt: skip
RECORD_EDITS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(RECORD_FIELDS), RECORD_VALUES),
    st.tuples(
        st.just("set"),
        st.just("input_shape"),
        st.lists(st.integers(-2, 9) | st.sampled_from([math.inf, 8.0, "8"]), max_size=4),
    ),
    st.tuples(st.just("delete"), st.sampled_from(RECORD_FIELDS), st.none()),
    st.tuples(st.just("whole"), st.just(""), RECORD_VALUES),
    st.tuples(st.just("bytes"), st.just(""), st.binary(max_size=20)),
)


@_settings(150)
@given(st.lists(RECORD_EDITS, min_size=1, max_size=3))
def test_fuzz_checkpoint_record(template: dict[str, bytes], edits: list[tuple]) -> None:
    record: Any = json.loads(template["record"])
    raw: bytes | None = None
    for op, field, value in edits:
        if op == "set" and isinstance(record, dict):
            record[field] = value
        elif op == "delete" and isinstance(record, dict):
            record.pop(field, None)
        elif op == "whole":
            record = value
        elif op == "bytes":
            raw = value
    with _tmpdir() as root:
        (root / "ck.safetensors").write_bytes(template["safetensors"])
        (root / "ck.json").write_bytes(raw if raw is not None else json.dumps(record).encode())
        rc, _err = _eval_cli(root, root / "ck")
        event(f"eval rc {rc}")


def _state_edits():  # type: ignore[no-untyped-def]
    return st.lists(
        st.one_of(
            st.tuples(st.just("drop"), st.sampled_from(ST_TENSOR_NAMES), st.none()),
            st.tuples(st.just("rename"), st.sampled_from(ST_TENSOR_NAMES), SPEC_KEYS),
            st.tuples(
                st.just("shape"),
                st.sampled_from(ST_TENSOR_NAMES),
                st.lists(st.integers(0, 130), min_size=0, max_size=3),
            ),
            st.tuples(
                st.just("dtype"),
                st.sampled_from(ST_TENSOR_NAMES),
                st.sampled_from([torch.float64, torch.float16, torch.int64, torch.bool]),
            ),
            st.tuples(
                st.just("value"),
                st.sampled_from(ST_TENSOR_NAMES),
                st.sampled_from([math.nan, math.inf, -math.inf, 1e30]),
            ),
            st.tuples(st.just("object"), st.sampled_from(ST_TENSOR_NAMES), RECORD_VALUES),
        ),
        max_size=3,
    )


@_settings(120)
@given(
    _state_edits(),
    st.sampled_from(["plain", "plain", "wrapped", "list", "evil-value", "evil-top", "evil-list"]),
    st.sampled_from(["zip", "legacy", "pickle"]),
    st.none() | st.integers(0, 60_000),
)
def test_fuzz_pth(
    template: dict[str, bytes], edits: list[tuple], shape: str, fmt: str, cut: int | None
) -> None:
    state: dict[Any, Any] = torch.load(io.BytesIO(template["pth"]), weights_only=True)
    for op, name, arg in edits:
        if name not in state:
            continue
        if op == "drop":
            del state[name]
        elif op == "rename":
            state[arg] = state.pop(name)
        elif op == "shape":
            state[name] = torch.zeros(arg)
        elif op == "dtype" and isinstance(state[name], torch.Tensor):
            state[name] = state[name].to(arg)
        elif op == "value" and isinstance(state[name], torch.Tensor) and state[name].numel():
            state[name] = state[name].clone().float()
            state[name].view(-1)[0] = arg
        elif op == "object":
            state[name] = arg
    with _tmpdir() as root:
        marker = root / "pwned"
        obj: Any = state
        if shape == "wrapped":
            obj = {"state_dict": state, "epoch": 3}
        elif shape == "list":
            obj = list(state.values())
        elif shape == "evil-value":
            obj = {**state, "1.weight": _Evil(marker)}
        elif shape == "evil-top":
            obj = _Evil(marker)
        elif shape == "evil-list":
            obj = {"state_dict": state, "hooks": [_Evil(marker)]}
        buf = io.BytesIO()
        if fmt == "pickle":
            pickle.dump(obj, buf, protocol=2)
        else:
            torch.save(obj, buf, _use_new_zipfile_serialization=fmt == "zip")
        raw = buf.getvalue()[:cut] if cut is not None else buf.getvalue()
        path = root / "w.pth"
        path.write_bytes(raw)
        tensors = _check_tensors(path)
        rc, _err = _eval_cli(root, path, "--model", "mlp")
        assert not marker.exists(), "a .pth checkpoint executed code"
        if shape.startswith("evil"):
            assert tensors == "refused" and rc == 2
        event(f"tensors {tensors}, eval rc {rc}")


# =========================================================================== regressions
# Bugs the fuzzing above found, as minimal regression examples (all fixed).


def _spec_with_attack_params(tmp_path: Path, params: str) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(
        'name = "x"\n[data]\ndataset = "digits"\n[threat]\neps = [0.1]\n'
        f'[attack]\nname = "pgd"\nparams = {params}\n[[defenses]]\nname = "undefended"\n'
    )
    return path


@pytest.mark.parametrize("params", ['{ defense = "x" }', '{ library = "art" }', '{ norm = "l2" }'])
def test_spec_attack_params_may_not_shadow_arguments(tmp_path: Path, params: str) -> None:
    path = _spec_with_attack_params(tmp_path, params)
    with pytest.raises(ConfigError, match=r"attack\.params"):
        load_spec(path)


@pytest.mark.parametrize("case", ["spec-key", "cifar-persistent-id"])
def test_errors_with_newlines_are_one_line(tmp_path: Path, case: str) -> None:
    if case == "spec-key":
        path = tmp_path / "spec.toml"
        path.write_text('name = "x"\n"a\\nb" = 1\n[data]\ndataset = "digits"\n')
        rc, _, err = _cli("run", path, "--store", tmp_path / "s.sqlite")
    else:
        base = _cifar_dir(tmp_path)
        (base / "test_batch").write_bytes(b"P0\n.")  # PERSID opcode
        rc, _, err = _cli(
            "train", "--dataset", "cifar10", "--data-dir", tmp_path, "--out", tmp_path / "x"
        )
    assert rc == 2
    _error_line(err)


def _crafted_cifar(tmp_path: Path, payload: bytes) -> Path:
    base = _cifar_dir(tmp_path)
    (base / "test_batch").write_bytes(payload)
    return base / "test_batch"


@pytest.mark.parametrize(
    "payload",
    [
        b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"abc",  # BINBYTES8 of 1 TiB
        b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"abc",  # FRAME of 1 TiB
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        + b"\x8a\x06"
        + (2**40).to_bytes(6, "little")
        + b"\x85C\x01b\x87R.",  # _reconstruct(ndarray, (2**40,), b"b")
    ],
    ids=["binbytes8", "frame", "reconstruct"],
)
def test_cifar_pickle_declaring_a_huge_object_is_a_data_error(
    tmp_path: Path, payload: bytes
) -> None:
    path = _crafted_cifar(tmp_path, payload)
    with pytest.raises(DataError, match=re.escape(str(path))):
        load_dataset("cifar10", tmp_path)


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_classes", math.inf), ("num_classes", -3), ("num_classes", 2**40),
     ("input_shape", [1, 8, math.inf])],
    ids=["classes-inf", "classes-negative", "classes-huge", "shape-inf"],
)  # fmt: skip
def test_checkpoint_record_bad_numbers_are_checkpoint_errors(
    template: dict[str, bytes], tmp_path: Path, field: str, value: Any
) -> None:
    record = json.loads(template["record"])
    record[field] = value
    (tmp_path / "ck.safetensors").write_bytes(template["safetensors"])
    (tmp_path / "ck.json").write_text(json.dumps(record))
    rc, _, err = _cli("eval", "--dataset", "digits", "--checkpoint", tmp_path / "ck", "--quiet")
    assert rc == 2 and "ck" in _error_line(err)


def test_malicious_pickles_execute_nothing_through_the_cli(
    tmp_path: Path, template: dict[str, bytes]
) -> None:
    """The code-executing object, as a CIFAR batch and as a .pth, through the command line."""
    marker = tmp_path / "pwned"
    base = _cifar_dir(tmp_path)
    (base / "data_batch_3").write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    out = tmp_path / "ck"
    rc, _, err = _cli(
        "train", "--dataset", "cifar10", "--data-dir", tmp_path, "--out", out, "--epochs", "0"
    )
    assert rc == 2 and "data_batch_3: refusing to unpickle" in _error_line(err)
    _absent(out.with_suffix(".json"), out.with_suffix(".safetensors"))
    pth = tmp_path / "evil.pth"
    torch.save({"1.weight": _Evil(marker)}, pth)
    rc, _, err = _cli(
        "certify", "--dataset", "digits", "--model", "mlp", "--checkpoint", pth, "--norm", "l2",
        "--output", tmp_path / "c.json",
    )  # fmt: skip
    assert rc == 2 and "evil.pth: refused" in _error_line(err)
    _absent(tmp_path / "c.json")
    assert not marker.exists()
    shutil.rmtree(base)
