"""Confidence bounds and tests on Monte Carlo counts (pure, vectorised, no sampling here).

Every function takes numpy arrays, Python scalars or torch tensors and broadcasts its
arguments like numpy. The result is a ``float64`` numpy array (0-d for scalar inputs), or a
``float64`` tensor on the device of the first tensor argument when any argument is a tensor.
The arithmetic itself always runs in float64 numpy/scipy on the CPU (counts are small
arrays; the bounds need scipy's incomplete-beta inverse).

Guarantees are stated per function. The randomized-smoothing certificate (Cohen et al.,
2019) uses :func:`lower_confidence_bound`; PixelDP (Lecuyer et al., 2019) uses the
Bonferroni-corrected Clopper–Pearson pair or the Hoeffding / empirical-Bernstein bounds of
:func:`softmax_bounds`; Cohen's PREDICT uses :func:`binomial_test_pvalue`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import special

from bench.errors import ConfigError

__all__ = [
    "ArrayLike",
    "StatisticsValueError",
    "binomial_test_pvalue",
    "empirical_bernstein_bounds",
    "hoeffding_bounds",
    "lower_confidence_bound",
    "softmax_bounds",
    "upper_confidence_bound",
]

ArrayLike = np.ndarray | torch.Tensor | float | int


class StatisticsValueError(ConfigError, ValueError):
    """An argument of a statistical function is out of its domain.

    It is a :class:`ValueError` (what numerical code expects) and a
    :class:`bench.errors.ConfigError` (so the CLI reports it as one line when the value came
    from a spec, e.g. ``alpha``). The message names the argument, the offending value and
    what is allowed.
    """


# --------------------------------------------------------------------------- array helpers
def _to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    """``x`` as a float64 numpy array (tensors are detached and copied to the CPU)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise StatisticsValueError(
            f"{name}: expected a number, numpy array or torch tensor, got {type(x).__name__}"
        ) from exc


def _template(*args: Any) -> torch.Tensor | None:
    """The first tensor among ``args`` (fixes the output type and device), else None."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    return None


def _restore(result: np.ndarray, like: torch.Tensor | None) -> np.ndarray | torch.Tensor:
    """Return ``result`` as float64 numpy, or as a float64 tensor on ``like``'s device."""
    result = np.asarray(result, dtype=np.float64)
    if like is None:
        return result
    return torch.from_numpy(np.ascontiguousarray(result)).to(like.device)


def _fmt(value: Any) -> str:
    """A plain number for messages: ``3`` for integer values, ``0.25`` / ``nan`` otherwise."""
    v = float(value)
    return str(int(v)) if v.is_integer() else repr(v)


def _first_bad(values: np.ndarray, bad: np.ndarray) -> str:
    """Describe the first offending entry of ``values`` where ``bad`` is True."""
    values, bad = np.broadcast_arrays(values, bad)
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    where = f" at index {idx}" if values.ndim else ""
    return f"{_fmt(values[idx])}{where}"


def _check_alpha(alpha: np.ndarray, name: str = "alpha") -> None:
    bad = ~((alpha > 0) & (alpha < 1))
    if bad.any():
        raise StatisticsValueError(
            f"{name} must lie strictly between 0 and 1, got {_first_bad(alpha, bad)}"
        )


def _check_counts(k: np.ndarray, n: np.ndarray, k_name: str = "k") -> None:
    """Require integer-valued counts with n >= 1 and 0 <= k <= n (NaN fails every check)."""
    bad_n = ~((n >= 1) & (n == np.floor(n)))
    if bad_n.any():
        raise StatisticsValueError(
            f"n (number of draws) must be an integer >= 1, got {_first_bad(n, bad_n)}"
        )
    bad_k = ~((k >= 0) & (k == np.floor(k)))
    if bad_k.any():
        raise StatisticsValueError(
            f"{k_name} (count) must be an integer >= 0, got {_first_bad(k, bad_k)}"
        )
    over = k > n
    if over.any():
        kb, nb = np.broadcast_arrays(k, n)
        idx = tuple(int(i) for i in np.argwhere(np.broadcast_to(over, kb.shape))[0])
        raise StatisticsValueError(
            f"{k_name} (count) must not exceed n, got {k_name}={_fmt(kb[idx])} > n={_fmt(nb[idx])}"
            + (f" at index {idx}" if kb.ndim else "")
        )


def _check_positive(x: np.ndarray, name: str) -> None:
    bad = ~(x > 0)
    if bad.any():
        raise StatisticsValueError(f"{name} must be > 0, got {_first_bad(x, bad)}")


