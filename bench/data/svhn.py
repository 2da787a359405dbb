"""SVHN cropped digits (MATLAB files): ``svhn``.

The data directory holds ``train_32x32.mat`` and ``test_32x32.mat`` (MATLAB v5; ``X`` is
``(32, 32, 3, N)``, ``y`` is ``(N, 1)`` in 1..10 where 10 means the digit 0, mapped to label
0); a test-only load needs only ``test_32x32.mat``. Images are ``(N, 3, 32, 32)``, pixels the
8-bit values divided by 255. scipy is imported only when a file is read.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bench.data.base import Dataset, DatasetFormat, LoadRequest, read_splits
from bench.data.files import check_labels, pixels_to_unit
from bench.errors import DataError
from bench.registry import register_dataset

__all__ = ["Svhn"]


def _read_svhn_split(path: Path, n_keep: Callable[[int], int]) -> tuple[Tensor, Tensor]:
    """The first ``n_keep(n)`` of the ``n`` examples in ``path`` (all are validated)."""
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
    labels = check_labels(y, path, "'y'", n_all, 1, 10)
    labels[labels == 10] = 0  # SVHN stores the digit 0 as class 10
    n = n_keep(n_all)
    pixels = x[..., :n].transpose(3, 2, 0, 1)  # (H, W, C, N) -> (N, C, H, W)
    return pixels_to_unit(pixels, path, "'X'", 255), torch.from_numpy(labels[:n])


@register_dataset
class Svhn(DatasetFormat):
    """SVHN (Netzer et al. 2011): 73257 train / 26032 test 32x32 house-number digits."""

    name = "svhn"

    def load(self, directory: Path | None, request: LoadRequest) -> Dataset:
        assert directory is not None
        train_path, test_path = directory / "train_32x32.mat", directory / "test_32x32.mat"
        (x_tr, y_tr), (x_te, y_te) = read_splits(
            request, partial(_read_svhn_split, train_path), partial(_read_svhn_split, test_path)
        )
        if x_tr.shape[1:] != x_te.shape[1:]:
            raise DataError(
                f"{test_path}: images are {tuple(x_te.shape[1:])} but {train_path} has "
                f"{tuple(x_tr.shape[1:])}"
            )
        return Dataset(self.name, x_tr, y_tr, x_te, y_te, 10, str(directory))
