"""Model zoo: every model builds for its input shapes and maps (N,C,H,W) to (N,K)."""

from __future__ import annotations

import pytest
import torch

from bench.errors import ConfigError, RegistryError
from bench.models import create_model, first_layer_index, list_models

SHAPES = {"resnet": (3, 32, 32), "resnet110": (3, 32, 32), "wrn-28-10": (3, 32, 32)}


@pytest.mark.parametrize("name", list_models())
def test_every_model_forward(name):
    shape = SHAPES.get(name, (1, 28, 28))
    kwargs = {"depth": 8} if name == "resnet" else {}
    m = create_model(name, input_shape=shape, num_classes=7, **kwargs)
    out = m(torch.rand(2, *shape))
    assert out.shape == (2, 7)
    assert first_layer_index(m) in (0, 1)


def test_wrn_small_variant_and_depth_validation():
    m = create_model("wrn-28-10", input_shape=(3, 16, 16), num_classes=10, depth=10, widen=1)
    assert m(torch.rand(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(ConfigError, match="6n\\+4"):
        create_model("wrn-28-10", input_shape=(3, 32, 32), num_classes=10, depth=27)


def test_digits_shapes():
    for name in ("mlp", "cnn"):
        m = create_model(name, input_shape=(1, 8, 8), num_classes=10)
        assert m(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_unknown_model_lists_known():
    with pytest.raises(RegistryError, match=r"unknown model 'nope'.*known models: .*wk-small"):
        create_model("nope", input_shape=(1, 8, 8), num_classes=10)


def test_too_small_input_is_a_config_error():
    with pytest.raises(ConfigError, match="too small"):
        create_model("wk-small", input_shape=(1, 2, 2), num_classes=10)


def test_released_wong_kolter_weights_load_into_wk_small(wk_reference):
    from bench.checkpoint import load_into, load_tensors

    m = create_model("wk-small", input_shape=(1, 28, 28), num_classes=10)
    load_into(m, load_tensors(wk_reference), source=str(wk_reference))
    assert m(torch.rand(1, 1, 28, 28)).shape == (1, 10)
