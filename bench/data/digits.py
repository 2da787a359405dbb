"""scikit-learn's bundled 8x8 digits: ``digits``, the embedded default that needs no files.

1797 images, 10 classes, ``(1, 8, 8)``, pixels the 0..16 values divided by 16. Split once,
the same for every run: ``train_test_split(test_size=0.25, random_state=0,
stratify=labels)`` -> 1347 train / 450 test images.

The images are read from the file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``,
what ``load_digits`` reads) and split by :func:`stratified_split`, the same algorithm as
scikit-learn's ``StratifiedShuffleSplit`` (tests compare both): importing scikit-learn takes
half a second, which every worker process of a run would pay before its first task. Where the
file is not found, ``load_digits`` itself is used.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from bench.data.base import Dataset, DatasetFormat, LoadRequest
from bench.data.files import check_labels, pixels_to_unit
from bench.registry import register_dataset

__all__ = ["DIGITS_SPLIT_SEED", "DIGITS_TEST_SIZE", "Digits", "stratified_split"]

#: The fixed digits split: fraction held out for test, and the split's random_state.
DIGITS_TEST_SIZE = 0.25
DIGITS_SPLIT_SEED = 0


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng) -> np.ndarray:
    """Per-class sample counts summing to ``n_draws``, proportional to ``class_counts``
    (floors, then the largest remainders; ties broken by ``rng``), as scikit-learn's
    ``sklearn.utils.extmath._approximate_mode``."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def stratified_split(
    labels: np.ndarray, test_size: float, random_state: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` index arrays of a stratified shuffle split of ``labels`` ``(N,)``.

    The algorithm of scikit-learn's ``StratifiedShuffleSplit`` (one split, as
    ``train_test_split(..., stratify=labels)`` uses it): ``ceil(test_size * N)`` test
    examples, each class contributing in proportion to its count, drawn and shuffled by
    ``numpy.random.RandomState(random_state)``. Every class needs at least 2 members.
    """
    n = len(labels)
    n_test = int(np.ceil(test_size * n))
    n_train = n - n_test
    classes, y_indices, class_counts = np.unique(labels, return_inverse=True, return_counts=True)
    if class_counts.min() < 2 or min(n_train, n_test) < len(classes):
        raise ValueError("each class needs 2 members, and each side one per class")
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(random_state)
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i in range(len(classes)):
        members = class_indices[i].take(rng.permutation(class_counts[i]), mode="clip")
        train.extend(members[: n_i[i]])
        test.extend(members[n_i[i] : n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def _bundled_file() -> Path | None:
    """scikit-learn's ``digits.csv.gz``, found without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(images (1797, 1, 8, 8) float64 in 0..16, labels (1797,) int64)``: what
    ``load_digits`` returns, read from its file."""
    path = _bundled_file()
    if path is not None:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",")
        if table.ndim == 2 and table.shape[1] == 65:
            return table[:, :64].reshape(-1, 1, 8, 8), table[:, 64].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.asarray(bunch.images, dtype=np.float64)[:, None], np.asarray(bunch.target)


def _load_digits(limit_train: int | None, limit_test: int | None) -> Dataset:
    images, target = _read_digits()
    source = Path("sklearn.datasets.load_digits")
    train, test = stratified_split(target, DIGITS_TEST_SIZE, DIGITS_SPLIT_SEED)
    x_tr, x_te, y_tr, y_te = images[train], images[test], target[train], target[test]
    request = LoadRequest(limit_train, limit_test)
    n_tr, n_te = request.n_train(len(x_tr)), request.n_test(len(x_te))
    return Dataset(
        name="digits",
        x_train=pixels_to_unit(x_tr[:n_tr], source, "images", 16),
        y_train=torch.from_numpy(check_labels(y_tr[:n_tr], source, "target", n_tr, 0, 9)),
        x_test=pixels_to_unit(x_te[:n_te], source, "images", 16),
        y_test=torch.from_numpy(check_labels(y_te[:n_te], source, "target", n_te, 0, 9)),
        num_classes=10,
        source=str(source),
    )


@register_dataset
class Digits(DatasetFormat):
    """The 8x8 digits bundled with scikit-learn (Alpaydin & Kaynak, UCI), fixed split."""

    name = "digits"
    needs_dir = False

    def load(self, directory: Path | None, request: LoadRequest) -> Dataset:
        return _load_digits(0 if not request.train else request.limit_train, request.limit_test)
