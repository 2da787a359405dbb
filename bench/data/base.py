"""The dataset contract: :class:`Dataset`, :class:`DatasetFormat` and :func:`load_dataset`.

A dataset format is a :class:`DatasetFormat` subclass registered with
:func:`bench.registry.register_dataset` in a module listed under the ``certbench.datasets``
entry-point group. It declares its ``name``, its standard data directory (``default_dir``;
``None`` when the user must name one) and whether it reads files at all (``needs_dir``), and
implements :meth:`DatasetFormat.load`. :func:`load_dataset` looks the name up in the registry,
checks the arguments, resolves the directory and calls ``load``; it knows no format by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from bench.errors import ConfigError, DataError, RegistryError
from bench.registry import DATASETS as DATASET_FORMATS
from bench.validation import check_bool, check_int

Split = tuple[Tensor, Tensor]
"""``(x, y)``: ``(N, C, H, W)`` float32 images in ``[0, 1]`` and ``(N,)`` int64 labels."""


@dataclass
class Dataset:
    """A train/test pair of labelled images.

    Attributes:
        name: the dataset name (a name registered in ``bench.registry.DATASETS``).
        x_train: ``(N_train, C, H, W)`` float32, pixels in ``[0, 1]`` (``N_train`` is 0 for
            a test-only load).
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


@dataclass(frozen=True)
class LoadRequest:
    """What :func:`load_dataset` asks a format for (already validated).

    Attributes:
        limit_train: keep only the first ``limit_train`` training examples (None: all).
        limit_test: keep only the first ``limit_test`` test examples (None: all).
        train: False for a test-only load: the format must not open its training files and
            returns empty ``(0, C, H, W)`` training tensors (see :func:`empty_split`), so
            evaluation works on a directory that holds only the test files.
    """

    limit_train: int | None = None
    limit_test: int | None = None
    train: bool = True

    def n_train(self, available: int) -> int:
        """How many of ``available`` training examples to keep (0 for a test-only load)."""
        if not self.train:
            return 0
        return available if self.limit_train is None else min(available, self.limit_train)

    def n_test(self, available: int) -> int:
        """How many of ``available`` test examples to keep."""
        return available if self.limit_test is None else min(available, self.limit_test)


class DatasetFormat:
    """How one dataset is read. Subclass, set the class attributes, implement :meth:`load`,
    and register the class with ``@register_dataset`` in a module listed under the
    ``certbench.datasets`` entry-point group::

        @register_dataset
        class ToyNpz(DatasetFormat):
            name = "toy-npz"

            def load(self, directory: Path | None, request: LoadRequest) -> Dataset: ...

    Attributes:
        name: the registry name (kebab-case), what ``--dataset`` takes.
        default_dir: the standard install location used when no data directory is given;
            ``None`` when the user must pass one.
        needs_dir: False for data that needs no files (scikit-learn's digits): ``load`` then
            gets ``directory=None`` and any given data directory is ignored.
    """

    name: ClassVar[str] = ""
    default_dir: ClassVar[str | None] = None
    needs_dir: ClassVar[bool] = True

    def load(self, directory: Path | None, request: LoadRequest) -> Dataset:
        """Read the dataset.

        Args:
            directory: the existing, resolved data directory (None when ``needs_dir`` is
                False).
            request: the limits and whether the training split is wanted.

        Returns:
            A :class:`Dataset` with images ``(N, C, H, W)`` float32 in ``[0, 1]`` and labels
            int64, the first ``limit_*`` examples of each split, and no training examples
            when ``request.train`` is False.

        Raises:
            DataError: a missing or malformed file; the message starts with its path.
        """
        raise NotImplementedError


def empty_split(like: Tensor) -> Split:
    """Empty ``(0, C, H, W)`` float32 images (``C, H, W`` those of ``like``) and ``(0,)``
    int64 labels: the training split of a test-only load."""
    images = torch.empty((0, *like.shape[1:]), dtype=torch.float32)
    return images, torch.empty(0, dtype=torch.int64)


def read_splits(
    request: LoadRequest,
    read_train: Callable[[Callable[[int], int]], Split],
    read_test: Callable[[Callable[[int], int]], Split],
) -> tuple[Split, Split]:
    """The training and test splits of a format that keeps them in separate files.

    ``read_train(n_keep)`` / ``read_test(n_keep)`` read one split, validate all of its ``n``
    examples and keep the first ``n_keep(n)``. The training split is read first (its errors
    are reported first), and not at all for a test-only load, which gets
    :func:`empty_split` instead.
    """
    train = read_train(request.n_train) if request.train else None
    test = read_test(request.n_test)
    return (train if train is not None else empty_split(test[0])), test


def dataset_format(name: str) -> DatasetFormat:
    """The registered format ``name``; :class:`ConfigError` listing the known names."""
    try:
        obj = DATASET_FORMATS.get(name)
    except RegistryError as e:  # a bad --dataset or spec value is a configuration error
        raise ConfigError(str(e)) from None
    fmt = obj() if isinstance(obj, type) else obj
    if not isinstance(fmt, DatasetFormat):
        raise RegistryError(
            f"dataset {name!r} ({DATASET_FORMATS.entry(name).source}) is not a "
            f"bench.data.DatasetFormat: register a DatasetFormat subclass"
        )
    return fmt


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    limit_train: int | None = None,
    limit_test: int | None = None,
    train: bool = True,
) -> Dataset:
    """Load dataset ``name`` from ``data_dir`` (default: the format's ``default_dir``).

    Args:
        name: a registered dataset name (``bench.registry.DATASETS.names()``).
        data_dir: the directory holding the dataset's standard files. Ignored for formats
            that need no files (``digits``). Required for datasets without a standard
            location.
        limit_train: keep only the first ``limit_train`` training examples (None: all).
        limit_test: keep only the first ``limit_test`` test examples (None: all).
        train: False loads only the test split: training files are not opened (they may be
            absent) and ``x_train``/``y_train`` are empty ``(0, C, H, W)``/``(0,)`` tensors.

    Returns:
        A :class:`Dataset`; images ``(N, C, H, W)`` float32 in ``[0, 1]``, labels int64.

    Raises:
        ConfigError: unknown ``name``, a limit that is not a non-negative integer, or a
            ``train`` that is not a bool.
        DataError: missing directory or file, or a malformed file (the message names it).
    """
    fmt = dataset_format(name)
    request = LoadRequest(
        limit_train=_check_limit(limit_train, "limit_train"),
        limit_test=_check_limit(limit_test, "limit_test"),
        train=check_bool(train, "train"),
    )
    directory = _resolve_dir(name, fmt.default_dir, data_dir) if fmt.needs_dir else None
    return fmt.load(directory, request)


def _check_limit(value: int | None, name: str) -> int | None:
    return None if value is None else check_int(value, name, minimum=0)


def _resolve_dir(name: str, default: str | None, data_dir: str | Path | None) -> Path:
    if data_dir is None:
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
