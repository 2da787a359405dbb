"""Threat-model geometry (bench/threat.py): projections against independent oracles, random
starts uniform in the ball, the PGD loop on losses whose maximiser is known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest

import attacks
import attacks.base
import bench.certificates
from bench import threat
from bench.errors import ConfigError
from bench.threat import (
    lp_norm,
    per_example,
    project,
    project_delta,
    projected_gradient_ascent,
    random_delta,
)

P_FAIL = 1e-3
SHAPE = (1, 8, 8)


def _l1_projection_oracle(v: np.ndarray, eps: float) -> np.ndarray:
    """Projection onto the l1 ball by bisection on the soft threshold (independent of sorting)."""
    if np.abs(v).sum() <= eps:
        return v
    lo, hi = 0.0, float(np.abs(v).max())
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.clip(np.abs(v) - mid, 0, None).sum() > eps:
            lo = mid
        else:
            hi = mid
    return np.sign(v) * np.clip(np.abs(v) - hi, 0, None)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), eps=st.floats(0.01, 3.0), scale=st.floats(0.01, 2.0))
def test_projection_matches_oracles(seed, eps, scale):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, *SHAPE, generator=g, dtype=torch.float64).mul(1.2).sub(0.1).clamp(0, 1)
    v = torch.randn(3, *SHAPE, generator=g, dtype=torch.float64) * scale
    x_far = x + v
    for norm in ("linf", "l2", "l1"):
        out = project(x, x_far, norm=norm, eps=eps)
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        assert bool((lp_norm(out - x, norm) <= eps).all())
    # l1 before clipping equals the bisection oracle (clip is the identity when far inside)
    xm = torch.full((1, *SHAPE), 0.5, dtype=torch.float64)
    vm = v[:1] * min(1.0, 0.4 / float(v[:1].abs().max()))
    got = project(xm, xm + vm, norm="l1", eps=eps * 0.5) - xm
    want = _l1_projection_oracle(vm.numpy().ravel(), eps * 0.5)
    np.testing.assert_allclose(got.numpy().ravel(), want, atol=1e-9)


def test_l1_projection_matches_bisection_with_per_row_radii():
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 1, 4, 4, dtype=torch.float64, generator=gen)
    eps = torch.tensor([0.0, 0.5, 1.0, 3.0, 100.0, 2.0], dtype=torch.float64)
    got = project_delta(delta, eps.view(-1, 1, 1, 1), "l1")
    for i in range(6):
        want = _l1_projection_oracle(delta[i].flatten().numpy(), float(eps[i]))
        np.testing.assert_allclose(got[i].flatten().numpy(), want, atol=1e-9)
    # a number radius gives the same projection as the same radius for every row
    same = project_delta(delta, 1.0, "l1")
    np.testing.assert_allclose(same[2].numpy(), got[2].numpy(), atol=1e-12)


@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
def test_exact_projection_keeps_stored_numbers_in_budget_per_row(norm):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(32, 1, 8, 8, generator=gen)
    x_adv = x + torch.randn(32, 1, 8, 8, generator=gen)
    eps = per_example(torch.linspace(0.0, 2.0, 32), "eps", x)
    out = project(x, x_adv, norm=norm, eps=eps)
    assert out.dtype == x.dtype and float(out.min()) >= 0 and float(out.max()) <= 1
    dist = lp_norm(out.double() - x.double(), norm)
    assert bool((dist <= eps.double().flatten()).all())
    assert torch.equal(out[0], x[0])  # radius 0


@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
def test_random_delta_is_uniform_in_the_ball(norm):
    # Uniform in a d-dimensional ball of radius eps: P(||delta|| <= t eps) = t^d for every
    # norm; with t = 2^(-1/d) half of the draws fall inside. Exact binomial test at 1e-3.
    n, d, eps = 4000, 4, 0.7
    x = torch.full((n, 1, 2, 2), 0.5, dtype=torch.float64)
    delta = random_delta(x, eps, norm, torch.Generator().manual_seed(2))
    r = lp_norm(delta, norm)
    assert float(r.max()) <= eps * (1 + 1e-12)
    inside = int((r <= eps * 2 ** (-1 / d)).sum())
    assert binomtest(inside, n, 0.5).pvalue > P_FAIL, inside
    # Directions are symmetric: each coordinate is positive half of the time.
    pos = int((delta[:, 0, 0, 0] > 0).sum())
    assert binomtest(pos, n, 0.5).pvalue > P_FAIL, pos


@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
def test_random_delta_per_row_radii_and_generator(norm):
    x = torch.rand(5, 1, 3, 3, generator=torch.Generator().manual_seed(3))
    eps = per_example(torch.tensor([0.0, 0.1, 0.2, 0.4, 0.8]), "eps", x)
    a = random_delta(x, eps, norm, torch.Generator().manual_seed(4))
    b = random_delta(x, eps, norm, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert bool((lp_norm(a, norm) <= eps.flatten() * (1 + 1e-6)).all())
    assert not a[0].any()


def test_pgd_reaches_the_maximiser_of_a_linear_loss():
    # loss(x') = <w, x'>: over the linf ball ∩ [0, 1] the maximiser is clip(x + eps sign(w));
    # over a small l2 ball around an interior x it is x + eps w / ||w||.
    gen = torch.Generator().manual_seed(5)
    x = 0.2 + 0.6 * torch.rand(4, 1, 4, 4, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 1, 4, 4, generator=gen, dtype=torch.float64)

    got = projected_gradient_ascent(
        lambda _: w, x, norm="linf", eps=0.3, steps=10, step_size=0.1, exact_budget=True
    )
    torch.testing.assert_close(got, (x + 0.3 * w.sign()).clamp(0, 1))

    got = projected_gradient_ascent(
        lambda _: w, x, norm="l2", eps=0.15, steps=5, step_size=0.1, exact_budget=False
    )
    want = x + 0.15 * w / lp_norm(w, "l2").view(-1, 1, 1, 1)
    torch.testing.assert_close(got, want)


def test_min_grad_norm_shortens_steps_along_tiny_gradients():
    x = torch.full((3, 1, 2, 2), 0.5, dtype=torch.float64)
    g = torch.zeros_like(x)
    g[0, 0, 0, 0] = 1e-14  # below the floor
    g[1, 0, 0, 0] = 1.0  # a normal gradient
    # row 2: no gradient at all

    def step(floor: float) -> torch.Tensor:
        out = projected_gradient_ascent(
            lambda _: g, x, norm="l2", eps=1.0, steps=1, step_size=0.1, min_grad_norm=floor
        )
        return lp_norm(out - x, "l2")

    unit = step(0.0)
    torch.testing.assert_close(unit, torch.tensor([0.1, 0.1, 0.0], dtype=torch.float64))
    floored = step(1e-12)
    torch.testing.assert_close(floored, torch.tensor([1e-3, 0.1, 0.0], dtype=torch.float64))


def test_pgd_rejects_unsupported_norm_and_steps():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ConfigError, match="norm must be one of linf, l2"):
        projected_gradient_ascent(torch.zeros_like, x, norm="l1", eps=0.1, steps=1, step_size=1)
    with pytest.raises(ConfigError, match="steps"):
        projected_gradient_ascent(torch.zeros_like, x, norm="l2", eps=0.1, steps=-1, step_size=1)


def test_old_homes_reexport_the_geometry():
    assert attacks.project is attacks.base.project is threat.project
    assert attacks.lp_norm is threat.lp_norm
    assert attacks.base.random_in_ball is threat.random_in_ball


def test_convert_radius_is_reexported_and_validates():
    assert bench.certificates.convert_radius is threat.convert_radius
    r = threat.convert_radius(np.array([1.0]), from_norm="l2", to_norm="linf", dim=16)
    np.testing.assert_allclose(r, [1.0 / math.sqrt(16)])
    with pytest.raises(ValueError, match="dim"):
        threat.convert_radius(1.0, from_norm="l2", to_norm="l1", dim=True)


def test_linf_budget_fix_keeps_pixels_that_fall_near_zero():
    """A pixel of x just above eps pushed to (about) 0 overshoots the ball by an ulp of x,
    far more than ulps near 0: it must end exactly inside the ball, not reset the row."""
    from bench.threat import project

    eps = 0.1
    x = torch.tensor([[0.1005, 0.5, 0.7]], dtype=torch.float32)
    adv = torch.tensor([[0.0, 0.4, 0.8]], dtype=torch.float32)  # first pixel 0.1005 away
    out = project(x, adv, norm="linf", eps=eps)
    assert (out.double() - x.double()).abs().max() <= eps
    assert out[0, 0] > 0 and abs(float(out[0, 0]) - (0.1005 - eps)) < 1e-6
    assert out[0, 1] == pytest.approx(0.4) and out[0, 2] == pytest.approx(0.8)  # row kept
