"""Dataset loaders: standard files from a data directory, never the network.

:func:`load_dataset` returns a :class:`Dataset` whose images are ``(N, C, H, W)`` float32
tensors with pixels in ``[0, 1]`` (raw 8-bit values divided by 255; the 8x8 digits' 0..16
values divided by 16) and whose labels are ``(N,)`` int64 tensors in ``[0, num_classes)``.
No normalisation with data statistics is applied: defenses see raw ``[0, 1]`` pixels.

Supported formats (``DATASETS``):

``digits``
    scikit-learn's bundled 8x8 digits (1797 images, 10 classes, ``(1, 8, 8)``), no files
    needed. Split once, the same for every run: ``train_test_split(test_size=0.25,
    random_state=0, stratify=labels)`` -> 1347 train / 450 test images.
``mnist``, ``fashion-mnist``
    MNIST-format IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` in the data directory, each plain
    or gzip-compressed (``.gz``); ``train-images.idx3-ubyte`` spellings are accepted too.
    Debian's ``dataset-fashion-mnist`` installs Fashion-MNIST under
    ``/usr/share/datasets/fashion-mnist``.
``cifar10``, ``cifar100``
    The python-pickle releases: a directory holding ``cifar-10-batches-py/``
    (``data_batch_1`` .. ``data_batch_5``, ``test_batch``) or ``cifar-100-python/``
    (``train``, ``test``; the 100 ``fine_labels`` are used), or those files directly.
    Pickles are read with a restricted unpickler that can build only dicts, lists,
    str/bytes, numbers and numpy arrays; any other global (``os.system`` ...) is refused
    with a :class:`~bench.errors.DataError` before anything runs.
``svhn``
    ``train_32x32.mat`` and ``test_32x32.mat`` (MATLAB v5; ``X`` is ``(32, 32, 3, N)``,
    ``y`` is ``(N, 1)`` in 1..10 where 10 means the digit 0, mapped to label 0).
``imagefolder``
    ``DIR/train/<class>/*.png|jpg|...`` and ``DIR/test/<class>/...`` (or ``DIR/val/``;
    ``test/`` wins when both exist). Classes are the sorted ``train/`` folder names. Images
    are read with Pillow (imported only here), as 8-bit grayscale when every image is
    ``L``/``1`` mode and as RGB otherwise; all must have the same size (no resizing).
    Examples are ordered round-robin over classes (first image of each class, then the
    second, ...; files sorted by name), so "the first N" is balanced across classes.

Every malformed or missing input raises :class:`~bench.errors.DataError` naming the file or
directory and what is wrong; an unknown dataset name or a bad ``limit_*`` raises
:class:`~bench.errors.ConfigError`. Nothing is cached on disk.
"""

from __future__ import annotations

import os
import pickle
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from bench.errors import ConfigError, DataError

__all__ = [
    "DATASETS",
    "DEFAULT_DATA_DIRS",
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_SIZE",
    "Dataset",
    "load_dataset",
    "read_idx",
]

DATASETS: tuple[str, ...] = (
    "digits",
    "mnist",
    "fashion-mnist",
    "cifar10",
    "cifar100",
    "svhn",
    "imagefolder",
)

#: Standard install locations, used when no data directory is given. Datasets missing here
#: (cifar10, cifar100, svhn, imagefolder) need an explicit ``data_dir``; digits needs none.
DEFAULT_DATA_DIRS: dict[str, str] = {
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
}

#: The fixed digits split: fraction held out for test, and the split's random_state.
DIGITS_TEST_SIZE = 0.25
DIGITS_SPLIT_SEED = 0

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
)


