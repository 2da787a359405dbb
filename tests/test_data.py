"""Tests for bench.data: every loader on small files written in the real formats.

The oracles are independent of the loaders: images are built as (N, C, H, W) arrays first
and then serialised with each format's own layout rules (IDX header by hand, CIFAR's
R-plane/G-plane/B-plane rows, SVHN's (H, W, C, N) with label 10 for the digit 0, PNG files
through Pillow); the loader must give the original arrays back, exactly (every value is
k/255 in float32, computed the same way by numpy on both sides).
"""

from __future__ import annotations

import gzip
import os
import pickle
import pickletools
import shutil
import struct
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from bench.data import (
    DATASETS,
    DEFAULT_DATA_DIRS,
    Dataset,
    load_dataset,
    read_idx,
)
from bench.errors import ConfigError, DataError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def _unit(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_u8.astype(np.float32) / np.float32(255))


# --------------------------------------------------------------------------- IDX


def _idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    """Serialise ``arr`` as IDX: magic 0x0000TTDD, big-endian uint32 dims, big-endian data."""
    big = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    header = bytes([0, 0, type_code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(big[type_code]).tobytes()


def _write(path: Path, data: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def _make_idx_dir(
    root: Path, *, gz: bool, n_train: int = 12, n_test: int = 7, hw: tuple[int, int] = (5, 4)
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *hw), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *hw), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    arrays["train-images-idx3-ubyte"][0, 0, 0] = 255  # the range's ends are present
    arrays["train-images-idx3-ubyte"][0, 0, 1] = 0
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        _write(root / name, _idx_bytes(arr), gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_loads_exact_pixels_and_labels(tmp_path: Path, gz: bool, name: str) -> None:
    arrays = _make_idx_dir(tmp_path, gz=gz)
    d = load_dataset(name, tmp_path)
    assert isinstance(d, Dataset)
    assert d.name == name and d.num_classes == 10 and d.input_shape == (1, 5, 4)
    assert d.source == str(tmp_path.resolve())
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.x_train.shape == (12, 1, 5, 4) and d.x_test.shape == (7, 1, 5, 4)
    assert torch.equal(d.x_train[:, 0], _unit(arrays["train-images-idx3-ubyte"]))
    assert torch.equal(d.x_test[:, 0], _unit(arrays["t10k-images-idx3-ubyte"]))
    assert d.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert d.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert d.x_train.min() == 0.0 and d.x_train.max() == 1.0


def test_idx_limits_take_the_first_examples(tmp_path: Path) -> None:
    arrays = _make_idx_dir(tmp_path, gz=True)
    d = load_dataset("mnist", tmp_path, limit_train=5, limit_test=100)
    assert d.x_train.shape[0] == 5 and d.x_test.shape[0] == 7
    assert torch.equal(d.x_train[:, 0], _unit(arrays["train-images-idx3-ubyte"][:5]))
    assert d.y_train.tolist() == arrays["train-labels-idx1-ubyte"][:5].tolist()
    empty = load_dataset("mnist", tmp_path, limit_train=0, limit_test=0)
    assert empty.x_train.shape == (0, 1, 5, 4) and empty.input_shape == (1, 5, 4)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_bad_limits_are_config_errors(tmp_path: Path, bad: object) -> None:
    _make_idx_dir(tmp_path, gz=False)
    with pytest.raises(ConfigError, match="limit_train"):
        load_dataset("mnist", tmp_path, limit_train=bad)  # type: ignore[arg-type]


def test_read_idx_generic_types_and_gz_detection(tmp_path: Path) -> None:
    ints = np.arange(-6, 6, dtype=np.int32).reshape(3, 4) * 1000
    floats = np.linspace(-1, 1, 10, dtype=np.float64).reshape(2, 5)
    p1 = _write(tmp_path / "ints.idx", _idx_bytes(ints, 0x0C), gz=False)
    p2 = _write(tmp_path / "floats", _idx_bytes(floats, 0x0E), gz=True)
    got_i, got_f = read_idx(p1), read_idx(str(p2))
    assert got_i.dtype == np.int32 and np.array_equal(got_i, ints)
    assert got_f.dtype == np.float64 and np.array_equal(got_f, floats)
    assert got_i.flags.writeable and got_i.dtype.isnative
    # gzip is recognised from the content, whatever the file is called
    (tmp_path / "renamed").write_bytes(p2.read_bytes())
    assert np.array_equal(read_idx(tmp_path / "renamed"), floats)
    with pytest.raises(
        DataError, match=r"ints\.idx: bad magic number 0x00000c02 \(expected 0x00000803"
    ):
        read_idx(p1, kind="images")


def test_idx_real_file_names_with_dot_spelling(tmp_path: Path) -> None:
    arrays = _make_idx_dir(tmp_path, gz=False)
    for name in list(arrays):
        (tmp_path / name).rename(tmp_path / name.replace("-idx", ".idx"))
    d = load_dataset("mnist", tmp_path)
    assert d.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def _corrupt(path: Path, transform) -> None:  # type: ignore[no-untyped-def]
    raw = path.read_bytes()
    gz = raw[:2] == b"\x1f\x8b"
    data = transform(gzip.decompress(raw) if gz else raw)
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize(
    ("target", "transform", "message"),
    [
        (
            "train-images-idx3-ubyte",
            lambda b: b[:-1],
            r"truncated: header declares shape \(12, 5, 4\)",
        ),
        ("t10k-labels-idx1-ubyte", lambda b: b[:-3], r"truncated"),
        ("train-images-idx3-ubyte", lambda b: b[:10], r"truncated header"),
        ("train-images-idx3-ubyte", lambda b: b[:2], r"too short for an IDX header"),
        ("train-images-idx3-ubyte", lambda b: b + b"\0\0", r"2 unexpected bytes"),
        (
            "train-images-idx3-ubyte",
            lambda b: b"\0\0\x08\x02" + b[4:],
            r"bad magic number 0x00000802 \(expected 0x00000803 for IDX images\)",
        ),
        (
            "train-labels-idx1-ubyte",
            lambda b: b"\0\0\x08\x03" + b[4:],
            r"bad magic number 0x00000803 \(expected 0x00000801 for IDX labels\)",
        ),
        (
            "train-images-idx3-ubyte",
            lambda b: b"\0\0\x0c\x03" + b[4:],
            r"bad magic number 0x00000c03",
        ),
        (
            "t10k-labels-idx1-ubyte",
            lambda b: b[:-1] + b"\x0a",
            r"labels\[6\] = 10 is out of range 0\.\.9",
        ),
        (
            "train-labels-idx1-ubyte",
            lambda b: b[:8] + b"\xff" + b[9:],
            r"labels\[0\] = 255 is out of range",
        ),
    ],
)
def test_idx_corruptions_name_the_file(
    tmp_path: Path,
    gz: bool,
    target: str,
    transform,
    message: str,  # type: ignore[no-untyped-def]
) -> None:
    _make_idx_dir(tmp_path, gz=gz)
    path = tmp_path / (target + (".gz" if gz else ""))
    _corrupt(path, transform)
    with pytest.raises(DataError, match=message) as info:
        load_dataset("fashion-mnist", tmp_path)
    assert str(info.value).startswith(f"{path}: ")


def test_idx_image_and_label_counts_must_match(tmp_path: Path) -> None:
    _make_idx_dir(tmp_path, gz=False)
    labels = np.zeros(11, dtype=np.uint8)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))
    with pytest.raises(
        DataError,
        match=r"train-images-idx3-ubyte: 12 images but .*train-labels-idx1-ubyte has 11 labels",
    ):
        load_dataset("mnist", tmp_path)


def test_idx_train_and_test_image_sizes_must_match(tmp_path: Path) -> None:
    _make_idx_dir(tmp_path, gz=False)
    img = np.zeros((7, 6, 6), dtype=np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(img))
    with pytest.raises(DataError, match=r"train images are \(5, 4\) but t10k images are \(6, 6\)"):
        load_dataset("mnist", tmp_path)


def test_idx_corrupt_gzip(tmp_path: Path) -> None:
    _make_idx_dir(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match="corrupt gzip data") as info:
        load_dataset("mnist", tmp_path)
    assert str(path) in str(info.value)


def test_idx_gzip_bomb_is_inflated_only_as_far_as_the_header_declares(tmp_path: Path) -> None:
    # 12 declared labels followed by 256 MiB of zeros: ~250 KB on disk. Reading it must stop
    # a few KB past the declared data, not allocate the 256 MiB.
    import tracemalloc
    import zlib

    header = struct.pack(">II", 0x801, 12) + bytes(range(10)) + b"\x00\x01"
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    body = comp.compress(header)
    chunk = bytes(2**20)
    for _ in range(256):
        body += comp.compress(chunk)
    body += comp.flush()
    path = tmp_path / "bomb-idx1-ubyte.gz"
    path.write_bytes(body)
    assert len(body) < 2**20
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"at least 4096 unexpected bytes after the \(12,\)"):
            read_idx(path, kind="labels")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak


