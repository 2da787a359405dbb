"""scikit-learn's bundled 8x8 digits: ``digits``, the embedded default that needs no files.

1797 images, 10 classes, ``(1, 8, 8)``, pixels the 0..16 values divided by 16. Split once,
the same for every run: ``train_test_split(test_size=0.25, random_state=0,
stratify=labels)`` -> 1347 train / 450 test images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bench.data.base import Dataset, DatasetFormat, LoadRequest
from bench.data.files import check_labels, pixels_to_unit
from bench.registry import register_dataset

__all__ = ["DIGITS_SPLIT_SEED", "DIGITS_TEST_SIZE", "Digits"]

#: The fixed digits split: fraction held out for test, and the split's random_state.
DIGITS_TEST_SIZE = 0.25
DIGITS_SPLIT_SEED = 0


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