@dataclass
class Dataset:
    """A train/test pair of labelled images.

    Attributes:
        name: the dataset name (one of ``DATASETS``).
        x_train: ``(N_train, C, H, W)`` float32, pixels in ``[0, 1]``.
        y_train: ``(N_train,)`` int64 labels in ``[0, num_classes)``.
        x_test: ``(N_test, C, H, W)`` float32, pixels in ``[0, 1]``.
        y_test: ``(N_test,)`` int64 labels in ``[0, num_classes)``.
        num_classes: number of classes (labels the task can have, not only those present).
        source: the file or directory the data came from (``sklearn.datasets.load_digits``
            for digits), recorded for provenance.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    source: str

    def __post_init__(self) -> None:
        for split, x, y in (
            ("train", self.x_train, self.y_train),
            ("test", self.x_test, self.y_test),
        ):
            if x.ndim != 4 or x.dtype != torch.float32:
                raise ValueError(
                    f"x_{split} must be a (N, C, H, W) float32 tensor, "
                    f"got {tuple(x.shape)} {x.dtype}"
                )
            if y.ndim != 1 or y.dtype != torch.int64 or y.shape[0] != x.shape[0]:
                raise ValueError(
                    f"y_{split} must be a ({x.shape[0]},) int64 tensor, "
                    f"got {tuple(y.shape)} {y.dtype}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"train images {tuple(self.x_train.shape[1:])} and test images "
                f"{tuple(self.x_test.shape[1:])} differ in shape"
            )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = (int(s) for s in self.x_train.shape[1:])
        return (c, h, w)


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> Dataset:
    """Load dataset ``name`` from ``data_dir`` (default: ``DEFAULT_DATA_DIRS[name]``).

    Args:
        name: one of ``DATASETS``.
        data_dir: the directory holding the dataset's standard files. Ignored for
            ``digits`` (bundled with scikit-learn). Required for datasets without a
            standard location.
        limit_train: keep only the first ``limit_train`` training examples (None: all).
        limit_test: keep only the first ``limit_test`` test examples (None: all).

    Returns:
        A :class:`Dataset`; images ``(N, C, H, W)`` float32 in ``[0, 1]``, labels int64.

    Raises:
        ConfigError: unknown ``name``, or a limit that is not a non-negative integer.
        DataError: missing directory or file, or a malformed file (the message names it).
    """
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    limits = (_check_limit("limit_train", limit_train), _check_limit("limit_test", limit_test))
    if name == "digits":
        return _load_digits(*limits)
    directory = _resolve_dir(name, data_dir)
    return _LOADERS[name](name, directory, *limits)


def read_idx(path: str | Path, *, kind: Literal["images", "labels"] | None = None) -> np.ndarray:
    """Read one IDX file (the MNIST format), plain or gzip-compressed.

    The header is a 4-byte big-endian magic ``0x0000TTDD`` (``TT`` the element type, ``DD``
    the number of dimensions) followed by ``DD`` big-endian uint32 sizes; the data follows
    in C order, big-endian. The file must hold exactly the declared number of bytes.

    Args:
        path: the file; gzip is detected from its first bytes, not its name.
        kind: ``"images"`` requires magic ``0x00000803`` (uint8, 3-D), ``"labels"``
            requires ``0x00000801`` (uint8, 1-D); None accepts any valid IDX type.

    Returns:
        A writable native-endian array with the declared shape and element type.

    Raises:
        DataError: unreadable file, bad magic number, or truncated / oversized data.
    """
    return np.array(_read_idx_view(Path(path), kind))


# --------------------------------------------------------------------------- helpers


def _check_limit(field: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"{field} must be a non-negative integer or None, got {value!r}")
    return int(value)


def _resolve_dir(name: str, data_dir: str | Path | None) -> Path:
    if data_dir is None:
        default = DEFAULT_DATA_DIRS.get(name)
        if default is None:
            raise DataError(f"dataset {name} has no standard data directory; pass --data-dir DIR")
        data_dir = default
    directory = Path(data_dir).expanduser()
    if not directory.exists():
        raise DataError(
            f"data directory {directory} does not exist (dataset {name}; pass --data-dir)"
        )
    if not directory.is_dir():
        raise DataError(f"data directory {directory} is not a directory (dataset {name})")
    return directory.resolve()


def _first(n: int, limit: int | None) -> int:
    return n if limit is None else min(n, limit)


def _gunzip(raw: bytes, path: Path, max_len: int | None) -> bytes:
    """Decompress (possibly multi-member) gzip ``raw``; stop after ``max_len`` bytes.

    Bounding the output keeps a small file that inflates to gigabytes (a "gzip bomb") from
    exhausting memory: callers ask for what the format's header declares, plus a margin.
    """
    out = bytearray()
    data = raw
    try:
        while data:
            d = zlib.decompressobj(wbits=31)
            room = 0 if max_len is None else max(1, max_len - len(out))
            out += d.decompress(data, room)  # room 0: no limit
            if max_len is not None and len(out) >= max_len:
                return bytes(out[:max_len])
            if not d.eof:
                raise EOFError("compressed file ended before the end-of-stream marker")
            data = d.unused_data
            if data[:2] != b"\x1f\x8b":  # trailing garbage after the last member
                break
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt gzip data ({e})") from e
    return bytes(out)


def _read_bytes(path: Path, declared_len: Callable[[bytes], int | None] | None = None) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic ``1f 8b``.

    ``declared_len``, given the first decompressed bytes (up to :data:`_HEADER_PROBE`),
    returns how many bytes the format's header declares (``None``: no valid header, and only
    those first bytes are returned); the gzip stream is then inflated no further than that plus
    :data:`_TRAILING_PROBE` bytes, and never past the machine's physical memory (the parser
    reports a header that declares more).
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    if raw[:2] != b"\x1f\x8b":
        return raw
    if declared_len is None:
        return _gunzip(raw, path, None)
    head = _gunzip(raw, path, _HEADER_PROBE)
    declared = declared_len(head)
    if declared is None:  # no valid header in the probe: the parser reports what is wrong
        return head
    return _gunzip(raw, path, min(declared + _TRAILING_PROBE, _physical_memory()))


def _physical_memory() -> int:
    """Bytes of physical memory (a large default where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
        return 1 << 40


def _check_pixels(pixels: np.ndarray, path: Path, what: str, scale: float) -> None:
    """Require numeric, finite pixels in ``[0, scale]`` (uint8 with scale 255 always is)."""
    if pixels.dtype.kind not in "uif":
        raise DataError(f"{path}: {what} has dtype {pixels.dtype}, expected numeric pixels")
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        bad = np.argwhere(~np.isfinite(pixels))[0]
        raise DataError(
            f"{path}: {what} has a non-finite pixel (NaN or inf) at index {tuple(bad.tolist())}"
        )
    if pixels.size and not (pixels.dtype == np.uint8 and scale == 255):
        lo, hi = pixels.min(), pixels.max()
        if lo < 0 or hi > scale:
            raise DataError(f"{path}: {what} pixel values span [{lo}, {hi}], expected 0..{scale:g}")


def _pixels_to_unit(pixels: np.ndarray, path: Path, what: str, scale: float) -> Tensor:
    """``(N, C, H, W)`` numeric pixels in ``[0, scale]`` -> contiguous float32 in ``[0, 1]``."""
    _check_pixels(pixels, path, what, scale)
    out = np.empty(pixels.shape, dtype=np.float32)
    np.divide(pixels, np.float32(scale), out=out, casting="unsafe")
    return torch.from_numpy(out)


def _labels(values: Any, path: Path, what: str, n: int, lo: int, hi: int) -> np.ndarray:
    """Validate ``n`` integer labels in ``lo..hi`` (inclusive); return them as int64."""
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError) as e:
        raise DataError(f"{path}: {what} is not an array of integers ({e})") from e
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise DataError(f"{path}: {what} has shape {arr.shape}, expected ({n},)")
    if arr.shape[0] != n:
        raise DataError(f"{path}: {what} has {arr.shape[0]} labels but there are {n} images")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise DataError(f"{path}: {what} contains non-integer values")
    elif arr.dtype.kind not in "iu":
        raise DataError(f"{path}: {what} has dtype {arr.dtype}, expected integers")
    if n:
        bad = np.flatnonzero((arr < lo) | (arr > hi))
        if bad.size:
            i = int(bad[0])
            value = arr[i].item()
            raise DataError(
                f"{path}: {what}[{i}] = {value:g} is out of range {lo}..{hi}"
                if isinstance(value, float)
                else f"{path}: {what}[{i}] = {value} is out of range {lo}..{hi}"
            )
    return arr.astype(np.int64)


