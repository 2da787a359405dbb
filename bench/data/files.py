"""Safe reading shared by the dataset formats: files, bounded gzip, pixel and label checks.

Every function raises :class:`~bench.errors.DataError` whose message starts with the path
of the file at fault and says what is wrong with it.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bench.errors import DataError

__all__ = [
    "TRAILING_PROBE",
    "check_labels",
    "check_pixels",
    "file_error",
    "gunzip",
    "physical_memory",
    "pixels_to_unit",
    "read_bytes",
]

TRAILING_PROBE = 4096
"""Decompressed bytes read past a file's declared data, to report trailing garbage."""


def file_error(path: Path, exc: OSError) -> DataError:
    """The :class:`DataError` for an ``OSError`` raised opening or reading ``path``."""
    if isinstance(exc, FileNotFoundError):
        return DataError(f"{path}: file not found")
    return DataError(f"{path}: cannot read ({exc.strerror or exc})")


def gunzip(raw: bytes, path: Path, max_len: int | None) -> bytes:
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


def read_bytes(
    path: Path,
    declared_len: Callable[[bytes], int | None] | None = None,
    *,
    header_bytes: int = 1024,
) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic ``1f 8b``.

    ``declared_len``, given the first ``header_bytes`` decompressed bytes (enough for any
    header of the format), returns how many bytes the format's header declares (``None``: no
    valid header, and only those first bytes are returned); the gzip stream is then inflated
    no further than that plus :data:`TRAILING_PROBE` bytes, and never past the machine's
    physical memory (the parser reports a header that declares more).
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise file_error(path, e) from (None if isinstance(e, FileNotFoundError) else e)
    if raw[:2] != b"\x1f\x8b":
        return raw
    if declared_len is None:
        return gunzip(raw, path, None)
    head = gunzip(raw, path, header_bytes)
    declared = declared_len(head)
    if declared is None:  # no valid header in the probe: the parser reports what is wrong
        return head
    return gunzip(raw, path, min(declared + TRAILING_PROBE, physical_memory()))


def physical_memory() -> int:
    """Bytes of physical memory (a large default where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
        return 1 << 40


def check_pixels(pixels: np.ndarray, path: Path, what: str, scale: float) -> None:
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


def pixels_to_unit(pixels: np.ndarray, path: Path, what: str, scale: float) -> Tensor:
    """``(N, C, H, W)`` numeric pixels in ``[0, scale]`` -> contiguous float32 in ``[0, 1]``
    (each value divided by ``scale`` in float32)."""
    check_pixels(pixels, path, what, scale)
    out = np.empty(pixels.shape, dtype=np.float32)
    np.divide(pixels, np.float32(scale), out=out, casting="unsafe")
    return torch.from_numpy(out)


def check_labels(values: Any, path: Path, what: str, n: int, lo: int, hi: int) -> np.ndarray:
    """Validate ``n`` integer labels in ``lo..hi`` (inclusive); return them as ``(n,)`` int64.

    A ``(n, 1)`` or ``(1, n)`` column is accepted; integral floats are accepted.
    """
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
