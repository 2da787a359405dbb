"""Checkpoints: safetensors + JSON round trip; nothing is ever unpickled from a file."""

from __future__ import annotations

import pickle

import pytest
import torch

from bench.checkpoint import load_into, load_tensors, read_record, save_checkpoint
from bench.errors import CheckpointError
from bench.models import create_model


def _model():
    torch.manual_seed(0)
    return create_model("mlp", input_shape=(1, 8, 8), num_classes=10)


def test_round_trip(tmp_path):
    m = _model()
    save_checkpoint(tmp_path / "ck", m.state_dict(), {"model": "mlp"})
    rec = read_record(tmp_path / "ck")
    assert rec["model"] == "mlp" and rec["format"] == "certbench-checkpoint"
    m2 = create_model("mlp", input_shape=(1, 8, 8), num_classes=10)
    load_into(m2, load_tensors(tmp_path / "ck.safetensors"), source="ck")
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(m(x), m2(x))


def test_wrong_architecture_names_the_file(tmp_path):
    save_checkpoint(tmp_path / "ck", _model().state_dict(), {})
    cnn = create_model("cnn", input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(CheckpointError, match=r"ck.safetensors: does not match the architecture"):
        load_into(
            cnn, load_tensors(tmp_path / "ck.safetensors"), source=str(tmp_path / "ck.safetensors")
        )


def test_wrong_shape_is_reported(tmp_path):
    state = _model().state_dict()
    state["1.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"'1.weight' has shape \(3, 3\)"):
        load_into(_model(), state, source="x")


def test_nan_weights_rejected():
    state = _model().state_dict()
    state["1.bias"][0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN"):
        load_into(_model(), state, source="x")


def test_truncated_safetensors(tmp_path):
    save_checkpoint(tmp_path / "ck", _model().state_dict(), {})
    p = tmp_path / "ck.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"ck\.safetensors: not a readable safetensors"):
        load_tensors(p)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/certbench_pwned_by_checkpoint",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    import os

    marker = "/tmp/certbench_pwned_by_checkpoint"
    if os.path.exists(marker):
        os.remove(marker)
    p = tmp_path / "evil.pth"
    with open(p, "wb") as fh:
        pickle.dump({"w": _Evil()}, fh)
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused or unreadable"):
        load_tensors(p)
    assert not os.path.exists(marker)


def test_plain_state_dict_pth_accepted(tmp_path):
    m = _model()
    torch.save(m.state_dict(), tmp_path / "w.pth")
    state = load_tensors(tmp_path / "w.pth")
    assert set(state) == set(m.state_dict())


def test_missing_record(tmp_path):
    with pytest.raises(CheckpointError, match="record not found"):
        read_record(tmp_path / "nothing")
