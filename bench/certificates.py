"""Certified radii from Monte Carlo bounds: randomized smoothing and PixelDP (pure, vectorised).

Inputs are numpy arrays, Python scalars or torch tensors (broadcast like numpy); results are
``float64`` numpy arrays, or ``float64`` tensors on the device of the first tensor argument
(see :mod:`bench.stats`). Radii are in input (pixel, [0, 1] range) units for the stated norm.

Every Monte Carlo certificate holds with the probability of the confidence bounds it was
computed from (``1 - alpha`` for smoothing, ``1 - eta`` for PixelDP); the functions here are
deterministic maps from those bounds to radii.

* Randomized smoothing (Cohen et al., ICML 2019, Thm 1): ``R = sigma * Phi^-1(p_lower)``
  in the l2 norm; ``R < 0`` (``p_lower < 1/2``) means *abstain*.
* PixelDP (Lecuyer et al., S&P 2019; REFERENCE.md §1), in the paper's order: bounds on the
  expected scores from argmax counts (:func:`pixeldp_bounds_from_counts`, Clopper–Pearson
  with Bonferroni over K) or softmax sums (:func:`pixeldp_bounds_from_softmax`, Hoeffding /
  empirical Bernstein); the robustness test ``p_lower > e^{2 eps} p_upper + (1 + e^eps)
  delta`` at one attack size (:func:`pixeldp_is_robust`); the largest attack size ``L_max``
  in the construction norm for which the test holds for some ``(eps', delta')`` that the
  fixed noise satisfies (:func:`pixeldp_robust_size_from_bounds`,
  :func:`pixeldp_robust_size`); then :func:`convert_radius` to the other norms.

* Sequential PixelDP (:class:`PixelDPSequentialTest`): the robustness test at a grid of
  thresholds, from confidence sequences (:mod:`bench.confseq`) on every label's argmax
  probability, for the round loop of :mod:`bench.sampling.sequential`.

Conversion of a radius between norms is :func:`bench.threat.convert_radius` (re-exported).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from scipy import special

from bench.stats import (
    ArrayLike,
    StatisticsValueError,
    _first_bad,
    _restore,
    _template,
    _to_numpy,
    lower_confidence_bound,
    softmax_bounds,
    upper_confidence_bound,
)
from bench.threat import convert_radius  # re-exported: callers import it from here
from bench.validation import check_choice, check_int

if TYPE_CHECKING:
    from bench.confseq import ConfidenceSequence

__all__ = [
    "MECHANISMS",
    "PixelDPSequentialTest",
    "ScoreBounds",
    "convert_radius",
    "gaussian_radius_from_bound",
    "pixeldp_bounds_from_counts",
    "pixeldp_bounds_from_softmax",
    "pixeldp_count_bounds",
    "pixeldp_is_robust",
    "pixeldp_robust_size",
    "pixeldp_robust_size_from_bounds",
    "smoothing_radius",
]

MECHANISMS = ("gaussian", "laplace")

# Probabilities are clipped to [_P_MIN, _P_MAX] before Phi^-1 so radii stay finite:
# Phi^-1(_P_MIN) ~ -37.5 (a finite "abstain" radius), Phi^-1(_P_MAX) ~ 8.2.
_P_MIN = float(np.finfo(np.float64).tiny)
_P_MAX = float(np.nextafter(1.0, 0.0))

# The PixelDP reference's search grid for delta' (0.001 ... 0.299, step 0.001).
_DELTA_GRID = np.arange(1, 300, dtype=np.float64) / 1000.0


def _check_probability(p: np.ndarray, name: str) -> None:
    bad = ~((p >= 0) & (p <= 1))
    if bad.any():
        raise StatisticsValueError(f"{name} must lie in [0, 1], got {_first_bad(p, bad)}")


def _check_scalar(value: float, name: str, *, upper: float | None = None) -> float:
    """A positive finite float (strictly below ``upper`` when given), else a ConfigError."""
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise StatisticsValueError(f"{name} must be a number, got {value!r}") from exc
    if not (np.isfinite(v) and v > 0 and (upper is None or v < upper)):
        allowed = f"0 < {name} < {upper:g}" if upper is not None else f"finite {name} > 0"
        raise StatisticsValueError(f"{name} must satisfy {allowed}, got {value!r}")
    return v


# --------------------------------------------------------------------------- smoothing
def gaussian_radius_from_bound(
    p_lower: ArrayLike,
    sigma: float,
    *,
    p_upper: ArrayLike | None = None,
    sensitivity: float = 1.0,
) -> Any:
    """Tight l2 certificate of Gaussian noise from probability bounds (Cohen et al., Thm 1).

    Without ``p_upper``: ``R = sigma * Phi^-1(p_lower) / sensitivity`` (the runner-up is
    bounded by ``1 - p_lower``). With ``p_upper`` (a bound on every other class):
    ``R = sigma / 2 * (Phi^-1(p_lower) - Phi^-1(p_upper)) / sensitivity``. Valid for the
    probabilities of a hard base classifier and for expected softmax scores alike (Salman
    et al., 2019, Lemma 2). ``R <= 0`` certifies nothing (abstain).

    Args:
        p_lower: lower bound on the top class probability, in [0, 1] (any shape).
        sigma: standard deviation of the Gaussian noise, ``> 0``.
        p_upper: optional upper bound on the runner-up probability (broadcastable).
        sensitivity: l2 operator norm ``Delta`` of the (linear) map in front of the noise
            (1 when the noise is added to the image); divides the radius, giving input units.

    Returns:
        Radius in l2 input units, same shape as the broadcast inputs; finite (probabilities
        are clipped to ``[tiny, 1 - 2^-53]`` before ``Phi^-1``, which only shrinks radii).
    """
    like = _template(p_lower, p_upper) if p_upper is not None else _template(p_lower)
    pl = _to_numpy(p_lower, "p_lower")
    _check_probability(pl, "p_lower")
    s = _check_scalar(sigma, "sigma")
    d = _check_scalar(sensitivity, "sensitivity")
    z_lower = special.ndtri(np.clip(pl, _P_MIN, _P_MAX))
    if p_upper is None:
        return _restore(s * z_lower / d, like)
    pu = _to_numpy(p_upper, "p_upper")
    _check_probability(pu, "p_upper")
    z_upper = special.ndtri(np.clip(pu, _P_MIN, _P_MAX))
    return _restore(0.5 * s * (z_lower - z_upper) / d, like)


def smoothing_radius(n_top: ArrayLike, n: ArrayLike, sigma: float, alpha: float) -> Any:
    """Randomized-smoothing CERTIFY radius from the top-class count (Cohen et al., 2019).

    ``R = sigma * Phi^-1(lower_confidence_bound(n_top, n, alpha))``. ``n_top`` must count
    the class chosen on *separate* selection draws (reusing them invalidates the bound).

    Guarantee: with probability ``>= 1 - alpha`` over the estimation draws, the smoothed
    classifier returns the selected class for every l2 perturbation of norm ``< R``.
    A negative ``R`` (lower bound below 1/2) means *abstain*; where the lower bound is 0
    (``n_top == 0``) ``R = sigma * Phi^-1(tiny) ~ -37.5 sigma``, finite and negative.

    Args:
        n_top: ``(N,)`` counts of the selected class among ``n`` estimation draws.
        n: number of estimation draws (scalar or ``(N,)``).
        sigma: noise standard deviation in input units, ``> 0``.
        alpha: failure probability, ``0 < alpha < 1``.

    Returns:
        ``(N,)`` float64 l2 radii in input units.
    """
    like = _template(n_top, n)
    p_lower = lower_confidence_bound(_to_numpy(n_top, "n_top"), _to_numpy(n, "n"), alpha)
    return _restore(gaussian_radius_from_bound(p_lower, sigma), like)


# --------------------------------------------------------------------------- PixelDP
# Step 1: bounds on the expected scores (argmax counts or softmax sums), step 2: the
# robustness test and the largest certified size L_max, step 3 (below, shared with
# smoothing): conversion of the radius to other norms.
class ScoreBounds(NamedTuple):
    """The top label and bounds on the expected scores behind a PixelDP certificate.

    Attributes:
        labels: ``(N,)`` int64, the label with the largest estimate (the first on ties).
        p_lower: ``(N,)`` float64 lower bound on the top label's expected score.
        p_upper: ``(N,)`` float64 upper bound on every other label's expected score.
    """

    labels: Any
    p_lower: Any
    p_upper: Any


def _top_label(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, others)``: each row's argmax (the first on ties) and a mask of the rest."""
    labels = np.argmax(scores, axis=1)
    others = np.ones(scores.shape, dtype=bool)
    others[np.arange(scores.shape[0]), labels] = False
    return labels, others