# --------------------------------------------------------------------------- Clopper–Pearson
def lower_confidence_bound(k: ArrayLike, n: ArrayLike, alpha: ArrayLike) -> Any:
    """One-sided ``(1 - alpha)`` Clopper–Pearson lower bound on a binomial proportion.

    Returns ``Beta^-1(alpha; k, n - k + 1)``, and ``0`` where ``k == 0``. Guarantee: if
    ``k ~ Binomial(n, p)``, then ``P(bound <= p) >= 1 - alpha`` for every ``p``. Equals
    ``statsmodels.stats.proportion.proportion_confint(k, n, alpha=2 * alpha,
    method="beta")[0]``.

    Args:
        k: successes, integer-valued, ``0 <= k <= n`` (any broadcastable shape).
        n: trials, integer-valued, ``n >= 1``.
        alpha: failure probability, ``0 < alpha < 1``.

    Raises:
        StatisticsValueError: (a ``ValueError``) naming the offending value.
    """
    like = _template(k, n, alpha)
    kk, nn, aa = _to_numpy(k, "k"), _to_numpy(n, "n"), _to_numpy(alpha, "alpha")
    _check_counts(kk, nn)
    _check_alpha(aa)
    zero = kk == 0
    # betaincinv(0, ., .) is nan; substitute a harmless shape parameter and mask afterwards.
    bound = special.betaincinv(np.where(zero, 1.0, kk), nn - kk + 1.0, aa)
    return _restore(np.where(zero, 0.0, bound), like)


def upper_confidence_bound(k: ArrayLike, n: ArrayLike, alpha: ArrayLike) -> Any:
    """One-sided ``(1 - alpha)`` Clopper–Pearson upper bound on a binomial proportion.

    Returns ``Beta^-1(1 - alpha; k + 1, n - k)``, and ``1`` where ``k == n``. Guarantee:
    ``P(bound >= p) >= 1 - alpha``. Same argument rules as :func:`lower_confidence_bound`.
    """
    like = _template(k, n, alpha)
    kk, nn, aa = _to_numpy(k, "k"), _to_numpy(n, "n"), _to_numpy(alpha, "alpha")
    _check_counts(kk, nn)
    _check_alpha(aa)
    full = kk == nn
    # betaincinv(., 0, .) is nan; substitute a harmless shape parameter and mask afterwards.
    bound = special.betaincinv(kk + 1.0, np.where(full, 1.0, nn - kk), 1.0 - aa)
    return _restore(np.where(full, 1.0, bound), like)


# --------------------------------------------------------------------------- mean bounds
def _check_eta_classes(num_classes: int, eta: float) -> None:
    if not (isinstance(num_classes, (int, np.integer)) and num_classes >= 1):
        raise StatisticsValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    _check_alpha(np.asarray(eta, dtype=np.float64), "eta")


def hoeffding_bounds(
    mean: ArrayLike, n: ArrayLike, *, num_classes: int, eta: float
) -> tuple[Any, Any]:
    """Hoeffding bounds on the expectations of ``num_classes`` scores in [0, 1].

    ``(lower, upper) = mean ∓ sqrt(ln(K / eta) / (2 n))``, clipped to ``[0, 1]``.

    Guarantee (union bound over the K classes, ``eta / K`` per class and per side, as in the
    PixelDP reference): each one-sided bound fails with probability ``<= eta / K``, so all K
    lower bounds hold simultaneously with probability ``>= 1 - eta``, and so do all K upper
    bounds; both sides of all K intervals hold together with probability ``>= 1 - 2 eta``
    (pass ``eta / 2`` for a strict two-sided ``1 - eta`` statement).

    Args:
        mean: empirical means over ``n`` i.i.d. draws, values in [0, 1], e.g. shape ``(N, K)``.
        n: number of draws (broadcastable to ``mean``), ``>= 1``.
        num_classes: K, the number of simultaneous intervals (Bonferroni factor).
        eta: total failure probability, ``0 < eta < 1``.
    """
    like = _template(mean, n)
    m, nn = _to_numpy(mean, "mean"), _to_numpy(n, "n")
    _check_eta_classes(num_classes, eta)
    _check_positive(nn, "n")
    half = np.sqrt(np.log(num_classes / eta) / (2.0 * nn))
    lower = np.clip(m - half, 0.0, 1.0)
    upper = np.clip(m + half, 0.0, 1.0)
    return _restore(lower, like), _restore(upper, like)


