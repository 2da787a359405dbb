"""bench.certificates: published reference values, closed forms, soundness of the search."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize
from scipy import stats as sps
from statsmodels.stats.proportion import proportion_confint

from bench.certificates import (
    convert_radius,
    gaussian_radius_from_bound,
    pixeldp_bounds_from_counts,
    pixeldp_bounds_from_softmax,
    pixeldp_count_bounds,
    pixeldp_is_robust,
    pixeldp_robust_size,
    pixeldp_robust_size_from_bounds,
    smoothing_radius,
)
from bench.errors import CertbenchError, ConfigError
from bench.stats import softmax_bounds

# REFERENCE.md §1: n = 2000, K = 10, L = 0.1, eps = 1, delta = 0.05, eta = 0.05, argmax
# counts with second = n - top.
PIXELDP = {"num_classes": 10, "epsilon": 1.0, "delta": 0.05, "construction_bound": 0.1}
REFERENCE_VALUES = [(2000, 0.1436, 0.2966), (1900, 0.1181, 0.1342), (1500, 0.0396, 0.0483)]
GRID = np.arange(1, 300) / 1000


def _gauss(pl, pu, **kw):
    params = {k: v for k, v in PIXELDP.items() if k != "num_classes"} | kw
    return pixeldp_robust_size_from_bounds(pl, pu, mechanism="gaussian", **params)


# --------------------------------------------------------------------------- PixelDP
@pytest.mark.parametrize(("top", "gaussian", "laplace"), REFERENCE_VALUES)
def test_pixeldp_reference_values(top: int, gaussian: float, laplace: float) -> None:
    n = 2000
    for mechanism, expected in (("gaussian", gaussian), ("laplace", laplace)):
        got = pixeldp_robust_size(top, n - top, n, mechanism=mechanism, eta=0.05, **PIXELDP)
        # Published to 4 decimals from a bisection with tolerance 0.001 on eps' (which moves
        # L' by at most 0.001 * 1.45 L / eps = 1.5e-4 at eps = 1): 5e-4 covers rounding plus
        # tolerance.
        assert abs(float(got) - expected) <= 5e-4, (mechanism, top, float(got))


def test_pixeldp_reference_values_vectorised_and_tensor() -> None:
    top = torch.tensor([2000, 1900, 1500])
    got = pixeldp_robust_size(top, 2000 - top, 2000, mechanism="gaussian", eta=0.05, **PIXELDP)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), [v[1] for v in REFERENCE_VALUES], atol=5e-4)


def test_pixeldp_counts_use_bonferroni_clopper_pearson() -> None:
    """Laplace L_max from counts == closed form on statsmodels' Clopper–Pearson bounds."""
    rng = np.random.default_rng(3)
    n, k, eta = 500, 10, 0.05
    top = rng.integers(100, n + 1, size=200)
    second = (rng.random(200) * (n - top)).astype(int)
    got = pixeldp_robust_size(
        top, second, n, num_classes=k, mechanism="laplace", epsilon=0.5, delta=0.05,
        construction_bound=0.3, eta=eta,
    )  # fmt: skip
    # one-sided level eta/K == two-sided statsmodels alpha 2 eta/K
    pl = proportion_confint(top, n, alpha=2 * eta / k, method="beta")[0]
    pu = proportion_confint(second, n, alpha=2 * eta / k, method="beta")[1]
    expected = np.where(pl > pu, 0.3 * np.log(pl / pu) / (2 * 0.5), 0.0)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert np.any(expected == 0) and np.any(expected > 0)


@settings(max_examples=200, deadline=None)
@given(
    pl=st.floats(0, 1),
    pu=st.floats(0, 1, exclude_min=True),
    eps=st.floats(0.05, 4),
    big_l=st.floats(0.01, 2),
)
def test_laplace_closed_form(pl: float, pu: float, eps: float, big_l: float) -> None:
    got = float(
        pixeldp_robust_size_from_bounds(
            pl, pu, mechanism="laplace", epsilon=eps, delta=0.3, construction_bound=big_l
        )
    )
    expected = big_l * (math.log(pl) - math.log(pu)) / (2 * eps) if pl > pu else 0.0
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # L_max > L exactly when the (eps, 0) robustness test passes at the construction bound.
    robust = bool(pixeldp_is_robust(pl, pu, epsilon=eps, delta=0.3, mechanism="laplace"))
    if abs(got - big_l) > 1e-9 * big_l:
        assert robust == (got > big_l)


def _passes(pl: float, pu: float, eps_p: float, delta_p: float) -> bool:
    return pl >= math.exp(2 * eps_p) * pu + (1 + math.exp(eps_p)) * delta_p


