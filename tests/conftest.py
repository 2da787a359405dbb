"""Shared fixtures. Tests run on CPU with one torch thread unless they say otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
ROOT = Path(__file__).resolve().parents[1]
WEIGHTS_DIR = ROOT / "weights"  # released weights shipped in the repository (weights/README.md)


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(int(os.environ.get("CERTBENCH_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    if not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not installed under {FASHION_DIR} (apt dataset-fashion-mnist)")
    return FASHION_DIR


@pytest.fixture(scope="session")
def wk_reference() -> Path:
    path = WEIGHTS_DIR / "wong_kolter_fashion_mnist.pth"
    assert path.is_file(), f"released Wong–Kolter weights missing from the repository: {path}"
    return path


@pytest.fixture(scope="session")
def install_package(tmp_path_factory):
    """``install_package(src)``: a throwaway site directory holding the package at ``src``
    (``pip install --target``, no dependencies, no index), as a user's install would."""

    def install(src: Path) -> Path:
        site = tmp_path_factory.mktemp("site")
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
               "--no-build-isolation", "--target", str(site), str(src)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            pytest.fail(f"installing {src} failed:\n{proc.stderr[-2000:]}")
        return site

    return install


@pytest.fixture(scope="session")
def certbench_cli():
    """``certbench_cli(args, cwd=..., paths=())``: ``python -m bench.cli ARGS`` in a fresh
    process, with this clone and ``paths`` (e.g. a plugin's site directory) on PYTHONPATH."""

    def run(args: list[str], *, cwd: Path, paths=()) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        path = [*map(str, paths), str(ROOT), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(path)
        return subprocess.run(
            [sys.executable, "-m", "bench.cli", *args],
            capture_output=True,
            text=True,
            cwd=cwd,
            env=env,
            check=False,
            timeout=900,
        )

    return run