def _per_example_table(x: ArrayLike, name: str) -> np.ndarray:
    table = _to_numpy(x, name)
    if table.ndim != 2 or table.shape[1] < 1:
        raise StatisticsValueError(
            f"{name} must have shape (N, K) with K >= 1 labels, got shape {table.shape}"
        )
    return table


def _score_bounds(
    labels: np.ndarray, p_lower: Any, p_upper: Any, like: torch.Tensor | None
) -> ScoreBounds:
    out_labels: Any = labels.astype(np.int64)
    if like is not None:
        out_labels = torch.from_numpy(out_labels).to(like.device)
    return ScoreBounds(out_labels, _restore(p_lower, like), _restore(p_upper, like))


def pixeldp_count_bounds(
    n_top: ArrayLike, n_second: ArrayLike, n: ArrayLike, *, num_classes: int, eta: float
) -> tuple[Any, Any]:
    """Clopper–Pearson bounds with Bonferroni over the K labels (REFERENCE.md §1, argmax).

    ``p_lower = Beta^-1(eta/K; n_top, n - n_top + 1)`` bounds the top label's probability of
    being the argmax of a noisy pass from below, ``p_upper = Beta^-1(1 - eta/K; n_second + 1,
    n - n_second)`` the runner-up's from above. Clopper–Pearson upper bounds grow with the
    count, so ``p_upper`` bounds every other label too.

    Guarantee: each one-sided bound fails with probability ``<= eta / K`` (the PixelDP
    reference's union bound over the K labels, which also covers a top label picked from
    the same draws).

    Args:
        n_top: ``(N,)`` largest argmax count among ``n`` noise draws.
        n_second: ``(N,)`` second-largest count (``n_top + n_second <= n``).
        n: number of draws (scalar or ``(N,)``).
        num_classes: K, the Bonferroni factor.
        eta: total failure probability, ``0 < eta < 1``.

    Returns:
        ``(p_lower, p_upper)``, ``(N,)`` float64 each, in [0, 1].
    """
    like = _template(n_top, n_second, n)
    top, second, nn = (
        _to_numpy(n_top, "n_top"),
        _to_numpy(n_second, "n_second"),
        _to_numpy(n, "n"),
    )
    check_int(num_classes, "num_classes", minimum=1)
    level = _check_scalar(eta, "eta", upper=1.0) / num_classes
    over = top + second > nn
    if np.any(over):
        raise StatisticsValueError(
            "n_top + n_second must not exceed n, got "
            f"n_top + n_second = {_first_bad(top + second, over)}"
        )
    p_lower = lower_confidence_bound(top, nn, level)
    p_upper = upper_confidence_bound(second, nn, level)
    return _restore(p_lower, like), _restore(p_upper, like)