def test_idx_gzip_bomb_without_a_valid_header_is_not_inflated(tmp_path: Path) -> None:
    import tracemalloc
    import zlib

    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    body = b"".join(comp.compress(bytes(2**20)) for _ in range(128)) + comp.flush()
    path = tmp_path / "zeros-idx3-ubyte.gz"  # 128 MiB of zeros: magic 0x00000000
    path.write_bytes(body)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"bad magic number 0x00000000"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak


def test_idx_header_declaring_more_than_memory(tmp_path: Path) -> None:
    path = tmp_path / "huge-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(struct.pack(">IIII", 0x803, 2**31, 2**16, 2**16) + bytes(64)))
    with pytest.raises(DataError, match=r"declares shape .* more than this machine's memory"):
        read_idx(path, kind="images")


def test_idx_multi_member_gzip(tmp_path: Path) -> None:
    raw = struct.pack(">II", 0x801, 6) + bytes([3, 1, 4, 1, 5, 9])
    path = tmp_path / "two-members-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(raw[:5]) + gzip.compress(raw[5:]))  # as `cat a.gz b.gz`
    assert read_idx(path, kind="labels").tolist() == [3, 1, 4, 1, 5, 9]


def test_idx_missing_file(tmp_path: Path) -> None:
    _make_idx_dir(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: file not found") as info:
        load_dataset("fashion-mnist", tmp_path)
    assert str(tmp_path / "t10k-labels-idx1-ubyte") in str(info.value)


def test_missing_and_non_directory_data_dirs(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", missing)
    assert str(info.value) == (
        f"data directory {missing} does not exist (dataset fashion-mnist; pass --data-dir)"
    )
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(DataError, match="is not a directory"):
        load_dataset("cifar10", afile)
    for name in ("cifar10", "cifar100", "svhn", "imagefolder"):
        assert name not in DEFAULT_DATA_DIRS
        with pytest.raises(DataError, match=f"dataset {name} has no standard data directory"):
            load_dataset(name)


def test_unknown_dataset_lists_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load_dataset("fashion_mnist")
    msg = str(info.value)
    assert "'fashion_mnist'" in msg
    assert all(name in msg for name in DATASETS)


# --------------------------------------------------------------------------- CIFAR


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N, 3, 32, 32) -> (N, 3072) with the documented CIFAR row layout, element by element:
    the first 1024 entries are the red plane in row-major order, then green, then blue."""
    n = images.shape[0]
    rows = np.empty((n, 3072), dtype=np.uint8)
    for i in range(n):
        for c in range(3):
            for r in range(32):
                start = c * 1024 + r * 32
                rows[i, start : start + 32] = images[i, c, r]
    return rows


def _cifar_images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def _make_cifar10(root: Path, *, protocol: int = 4, str_keys: bool = False, sub: bool = True):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    base = root / "cifar-10-batches-py" if sub else root
    base.mkdir(parents=True, exist_ok=True)
    key = (lambda k: k) if str_keys else (lambda k: k.encode())
    batches = {}
    for fname, n in [*((f"data_batch_{i}", 3) for i in range(1, 6)), ("test_batch", 4)]:
        images = _cifar_images(rng, n)
        labels = rng.integers(0, 10, n).tolist()
        batch = {
            key("batch_label"): key(f"batch {fname}"),
            key("labels"): labels,
            key("data"): _cifar_rows(images),
            key("filenames"): [key(f"img_{i}.png") for i in range(n)],
        }
        with (base / fname).open("wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        batches[fname] = (images, labels)
    return base, batches


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_cifar10_loads_layout_and_labels(tmp_path: Path, protocol: int) -> None:
    base, batches = _make_cifar10(tmp_path, protocol=protocol)
    d = load_dataset("cifar10", tmp_path)
    train_images = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = [y for i in range(1, 6) for y in batches[f"data_batch_{i}"][1]]
    assert d.num_classes == 10 and d.input_shape == (3, 32, 32) and d.source == str(base)
    assert torch.equal(d.x_train, _unit(train_images))
    assert d.y_train.tolist() == train_labels
    assert torch.equal(d.x_test, _unit(batches["test_batch"][0]))
    assert d.y_test.tolist() == batches["test_batch"][1]
    limited = load_dataset("cifar10", tmp_path, limit_train=4, limit_test=1)
    assert torch.equal(limited.x_train, _unit(train_images[:4]))
    assert limited.y_test.tolist() == batches["test_batch"][1][:1]


def test_cifar10_files_directly_in_data_dir_and_str_keys(tmp_path: Path) -> None:
    _, batches = _make_cifar10(tmp_path, str_keys=True, sub=False)
    d = load_dataset("cifar10", tmp_path)
    assert d.source == str(tmp_path.resolve())
    assert torch.equal(d.x_test, _unit(batches["test_batch"][0]))


def _py2_pickle(batch: list[tuple[bytes, object]]) -> bytes:
    """A protocol-2 pickle as Python 2's cPickle with numpy 1.x wrote the real CIFAR files.

    Python 2 ``str`` is SHORT_BINSTRING/BINSTRING, and a uint8 array is
    ``numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), 'b')`` followed by BUILD with
    the state ``(1, shape, dtype('u1') with state (3, '|', None, None, None, -1, -1, 0),
    False, raw bytes)``. Written opcode by opcode; memo opcodes are omitted.
    """

    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def i(v: int) -> bytes:
        return b"J" + struct.pack("<i", v)

    def obj(value: object) -> bytes:
        if isinstance(value, bytes):
            return s(value)
        if isinstance(value, int):
            return i(value)
        if isinstance(value, list):
            return b"](" + b"".join(obj(v) for v in value) + b"e"
        assert isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 2
        dtype = b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R"
        dtype += b"(" + i(3) + s(b"|") + b"NNN" + i(-1) + i(-1) + i(0) + b"tb"
        return (
            b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
            + i(0)
            + b"\x85"
            + s(b"b")
            + b"\x87R("
            + i(1)
            + i(value.shape[0])
            + i(value.shape[1])
            + b"\x86"
            + dtype
            + b"\x89"
            + s(value.tobytes())
            + b"tb"
        )

    return b"\x80\x02}(" + b"".join(s(k) + obj(v) for k, v in batch) + b"u."


def test_cifar100_from_python2_style_pickles(tmp_path: Path) -> None:
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    rng = np.random.default_rng(2)
    expected = {}
    for fname, n in (("train", 5), ("test", 3)):
        images = _cifar_images(rng, n)
        fine = [99, *rng.integers(0, 100, n - 1).tolist()]
        raw = _py2_pickle(
            [
                (b"filenames", [b"a.png"] * n),
                (b"batch_label", b"training batch 1 of 1"),
                (b"fine_labels", fine),
                (b"coarse_labels", [c // 5 for c in fine]),
                (b"data", _cifar_rows(images)),
            ]
        )
        with open(os.devnull, "w") as devnull:
            pickletools.dis(raw, out=devnull)  # a well-formed pickle stream
        # the stream is what stock (unsafe) pickle reads as a dict holding the array
        ref = pickle.loads(raw, encoding="latin1")
        assert np.array_equal(ref["data"], _cifar_rows(images))
        (base / fname).write_bytes(raw)
        expected[fname] = (images, fine)
    d = load_dataset("cifar100", tmp_path)
    assert d.num_classes == 100 and d.source == str(base)
    assert torch.equal(d.x_train, _unit(expected["train"][0]))
    assert d.y_train.tolist() == expected["train"][1]
    assert torch.equal(d.x_test, _unit(expected["test"][0]))
    assert d.y_test.tolist() == expected["test"][1]


class _Evil:
    """Unpickling this would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


