"""Confidence sequences for a binomial proportion, valid at every look of a sequential test.

A sequential test draws in rounds and looks at its counts after each one. At look ``k`` it
has ``successes_k`` among ``n_k`` i.i.d. Bernoulli(``p``) draws, and a
``(1 - alpha)`` *confidence sequence* gives bounds ``(L_k, U_k)`` with

    P(L_k <= p for every look k) >= 1 - alpha,     and the same for U_k >= p,

whatever rule decides, from the counts seen so far, when to stop looking (optional
stopping). A fixed-n Clopper–Pearson bound recomputed at every look has no such guarantee:
its errors accumulate over the looks. The sequences here:

* :class:`ClopperPearsonUnion` (``"clopper-pearson-union"``) — the one-sided Clopper–Pearson
  bound at ``alpha / looks`` at each of at most ``looks`` pre-planned looks (union bound over
  the looks; REFERENCE.md §2's "simple baseline"). Valid at the looks only, which is all a
  round-based test uses.
* :class:`BettingMixture` (``"betting"``) — the wealth of a bettor who, against each
  candidate ``m``, spreads an initial unit of wealth over every constant bet on the draws
  (Waudby-Smith & Ramdas, JRSS-B 2023, for bounded means); for Bernoulli draws a constant bet
  is the likelihood ratio of some ``theta`` against ``m``, so the spread with weights
  Beta(1/2, 1/2) over ``theta`` is the Krichevsky–Trofimov mixture likelihood ratio that
  Voráček (2024) tests with:

      M_k(m) = B(S + 1/2, F + 1/2) / B(1/2, 1/2) / (m^S (1 - m)^F),   S + F = n_k.

  Under ``p = m``, ``M_k(m)`` is a nonnegative martingale with ``M_0 = 1``, so by Ville's
  inequality ``P(exists k: M_k(p) >= 1/alpha) <= alpha``: the set ``{m : M_k(m) < 1/alpha}``
  is a ``(1 - alpha)`` confidence sequence valid at *every* draw (anytime-valid), at both
  ends together. ``log M_k`` is convex in ``m`` with its minimum (``<= 0``) at ``S / n``, so
  the set is an interval whose ends are found by bisection.

Both are used with their running intersection (the largest lower bound and the smallest
upper bound seen so far), which keeps the guarantee. Which is tighter depends on the regime:
the mixture pays about ``log(n) / 2`` in the exponent against a fixed-n bound, the union
``log(looks)``; benchmarks/RESULTS.md ("bench.confseq") has the measurement behind the
default of :mod:`bench.sampling.sequential`.

Bounds are pure, vectorised functions of the counts (numpy or torch, broadcast like numpy),
computed in float64 on the CPU, like :mod:`bench.stats`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from scipy import special

from bench.stats import (
    ArrayLike,
    _check_alpha,
    _check_counts,
    _restore,
    _template,
    _to_numpy,
    lower_confidence_bound,
    upper_confidence_bound,
)
from bench.validation import check_choice, check_int

__all__ = [
    "SEQUENCES",
    "BettingMixture",
    "ClopperPearsonUnion",
    "ConfidenceSequence",
    "confidence_sequence",
]

_BISECTIONS = 64
"""Bisection steps for the mixture's interval ends: enough to reach float64 resolution on
[0, 1] (the bracket halves each step; 2^-64 is below the spacing of doubles near 1)."""


class ConfidenceSequence:
    """A ``(1 - alpha)`` confidence sequence for a binomial proportion (module doc).

    ``lower(successes, n)`` and ``upper(successes, n)`` are the bounds at a look with
    ``successes`` among ``n`` draws; each holds at every look at once with probability
    ``>= 1 - alpha``. Subclasses set :attr:`name` and implement the two bounds.
    """

    name: ClassVar[str] = ""

    def __init__(self, alpha: float) -> None:
        _check_alpha(np.asarray(alpha, dtype=np.float64))
        self.alpha = float(alpha)

    def lower(self, successes: ArrayLike, n: ArrayLike) -> Any:
        """Lower bound on ``p`` at a look (float64, shaped like the broadcast counts)."""
        raise NotImplementedError

    def upper(self, successes: ArrayLike, n: ArrayLike) -> Any:
        """Upper bound on ``p`` at a look (float64, shaped like the broadcast counts)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha={self.alpha!r})"