def pixeldp_bounds_from_counts(counts: ArrayLike, n: ArrayLike, *, eta: float) -> ScoreBounds:
    """PixelDP's argmax estimator: top label and Clopper–Pearson bounds from argmax counts.

    The top label is the most frequent argmax of the ``n`` noisy passes, ``c1`` its count and
    ``c2`` the largest count of any other label (0 when ``K = 1``); the bounds are
    :func:`pixeldp_count_bounds` of ``(c1, c2)`` at ``eta / K`` with ``K = counts.shape[1]``.

    Args:
        counts: ``(N, K)`` argmax counts, each row summing to ``n``.
        n: number of draws per example.
        eta: total failure probability, ``0 < eta < 1``.

    Returns:
        :class:`ScoreBounds` (numpy, or tensors on ``counts``' device).
    """
    like = _template(counts)
    c = _per_example_table(counts, "counts")
    labels, others = _top_label(c)
    top = np.take_along_axis(c, labels[:, None], axis=1)[:, 0]
    second = np.maximum(np.where(others, c, -1.0).max(axis=1), 0.0)
    p_lower, p_upper = pixeldp_count_bounds(top, second, n, num_classes=c.shape[1], eta=eta)
    return _score_bounds(labels, p_lower, p_upper, like)


def pixeldp_bounds_from_softmax(
    softmax_sum: ArrayLike, softmax_sq_sum: ArrayLike, n: ArrayLike, *, eta: float
) -> ScoreBounds:
    """PixelDP's softmax estimator: top label and bounds from sums of the softmax over draws.

    The top label has the largest mean softmax; per label the tighter of the Hoeffding and
    empirical-Bernstein bounds at ``eta / K`` (:func:`bench.stats.softmax_bounds`, ``K =
    softmax_sum.shape[1]``). ``p_lower`` is the top label's lower bound and ``p_upper`` the
    largest upper bound of any other label (0 when ``K = 1``): empirical-Bernstein bounds are
    not monotone in the mean, so the runner-up's bound alone would not cover the others.

    Guarantee: each one-sided bound fails with probability ``<= 2 eta / K`` (the tighter of
    two bounds at ``eta / K`` each, picked after seeing the data).

    Args:
        softmax_sum: ``(N, K)`` sums of the softmax scores (in [0, 1]) over ``n`` draws.
        softmax_sq_sum: ``(N, K)`` sums of their squares.
        n: number of draws per example.
        eta: total failure probability, ``0 < eta < 1``.

    Returns:
        :class:`ScoreBounds` (numpy, or tensors on ``softmax_sum``'s device).
    """
    like = _template(softmax_sum, softmax_sq_sum)
    s = _per_example_table(softmax_sum, "softmax_sum")
    sq = _to_numpy(softmax_sq_sum, "softmax_sq_sum")
    labels, others = _top_label(s)
    lo, hi = softmax_bounds(s, sq, n, num_classes=s.shape[1], eta=eta)
    p_lower = np.take_along_axis(lo, labels[:, None], axis=1)[:, 0]
    p_upper = np.where(others, hi, 0.0).max(axis=1)
    return _score_bounds(labels, p_lower, p_upper, like)