class _ArraySubclass(np.ndarray):
    pass


@pytest.mark.parametrize("where", ["top", "nested"])
def test_malicious_cifar_pickle_is_refused_and_runs_nothing(tmp_path: Path, where: str) -> None:
    base, _ = _make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    payload = _Evil(marker)
    if where == "nested":
        rows = _cifar_rows(_cifar_images(np.random.default_rng(0), 2))
        payload = {b"data": rows, b"labels": [0, 1], b"filenames": [b"x", payload]}  # type: ignore[assignment]
    path = base / "data_batch_2"
    # protocol 2 as in the real files; the nested case uses 4 (protocol 2 pickles Python 3
    # bytes through _codecs.encode, which is refused before the payload is reached)
    path.write_bytes(pickle.dumps(payload, protocol=2 if where == "top" else 4))
    with pytest.raises(
        DataError, match=r"refusing to unpickle: it references posix\.system"
    ) as info:
        load_dataset("cifar10", tmp_path)
    assert str(info.value).startswith(f"{path}: ")
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        np.zeros((1, 3072), np.uint8).view(_ArraySubclass),  # its class is refused too
        {b"data": np.zeros((1, 3072), np.uint8), b"labels": [np.int64(3)]},  # numpy scalar
        {b"data": eval, b"labels": []},
    ],
    ids=["ndarray-subclass", "numpy-scalar", "builtin"],
)
def test_other_globals_are_refused(tmp_path: Path, payload: object) -> None:
    base, _ = _make_cifar10(tmp_path)
    path = base / "test_batch"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(DataError, match="refusing to unpickle") as info:
        load_dataset("cifar10", tmp_path)
    assert str(info.value).startswith(f"{path}: ")