def _witness(l_max: float, pl: float, pu: float) -> bool:
    """Is l_max = L' of some (eps' <= 1, delta' on the grid) that passes the test?"""
    scale = PIXELDP["construction_bound"] * math.sqrt(math.log(1.25 / 0.05)) / 1.0
    for d in GRID:
        eps_p = l_max * math.sqrt(math.log(1.25 / d)) / scale
        if 0 < eps_p <= 1 + 1e-12 and _passes(pl, pu, min(eps_p, 1.0), d):
            return True
    return False


def _exact_l_max(pl: float, pu: float) -> float:
    """Supremum of the reference search, by root finding (independent of the bisection)."""
    scale = PIXELDP["construction_bound"] * math.sqrt(math.log(1.25 / 0.05))
    best = 0.0
    for d in GRID:
        if _passes(pl, pu, 1.0, d):
            eps_star = 1.0
        elif _passes(pl, pu, 1e-300, d):
            f = lambda x, d=d: pl - math.exp(2 * x) * pu - (1 + math.exp(x)) * d  # noqa: E731
            eps_star = optimize.brentq(f, 0.0, 1.0, xtol=1e-14)
        else:
            continue
        best = max(best, scale * eps_star / math.sqrt(math.log(1.25 / d)))
    return best


def test_gaussian_search_is_sound_and_near_the_supremum() -> None:
    rng = np.random.default_rng(11)
    pl = rng.uniform(0.2, 1.0, 25)
    pu = rng.uniform(0.0, 1.0, 25) * (1 - pl)
    got = _gauss(pl, pu)
    scale = PIXELDP["construction_bound"] * math.sqrt(math.log(1.25 / 0.05))
    # 14 bisection steps leave eps' at most 2^-14 below the sup; L' = scale eps' /
    # sqrt(ln(1.25/delta')) with 1/sqrt(ln(1.25/0.299)) < 0.84.
    slack = scale * 2.0**-14 * 0.84
    for a, b, g in zip(pl, pu, got, strict=True):
        exact = _exact_l_max(a, b)
        assert exact - slack - 1e-12 <= g <= exact + 1e-12
        assert g == 0 or _witness(g, a, b)


@settings(max_examples=300, deadline=None)
@given(pl=st.floats(0, 1), frac=st.floats(0, 1))
def test_gaussian_search_soundness_property(pl: float, frac: float) -> None:
    pu = frac * (1 - pl)  # the runner-up cannot exceed 1 - top
    got = float(_gauss(pl, pu))
    assert 0 <= got <= 1.45 * PIXELDP["construction_bound"]
    if got > 0:
        assert _witness(got, pl, pu), (pl, pu, got)
    else:
        assert not any(_passes(pl, pu, 2.0**-14, d) for d in GRID)


def test_gaussian_search_monotone_and_consistent_with_the_test() -> None:
    rng = np.random.default_rng(5)
    pl = np.sort(rng.uniform(0.3, 1.0, 400))
    pu = np.full(400, 0.05)
    got = _gauss(pl, pu)
    assert np.all(np.diff(got) >= -1e-15)  # larger p_lower never certifies less
    got_pu = _gauss(0.9, np.linspace(0.0, 0.1, 50))
    assert np.all(np.diff(got_pu) <= 1e-15)
    # Robust at (eps, delta) = (1, 0.05) -> delta' = 0.05, eps' = 1 is a witness -> L_max >= L.
    robust = pixeldp_is_robust(pl, pu, epsilon=1.0, delta=0.05, mechanism="gaussian")
    assert robust.any() and (~robust).any()
    assert np.all(got[robust] >= PIXELDP["construction_bound"] * (1 - 1e-12))


def test_gaussian_search_sensitivity_cancels_and_large_batches() -> None:
    rng = np.random.default_rng(2)
    pl = rng.uniform(0.0, 1.0, 5000)
    pu = rng.uniform(0.0, 1.0, 5000) * (1 - pl)
    base = _gauss(pl, pu)
    np.testing.assert_array_equal(base, _gauss(pl, pu, sensitivity=3.7))
    # chunked evaluation == one row at a time
    idx = rng.integers(0, 5000, 10)
    np.testing.assert_array_equal(base[idx], [float(_gauss(pl[i], pu[i])) for i in idx])


def test_pixeldp_validation() -> None:
    with pytest.raises(ConfigError, match=r"mechanism .*'uniform'"):
        pixeldp_robust_size_from_bounds(
            0.9, 0.1, mechanism="uniform", epsilon=1, delta=0.05, construction_bound=0.1
        )
    with pytest.raises(ValueError, match="delta"):
        _gauss(0.9, 0.1, delta=1.5)
    with pytest.raises(ValueError, match=r"p_lower .*1.2"):
        _gauss(1.2, 0.1)
    with pytest.raises(ValueError, match=r"n_top \+ n_second"):
        pixeldp_robust_size(60, 50, 100, mechanism="gaussian", eta=0.05, **PIXELDP)


