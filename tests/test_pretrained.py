"""Pretrained spec rows: ``checkpoint = "path"`` loads a model's weights instead of training.

A pretrained row is never trained, its cells record no training time and the weights'
SHA-256, and two weight files never share a stored cell; a row without weights must train
(``epochs = 0`` is an error, not a randomly initialised network on the board).
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
import torch

from bench.errors import CheckpointError, ConfigError
from bench.models import create_model
from bench.pipeline import run_cell
from bench.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]

SPEC = """
name = "pre"

[data]
dataset = "digits"
model = "mlp"
limit_test = 30

[train]
epochs = 0

[threat]
norms = ["l2"]
radii = [0.0, 0.25]

[[defenses]]
name = "undefended"
checkpoint = "{a}"

[[defenses]]
name = "randomized-smoothing"
checkpoint = "{a}"
params = {{ sigma = 0.25, n0 = 10, n = 100 }}
"""


def _weights(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    net = create_model("mlp", input_shape=(1, 8, 8), num_classes=10)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(net.state_dict(), path)
    else:
        torch.save(net.state_dict(), path)
    return path


def _spec(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_pretrained_rows_are_identified_by_their_weights(tmp_path):
    a = _weights(tmp_path / "a.safetensors", 0)
    _weights(tmp_path / "b.pth", 1)
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "a.safetensors").write_bytes(a.read_bytes())  # the same weights elsewhere

    cells_a = load_spec(_spec(tmp_path, SPEC.format(a="a.safetensors"))).cells()
    cells_b = load_spec(_spec(tmp_path, SPEC.format(a="b.pth"))).cells()
    cells_moved = load_spec(_spec(sub, SPEC.format(a="a.safetensors"))).cells()
    for ca, cb, cm in zip(cells_a, cells_b, cells_moved, strict=True):
        assert ca.pretrained and ca.train == {}  # [train] does not apply
        assert ca.cell_id() != cb.cell_id() and ca.train_key() != cb.train_key()
        assert ca.cell_id() == cm.cell_id() and ca.checkpoint != cm.checkpoint
        assert ca.checkpoint == str(a.resolve())  # relative to the spec file


def test_a_pretrained_cell_is_loaded_not_trained(tmp_path):
    a = _weights(tmp_path / "a.pth", 0)
    cell = load_spec(_spec(tmp_path, SPEC.format(a="a.pth"))).cells()[1]
    result = run_cell(cell, tmp_path / "checkpoints", device="cpu")
    assert result["train_seconds"] is None
    assert result["provenance"]["weights_sha256"] == cell.weights_sha256
    assert not (tmp_path / "checkpoints").exists()  # nothing trained, nothing checkpointed
    # the same numbers as the weights evaluated by hand through the same defense
    from bench.assembly import build_defense
    from bench.checkpoint import load_tensors
    from bench.data import load_dataset
    from bench.pipeline import predict_all

    d = build_defense(
        "randomized-smoothing",
        {"sigma": 0.25, "n0": 10, "n": 100},
        "mlp",
        input_shape=(1, 8, 8),
        num_classes=10,
        base_state=load_tensors(a),
    )
    ds = load_dataset("digits", limit_test=30)
    pred = d.certify(ds.x_test, norm="l2", seed=0).labels
    assert result["metrics"]["accuracy"] == pytest.approx((pred == ds.y_test).double().mean())
    assert predict_all(d, ds.x_test).shape == (30,)


def test_changed_weights_are_refused(tmp_path):
    a = _weights(tmp_path / "a.pth", 0)
    cell = load_spec(_spec(tmp_path, SPEC.format(a="a.pth"))).cells()[0]
    _weights(a, 1)  # replaced after the spec was read
    with pytest.raises(CheckpointError, match="changed since the spec was read"):
        run_cell(cell, tmp_path / "checkpoints", device="cpu")


def test_a_pretrained_row_needs_only_the_test_files(tmp_path):
    """The released Wong–Kolter weights on a directory holding only t10k-* files."""
    import gzip

    import numpy as np

    rng = np.random.default_rng(0)
    data = tmp_path / "fmnist"
    data.mkdir()
    images = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 12, dtype=np.uint8)
    header = b"\x00\x00\x08\x03" + (12).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (data / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
    header = b"\x00\x00\x08\x01" + (12).to_bytes(4, "big")
    (data / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + labels.tobytes()))
    spec = f"""
    name = "wk"
    [data]
    dataset = "fashion-mnist"
    data_dir = "{data}"
    [threat]
    norms = ["linf"]
    radii = [0.01]
    [[defenses]]
    name = "undefended"
    model = "wk-small"
    checkpoint = "{ROOT / "weights" / "wong_kolter_fashion_mnist.pth"}"
    """
    (cell,) = load_spec(_spec(tmp_path, spec)).cells()
    result = run_cell(cell, tmp_path / "ck", device="cpu")
    assert result["n_test"] == 12 and result["train_seconds"] is None


def test_the_fashion_board_scores_the_released_wong_kolter_weights(tmp_path, fashion_dir):
    """configs/fashion-mnist.toml's pretrained row on the first 100 test images: 75 correct,
    60 certified at linf 0.1, the counts of `certbench certify` on the same weights."""
    spec = load_spec(ROOT / "configs" / "fashion-mnist.toml")
    (cell,) = [c for c in spec.cells() if c.pretrained and c.norm == "linf"]
    assert cell.model == "wk-small" and cell.defense == "wong-kolter"
    assert cell.checkpoint == str((ROOT / "weights" / "wong_kolter_fashion_mnist.pth").resolve())
    threat = {"radii": [0.1], "thresholds": [], "eps": []}
    few = dataclasses.replace(cell, limit_test=100, threat=threat, attack=None)
    result = run_cell(few, tmp_path / "ck", device="cpu")
    assert result["metrics"]["accuracy"] == pytest.approx(0.75)
    assert result["metrics"]["guaranteed_accuracy@0.1"] == pytest.approx(0.60)
    assert result["train_seconds"] is None


@pytest.mark.parametrize(
    ("row", "fragments"),
    [
        ("", ["'train.epochs' is 0", "defenses[0]", "checkpoint ="]),
        ('train = { epochs = 0 }\n', ["'defenses[0].train.epochs' is 0"]),
        ('checkpoint = "a.pth"\ntrain = { epochs = 1 }\n', ["'defenses[0].checkpoint'",
                                                           "'defenses[0].train'", "not trained"]),
        ('checkpoint = "missing.pth"\n', ["'defenses[0].checkpoint'", "no weight file",
                                          "missing.pth"]),
        ('checkpoint = "a.bin"\n', ["'defenses[0].checkpoint'", ".safetensors", "a.bin"]),
        ('model = "nosuchpkg:Net"\ncheckpoint = "a.pth"\n', ["'defenses[0].model'",
                                                            "cannot import module 'nosuchpkg'"]),
    ],
    ids=["epochs-0", "entry-epochs-0", "checkpoint-and-train", "missing", "suffix", "bad-path"],
)  # fmt: skip
def test_bad_rows_are_one_line(tmp_path, row, fragments):
    _weights(tmp_path / "a.pth", 0)
    (tmp_path / "a.bin").write_bytes(b"x")
    text = f"""
name = "bad"
[data]
dataset = "digits"
model = "mlp"
[train]
epochs = 0
[[defenses]]
name = "undefended"
{row}"""
    with pytest.raises(ConfigError) as exc:
        load_spec(_spec(tmp_path, text))
    message = str(exc.value)
    assert "\n" not in message and "spec.toml" in message
    for fragment in fragments:
        assert fragment in message
