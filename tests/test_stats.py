"""bench.stats against scipy / statsmodels, and seeded coverage checks of the bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps
from statsmodels.stats.proportion import proportion_confint

from bench.errors import CertbenchError
from bench.stats import (
    binomial_test_pvalue,
    empirical_bernstein_bounds,
    hoeffding_bounds,
    lower_confidence_bound,
    softmax_bounds,
    upper_confidence_bound,
)

ALPHAS = [1e-3, 0.005, 0.05, 0.3]


def _grid() -> tuple[np.ndarray, np.ndarray]:
    """(k, n) pairs over several n, always including k = 0, 1, n - 1 and n."""
    ks, ns = [], []
    for n in (1, 2, 3, 10, 57, 100, 2000, 100_000):
        k = np.unique(np.r_[0, 1, n - 1, n, np.linspace(0, n, 13).round()].clip(0, n))
        ks.append(k)
        ns.append(np.full(k.shape, n))
    return np.concatenate(ks), np.concatenate(ns)


# --------------------------------------------------------------------------- Clopper–Pearson
@pytest.mark.parametrize("alpha", ALPHAS)
def test_lower_bound_matches_scipy_and_statsmodels(alpha: float) -> None:
    k, n = _grid()
    got = lower_confidence_bound(k, n, alpha)
    with np.errstate(invalid="ignore"):
        scipy_ref = np.where(k == 0, 0.0, sps.beta.ppf(alpha, k, n - k + 1))
    sm_ref = proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]
    # Same incomplete-beta inverse underneath; allow only floating-point noise.
    np.testing.assert_allclose(got, scipy_ref, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(got, sm_ref, rtol=1e-10, atol=1e-15)
    assert np.all(got[k == 0] == 0.0)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_upper_bound_matches_scipy_and_statsmodels(alpha: float) -> None:
    k, n = _grid()
    got = upper_confidence_bound(k, n, alpha)
    with np.errstate(invalid="ignore"):
        scipy_ref = np.where(k == n, 1.0, sps.beta.ppf(1 - alpha, k + 1, n - k))
    sm_ref = proportion_confint(k, n, alpha=2 * alpha, method="beta")[1]
    np.testing.assert_allclose(got, scipy_ref, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(got, sm_ref, rtol=1e-10, atol=1e-15)
    assert np.all(got[k == n] == 1.0)


def test_closed_forms_at_the_ends() -> None:
    # k = n: Beta^-1(a; n, 1) = a^(1/n); k = 0: upper = 1 - a^(1/n).
    n, a = 2000, 0.005
    assert lower_confidence_bound(n, n, a) == pytest.approx(a ** (1 / n), rel=1e-12)
    assert upper_confidence_bound(0, n, a) == pytest.approx(1 - a ** (1 / n), rel=1e-9)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 10**6),
    frac=st.floats(0, 1),
    alpha=st.floats(1e-6, 0.5),
)
def test_bounds_bracket_the_estimate_and_mirror(n: int, frac: float, alpha: float) -> None:
    k = round(frac * n)
    lo = float(lower_confidence_bound(k, n, alpha))
    hi = float(upper_confidence_bound(k, n, alpha))
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    # Mirror identity of Clopper–Pearson: the upper bound for k is 1 - lower bound for n - k.
    mirrored = 1.0 - float(lower_confidence_bound(n - k, n, alpha))
    assert hi == pytest.approx(mirrored, rel=1e-9, abs=1e-12)


def test_lower_bound_is_monotone_in_k_and_alpha() -> None:
    k = np.arange(0, 501)
    lo = lower_confidence_bound(k, 500, 0.01)
    assert np.all(np.diff(lo) > 0)
    assert np.all(lower_confidence_bound(k, 500, 0.001) <= lo)


@pytest.mark.parametrize(
    ("k", "n", "alpha", "match"),
    [
        (-1, 10, 0.05, "-1"),
        (11, 10, 0.05, "k=11 > n=10"),
        (2.5, 10, 0.05, "2.5"),
        (1, 0, 0.05, "n .*got 0"),
        (1, 10, 0.0, "alpha .*got 0"),
        (1, 10, 1.0, "alpha .*got 1"),
        (1, 10, float("nan"), "nan"),
        (np.array([1, 2, 30]), 10, 0.05, r"k=30 > n=10 at index \(2,\)"),
    ],
)
def test_invalid_arguments_raise_with_the_value(k, n, alpha, match) -> None:
    for fn in (lower_confidence_bound, upper_confidence_bound):
        with pytest.raises(ValueError, match=match) as info:
            fn(k, n, alpha)
        assert isinstance(info.value, CertbenchError)


def test_types_follow_the_input() -> None:
    out = lower_confidence_bound(5, 10, 0.05)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == ()
    out = upper_confidence_bound(np.array([1, 2]), 10, 0.05)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (2,)
    t = torch.tensor([[0, 3], [7, 10]])
    out = lower_confidence_bound(t, 10, 0.05)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    assert out.shape == (2, 2) and out.device == t.device
    np.testing.assert_allclose(out.numpy(), lower_confidence_bound(t.numpy(), 10, 0.05))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensor_output_stays_on_the_input_device() -> None:
    t = torch.tensor([3, 9], device="cuda")
    assert lower_confidence_bound(t, 10, 0.05).device == t.device
    assert binomial_test_pvalue(t, t).device == t.device


@pytest.mark.statistical
@pytest.mark.parametrize("p", [0.02, 0.3, 0.5, 0.9, 0.995])
def test_clopper_pearson_coverage(p: float) -> None:
    """Over M seeded binomials with known p, each one-sided bound misses p at rate <= alpha.

    Clopper–Pearson is exact-conservative: P(miss) <= alpha. The observed miss count is
    Binomial(M, q) with q <= alpha, so its rate exceeds alpha + 3 sqrt(alpha (1-alpha) / M)
    with probability ~0.1% (3 standard deviations, normal approximation); the seed makes
    the test deterministic.
    """
    m, n, alpha = 40_000, 100, 0.05
    rng = np.random.default_rng(20190421 + int(p * 1000))
    k = rng.binomial(n, p, size=m)
    tol = alpha + 3 * math.sqrt(alpha * (1 - alpha) / m)
    assert np.mean(lower_confidence_bound(k, n, alpha) > p) <= tol
    assert np.mean(upper_confidence_bound(k, n, alpha) < p) <= tol
    if p == 0.02:
        # The check has teeth: the normal-approximation (Wald) upper bound misses far too
        # often near 0 (k = 0 alone has probability 0.98^100 = 0.13).
        phat = k / n
        wald = phat + sps.norm.ppf(1 - alpha) * np.sqrt(phat * (1 - phat) / n)
        assert np.mean(wald < p) > tol


# --------------------------------------------------------------------------- mean bounds
def test_hoeffding_formula_and_clipping() -> None:
    mean = np.array([[0.0, 0.5, 0.999]])
    lo, hi = hoeffding_bounds(mean, 500, num_classes=10, eta=0.05)
    half = math.sqrt(math.log(10 / 0.05) / (2 * 500))
    np.testing.assert_allclose(lo, [[0.0, 0.5 - half, 0.999 - half]], rtol=1e-14)
    np.testing.assert_allclose(hi, [[half, 0.5 + half, 1.0]], rtol=1e-14)


def test_empirical_bernstein_formula() -> None:
    mean, var, n, k, eta = 0.7, 0.01, 1000, 10, 0.05
    lo, hi = empirical_bernstein_bounds(mean, var, n, num_classes=k, eta=eta)
    log_term = math.log(2 * k / eta)
    half = math.sqrt(2 * var * log_term / n) + 7 * log_term / (3 * (n - 1))
    assert float(lo) == pytest.approx(mean - half, rel=1e-14)
    assert float(hi) == pytest.approx(mean + half, rel=1e-14)
    lo1, hi1 = empirical_bernstein_bounds(0.3, 0.0, 1, num_classes=k, eta=eta)
    assert (float(lo1), float(hi1)) == (0.0, 1.0)  # n = 1: vacuous


def test_softmax_bounds_from_sums_match_raw_samples() -> None:
    rng = np.random.default_rng(0)
    n, num_classes = 400, 5
    # (N, n, K) softmax draws: low-variance rows favour Bernstein, uniform rows Hoeffding.
    logits = (
        rng.normal(size=(6, 1, num_classes)) * 3
        + rng.normal(size=(6, n, num_classes))
        * (np.array([0.05, 0.05, 0.05, 3, 3, 3])[:, None, None])
    )
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    lo, hi = softmax_bounds(probs.sum(1), (probs**2).sum(1), n, num_classes=num_classes, eta=0.05)
    mean, var = probs.mean(1), probs.var(1, ddof=1)
    h_lo, h_hi = hoeffding_bounds(mean, n, num_classes=num_classes, eta=0.05)
    b_lo, b_hi = empirical_bernstein_bounds(mean, var, n, num_classes=num_classes, eta=0.05)
    np.testing.assert_allclose(lo, np.maximum(h_lo, b_lo), atol=1e-12)
    np.testing.assert_allclose(hi, np.minimum(h_hi, b_hi), atol=1e-12)
    # Both rules are exercised by this data.
    assert np.any(b_lo > h_lo) and np.any(h_lo > b_lo)


@pytest.mark.statistical
def test_softmax_bounds_coverage() -> None:
    """Seeded: the bounds on E[score] hold at rate >= 1 - 2 eta / K per class and side.

    Scores are Beta(2, 5) (mean 2/7) for class 0. Each per-side bound fails with prob <=
    eta/K; taking the tighter of Hoeffding and Bernstein can double that, so the allowed
    miss rate is 2 eta / K + 3 sqrt(q (1 - q) / M) with q = 2 eta / K (3 standard deviations).
    """
    m, n, num_classes, eta = 4000, 50, 2, 0.2
    rng = np.random.default_rng(7)
    scores = rng.beta(2, 5, size=(m, n))
    true_mean = 2 / 7
    lo, hi = softmax_bounds(scores.sum(1), (scores**2).sum(1), n, num_classes=num_classes, eta=eta)
    q = 2 * eta / num_classes
    tol = q + 3 * math.sqrt(q * (1 - q) / m)
    assert np.mean(lo > true_mean) <= tol
    assert np.mean(hi < true_mean) <= tol


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0, "eta": 0.05}, "num_classes"),
        ({"num_classes": 10, "eta": 1.5}, "eta .*1.5"),
    ],
)
def test_mean_bounds_validate(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        hoeffding_bounds(0.5, 10, **kwargs)
    with pytest.raises(ValueError, match=match):
        softmax_bounds(np.ones(3), np.ones(3), 10, **kwargs)


# --------------------------------------------------------------------------- binomial test
def test_binomial_test_matches_scipy_on_a_grid() -> None:
    pairs = [(a, b) for a in range(0, 40) for b in range(0, 40) if a + b > 0]
    pairs += [(520, 480), (5200, 4800), (60_000, 40_000), (99_990, 10), (1, 100_000)]
    c1 = np.array([a for a, _ in pairs])
    c2 = np.array([b for _, b in pairs])
    ref = np.array([sps.binomtest(a, a + b, 0.5).pvalue for a, b in pairs])
    np.testing.assert_allclose(binomial_test_pvalue(c1, c2), ref, rtol=1e-9, atol=1e-300)


@settings(max_examples=150, deadline=None)
@given(c1=st.integers(0, 20_000), c2=st.integers(0, 20_000))
def test_binomial_test_matches_scipy_property(c1: int, c2: int) -> None:
    got = float(binomial_test_pvalue(c1, c2))
    if c1 + c2 == 0:
        assert got == 1.0
    else:
        assert got == pytest.approx(sps.binomtest(c1, c1 + c2, 0.5).pvalue, rel=1e-9, abs=1e-300)


def test_binomial_test_tensor_and_validation() -> None:
    out = binomial_test_pvalue(torch.tensor([70, 50]), torch.tensor([30, 50]))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    assert out[1].item() == 1.0
    with pytest.raises(ValueError, match=r"c2 .*-3"):
        binomial_test_pvalue(3, -3)