def _dp_test_inputs(
    p_lower: ArrayLike, p_upper: ArrayLike, epsilon: float, mechanism: str
) -> tuple[torch.Tensor | None, np.ndarray, np.ndarray, float]:
    """Checked inputs of the PixelDP test: ``(like, p_lower, p_upper, epsilon)``.

    ``like`` is the first tensor argument (results go back to its device) or None; the bounds
    come back as float64 numpy arrays in [0, 1]; ``epsilon`` as a positive float.
    """
    check_choice(mechanism, "mechanism", MECHANISMS)
    like = _template(p_lower, p_upper)
    pl, pu = _to_numpy(p_lower, "p_lower"), _to_numpy(p_upper, "p_upper")
    _check_probability(pl, "p_lower")
    _check_probability(pu, "p_upper")
    return like, pl, pu, _check_scalar(epsilon, "epsilon")


def pixeldp_is_robust(
    p_lower: ArrayLike,
    p_upper: ArrayLike,
    *,
    epsilon: float,
    delta: float,
    mechanism: str,
) -> Any:
    """PixelDP robustness test: ``p_lower > e^{2 epsilon} p_upper + (1 + e^epsilon) delta``.

    REFERENCE.md §1 (Lecuyer et al., Prop. 1 with the expected output stability bound). For
    an ``(epsilon, delta)``-PixelDP network w.r.t. attacks of size ``L`` (input units, the
    construction norm), a True entry means no attack of size ``<= L`` can change the
    prediction, given that ``p_lower`` bounds the top label's expected score from below and
    ``p_upper`` every other label's from above. For the Laplace mechanism the network is
    ``(epsilon, 0)``-DP and ``delta`` is ignored.

    Args:
        p_lower, p_upper: bounds in [0, 1] (broadcastable, any shape), e.g. a
            :class:`ScoreBounds`' fields.
        epsilon, delta: the network's DP budget at size ``L``.
        mechanism: ``"gaussian"`` or ``"laplace"``.

    Returns:
        Boolean numpy array, or a bool tensor on the first tensor argument's device.
    """
    like, pl, pu, eps = _dp_test_inputs(p_lower, p_upper, epsilon, mechanism)
    dlt = 0.0 if mechanism == "laplace" else _check_scalar(delta, "delta", upper=1.0)
    robust = pl > np.exp(2.0 * eps) * pu + (1.0 + np.exp(eps)) * dlt
    if like is None:
        return robust
    return torch.from_numpy(np.ascontiguousarray(robust)).to(like.device)


