"""Dataset loaders: standard files from a data directory, never the network.

:func:`load_dataset` returns a :class:`Dataset` whose images are ``(N, C, H, W)`` float32
tensors with pixels in ``[0, 1]`` (raw 8-bit values divided by 255; the 8x8 digits' 0..16
values divided by 16) and whose labels are ``(N,)`` int64 tensors in ``[0, num_classes)``.
No normalisation with data statistics is applied: defenses see raw ``[0, 1]`` pixels.
``load_dataset(..., train=False)`` loads only the test split (training files may be absent).

Formats are registered in ``bench.registry.DATASETS`` (entry-point group
``certbench.datasets``), one module per format; certbench's ``pyproject.toml`` lists the
built-ins:

=============================  ====================  =======================================
module                         names                 files
=============================  ====================  =======================================
:mod:`bench.data.digits`       digits                none (bundled with scikit-learn)
:mod:`bench.data.idx`          mnist, fashion-mnist  MNIST-format IDX, plain or gzip
:mod:`bench.data.cifar`        cifar10, cifar100     python pickles (restricted unpickler)
:mod:`bench.data.svhn`         svhn                  ``train_32x32.mat``, ``test_32x32.mat``
:mod:`bench.data.imagefolder`  imagefolder           ``train/<class>/``, ``test/<class>/``
=============================  ====================  =======================================

Adding a format is one module defining a :class:`DatasetFormat` subclass decorated with
``@register_dataset``, plus its line in an entry-point table; :mod:`bench.data.files` has
the shared safe readers (bounded gzip, pixel and label checks).

Every malformed or missing input raises :class:`~bench.errors.DataError` naming the file or
directory and what is wrong; an unknown dataset name or a bad ``limit_*`` raises
:class:`~bench.errors.ConfigError`. Nothing is cached on disk.

``DATASETS`` (the registered names) and ``DEFAULT_DATA_DIRS`` (name -> standard location)
are computed from the registry when read, so they include third-party formats.
"""

from __future__ import annotations

import importlib
from typing import Any

from bench.data.base import (
    Dataset,
    DatasetFormat,
    LoadRequest,
    Split,
    dataset_format,
    empty_split,
    load_dataset,
    read_splits,
)
from bench.registry import DATASETS as _FORMATS

__all__ = [
    "DATASETS",
    "DEFAULT_DATA_DIRS",
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_SIZE",
    "IMAGE_EXTENSIONS",
    "Dataset",
    "DatasetFormat",
    "LoadRequest",
    "Split",
    "dataset_format",
    "empty_split",
    "load_dataset",
    "read_idx",
    "read_splits",
]

# Names of the format modules, imported on first use: importing bench.data (as a plugin
# does) must not register the built-in formats; the registry imports them, as built-ins.
_LAZY = {
    "DIGITS_SPLIT_SEED": "bench.data.digits",
    "DIGITS_TEST_SIZE": "bench.data.digits",
    "IMAGE_EXTENSIONS": "bench.data.imagefolder",
    "read_idx": "bench.data.idx",
}


def __getattr__(name: str) -> Any:
    """The format modules' names, and ``DATASETS`` / ``DEFAULT_DATA_DIRS`` read from the
    registry on each access (so they include third-party formats)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in ("DATASETS", "DEFAULT_DATA_DIRS"):
        names = tuple(_FORMATS.names())
        if name == "DATASETS":
            return names
        defaults = {n: getattr(_FORMATS.get(n), "default_dir", None) for n in names}
        return {n: d for n, d in defaults.items() if d is not None}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