def _replace_batch(base: Path, fname: str, batch: object) -> Path:
    path = base / fname
    path.write_bytes(pickle.dumps(batch))
    return path


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (
            {b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]},
            r"'data' is \(2, 3000\), expected a \(N, 3072\)",
        ),
        (
            {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]},
            r"'labels'\[1\] = 10 is out of range 0\.\.9",
        ),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, -1]}, r"= -1 is out of range"),
        (
            {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]},
            r"has 1 labels but there are 2 images",
        ),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [b"a", b"b"]}, r"expected integers"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, r"missing key 'labels'"),
        ({b"data": [1, 2], b"labels": [0, 1]}, r"'data' is list"),
        ([1, 2, 3], r"expected a pickled dict, got list"),
        ({b"data": np.full((1, 3072), np.nan, np.float32), b"labels": [0]}, r"non-finite pixel"),
        (
            {b"data": np.full((1, 3072), 256.0), b"labels": [0]},
            r"pixel values span \[256\.0, 256\.0\], expected 0\.\.255",
        ),
        ({b"data": np.zeros((1, 3072), object), b"labels": [0]}, r"dtype object"),
    ],
)
def test_cifar_malformed_batches_name_the_file(tmp_path: Path, batch: object, message: str) -> None:
    base, _ = _make_cifar10(tmp_path)
    path = _replace_batch(base, "test_batch", batch)
    with pytest.raises(DataError, match=message) as info:
        load_dataset("cifar10", tmp_path)
    assert str(info.value).startswith(f"{path}: ")


def test_cifar_bad_pixels_in_a_later_train_batch_name_that_batch(tmp_path: Path) -> None:
    base, _ = _make_cifar10(tmp_path)
    data = np.zeros((2, 3072), np.float64)
    data[1, 7] = np.nan
    path = _replace_batch(base, "data_batch_4", {b"data": data, b"labels": [0, 1]})
    with pytest.raises(
        DataError, match=r"non-finite pixel \(NaN or inf\) at index \(1, 7\)"
    ) as info:
        load_dataset("cifar10", tmp_path, limit_train=1)
    assert str(info.value).startswith(f"{path}: ")


def test_cifar_not_a_pickle_truncated_and_missing(tmp_path: Path) -> None:
    base, _ = _make_cifar10(tmp_path)
    path = base / "data_batch_1"
    path.write_bytes(b"this is not a pickle")
    with pytest.raises(DataError, match="not a readable pickle") as info:
        load_dataset("cifar10", tmp_path)
    assert str(info.value).startswith(f"{path}: ")
    base, _ = _make_cifar10(tmp_path)
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(DataError, match="not a readable pickle"):
        load_dataset("cifar10", tmp_path)
    base, _ = _make_cifar10(tmp_path)
    (base / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"data_batch_3: file not found"):
        load_dataset("cifar10", tmp_path)


