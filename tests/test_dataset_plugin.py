"""A dataset format is one new file plus its entry point.

The test writes a tiny third-party package that reads ``.npz`` files (``toy-npz``: one new
module and one line under ``[project.entry-points."certbench.datasets"]``), and a second
package whose dataset module fails to import. Both are pip-installed into a throwaway site
directory; a subprocess with that site on ``PYTHONPATH`` must list ``toy-npz`` next to the
built-ins, load it through :func:`bench.data.load_dataset` (both splits, and the test split
alone), and report the broken plugin by name while the built-ins keep working.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject(distribution: str, name: str, module: str) -> str:
    """A plugin's pyproject.toml: the entry point ``name = module`` in the group
    certbench.datasets, and the package holding ``module``."""
    return textwrap.dedent(
        f"""\
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{distribution}"
        version = "0.1.0"
        dependencies = ["certbench"]

        [project.entry-points."certbench.datasets"]
        {name} = "{module}"

        [tool.setuptools]
        packages = ["{module.split(".")[0]}"]
        """
    )


# the whole format: train.npz / test.npz holding uint8 images (N, C, H, W) and labels (N,)
TOY_FORMAT = '''\
from pathlib import Path

import torch

from bench.data import Dataset, DatasetFormat, LoadRequest, read_splits
from bench.data.files import check_labels, file_error, pixels_to_unit
from bench.registry import register_dataset


def _split(path: Path, n_keep):
    import numpy as np

    try:
        with np.load(path) as npz:
            x, y = npz["x"], npz["y"]
    except OSError as e:
        raise file_error(path, e) from None
    n = n_keep(x.shape[0])
    labels = check_labels(y, path, "y", x.shape[0], 0, 2)
    return pixels_to_unit(x[:n], path, "x", 255), torch.from_numpy(labels[:n])


@register_dataset
class ToyNpz(DatasetFormat):
    """Three classes of uint8 images in train.npz and test.npz."""

    name = "toy-npz"

    def load(self, directory: Path | None, request: LoadRequest) -> Dataset:
        (x_tr, y_tr), (x_te, y_te) = read_splits(
            request,
            lambda n_keep: _split(directory / "train.npz", n_keep),
            lambda n_keep: _split(directory / "test.npz", n_keep),
        )
        return Dataset(self.name, x_tr, y_tr, x_te, y_te, 3, str(directory))
'''

# what the subprocess reports, as JSON on its last line of stdout
PROBE = textwrap.dedent(
    """
    import json, sys, warnings
    import numpy as np
    from bench.data import load_dataset
    from bench.errors import ConfigError
    from bench.registry import DATASETS

    data_dir, out, train = sys.argv[1], sys.argv[2], sys.argv[3] == "train"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = DATASETS.names()
    full = load_dataset("toy-npz", data_dir, train=train)
    limited = load_dataset("toy-npz", data_dir, limit_train=2, limit_test=1, train=train)
    try:
        load_dataset("broken-format", data_dir)
        unknown = ""
    except ConfigError as e:
        unknown = str(e)
    digits = load_dataset("digits", limit_train=3, limit_test=3)
    np.savez(out, x_train=full.x_train.numpy(), y_train=full.y_train.numpy(),
             x_test=full.x_test.numpy(), y_test=full.y_test.numpy(),
             limited_train=limited.x_train.numpy(), limited_test=limited.x_test.numpy())
    print(json.dumps({
        "names": names,
        "package": DATASETS.package("toy-npz"),
        "broken": DATASETS.broken(),
        "warnings": [str(w.message) for w in caught],
        "num_classes": full.num_classes,
        "unknown": unknown,
        "digits": [digits.x_train.shape[0], digits.x_test.shape[0]],
    }))
    """
)


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    toy, broken = src / "toy", src / "broken"
    (toy / "toy_npz").mkdir(parents=True)
    (toy / "pyproject.toml").write_text(
        _pyproject("certbench-toy-npz", "toy-npz", "toy_npz.npz_format")
    )
    (toy / "toy_npz" / "__init__.py").write_text("")
    (toy / "toy_npz" / "npz_format.py").write_text(TOY_FORMAT)
    (broken / "broken_dataset").mkdir(parents=True)
    (broken / "pyproject.toml").write_text(
        _pyproject("certbench-broken-dataset", "broken-format", "broken_dataset.fmt")
    )
    (broken / "broken_dataset" / "__init__.py").write_text("")
    (broken / "broken_dataset" / "fmt.py").write_text(
        "raise RuntimeError('the broken dataset plugin fails on import')\n"
    )
    site = tmp_path_factory.mktemp("site")
    cmd = [
        sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
        "--no-build-isolation", "--target", str(site), str(toy), str(broken),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"installing the dataset plugins failed:\n{proc.stderr[-2000:]}")
    return site


def _probe(site: Path, data_dir: Path, out: Path, *, train: bool = True) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("CERTBENCH_DISABLE_PLUGIN_AUTOLOAD", None)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(data_dir), str(out), "train" if train else "test"],
        capture_output=True,
        text=True,
        env=env,
        cwd=data_dir,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_dataset_plugin_is_one_file_plus_its_entry_point(plugin_site: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        split: (rng.integers(0, 256, (n, 2, 3, 4), dtype=np.uint8), rng.integers(0, 3, n))
        for split, n in (("train", 5), ("test", 4))
    }
    for split, (x, y) in arrays.items():
        np.savez(tmp_path / f"{split}.npz", x=x, y=y)
    report = _probe(plugin_site, tmp_path, tmp_path / "got.npz")
    assert "toy-npz" in report["names"] and report["package"] == "certbench-toy-npz"
    assert {"digits", "mnist", "cifar10", "svhn", "imagefolder"} <= set(report["names"])
    assert report["num_classes"] == 3
    with np.load(tmp_path / "got.npz") as got:
        for split, (x, y) in arrays.items():
            assert got[f"x_{split}"].dtype == np.float32
            assert np.array_equal(got[f"x_{split}"], x.astype(np.float32) / np.float32(255))
            assert got[f"y_{split}"].tolist() == y.tolist()
        assert np.array_equal(got["limited_train"], got["x_train"][:2])
        assert np.array_equal(got["limited_test"], got["x_test"][:1])
    # the broken plugin is named, its failure reported, and the built-ins still load
    assert "broken-format" in report["broken"]
    assert "fails on import" in report["broken"]["broken-format"]
    assert any("'broken-format'" in w and "failed to load" in w for w in report["warnings"])
    assert "its plugin failed to load" in report["unknown"]
    assert report["digits"] == [3, 3]


def test_dataset_plugin_test_only_load(plugin_site: Path, tmp_path: Path) -> None:
    x = np.arange(2 * 1 * 2 * 2, dtype=np.uint8).reshape(2, 1, 2, 2)
    np.savez(tmp_path / "test.npz", x=x, y=np.array([2, 0]))  # no train.npz
    _probe(plugin_site, tmp_path, tmp_path / "got.npz", train=False)
    with np.load(tmp_path / "got.npz") as got:
        assert got["x_train"].shape == (0, 1, 2, 2) and got["y_train"].shape == (0,)
        assert np.array_equal(got["x_test"], x.astype(np.float32) / np.float32(255))
        assert got["y_test"].tolist() == [2, 0]