def _gaussian_search(
    pl: np.ndarray,
    pu: np.ndarray,
    scale: float,
    *,
    iterations: int,
    chunk_size: int = 128,
) -> np.ndarray:
    """Reference L_max search for the Gaussian mechanism, vectorised over examples × grid.

    For every ``delta'`` on :data:`_DELTA_GRID`, find the largest ``eps' in (0, 1]`` with
    ``pl >= e^{2 eps'} pu + (1 + e^{eps'}) delta'``, as ``iterations`` steps of bisection on
    ``[0, 1]`` would: ``1`` when feasible, else the lower end of the final bracket. The
    right-hand side is increasing in ``eps'``, so the feasible set is ``(0, eps*]`` with
    ``y* = e^{eps*}`` the positive root of ``pu y^2 + delta' y + (delta' - pl) = 0``.
    Bisection's midpoints are the dyadic numbers ``j / 2^iterations``, so its lower end is
    ``floor(eps* 2^iterations) / 2^iterations``; that value is computed directly from the
    root (one pass instead of ``iterations``), then the inequality is *re-checked* in float64
    -- the robustness test of :func:`pixeldp_is_robust` in the reference's non-strict form,
    evaluated as ``pl >= e^{eps'} e^{eps'} pu + (1 + e^{eps'}) delta'`` -- and the value
    stepped down by ``2^-iterations`` where rounding put it on the wrong side. Invariant:
    every returned ``eps'`` is 0 or satisfies the inequality as evaluated -- never the
    violating end.

    ``L' = scale * eps' / sqrt(ln(1.25 / delta'))``; ``L_max`` is the max over the grid
    (0 when nothing is feasible). ``pl`` and ``pu`` are flat float64 arrays of equal length.
    """
    inv_root = 1.0 / np.sqrt(np.log(1.25 / _DELTA_GRID))  # (G,)
    dgrid = _DELTA_GRID[None, :]
    step = 2.0**-iterations
    out = np.zeros(pl.shape, dtype=np.float64)
    # Only pl > pu + 2 delta'_min can pass for any eps' > 0; the rest keep L_max = 0.
    todo = np.flatnonzero(pl > pu + 2.0 * _DELTA_GRID[0])
    for start in range(0, todo.size, chunk_size):
        rows = todo[start : start + chunk_size]
        a = pl[rows, None]
        b = pu[rows, None]

        def feasible(x: np.ndarray, a: np.ndarray = a, b: np.ndarray = b) -> np.ndarray:
            ex = np.exp(x)
            return a >= ex * ex * b + (1.0 + ex) * dgrid

        # Positive root in the cancellation-free form 2c / (d + sqrt(d^2 + 4 b c)), c = a - d;
        # where c <= 0 even eps' -> 0 fails and eps* is set to 0 (nothing feasible).
        c = np.maximum(a - dgrid, 0.0)
        root = np.sqrt(4.0 * b * c + dgrid * dgrid)
        root += dgrid
        np.divide(2.0 * c, root, out=root)
        np.maximum(root, 1.0, out=root)
        eps_star = np.log(root, out=root)  # >= 0
        # Lower end of the bisection bracket (1 itself when eps* >= 1).
        lo = np.minimum(eps_star, 1.0, out=eps_star)
        lo /= step
        np.floor(lo, out=lo)
        lo *= step
        ok = feasible(lo) & (lo > 0)
        for _ in range(3):  # rounding can misplace eps* by an ulp: step down until it holds
            bad = (lo > 0) & ~ok
            if not bad.any():
                break
            lo = np.where(bad, lo - step, lo)
            ok = np.where(bad, feasible(lo) & (lo > 0), ok)
        eps_prime = np.where(ok, lo, 0.0)  # last resort: certify nothing
        out[rows] = scale * (eps_prime * inv_root).max(axis=1)
    return out