def empirical_bernstein_bounds(
    mean: ArrayLike, var: ArrayLike, n: ArrayLike, *, num_classes: int, eta: float
) -> tuple[Any, Any]:
    """Empirical-Bernstein bounds (Maurer & Pontil 2009, Thm 4) on scores in [0, 1].

    Half-width ``sqrt(2 V ln(2K/eta) / n) + 7 ln(2K/eta) / (3 (n - 1))`` around ``mean``,
    clipped to ``[0, 1]``; ``V`` is the *sample* variance (denominator ``n - 1``). Where
    ``n < 2`` the bound is vacuous (``[0, 1]``).

    Guarantee: as :func:`hoeffding_bounds` — each one-sided bound fails with probability
    ``<= eta / K`` (union bound over the K classes).

    Args:
        mean: empirical means, values in [0, 1], e.g. shape ``(N, K)``.
        var: sample variances (``n - 1`` denominator), same shape, ``>= 0``.
        n: number of draws (broadcastable), ``>= 1``.
        num_classes: K. eta: total failure probability.
    """
    like = _template(mean, var, n)
    m, v, nn = _to_numpy(mean, "mean"), _to_numpy(var, "var"), _to_numpy(n, "n")
    _check_eta_classes(num_classes, eta)
    _check_positive(nn, "n")
    log_term = np.log(2.0 * num_classes / eta)
    with np.errstate(divide="ignore", invalid="ignore"):
        half = np.sqrt(2.0 * np.maximum(v, 0.0) * log_term / nn) + 7.0 * log_term / (
            3.0 * (nn - 1.0)
        )
    half = np.where(nn >= 2, half, np.inf)
    lower = np.clip(m - half, 0.0, 1.0)
    upper = np.clip(m + half, 0.0, 1.0)
    return _restore(lower, like), _restore(upper, like)


def softmax_bounds(
    sum: ArrayLike, sq_sum: ArrayLike, n: ArrayLike, *, num_classes: int, eta: float
) -> tuple[Any, Any]:
    """Bounds on the expected softmax from per-class sums over ``n`` noise draws.

    ``mean = sum / n``; sample variance ``V = (sq_sum - n mean^2) / (n - 1)`` (clipped at 0);
    per entry, the tighter of :func:`hoeffding_bounds` and :func:`empirical_bernstein_bounds`
    (the PixelDP reference's rule).

    Guarantee: each of the two bounds alone fails with probability ``<= eta / K`` per class
    and side (union bound over the K classes, so all K lower bounds hold simultaneously with
    probability ``>= 1 - eta`` for either bound). Picking the tighter of the two after seeing
    the data can, in the worst case, add their failure probabilities: the entry-wise
    tighter bound is guaranteed at ``eta / K`` per class and side only up to a factor 2
    (pass ``eta / 2`` for a strict statement).

    Args:
        sum: ``(N, K)`` sums of the softmax scores over the draws.
        sq_sum: ``(N, K)`` sums of the squared softmax scores.
        n: number of draws (scalar or broadcastable), ``>= 1``.
        num_classes: K. eta: total failure probability.

    Returns:
        ``(lower, upper)``, each shaped like ``sum``, values in [0, 1].
    """
    like = _template(sum, sq_sum, n)
    s, sq, nn = _to_numpy(sum, "sum"), _to_numpy(sq_sum, "sq_sum"), _to_numpy(n, "n")
    _check_positive(nn, "n")
    mean = s / nn
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.where(nn >= 2, (sq - nn * mean * mean) / (nn - 1.0), 0.0)
    var = np.maximum(var, 0.0)
    h_lo, h_hi = hoeffding_bounds(mean, nn, num_classes=num_classes, eta=eta)
    b_lo, b_hi = empirical_bernstein_bounds(mean, var, nn, num_classes=num_classes, eta=eta)
    return _restore(np.maximum(h_lo, b_lo), like), _restore(np.minimum(h_hi, b_hi), like)


# --------------------------------------------------------------------------- binomial test
def binomial_test_pvalue(c1: ArrayLike, c2: ArrayLike) -> Any:
    """Two-sided exact binomial test of ``c1`` successes in ``c1 + c2`` trials at p = 1/2.

    Equals ``scipy.stats.binomtest(c1, c1 + c2, 0.5).pvalue`` (vectorised). At p = 1/2 the
    null distribution is symmetric, so the p-value is ``min(1, 2 P(X <= min(c1, c2)))``,
    ``X ~ Binomial(c1 + c2, 1/2)``. Where ``c1 + c2 == 0`` there is no evidence and the
    p-value is 1 (scipy raises there). Used by Cohen's PREDICT: abstain when the p-value
    exceeds ``alpha``.

    Args:
        c1, c2: integer-valued counts ``>= 0`` (broadcastable), e.g. the top two class counts.
    """
    like = _template(c1, c2)
    a, b = _to_numpy(c1, "c1"), _to_numpy(c2, "c2")
    for name, x in (("c1", a), ("c2", b)):
        bad = ~((x >= 0) & (x == np.floor(x)))
        if bad.any():
            raise StatisticsValueError(
                f"{name} (count) must be an integer >= 0, got {_first_bad(x, bad)}"
            )
    total = a + b
    k = np.minimum(a, b)
    # P(X <= k) = I_{1/2}(n - k, k + 1) = betaincc(k + 1, n - k, 1/2) for k < n (scipy's own
    # binomial cdf; scipy.special only: scipy.stats costs half a second to import)
    cdf = special.betaincc(k + 1.0, np.maximum(total - k, 1.0), 0.5)
    p = np.minimum(1.0, 2.0 * np.where(k >= total, 1.0, cdf))
    return _restore(np.where(total == 0, 1.0, p), like)