def test_cifar100_uses_fine_labels_and_checks_their_range(tmp_path: Path) -> None:
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    rows = _cifar_rows(_cifar_images(np.random.default_rng(3), 2))
    _replace_batch(
        base, "train", {b"data": rows, b"fine_labels": [99, 0], b"coarse_labels": [19, 0]}
    )
    test = _replace_batch(
        base, "test", {b"data": rows, b"fine_labels": [5, 100], b"coarse_labels": [1, 0]}
    )
    with pytest.raises(
        DataError, match=r"'fine_labels'\[1\] = 100 is out of range 0\.\.99"
    ) as info:
        load_dataset("cifar100", tmp_path)
    assert str(info.value).startswith(f"{test}: ")
    _replace_batch(base, "test", {b"data": rows, b"fine_labels": [5, 7], b"coarse_labels": [1, 0]})
    d = load_dataset("cifar100", tmp_path)
    assert d.y_train.tolist() == [99, 0] and d.y_test.tolist() == [5, 7]


# --------------------------------------------------------------------------- SVHN


def _svhn_arrays(images: np.ndarray, digits: np.ndarray) -> dict[str, np.ndarray]:
    """(N, 3, H, W) images and digits 0..9 -> SVHN's X (H, W, 3, N) and y (N, 1) in 1..10."""
    n, c, h, w = images.shape
    x = np.empty((h, w, c, n), dtype=images.dtype)
    for k in range(n):
        for ch in range(c):
            x[:, :, ch, k] = images[k, ch]
    y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)
    return {"X": x, "y": y}


def _make_svhn(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import scipy.io

    rng = np.random.default_rng(4)
    expected = {}
    for fname, n in (("train_32x32.mat", 6), ("test_32x32.mat", 4)):
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        digits = np.array([0, 9, *rng.integers(0, 10, n - 2).tolist()])
        scipy.io.savemat(root / fname, _svhn_arrays(images, digits))
        expected[fname] = (images, digits)
    return expected


def test_svhn_loads_and_maps_label_10_to_0(tmp_path: Path) -> None:
    expected = _make_svhn(tmp_path)
    d = load_dataset("svhn", tmp_path)
    assert d.num_classes == 10 and d.input_shape == (3, 32, 32)
    assert torch.equal(d.x_train, _unit(expected["train_32x32.mat"][0]))
    assert d.y_train.tolist() == expected["train_32x32.mat"][1].tolist()
    assert d.y_train[0] == 0 and d.y_train[1] == 9
    assert torch.equal(d.x_test, _unit(expected["test_32x32.mat"][0]))
    assert d.y_test.tolist() == expected["test_32x32.mat"][1].tolist()
    limited = load_dataset("svhn", tmp_path, limit_train=2, limit_test=3)
    assert torch.equal(limited.x_train, _unit(expected["train_32x32.mat"][0][:2]))
    assert limited.y_test.tolist() == expected["test_32x32.mat"][1][:3].tolist()


def test_svhn_float_pixels_are_accepted_when_valid(tmp_path: Path) -> None:
    import scipy.io

    expected = _make_svhn(tmp_path)
    arrays = scipy.io.loadmat(tmp_path / "test_32x32.mat")
    scipy.io.savemat(
        tmp_path / "test_32x32.mat",
        {"X": arrays["X"].astype(np.float64), "y": arrays["y"].astype(float)},
    )
    d = load_dataset("svhn", tmp_path)
    assert torch.equal(d.x_test, _unit(expected["test_32x32.mat"][0]))
    assert d.y_test.tolist() == expected["test_32x32.mat"][1].tolist()


def _nan_x(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = a["X"].astype(np.float32)
    x[1, 2, 0, 3] = np.inf
    return {"X": x, "y": a["y"]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda a: {"X": a["X"], "y": np.array([[0], *a["y"][1:].tolist()])},
            r"'y'\[0\] = 0 is out of range 1\.\.10",
        ),
        (lambda a: {"X": a["X"], "y": a["y"] + 1}, r"= 11 is out of range 1\.\.10"),
        (lambda a: {"X": a["X"], "y": a["y"][:3]}, r"has 3 labels but there are 4 images"),
        (lambda a: {"X": a["X"], "y": a["y"] + 0.5}, r"non-integer"),
        (
            lambda a: {"X": a["X"][:, :, :2], "y": a["y"]},
            r"'X' is \(32, 32, 2, 4\), expected \(H, W, 3, N\)",
        ),
        (lambda a: {"X": a["X"]}, r"missing variable 'y'"),
        (_nan_x, r"non-finite pixel \(NaN or inf\) at index \(3, 0, 1, 2\)"),
        (
            lambda a: {"X": a["X"].astype(float) * 2, "y": a["y"]},
            r"pixel values span \[0\.0, 5\d\d\.0\]",
        ),
        (
            lambda a: {"X": a["X"][:16], "y": a["y"]},
            r"images are \(3, 16, 32\) but .*train_32x32\.mat has \(3, 32, 32\)",
        ),
    ],
)
def test_svhn_malformed_files_name_the_file(tmp_path: Path, change, message: str) -> None:  # type: ignore[no-untyped-def]
    import scipy.io

    _make_svhn(tmp_path)
    path = tmp_path / "test_32x32.mat"
    scipy.io.savemat(path, change(scipy.io.loadmat(path)))
    with pytest.raises(DataError, match=message) as info:
        load_dataset("svhn", tmp_path)
    assert str(info.value).startswith(f"{path}: ")


def test_svhn_not_a_mat_file_and_missing_file(tmp_path: Path) -> None:
    _make_svhn(tmp_path)
    path = tmp_path / "train_32x32.mat"
    path.write_bytes(b"\0" * 300)
    with pytest.raises(DataError, match=r"not a readable \.mat file") as info:
        load_dataset("svhn", tmp_path)
    assert str(info.value).startswith(f"{path}: ")
    (tmp_path / "test_32x32.mat").unlink()
    _make_svhn(tmp_path)
    (tmp_path / "test_32x32.mat").unlink()
    with pytest.raises(DataError, match=r"test_32x32\.mat: file not found"):
        load_dataset("svhn", tmp_path)