def pixeldp_robust_size_from_bounds(
    p_lower: ArrayLike,
    p_upper: ArrayLike,
    *,
    mechanism: str,
    epsilon: float,
    delta: float,
    construction_bound: float,
    sensitivity: float = 1.0,
    iterations: int = 14,
) -> Any:
    """Largest attack size ``L_max`` PixelDP certifies, from bounds on the expected scores.

    The network's noise was calibrated for ``(epsilon, delta)``-DP against attacks of size
    ``L = construction_bound`` in the mechanism's norm: Gaussian (l2)
    ``sigma = Delta L sqrt(2 ln(1.25/delta)) / epsilon``; Laplace (l1) ``b = Delta L / epsilon``.

    * Laplace: ``L_max = L ln(p_lower / p_upper) / (2 epsilon)``, 0 where
      ``p_lower <= p_upper`` (``delta`` is ignored; ``+inf`` if ``p_upper == 0``).
    * Gaussian: the reference search (REFERENCE.md §1): the same ``sigma`` is
      ``(eps', delta')``-DP for attacks of size ``L' = sigma eps' / (Delta sqrt(2
      ln(1.25/delta')))`` for any ``eps' <= 1``; ``delta'`` runs over 0.001 … 0.299 and the
      largest ``eps'`` passing the robustness test (:func:`pixeldp_is_robust`, with ``>=``)
      is found to the precision of ``iterations`` bisection steps on (0, 1] (14 gives
      6e-5, finer than the reference's 0.001; computed from the closed-form root and
      re-checked, see :func:`_gaussian_search`). The returned ``L_max`` always comes from
      an ``(eps', delta')`` that passes the test. Since ``eps' <= 1`` and ``p_lower <= 1``
      (so ``(1 + e^{eps'}) delta' < 1``), ``L_max < 0.81 L sqrt(ln(1.25/delta)) / epsilon``:
      about ``1.45 L / epsilon`` for ``delta = 0.05`` (``1.45 L`` only for ``epsilon = 1``,
      the reference's setting).

    Guarantee: if ``p_lower`` / ``p_upper`` bound the expected top / every other score
    (with probability ``>= 1 - eta``), no perturbation of norm ``<= L_max`` (input units)
    changes the prediction. Robust at threshold ``T`` iff ``L_max >= T``.

    ``sensitivity`` is the ``Delta`` that scaled the noise (operator norm of the pre-noise
    layer, 1 for noise on the image). ``L`` and ``L_max`` are in input units; because the
    noise is built from ``(epsilon, delta, L, Delta)``, ``Delta`` cancels in ``L_max``. It is
    accepted (and validated) so that callers pass the full noise calibration; it does not
    change the result.

    Args:
        p_lower: ``(N,)`` lower bounds on the top class's expected score, in [0, 1].
        p_upper: ``(N,)`` upper bounds on the runner-up's expected score, in [0, 1].
        mechanism: ``"gaussian"`` or ``"laplace"``.
        epsilon, delta: the DP budget the noise was calibrated for (``delta`` in (0, 1)).
        construction_bound: ``L``, the attack size the noise was calibrated for, ``> 0``.
        sensitivity: ``Delta > 0`` (see above).
        iterations: bisection steps of the Gaussian search.

    Returns:
        ``(N,)`` float64 ``L_max >= 0`` in input units.
    """
    like, pl, pu, eps = _dp_test_inputs(p_lower, p_upper, epsilon, mechanism)
    big_l = _check_scalar(construction_bound, "construction_bound")
    _check_scalar(sensitivity, "sensitivity")
    pl, pu = np.broadcast_arrays(pl, pu)
    if mechanism == "laplace":
        with np.errstate(divide="ignore"):
            ratio = np.log(pl) - np.log(pu)
        size = np.where(pl > pu, big_l * ratio / (2.0 * eps), 0.0)
        return _restore(size, like)
    dlt = _check_scalar(delta, "delta", upper=1.0)
    check_int(iterations, "iterations", minimum=1)
    # L' = sigma eps' / (Delta sqrt(2 ln(1.25/delta'))) with sigma from (eps, delta, L, Delta):
    scale = big_l * np.sqrt(np.log(1.25 / dlt)) / eps
    flat = _gaussian_search(
        np.ascontiguousarray(pl, dtype=np.float64).ravel(),
        np.ascontiguousarray(pu, dtype=np.float64).ravel(),
        scale,
        iterations=int(iterations),
    )
    return _restore(flat.reshape(pl.shape), like)


