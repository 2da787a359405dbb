"""The CIFAR python-pickle releases: ``cifar10`` and ``cifar100``.

The data directory holds ``cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``,
``test_batch``) or ``cifar-100-python/`` (``train``, ``test``; the 100 ``fine_labels`` are
used), or those files directly; a test-only load needs only ``test_batch`` / ``test``.
Images are ``(N, 3, 32, 32)``, pixels the 8-bit values divided by 255.

Pickles are read with a restricted unpickler that can build only dicts, lists, str/bytes,
numbers and numpy arrays; any other global (``os.system`` ...) is refused with a
:class:`~bench.errors.DataError` before anything runs.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from bench.data.base import Dataset, DatasetFormat, LoadRequest, read_splits
from bench.data.files import check_labels, check_pixels, file_error, pixels_to_unit
from bench.errors import DataError
from bench.registry import register_dataset

__all__ = ["Cifar10", "Cifar100", "CifarFormat"]


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
    except OSError as e:
        raise file_error(path, e) from (None if isinstance(e, FileNotFoundError) else e)
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
    check_pixels(data, path, "'data'", 255)
    labels = check_labels(
        _get_key(batch, path, label_key), path, repr(label_key), data.shape[0], 0, num_classes - 1
    )
    return data, labels


class CifarFormat(DatasetFormat):
    """A CIFAR release: ``train_files`` and ``test_file`` in ``subdir`` (or the directory)."""

    subdir: ClassVar[str]
    train_files: ClassVar[tuple[str, ...]]
    test_file: ClassVar[str]
    label_key: ClassVar[str]
    num_classes: ClassVar[int]

    def load(self, directory: Path | None, request: LoadRequest) -> Dataset:
        assert directory is not None
        base = directory / self.subdir if (directory / self.subdir).is_dir() else directory
        (x_tr, y_tr), (x_te, y_te) = read_splits(
            request,
            partial(self._split, base, self.train_files),
            partial(self._split, base, (self.test_file,)),
        )
        return Dataset(self.name, x_tr, y_tr, x_te, y_te, self.num_classes, str(base))

    def _split(
        self, base: Path, files: tuple[str, ...], n_keep: Callable[[int], int]
    ) -> tuple[Tensor, Tensor]:
        """The first ``n_keep(n)`` of the ``n`` examples in ``files`` (all are validated)."""
        parts = [_read_cifar_batch(base / f, self.label_key, self.num_classes) for f in files]
        data = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        labels = np.concatenate([p[1] for p in parts])
        n = n_keep(data.shape[0])
        # rows are 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane
        x = pixels_to_unit(data[:n].reshape(n, 3, 32, 32), base / files[0], "'data'", 255)
        return x, torch.from_numpy(labels[:n])


@register_dataset
class Cifar10(CifarFormat):
    """CIFAR-10 (Krizhevsky 2009): 50000 train / 10000 test 32x32 colour images, 10 classes."""

    name = "cifar10"
    subdir = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_file = "test_batch"
    label_key = "labels"
    num_classes = 10


@register_dataset
class Cifar100(CifarFormat):
    """CIFAR-100 (Krizhevsky 2009): 50000 train / 10000 test 32x32 colour images, 100 fine
    classes."""

    name = "cifar100"
    subdir = "cifar-100-python"
    train_files = ("train",)
    test_file = "test"
    label_key = "fine_labels"
    num_classes = 100
