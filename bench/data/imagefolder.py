"""ImageNet-style folders of image files: ``imagefolder``.

``DIR/train/<class>/*.png|jpg|...`` and ``DIR/test/<class>/...`` (or ``DIR/val/``; ``test/``
wins when both exist). Classes are the sorted ``train/`` folder names; a test-only load of a
directory without ``train/`` takes the sorted ``test/`` folder names instead, so such a
directory keeps a (possibly empty) folder for every class to number the labels as training
did. Images are read with Pillow (imported only here), as 8-bit grayscale when every image
loaded is ``L``/``1`` mode and as RGB otherwise; all must have the same size (no resizing).
Examples are ordered round-robin over classes (first image of each class, then the second,
...; files sorted by name), so "the first N" is balanced across classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.data.base import Dataset, DatasetFormat, LoadRequest
from bench.data.files import pixels_to_unit
from bench.errors import DataError
from bench.registry import register_dataset

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder"]

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
)


def _class_dirs(split_dir: Path) -> list[Path]:
    """The visible sub-folders of ``split_dir``, sorted by name."""
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(class_dir: Path) -> list[Path]:
    """The visible image files of ``class_dir``, sorted by name."""
    return sorted(
        f
        for f in class_dir.iterdir()
        if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS
    )


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


@register_dataset
class ImageFolder(DatasetFormat):
    """Labelled images in one folder per class, split into ``train/`` and ``test/``."""

    name = "imagefolder"

    def load(self, directory: Path | None, request: LoadRequest) -> Dataset:
        assert directory is not None
        try:
            from PIL import Image
        except ImportError as e:
            raise DataError(
                f"{directory}: reading an image folder needs Pillow, which is not installed "
                f"(pip install pillow)"
            ) from e
        train_dir = directory / "train"
        if request.train and not train_dir.is_dir():
            raise DataError(
                f"{train_dir}: folder not found (dataset imagefolder needs train/<class>/)"
            )
        test_dir = next((directory / s for s in ("test", "val") if (directory / s).is_dir()), None)
        if test_dir is None:
            raise DataError(f"{directory}: no test/ or val/ folder (dataset imagefolder)")
        class_root = train_dir if train_dir.is_dir() else test_dir
        classes = [d.name for d in _class_dirs(class_root)]
        if not classes:
            raise DataError(f"{class_root}: no class folders")
        train_per_class = []
        if request.train:
            for cls in classes:
                files = _image_files(train_dir / cls)
                if not files:
                    raise DataError(
                        f"{train_dir / cls}: class folder has no images "
                        f"({', '.join(sorted(IMAGE_EXTENSIONS))})"
                    )
                train_per_class.append(files)
        index = {cls: i for i, cls in enumerate(classes)}
        test_classes = {d.name: _image_files(d) for d in _class_dirs(test_dir)}
        for cls in test_classes:
            if cls not in index:
                raise DataError(
                    f"{test_dir / cls}: class {cls!r} does not exist in {class_root} "
                    f"(known: {', '.join(index)})"
                )
        test_per_class = [test_classes.get(cls, []) for cls in classes]
        if not any(test_per_class):
            raise DataError(f"{test_dir}: no images")

        all_tr, all_te = _round_robin(train_per_class), _round_robin(test_per_class)
        items_tr = all_tr[: request.n_train(len(all_tr))]
        items_te = all_te[: request.n_test(len(all_te))]
        # decode both splits together so they share one size check and one colour mode;
        # with nothing to load, decode one image anyway to learn the (C, H, W) shape
        items = items_tr + items_te
        pixels = _read_images(items or (all_tr or all_te)[:1], Image)
        pixels = pixels[: len(items)]
        # (N, H, W) -> (N, 1, H, W); (N, H, W, 3) -> (N, 3, H, W)
        pixels = pixels[:, None] if pixels.ndim == 3 else pixels.transpose(0, 3, 1, 2)
        x = pixels_to_unit(pixels, directory, "images", 255)
        y = torch.tensor([c for _, c in items], dtype=torch.int64)
        n = len(items_tr)
        return Dataset(
            self.name, x[:n].clone(), y[:n], x[n:].clone(), y[n:], len(index), str(directory)
        )
