"""Noise layers: distributions, the u = 0 edge of the Laplace sampler, eval-mode noise."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from bench.noise import NoiseLayer, noise_source, sample_standard


def test_laplace_is_finite_when_uniform_draw_is_zero(monkeypatch):
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.zeros(shape, dtype=kw["dtype"]))
    z = sample_standard("laplace", (5,))
    assert torch.isfinite(z).all() and (z.abs() < 20).all()


@pytest.mark.parametrize("kind, dist", [("gaussian", "norm"), ("laplace", "laplace")])
def test_standard_noise_distribution(kind, dist):
    g = torch.Generator().manual_seed(0)
    z = sample_standard(kind, (20000,), generator=g).double().numpy()
    # KS at level 1e-4 with n = 20000: a wrong scale (e.g. 1.1) is rejected with certainty.
    assert stats.kstest(z, dist).pvalue > 1e-4
    assert stats.kstest(z * 1.1, dist).pvalue < 1e-4


def test_noise_layer_is_on_in_eval_mode_and_scaled():
    layer = NoiseLayer("gaussian", 0.5).eval()
    h = torch.zeros(4000, 3)
    out = layer(h)
    assert not torch.equal(out, h)
    # std of 12000 N(0, 0.25) draws: relative sd of the estimate ≈ 1/sqrt(2·12000) ≈ 0.0065
    assert abs(out.std().item() - 0.5) < 5 * 0.5 * 0.0065


def test_noise_source_routes_draws():
    layer = NoiseLayer("laplace", 2.0)
    with noise_source(lambda kind, shape, like: torch.ones(shape)):
        out = layer(torch.zeros(2, 3))
    assert torch.equal(out, torch.full((2, 3), 2.0))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown noise kind"):
        NoiseLayer("uniform", 1.0)
    with pytest.raises(ValueError, match="scale must be >= 0"):
        NoiseLayer("gaussian", -1.0)