# --------------------------------------------------------------------------- image folders


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if image.ndim == 2 else "RGB"
    Image.fromarray(image, mode=mode).save(path)


def _make_folder(root: Path, *, rgb: bool) -> dict[tuple[str, str, str], np.ndarray]:
    """train: cat x3, dog x1, eel x2; test: cat x1, eel x2 (no dog). Images 4x6 (HxW)."""
    rng = np.random.default_rng(5)
    shape = (4, 6, 3) if rgb else (4, 6)
    layout = {"train": {"cat": 3, "dog": 1, "eel": 2}, "test": {"cat": 1, "eel": 2}}
    images = {}
    for split, classes in layout.items():
        for cls, n in classes.items():
            for k in range(n):
                img = rng.integers(0, 256, shape, dtype=np.uint8)
                _save_png(root / split / cls / f"{k:02d}.png", img)
                images[split, cls, f"{k:02d}"] = img
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / ".hidden").mkdir()
    return images


def _chw(img: np.ndarray) -> torch.Tensor:
    return _unit(img[None] if img.ndim == 2 else img.transpose(2, 0, 1))


@pytest.mark.parametrize("rgb", [False, True], ids=["gray", "rgb"])
def test_imagefolder_sorted_classes_round_robin_order(tmp_path: Path, rgb: bool) -> None:
    pytest.importorskip("PIL")
    images = _make_folder(tmp_path, rgb=rgb)
    d = load_dataset("imagefolder", tmp_path)
    assert d.num_classes == 3 and d.input_shape == ((3 if rgb else 1), 4, 6)
    # round robin: cat/00 dog/00 eel/00 cat/01 eel/01 cat/02
    order = [
        ("cat", "00"),
        ("dog", "00"),
        ("eel", "00"),
        ("cat", "01"),
        ("eel", "01"),
        ("cat", "02"),
    ]
    assert d.y_train.tolist() == [["cat", "dog", "eel"].index(c) for c, _ in order]
    for i, (cls, k) in enumerate(order):
        assert torch.equal(d.x_train[i], _chw(images["train", cls, k]))
    assert d.y_test.tolist() == [0, 2, 2]
    assert torch.equal(d.x_test[1], _chw(images["test", "eel", "00"]))
    limited = load_dataset("imagefolder", tmp_path, limit_train=3, limit_test=1)
    assert limited.y_train.tolist() == [0, 1, 2] and limited.y_test.tolist() == [0]
    none = load_dataset("imagefolder", tmp_path, limit_train=0, limit_test=0)
    assert none.x_train.shape == (0, (3 if rgb else 1), 4, 6)


def test_imagefolder_val_folder_and_mixed_modes(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    images = _make_folder(tmp_path, rgb=False)
    (tmp_path / "test").rename(tmp_path / "val")
    rgb = np.random.default_rng(6).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    _save_png(tmp_path / "val" / "dog" / "00.png", rgb)
    d = load_dataset("imagefolder", tmp_path)
    assert d.input_shape == (3, 4, 6)  # one RGB image makes the whole dataset RGB
    assert d.y_test.tolist() == [0, 1, 2, 2]
    assert torch.equal(d.x_test[1], _chw(rgb))
    gray = images["train", "dog", "00"]
    assert torch.equal(d.x_train[1], _chw(np.repeat(gray[:, :, None], 3, axis=2)))


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (
            lambda r: _save_png(r / "test" / "cat" / "09.png", np.zeros((5, 6), np.uint8)),
            r"09\.png: image is 6x5 but .* is 6x4",
        ),
        (
            lambda r: (r / "train" / "dog" / "00.png").write_bytes(b"garbage"),
            r"dog/00\.png: cannot read image",
        ),
        (
            lambda r: _save_png(r / "test" / "fox" / "00.png", np.zeros((4, 6), np.uint8)),
            r"test/fox: class 'fox' does not exist",
        ),
        (
            lambda r: (r / "train" / "dog" / "00.png").unlink(),
            r"train/dog: class folder has no images",
        ),
        (lambda r: [p.unlink() for p in (r / "test").rglob("*.png")], r"test: no images"),
    ],
)
def test_imagefolder_errors_name_the_file(tmp_path: Path, setup, message: str) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("PIL")
    _make_folder(tmp_path, rgb=False)
    setup(tmp_path)
    with pytest.raises(DataError, match=message):
        load_dataset("imagefolder", tmp_path)