class ClopperPearsonUnion(ConfidenceSequence):
    """One-sided Clopper–Pearson bounds at ``alpha / looks`` at each of ``looks`` looks.

    Guarantee: by the union bound over the at most ``looks`` looks, the lower bounds hold at
    all of them with probability ``>= 1 - alpha``, and so do the upper bounds. A caller must
    not look more than ``looks`` times.
    """

    name: ClassVar[str] = "clopper-pearson-union"

    def __init__(self, alpha: float, looks: int) -> None:
        super().__init__(alpha)
        self.looks = check_int(looks, "looks", minimum=1)
        self.level = self.alpha / self.looks

    def lower(self, successes: ArrayLike, n: ArrayLike) -> Any:
        return lower_confidence_bound(successes, n, self.level)

    def upper(self, successes: ArrayLike, n: ArrayLike) -> Any:
        return upper_confidence_bound(successes, n, self.level)

    def __repr__(self) -> str:
        return f"ClopperPearsonUnion(alpha={self.alpha!r}, looks={self.looks})"


class BettingMixture(ConfidenceSequence):
    """The anytime-valid Krichevsky–Trofimov mixture (betting) confidence sequence.

    ``{m : log M_k(m) < log(1 / alpha)}`` with ``M_k`` the Beta(1/2, 1/2)-mixture likelihood
    ratio of the module doc. Guarantee: with probability ``>= 1 - alpha`` the true ``p`` lies
    between the lower and the upper bound at every draw (both ends at once), so under any
    stopping rule and with any number of looks. The bounds are bisection brackets' outer
    ends (conservative by at most 2^-64).
    """

    name: ClassVar[str] = "betting"

    def _end(self, successes: ArrayLike, n: ArrayLike, *, upper: bool) -> Any:
        like = _template(successes, n)
        s, nn = _to_numpy(successes, "successes"), _to_numpy(n, "n")
        _check_counts(s, nn, "successes")
        s, nn = np.broadcast_arrays(s, nn)
        f = nn - s
        mle = s / nn
        # log M(m) >= log(1/alpha)  <=>  s log m + f log(1 - m) <= log B(s+1/2, f+1/2)
        # - log B(1/2, 1/2) - log(1/alpha) =: budget (0 log 0 = 0).
        budget = special.betaln(s + 0.5, f + 0.5) - special.betaln(0.5, 0.5)
        budget -= np.log(1.0 / self.alpha)
        # Bracket [lo, hi] around the end: inside (log M < threshold) at the MLE, outside at
        # 0 (lower end; when s > 0) or 1 (upper end; when f > 0).
        lo = np.where(upper, mle, 0.0).astype(np.float64)
        hi = np.where(upper, 1.0, mle).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            for _ in range(_BISECTIONS):
                mid = 0.5 * (lo + hi)
                log_lik = np.where(s > 0, s * np.log(mid), 0.0)
                log_lik += np.where(f > 0, f * np.log1p(-mid), 0.0)
                outside = log_lik <= budget
                if upper:
                    hi = np.where(outside, mid, hi)
                    lo = np.where(outside, lo, mid)
                else:
                    lo = np.where(outside, mid, lo)
                    hi = np.where(outside, hi, mid)
        # The end lies in [lo, hi]: report the outer side (hi for the upper end, lo for the
        # lower end), which is outside the set or the trivial bound 1 / 0.
        out = np.where(f == 0, 1.0, hi) if upper else np.where(s == 0, 0.0, lo)
        return _restore(out, like)

    def lower(self, successes: ArrayLike, n: ArrayLike) -> Any:
        return self._end(successes, n, upper=False)

    def upper(self, successes: ArrayLike, n: ArrayLike) -> Any:
        return self._end(successes, n, upper=True)


SEQUENCES = (ClopperPearsonUnion.name, BettingMixture.name)
"""Names of the confidence sequences :func:`confidence_sequence` builds."""


def confidence_sequence(name: str, alpha: float, looks: int) -> ConfidenceSequence:
    """The confidence sequence called ``name`` (one of :data:`SEQUENCES`) at level
    ``1 - alpha`` for a test that looks at most ``looks`` times."""
    check_choice(name, "sequence", SEQUENCES)
    looks = check_int(looks, "looks", minimum=1)
    if name == ClopperPearsonUnion.name:
        return ClopperPearsonUnion(alpha, looks)
    return BettingMixture(alpha)