def test_pixeldp_bounds_from_counts_are_bonferroni_clopper_pearson_of_the_top_two() -> None:
    rng = np.random.default_rng(7)
    n, k, eta = 300, 10, 0.05
    counts = rng.multinomial(n, rng.dirichlet(np.full(k, 0.3), size=60))
    counts[0] = 0
    counts[0, [4, 7]] = 150  # a tie: the first label wins, and certifies nothing
    got = pixeldp_bounds_from_counts(counts, n, eta=eta)
    ranked = np.sort(counts, axis=1)
    np.testing.assert_array_equal(got.labels, counts.argmax(axis=1))
    assert got.labels.dtype == np.int64 and got.labels[0] == 4
    # one-sided level eta/K == two-sided statsmodels alpha 2 eta/K
    pl = proportion_confint(ranked[:, -1], n, alpha=2 * eta / k, method="beta")[0]
    pu = proportion_confint(ranked[:, -2], n, alpha=2 * eta / k, method="beta")[1]
    np.testing.assert_allclose(got.p_lower, pl, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.p_upper, pu, rtol=1e-9, atol=1e-12)
    assert got.p_lower[0] < got.p_upper[0]
    pair = pixeldp_count_bounds(ranked[:, -1], ranked[:, -2], n, num_classes=k, eta=eta)
    np.testing.assert_array_equal(pair[0], got.p_lower)
    np.testing.assert_array_equal(pair[1], got.p_upper)
    # Tensors in, tensors out; one label: no runner-up, p_upper from a count of 0.
    as_tensor = pixeldp_bounds_from_counts(torch.from_numpy(counts), n, eta=eta)
    assert torch.equal(as_tensor.labels, torch.from_numpy(got.labels))
    assert torch.equal(as_tensor.p_upper, torch.from_numpy(got.p_upper))
    single = pixeldp_bounds_from_counts(np.array([[n]]), n, eta=eta)  # K = 1: level eta
    assert single.labels[0] == 0 and single.p_upper[0] == pytest.approx(1 - eta ** (1 / n))
    with pytest.raises(ValueError, match=r"counts must have shape \(N, K\)"):
        pixeldp_bounds_from_counts(np.array([n]), n, eta=eta)


def test_pixeldp_bounds_from_softmax_bound_every_other_label() -> None:
    rng = np.random.default_rng(8)
    n, k, eta = 200, 10, 0.05
    draws = rng.dirichlet(np.full(k, 0.4), size=(30, n))  # (N, n, K) softmax vectors
    s, sq = draws.sum(axis=1), (draws**2).sum(axis=1)
    got = pixeldp_bounds_from_softmax(s, sq, n, eta=eta)
    lo, hi = softmax_bounds(s, sq, n, num_classes=k, eta=eta)
    rows = np.arange(30)
    np.testing.assert_array_equal(got.labels, s.argmax(axis=1))
    np.testing.assert_array_equal(got.p_lower, lo[rows, got.labels])
    others = np.ones_like(hi, dtype=bool)
    others[rows, got.labels] = False
    expected = np.array([hi[i][others[i]].max() for i in rows])
    np.testing.assert_array_equal(got.p_upper, expected)


@pytest.mark.parametrize("eps", [0.25, 0.5, 1.0])
def test_gaussian_l_max_is_at_most_about_1_45_l_over_epsilon(eps: float) -> None:
    # eps' <= 1 and (1 + e^eps') delta' <= p_lower <= 1 cap L' = sigma eps' / sqrt(2
    # ln(1.25/delta')) at L sqrt(ln(1.25/delta)) / (eps sqrt(ln(1.25 (1 + e)))) ~ 1.447 L / eps
    # for delta = 0.05; the certain prediction (p_lower = 1, p_upper = 0) comes close.
    big_l = PIXELDP["construction_bound"]
    cap = (
        big_l * math.sqrt(math.log(1.25 / 0.05)) / (eps * math.sqrt(math.log(1.25 * (1 + math.e))))
    )
    assert cap == pytest.approx(1.4474 * big_l / eps, rel=1e-4)
    best = float(_gauss(1.0, 0.0, epsilon=eps))
    assert 0.998 * cap <= best <= cap
    rng = np.random.default_rng(4)
    pl = rng.uniform(0.0, 1.0, 2000)
    assert np.all(_gauss(pl, rng.uniform(0.0, 1.0, 2000) * (1 - pl), epsilon=eps) <= cap)


