"""Shared fixtures. Tests run on CPU with one torch thread unless they say otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(int(os.environ.get("CERTBENCH_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    if not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not installed under {FASHION_DIR} (apt dataset-fashion-mnist)")
    return FASHION_DIR


@pytest.fixture(scope="session")
def wk_reference() -> Path:
    path = REFERENCE_DIR / "wong_kolter_fashion_mnist.pth"
    if not path.is_file():
        pytest.skip(f"released Wong–Kolter weights not found at {path}")
    return path