def test_imagefolder_missing_split_folders(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no test/ or val/ folder"):
        load_dataset("imagefolder", tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(DataError, match=r"other/train: folder not found"):
        load_dataset("imagefolder", other)


def test_imagefolder_without_pillow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `import PIL` raise ImportError
    with pytest.raises(DataError, match=r"needs Pillow, which is not installed"):
        load_dataset("imagefolder", tmp_path)


# --------------------------------------------------------------------------- test-only loads


def _make_cifar100(root: Path) -> None:
    base = root / "cifar-100-python"
    base.mkdir()
    rng = np.random.default_rng(7)
    for fname, n in (("train", 3), ("test", 2)):
        rows = _cifar_rows(_cifar_images(rng, n))
        _replace_batch(base, fname, {b"data": rows, b"fine_labels": [99, *range(n - 1)]})


def _make_folder_with_every_test_class(root: Path) -> None:
    _make_folder(root, rgb=True)
    (root / "test" / "dog").mkdir()  # no test images, but keeps the class numbering


# name: (make the full directory, training files to remove, the path a train load names)
TEST_ONLY = {
    "mnist": (
        lambda r: _make_idx_dir(r, gz=True),
        ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"],
        "train-images-idx3-ubyte",
    ),
    "cifar10": (
        _make_cifar10,
        [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)],
        "cifar-10-batches-py/data_batch_1",
    ),
    "cifar100": (_make_cifar100, ["cifar-100-python/train"], "cifar-100-python/train"),
    "svhn": (_make_svhn, ["train_32x32.mat"], "train_32x32.mat"),
    "imagefolder": (_make_folder_with_every_test_class, ["train"], "train"),
}


@pytest.mark.parametrize("name", sorted(TEST_ONLY))
def test_test_only_load_needs_only_the_test_files(tmp_path: Path, name: str) -> None:
    if name == "imagefolder":
        pytest.importorskip("PIL")
    make, train_files, named = TEST_ONLY[name]
    make(tmp_path)
    full = load_dataset(name, tmp_path)
    for rel in train_files:
        path = tmp_path / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    d = load_dataset(name, tmp_path, train=False)
    assert d.x_train.shape == (0, *full.input_shape) and d.x_train.dtype == torch.float32
    assert d.y_train.shape == (0,) and d.y_train.dtype == torch.int64
    assert torch.equal(d.x_test, full.x_test) and torch.equal(d.y_test, full.y_test)
    assert (d.name, d.num_classes, d.source) == (full.name, full.num_classes, full.source)
    limited = load_dataset(name, tmp_path, train=False, limit_train=5, limit_test=1)
    assert torch.equal(limited.x_test, full.x_test[:1]) and limited.x_train.shape[0] == 0
    assert load_dataset(name, tmp_path, train=False, limit_test=0).input_shape == full.input_shape
    # asking for the training split still names the missing training file
    with pytest.raises(DataError, match="not found") as info:
        load_dataset(name, tmp_path)
    assert str(info.value).startswith(f"{tmp_path / named}: ")


def test_test_only_load_does_not_open_training_files(tmp_path: Path) -> None:
    _make_idx_dir(tmp_path, gz=False)
    full = load_dataset("mnist", tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"garbage")
    d = load_dataset("mnist", tmp_path, train=False)
    assert torch.equal(d.x_test, full.x_test) and d.x_train.shape == (0, 1, 5, 4)


def test_test_only_imagefolder_keeps_train_class_numbering(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    _make_folder(tmp_path, rgb=False)  # test/ lacks 'dog': classes come from train/
    full = load_dataset("imagefolder", tmp_path)
    (tmp_path / "train" / "dog" / "00.png").write_bytes(b"not opened by a test-only load")
    d = load_dataset("imagefolder", tmp_path, train=False)
    assert d.num_classes == 3 and d.y_test.tolist() == [0, 2, 2]
    assert torch.equal(d.x_test, full.x_test) and d.x_train.shape == (0, 1, 4, 6)
    (tmp_path / "test").rename(tmp_path / "val")
    shutil.rmtree(tmp_path / "train")
    # without train/, the val/ folder names are the classes ('cat', 'eel')
    d = load_dataset("imagefolder", tmp_path, train=False)
    assert d.num_classes == 2 and d.y_test.tolist() == [0, 1, 1]
    for cls in ("cat", "eel"):
        shutil.rmtree(tmp_path / "val" / cls)
    with pytest.raises(DataError, match=r"val: no class folders"):
        load_dataset("imagefolder", tmp_path, train=False)


def test_test_only_digits_and_bad_train_flag() -> None:
    full = load_dataset("digits")
    d = load_dataset("digits", train=False, limit_test=7)
    assert d.x_train.shape == (0, 1, 8, 8) and d.y_train.shape == (0,)
    assert torch.equal(d.x_test, full.x_test[:7]) and torch.equal(d.y_test, full.y_test[:7])
    with pytest.raises(ConfigError, match=r"train must be true or false, got 0"):
        load_dataset("digits", train=0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the registry


def test_dataset_names_and_default_dirs_come_from_the_registry() -> None:
    from bench.registry import DATASETS as formats

    assert tuple(formats.names()) == DATASETS
    builtins = {"digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn", "imagefolder"}
    assert builtins <= set(DATASETS)
    assert all(formats.package(name) == "certbench" for name in builtins)
    assert DEFAULT_DATA_DIRS["mnist"] == "/usr/share/datasets/mnist"
    assert DEFAULT_DATA_DIRS["fashion-mnist"] == str(FASHION_DIR)
    assert not {"digits", "cifar10", "cifar100", "svhn", "imagefolder"} & set(DEFAULT_DATA_DIRS)


def test_a_registered_object_that_is_no_format_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bench.errors import RegistryError
    from bench.registry import DATASETS as formats

    formats.load()
    monkeypatch.setattr(formats, "_entries", dict(formats._entries))

    @formats.register("not-a-format")
    def not_a_format(directory, request):  # type: ignore[no-untyped-def]
        raise AssertionError("never called")

    with pytest.raises(RegistryError, match=r"'not-a-format' \(.*not_a_format\) is not a"):
        load_dataset("not-a-format", "/tmp")


# --------------------------------------------------------------------------- digits, Dataset


def test_digits_fixed_stratified_split() -> None:
    from sklearn.datasets import load_digits

    d = load_dataset("digits")
    assert d.input_shape == (1, 8, 8) and d.num_classes == 10
    assert d.x_train.shape[0] == 1347 and d.x_test.shape[0] == 450
    assert d.source == "sklearn.datasets.load_digits"
    # pixels are k/16: in [0, 1] and hitting both ends
    assert d.x_train.min() == 0.0 and d.x_train.max() == 1.0
    assert torch.equal(torch.round(d.x_train * 16) / 16, d.x_train)
    # the split is a partition of the bundled images (compared as multisets of rows)
    bunch = load_digits()
    ref = sorted(map(tuple, np.c_[bunch.data / 16, bunch.target].round(6).tolist()))
    got = torch.cat([d.x_train.flatten(1), d.x_test.flatten(1)]).double().numpy()
    labels = torch.cat([d.y_train, d.y_test]).numpy()
    assert sorted(map(tuple, np.c_[got, labels].round(6).tolist())) == ref
    # stratified: each class's test share is its count * 0.25 rounded, so within 1 of it
    full = np.bincount(bunch.target, minlength=10)
    assert np.all(np.abs(np.bincount(d.y_test.numpy(), minlength=10) - full * 0.25) <= 1)
    # the same on every call
    again = load_dataset("digits", "/ignored", limit_train=10, limit_test=5)
    assert torch.equal(again.x_train, d.x_train[:10]) and torch.equal(again.y_test, d.y_test[:5])


def test_digits_split_is_scikit_learns_without_importing_it() -> None:
    """The images and split equal load_digits + train_test_split(stratify) exactly, and the
    loader reads sklearn's file without importing sklearn (workers would pay 0.5 s)."""
    import subprocess

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from bench.data.digits import DIGITS_SPLIT_SEED, DIGITS_TEST_SIZE

    bunch = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        bunch.images[:, None] / 16,
        bunch.target,
        test_size=DIGITS_TEST_SIZE,
        random_state=DIGITS_SPLIT_SEED,
        stratify=bunch.target,
    )
    d = load_dataset("digits")
    assert np.array_equal(d.x_train.numpy(), x_tr.astype(np.float32))
    assert np.array_equal(d.x_test.numpy(), x_te.astype(np.float32))
    assert np.array_equal(d.y_train.numpy(), y_tr) and np.array_equal(d.y_test.numpy(), y_te)
    # without the file, load_digits itself: the same dataset
    with mock.patch("bench.data.digits._bundled_file", return_value=None):
        again = load_dataset("digits")
    assert torch.equal(again.x_test, d.x_test) and torch.equal(again.y_train, d.y_train)
    code = (
        "import sys; from bench.data import load_dataset; load_dataset('digits'); "
        "print('sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_stratified_split_is_scikit_learns_on_random_labels() -> None:
    from sklearn.model_selection import train_test_split

    from bench.data.digits import stratified_split

    rng = np.random.default_rng(1)
    compared = 0
    for _ in range(100):
        n, k = int(rng.integers(20, 300)), int(rng.integers(2, 8))
        y = rng.integers(0, k, size=n)
        y[: 2 * k] = np.repeat(np.arange(k), 2)  # every class has 2 members
        test_size, seed = float(rng.uniform(0.1, 0.5)), int(rng.integers(0, 1000))
        try:
            ref = train_test_split(np.arange(n), test_size=test_size, random_state=seed, stratify=y)
        except ValueError:  # fewer test (or train) examples than classes: refused by both
            with pytest.raises(ValueError):
                stratified_split(y, test_size, seed)
            continue
        got = stratified_split(y, test_size, seed)
        assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1]), (n, k, seed)
        compared += 1
    assert compared >= 80
    with pytest.raises(ValueError, match="2 members"):
        stratified_split(np.array([0, 0, 1]), 0.5, 0)


def test_dataset_checks_its_own_shapes() -> None:
    x, y = torch.zeros(2, 1, 3, 3), torch.zeros(2, dtype=torch.int64)
    Dataset("t", x, y, x, y, 2, "s")
    with pytest.raises(ValueError, match="x_train"):
        Dataset("t", x[0], y, x, y, 2, "s")
    with pytest.raises(ValueError, match="y_test"):
        Dataset("t", x, y, x, y[:1], 2, "s")
    with pytest.raises(ValueError, match="differ in shape"):
        Dataset("t", x, y, torch.zeros(2, 1, 4, 4), y, 2, "s")


# --------------------------------------------------------------------------- real files


@pytest.mark.fashion
@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason=f"{FASHION_DIR} is absent")
def test_real_fashion_mnist() -> None:
    assert DEFAULT_DATA_DIRS["fashion-mnist"] == str(FASHION_DIR)
    d = load_dataset("fashion-mnist")
    assert d.x_test.shape == (10000, 1, 28, 28) and d.x_train.shape == (60000, 1, 28, 28)
    assert torch.bincount(d.y_test, minlength=10).tolist() == [1000] * 10
    assert torch.bincount(d.y_train, minlength=10).tolist() == [6000] * 10
    # independent parse of the test set: 16-byte header, then raw bytes; 8-byte label header
    with gzip.open(FASHION_DIR / "t10k-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(10000, 28, 28)
    with gzip.open(FASHION_DIR / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    assert torch.equal(d.x_test[:, 0], _unit(raw))
    assert d.y_test.tolist() == labels.tolist()