# --------------------------------------------------------------------------- smoothing
def test_smoothing_radius_matches_scipy() -> None:
    n, sigma, alpha = 1000, 0.25, 0.001
    k = np.arange(1, n + 1)
    got = smoothing_radius(k, n, sigma, alpha)
    expected = sigma * sps.norm.ppf(sps.beta.ppf(alpha, k, n - k + 1))
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert np.all((got < 0) == (sps.beta.ppf(alpha, k, n - k + 1) < 0.5))
    r0 = float(smoothing_radius(0, n, sigma, alpha))
    assert np.isfinite(r0) and r0 < 0


def test_smoothing_radius_maximum_matches_cohen() -> None:
    # REFERENCE.md §2: with n = 1e5 and alpha = 0.001, R <= 3.81 sigma.
    r = float(smoothing_radius(100_000, 100_000, 1.0, 0.001))
    assert r == pytest.approx(3.81, abs=0.005)


def test_smoothing_radius_tensor_and_validation() -> None:
    out = smoothing_radius(torch.tensor([90, 60]), 100, 0.5, 0.01)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    with pytest.raises(ValueError, match="sigma"):
        smoothing_radius(90, 100, 0.0, 0.01)
    with pytest.raises(CertbenchError, match="alpha"):
        smoothing_radius(90, 100, 0.5, 2.0)


def test_gaussian_radius_from_bound() -> None:
    pl = np.array([0.3, 0.5, 0.9, 0.999])
    np.testing.assert_allclose(gaussian_radius_from_bound(pl, 0.5), 0.5 * sps.norm.ppf(pl))
    # With p_upper = 1 - p_lower the two-sided form equals the one-sided one.
    np.testing.assert_allclose(
        gaussian_radius_from_bound(pl, 0.5, p_upper=1 - pl), 0.5 * sps.norm.ppf(pl), rtol=1e-12
    )
    pu = np.array([0.1, 0.2, 0.05, 0.0005])
    np.testing.assert_allclose(
        gaussian_radius_from_bound(pl, 0.5, p_upper=pu, sensitivity=2.0),
        0.25 * (sps.norm.ppf(pl) - sps.norm.ppf(pu)) / 2.0,
    )
    assert np.isfinite(gaussian_radius_from_bound(np.array([0.0, 1.0]), 1.0)).all()


# --------------------------------------------------------------------------- norms
FACTORS = {
    ("l2", "linf"): lambda d: 1 / math.sqrt(d),
    ("l2", "l1"): lambda d: 1.0,
    ("linf", "l2"): lambda d: 1.0,
    ("linf", "l1"): lambda d: 1.0,
    ("l1", "l2"): lambda d: 1 / math.sqrt(d),
    ("l1", "linf"): lambda d: 1 / d,
}
ORD = {"l1": 1, "l2": 2, "linf": np.inf}


@pytest.mark.parametrize(("src", "dst"), list(FACTORS))
def test_convert_radius_is_contained_and_tight(src: str, dst: str) -> None:
    dim, r = 49, 0.7
    got = float(convert_radius(r, from_norm=src, to_norm=dst, dim=dim))
    assert got == pytest.approx(r * FACTORS[src, dst](dim), rel=1e-14)
    rng = np.random.default_rng(1)
    # Containment: points of the target ball of radius `got` lie in the certified ball.
    for kind in ("gauss", "sparse", "sign"):
        v = rng.normal(size=(2000, dim))
        if kind == "sparse":
            v *= rng.random((2000, dim)) < 0.05
            v[:, 0] += 1.0
        elif kind == "sign":
            v = np.sign(v)
        v *= got * 0.999999 / np.linalg.norm(v, ord=ORD[dst], axis=1, keepdims=True)
        assert np.all(np.linalg.norm(v, ord=ORD[src], axis=1) < r)
    # Tightness: a point just outside the target ball leaves the certified ball.
    # (the all-ones direction when the source norm is the larger one, else a basis vector)
    worst = np.ones(dim) if ORD[src] < ORD[dst] else np.eye(dim)[0]
    worst *= got * 1.000001 / np.linalg.norm(worst, ord=ORD[dst])
    assert np.linalg.norm(worst, ord=ORD[src]) > r


def test_convert_radius_identity_sign_and_types() -> None:
    r = torch.tensor([0.5, 0.0, -0.2])
    out = convert_radius(r, from_norm="l2", to_norm="l2", dim=10)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    np.testing.assert_array_equal(out.numpy(), r.double().numpy())
    out = convert_radius(np.array([0.5, 0.0, -0.2]), from_norm="l2", to_norm="linf", dim=4)
    np.testing.assert_allclose(out, [0.25, 0.0, -0.1])
    with pytest.raises(ConfigError, match=r"to_norm .*'l3'"):
        convert_radius(1.0, from_norm="l2", to_norm="l3", dim=4)
    with pytest.raises(ValueError, match="dim"):
        convert_radius(1.0, from_norm="l2", to_norm="l1", dim=0)