def pixeldp_robust_size(
    n_top: ArrayLike,
    n_second: ArrayLike,
    n: ArrayLike,
    *,
    num_classes: int,
    mechanism: str,
    epsilon: float,
    delta: float,
    construction_bound: float,
    eta: float,
    sensitivity: float = 1.0,
) -> Any:
    """PixelDP ``L_max`` from argmax counts (REFERENCE.md §1, "argmax counts").

    The two steps of the certificate: Clopper–Pearson bounds with Bonferroni over
    ``num_classes`` labels (:func:`pixeldp_count_bounds`), then the largest certified size
    (:func:`pixeldp_robust_size_from_bounds`).

    Guarantee: each of the two bounds fails with probability ``<= eta / K`` (the PixelDP
    reference's union bound over the K labels); given both hold, no perturbation of norm
    ``<= L_max`` changes the prediction.

    Args:
        n_top, n_second, n, num_classes, eta: the top two of ``(N,)`` argmax counts among
            ``n`` draws, and the confidence, see :func:`pixeldp_count_bounds`.
        mechanism, epsilon, delta, construction_bound, sensitivity: the noise calibration,
            see :func:`pixeldp_robust_size_from_bounds`.

    Returns:
        ``(N,)`` float64 ``L_max >= 0`` in input units.
    """
    p_lower, p_upper = pixeldp_count_bounds(n_top, n_second, n, num_classes=num_classes, eta=eta)
    return pixeldp_robust_size_from_bounds(
        p_lower,
        p_upper,
        mechanism=mechanism,
        epsilon=epsilon,
        delta=delta,
        construction_bound=construction_bound,
        sensitivity=sensitivity,
    )