# --------------------------------------------------------------------------- digits


def _load_digits(limit_train: int | None, limit_test: int | None) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)[:, None]  # (1797, 1, 8, 8), 0..16
    target = np.asarray(bunch.target)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images,
        target,
        test_size=DIGITS_TEST_SIZE,
        random_state=DIGITS_SPLIT_SEED,
        stratify=target,
    )
    source = Path("sklearn.datasets.load_digits")
    n_tr, n_te = _first(len(x_tr), limit_train), _first(len(x_te), limit_test)
    return Dataset(
        name="digits",
        x_train=_pixels_to_unit(x_tr[:n_tr], source, "images", 16),
        y_train=torch.from_numpy(_labels(y_tr[:n_tr], source, "target", n_tr, 0, 9)),
        x_test=_pixels_to_unit(x_te[:n_te], source, "images", 16),
        y_test=torch.from_numpy(_labels(y_te[:n_te], source, "target", n_te, 0, 9)),
        num_classes=10,
        source=str(source),
    )


# --------------------------------------------------------------------------- IDX

_IDX_TYPES: Mapping[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_KIND_MAGIC = {"images": 0x00000803, "labels": 0x00000801}


_HEADER_PROBE = 4 + 4 * 255
"""Decompressed bytes enough for any IDX header (4 magic bytes + up to 255 dimensions)."""
_TRAILING_PROBE = 4096
"""Decompressed bytes read past a file's declared data, to report trailing garbage."""


def _idx_declared_len(head: bytes) -> int | None:
    """Header + data bytes an IDX header declares, or ``None`` if ``head`` is no IDX header."""
    if len(head) < 4 or head[2] not in _IDX_TYPES or head[3] == 0 or len(head) < 4 + 4 * head[3]:
        return None
    dims = np.frombuffer(head, dtype=">u4", count=head[3], offset=4)
    return 4 + 4 * head[3] + int(np.prod(dims, dtype=object)) * _IDX_TYPES[head[2]].itemsize


def _read_idx_view(path: Path, kind: str | None) -> np.ndarray:
    """Parse an IDX file; the result may be a read-only view of the file's bytes.

    A gzip file is inflated only as far as its header declares (plus a little, to notice
    trailing bytes), so a small file cannot inflate to more memory than its header asks for.
    """
    raw = _read_bytes(path, _idx_declared_len)
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if kind is not None:
        expected = _IDX_KIND_MAGIC[kind]
        if magic != expected:
            raise DataError(
                f"{path}: bad magic number 0x{magic:08x} (expected 0x{expected:08x} for IDX {kind})"
            )
    elif raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise DataError(
            f"{path}: bad magic number 0x{magic:08x} (not an IDX file: expected 0x0000TTDD, "
            f"type TT in {', '.join(f'{t:02x}' for t in _IDX_TYPES)}, DD >= 1 dimensions)"
        )
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{path}: truncated header ({len(raw)} bytes; {ndim} dimensions need {header})"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(dims, dtype=object))
    expected_bytes, actual = count * dtype.itemsize, len(raw) - header
    if expected_bytes > _physical_memory():
        raise DataError(
            f"{path}: the header declares shape {dims} ({expected_bytes} data bytes), more "
            f"than this machine's memory ({_physical_memory()} bytes)"
        )
    if actual < expected_bytes:
        raise DataError(
            f"{path}: truncated: header declares shape {dims} ({expected_bytes} data bytes) "
            f"but the file holds {actual}"
        )
    if actual > expected_bytes:
        extra = actual - expected_bytes
        raise DataError(
            f"{path}: {'at least ' if extra >= _TRAILING_PROBE else ''}{extra} unexpected bytes "
            f"after the {dims} data declared by the header"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return arr if dtype.itemsize == 1 else arr.astype(dtype.newbyteorder("="))


def _find_idx_file(directory: Path, name: str, stem: str) -> Path:
    dotted = stem.replace("-idx", ".idx")
    for candidate in (stem, stem + ".gz", dotted, dotted + ".gz"):
        path = directory / candidate
        if path.is_file():
            return path
    raise DataError(
        f"{directory / stem}: file not found (also tried {stem}.gz, {dotted}[.gz]; dataset {name})"
    )


def _load_idx_split(
    directory: Path, name: str, prefix: str, limit: int | None
) -> tuple[Tensor, Tensor]:
    img_path = _find_idx_file(directory, name, f"{prefix}-images-idx3-ubyte")
    lab_path = _find_idx_file(directory, name, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx_view(img_path, "images")
    labels = _read_idx_view(lab_path, "labels")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{img_path}: {images.shape[0]} images but {lab_path} has {labels.shape[0]} labels"
        )
    y = _labels(labels, lab_path, "labels", labels.shape[0], 0, 9)
    n = _first(images.shape[0], limit)
    x = _pixels_to_unit(images[:n, None], img_path, "images", 255)
    return x, torch.from_numpy(y[:n])


def _load_idx(
    name: str, directory: Path, limit_train: int | None, limit_test: int | None
) -> Dataset:
    x_tr, y_tr = _load_idx_split(directory, name, "train", limit_train)
    x_te, y_te = _load_idx_split(directory, name, "t10k", limit_test)
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(
            f"{directory}: train images are {tuple(x_tr.shape[2:])} but t10k images are "
            f"{tuple(x_te.shape[2:])}"
        )
    return Dataset(name, x_tr, y_tr, x_te, y_te, 10, str(directory))


# --------------------------------------------------------------------------- CIFAR


class _ForbiddenGlobalError(pickle.UnpicklingError):
    pass


def _numpy_pickle_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR pickle may name: what numpy arrays need to unpickle.

    ``_reconstruct``/``ndarray``/``dtype`` are how numpy pickles an array with protocols
    0-4 (the CIFAR files are Python 2 protocol-2 pickles); ``_frombuffer`` is protocol 5.
    None of them can run code: they allocate an array or parse a dtype description.
    """
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2 (and the 1.26 shims)
    except ImportError:  # pragma: no cover - numpy < 1.26
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray}
    allowed["numpy", "dtype"] = np.dtype
    for package in ("numpy.core", "numpy._core"):
        allowed[f"{package}.multiarray", "_reconstruct"] = multiarray._reconstruct
        allowed[f"{package}.numeric", "_frombuffer"] = numeric._frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` resolves only the numpy-array globals."""

    def __init__(self, file: Any, allowed: dict[tuple[str, str], Any]) -> None:
        super().__init__(file, encoding="latin1")
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[module, name]
        except KeyError:
            raise _ForbiddenGlobalError(f"{module}.{name}") from None


def _unpickle_dict(path: Path) -> dict[Any, Any]:
    """Read a CIFAR batch with the restricted unpickler; it must be a dict."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    with f:
        try:
            obj = _RestrictedUnpickler(f, _numpy_pickle_globals()).load()
        except _ForbiddenGlobalError as e:
            raise DataError(
                f"{path}: refusing to unpickle: it references {e}, which a CIFAR pickle may "
                f"not contain (allowed: dicts, lists, str/bytes, numbers, numpy arrays)"
            ) from None
        except MemoryError:
            raise DataError(
                f"{path}: the pickle declares an object too large to load (corrupt file?)"
            ) from None
        except Exception as e:  # a malformed pickle can fail in many ways; name the file
            raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _get_key(batch: dict[Any, Any], path: Path, key: str) -> Any:
    for k in (key, key.encode()):
        if k in batch:
            return batch[k]
    keys = ", ".join(sorted(repr(k) for k in batch))
    raise DataError(f"{path}: missing key {key!r} (keys present: {keys or 'none'})")


def _read_cifar_batch(
    path: Path, label_key: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle_dict(path)
    data = _get_key(batch, path, "data")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072:
        shape = data.shape if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' is {shape}, expected a (N, 3072) array")
    _check_pixels(data, path, "'data'", 255)
    labels = _labels(
        _get_key(batch, path, label_key), path, repr(label_key), data.shape[0], 0, num_classes - 1
    )
    return data, labels


def _load_cifar(
    name: str, directory: Path, limit_train: int | None, limit_test: int | None
) -> Dataset:
    if name == "cifar10":
        sub, train_files, test_file, label_key, k = (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            "test_batch",
            "labels",
            10,
        )
    else:
        sub, train_files, test_file, label_key, k = (
            "cifar-100-python",
            ["train"],
            "test",
            "fine_labels",
            100,
        )
    base = directory / sub if (directory / sub).is_dir() else directory
    splits = []
    for files, limit in ((train_files, limit_train), ([test_file], limit_test)):
        parts = [_read_cifar_batch(base / f, label_key, k) for f in files]
        data = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        labels = np.concatenate([p[1] for p in parts])
        n = _first(data.shape[0], limit)
        # rows are 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane
        x = _pixels_to_unit(data[:n].reshape(n, 3, 32, 32), base / files[0], "'data'", 255)
        splits.append((x, torch.from_numpy(labels[:n])))
    (x_tr, y_tr), (x_te, y_te) = splits
    return Dataset(name, x_tr, y_tr, x_te, y_te, k, str(base))


# --------------------------------------------------------------------------- SVHN


def _read_svhn_split(path: Path, limit: int | None) -> tuple[Tensor, Tensor]:
    import scipy.io

    if not path.is_file():
        raise DataError(f"{path}: file not found (dataset svhn)")
    try:
        mat = scipy.io.loadmat(str(path), variable_names=("X", "y"))
    except NotImplementedError as e:  # MATLAB v7.3 (HDF5) files
        raise DataError(f"{path}: unsupported .mat version ({e}); save as MATLAB v5") from e
    except MemoryError:
        raise DataError(f"{path}: the .mat file declares arrays too large to load") from None
    except Exception as e:  # scipy raises many types for corrupt files; name the file
        raise DataError(f"{path}: not a readable .mat file ({type(e).__name__}: {e})") from e
    for key in ("X", "y"):
        if key not in mat:
            raise DataError(f"{path}: missing variable {key!r}")
    x, y = mat["X"], mat["y"]
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[2] != 3:
        shape = x.shape if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{path}: 'X' is {shape}, expected (H, W, 3, N)")
    n_all = x.shape[3]
    labels = _labels(y, path, "'y'", n_all, 1, 10)
    labels[labels == 10] = 0  # SVHN stores the digit 0 as class 10
    n = _first(n_all, limit)
    pixels = x[..., :n].transpose(3, 2, 0, 1)  # (H, W, C, N) -> (N, C, H, W)
    return _pixels_to_unit(pixels, path, "'X'", 255), torch.from_numpy(labels[:n])


def _load_svhn(
    name: str, directory: Path, limit_train: int | None, limit_test: int | None
) -> Dataset:
    train_path, test_path = directory / "train_32x32.mat", directory / "test_32x32.mat"
    x_tr, y_tr = _read_svhn_split(train_path, limit_train)
    x_te, y_te = _read_svhn_split(test_path, limit_test)
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(
            f"{test_path}: images are {tuple(x_te.shape[1:])} but {train_path} has "
            f"{tuple(x_tr.shape[1:])}"
        )
    return Dataset(name, x_tr, y_tr, x_te, y_te, 10, str(directory))


# --------------------------------------------------------------------------- image folders


def _class_files(split_dir: Path) -> dict[str, list[Path]]:
    """``{class name: sorted image files}`` for the visible sub-folders of ``split_dir``."""
    classes = {}
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        classes[d.name] = sorted(
            f
            for f in d.iterdir()
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS
        )
    return classes


def _round_robin(per_class: list[list[Path]]) -> list[tuple[Path, int]]:
    order = []
    for k in range(max((len(files) for files in per_class), default=0)):
        order.extend((files[k], c) for c, files in enumerate(per_class) if k < len(files))
    return order


def _read_images(items: list[tuple[Path, int]], image_module: Any) -> np.ndarray:
    """Decode ``items`` to a ``(N, H, W)`` or ``(N, H, W, 3)`` uint8 array (same size)."""
    modes = []
    size, first = None, None
    for path, _ in items:
        try:
            with image_module.open(path) as img:
                mode, img_size = img.mode, img.size
        except (OSError, ValueError, SyntaxError, image_module.DecompressionBombError) as e:
            raise DataError(f"{path}: cannot read image ({e})") from e
        if size is None:
            size, first = img_size, path
        elif img_size != size:
            raise DataError(
                f"{path}: image is {img_size[0]}x{img_size[1]} but {first} is "
                f"{size[0]}x{size[1]}; all images must have the same size"
            )
        modes.append(mode)
    target = "L" if all(m in ("1", "L") for m in modes) else "RGB"
    arrays = []
    for path, _ in items:
        try:
            with image_module.open(path) as img:
                arrays.append(np.asarray(img.convert(target), dtype=np.uint8))
        except (OSError, ValueError, SyntaxError, image_module.DecompressionBombError) as e:
            raise DataError(f"{path}: cannot decode image ({e})") from e
    return np.stack(arrays)


def _load_imagefolder(
    name: str, directory: Path, limit_train: int | None, limit_test: int | None
) -> Dataset:
    try:
        from PIL import Image
    except ImportError as e:
        raise DataError(
            f"{directory}: reading an image folder needs Pillow, which is not installed "
            f"(pip install pillow)"
        ) from e
    train_dir = directory / "train"
    if not train_dir.is_dir():
        raise DataError(f"{train_dir}: folder not found (dataset imagefolder needs train/<class>/)")
    test_dir = next((directory / s for s in ("test", "val") if (directory / s).is_dir()), None)
    if test_dir is None:
        raise DataError(f"{directory}: no test/ or val/ folder (dataset imagefolder)")
    train_classes = _class_files(train_dir)
    if not train_classes:
        raise DataError(f"{train_dir}: no class folders")
    for cls, files in train_classes.items():
        if not files:
            raise DataError(
                f"{train_dir / cls}: class folder has no images "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
    index = {cls: i for i, cls in enumerate(train_classes)}
    test_classes = _class_files(test_dir)
    for cls in test_classes:
        if cls not in index:
            raise DataError(
                f"{test_dir / cls}: class {cls!r} does not exist in {train_dir} "
                f"(known: {', '.join(index)})"
            )
    test_per_class = [test_classes.get(cls, []) for cls in train_classes]
    if not any(test_per_class):
        raise DataError(f"{test_dir}: no images")

    items_tr = _round_robin(list(train_classes.values()))
    items_te = _round_robin(test_per_class)
    items_tr = items_tr[: _first(len(items_tr), limit_train)]
    items_te = items_te[: _first(len(items_te), limit_test)]
    # decode both splits together so they share one size check and one colour mode; with
    # both limits 0, decode one training image anyway to learn the (C, H, W) shape
    items = items_tr + items_te
    pixels = _read_images(items or _round_robin(list(train_classes.values()))[:1], Image)
    pixels = pixels[: len(items)]
    # (N, H, W) -> (N, 1, H, W); (N, H, W, 3) -> (N, 3, H, W)
    pixels = pixels[:, None] if pixels.ndim == 3 else pixels.transpose(0, 3, 1, 2)
    x = _pixels_to_unit(pixels, directory, "images", 255)
    y = torch.tensor([c for _, c in items_tr + items_te], dtype=torch.int64)
    n = len(items_tr)
    return Dataset(name, x[:n].clone(), y[:n], x[n:].clone(), y[n:], len(index), str(directory))


_Loader = Callable[[str, Path, int | None, int | None], Dataset]
_LOADERS: dict[str, _Loader] = {
    "mnist": _load_idx,
    "fashion-mnist": _load_idx,
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "svhn": _load_svhn,
    "imagefolder": _load_imagefolder,
}
