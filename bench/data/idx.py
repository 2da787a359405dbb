"""MNIST-format IDX files: ``mnist`` and ``fashion-mnist``.

The data directory holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each plain or gzip-compressed
(``.gz``); ``train-images.idx3-ubyte`` spellings are accepted too. A test-only load needs
only the two ``t10k`` files. Images are ``(N, 1, H, W)`` (28x28 for both datasets), pixels the
8-bit values divided by 255; labels 0..9. Debian's ``dataset-fashion-mnist`` installs
Fashion-MNIST under ``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from bench.data.base import Dataset, DatasetFormat, LoadRequest, read_splits
from bench.data.files import (
    TRAILING_PROBE,
    check_labels,
    physical_memory,
    pixels_to_unit,
    read_bytes,
)
from bench.errors import DataError
from bench.registry import register_dataset

__all__ = ["FashionMnist", "IdxFormat", "Mnist", "read_idx"]

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
    raw = read_bytes(path, _idx_declared_len, header_bytes=_HEADER_PROBE)
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
    if expected_bytes > physical_memory():
        raise DataError(
            f"{path}: the header declares shape {dims} ({expected_bytes} data bytes), more "
            f"than this machine's memory ({physical_memory()} bytes)"
        )
    if actual < expected_bytes:
        raise DataError(
            f"{path}: truncated: header declares shape {dims} ({expected_bytes} data bytes) "
            f"but the file holds {actual}"
        )
    if actual > expected_bytes:
        extra = actual - expected_bytes
        raise DataError(
            f"{path}: {'at least ' if extra >= TRAILING_PROBE else ''}{extra} unexpected bytes "
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
    directory: Path, name: str, prefix: str, n_keep: Callable[[int], int]
) -> tuple[Tensor, Tensor]:
    """The images and labels of split ``prefix`` (``train``/``t10k``); ``n_keep(n)`` says how
    many of the file's ``n`` examples to keep (all are validated)."""
    img_path = _find_idx_file(directory, name, f"{prefix}-images-idx3-ubyte")
    lab_path = _find_idx_file(directory, name, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx_view(img_path, "images")
    labels = _read_idx_view(lab_path, "labels")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{img_path}: {images.shape[0]} images but {lab_path} has {labels.shape[0]} labels"
        )
    y = check_labels(labels, lab_path, "labels", labels.shape[0], 0, 9)
    n = n_keep(images.shape[0])
    x = pixels_to_unit(images[:n, None], img_path, "images", 255)
    return x, torch.from_numpy(y[:n])


class IdxFormat(DatasetFormat):
    """Ten classes of ``(1, H, W)`` images in the four MNIST-format IDX files."""

    def load(self, directory: Path | None, request: LoadRequest) -> Dataset:
        assert directory is not None
        (x_tr, y_tr), (x_te, y_te) = read_splits(
            request,
            partial(_load_idx_split, directory, self.name, "train"),
            partial(_load_idx_split, directory, self.name, "t10k"),
        )
        if x_tr.shape[1:] != x_te.shape[1:]:
            raise DataError(
                f"{directory}: train images are {tuple(x_tr.shape[2:])} but t10k images are "
                f"{tuple(x_te.shape[2:])}"
            )
        return Dataset(self.name, x_tr, y_tr, x_te, y_te, 10, str(directory))


@register_dataset
class Mnist(IdxFormat):
    """MNIST handwritten digits (LeCun et al.), 60000 train / 10000 test 28x28 images."""

    name = "mnist"
    default_dir = "/usr/share/datasets/mnist"


@register_dataset
class FashionMnist(IdxFormat):
    """Fashion-MNIST (Xiao et al.), 60000 train / 10000 test 28x28 clothing images."""

    name = "fashion-mnist"
    default_dir = "/usr/share/datasets/fashion-mnist"