# --------------------------------------------------------------------------- sequential PixelDP
class PixelDPSequentialTest:
    """PixelDP's robustness test at a grid of thresholds ``T``, decided sequentially from
    argmax counts (the decisions of :func:`bench.sampling.sequential.run_rounds`).

    After each look, every label ``c`` has a lower and an upper bound on its argmax
    probability ``p_c`` from ``sequence`` (running maximum / minimum over the looks), which
    must be at level ``eta / K``: the Bonferroni over the K labels of the fixed-n test, which
    also covers the top label being picked from the same draws. With ``t`` the most frequent
    label and ``size(pl, pu)`` the largest certified size (:func:`pixeldp_robust_size_from_bounds`,
    converted to the grid's norm by the caller):

    * robust at ``T`` iff ``size(lower_t, max_{j != t} upper_j) >= T`` (the fixed-n test on
      the sequence's bounds);
    * not robust at ``T`` once even the most favourable truth the bounds allow,
      ``size(max_c upper_c, second-largest lower)``, is below ``T`` (no number of draws
      would certify it), or once ``size`` at ``max_n`` stays below ``T`` with every
      remaining draw on ``t`` (futility; ``t`` is the best case, as bounds grow with counts).

    Guarantee: where every sequence holds (probability ``>= 1 - 2 eta`` for one-sided
    sequences at ``eta / K``, the PixelDP reference's convention; ``>= 1 - eta`` for the
    two-sided betting sequence), the bounds hold at the look where the example stopped, so
    a reported threshold is certified. ``thresholds`` are positive, in the grid's norm.
    """

    def __init__(
        self,
        thresholds: np.ndarray,
        size: Callable[[np.ndarray, np.ndarray], np.ndarray],
        sequence: ConfidenceSequence,
        max_n: int,
        num_examples: int,
        num_classes: int,
    ) -> None:
        self.thresholds = np.unique(np.asarray(thresholds, dtype=np.float64))
        if self.thresholds.size and not (self.thresholds > 0).all():
            raise StatisticsValueError("PixelDP's sequential thresholds must be > 0")
        self.size, self.sequence, self.max_n = size, sequence, max_n
        self.lower = np.zeros((num_examples, num_classes))
        self.upper = np.ones((num_examples, num_classes))
        self.labels = np.zeros(num_examples, dtype=np.int64)
        self.p_lower = np.zeros(num_examples)
        self.p_upper = np.ones(num_examples)
        self.level = np.zeros(num_examples, dtype=np.int64)

    def update(self, positions: np.ndarray, counts: np.ndarray, n: int) -> np.ndarray:
        """Fold in the bounds after ``n`` draws (``counts``: ``(m, K)``); return which of the
        examples at ``positions`` stay open."""
        seq, m = self.sequence, positions.size
        lower = np.maximum(self.lower[positions], seq.lower(counts, n))
        upper = np.minimum(self.upper[positions], seq.upper(counts, n))
        self.lower[positions], self.upper[positions] = lower, upper
        rows = np.arange(m)
        top, others = _top_label(counts.astype(np.float64))
        p_lower = lower[rows, top]
        p_upper = np.where(others, upper, 0.0).max(axis=1)
        level = np.searchsorted(self.thresholds, self.size(p_lower, p_upper), side="right")
        self.labels[positions], self.level[positions] = top, level
        self.p_lower[positions], self.p_upper[positions] = p_lower, p_upper
        if n >= self.max_n or self.thresholds.size == 0:
            return np.zeros(m, dtype=bool)
        nxt = self.thresholds[np.minimum(level, self.thresholds.size - 1)]
        second_lower = np.sort(lower, axis=1)[:, -2] if lower.shape[1] > 1 else np.zeros(m)
        reachable = self.size(upper.max(axis=1), second_lower) >= nxt
        rest = self.max_n - n
        best_top = seq.lower(counts[rows, top] + rest, self.max_n)
        best_others = np.where(others, seq.upper(counts, self.max_n), 0.0).max(axis=1)
        not_futile = self.size(best_top, best_others) >= nxt
        return (level < self.thresholds.size) & reachable & not_futile

    def radii(self) -> np.ndarray:
        """``(N,)`` the largest threshold certified (0 where none)."""
        grid = np.concatenate([[0.0], self.thresholds])
        return grid[self.level]
