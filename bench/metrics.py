"""Leaderboard metrics: pure functions and an accumulating, mergeable :class:`MetricSet`.

Definitions (PixelDP §IV; Cohen et al. §4). ``N`` test points, ``pred`` the defense's
prediction (``-1`` = abstain, always counted wrong), ``radius`` the certified radius in
input units for the board's norm (``L_max`` for PixelDP, ``R`` for smoothing, 0 or negative
when nothing is certified):

* accuracy = #correct / N
* guaranteed accuracy at r = #(correct ∧ radius >= r) / N  (Cohen's *certified accuracy*,
  PixelDP's *robust accuracy* at threshold T = r)
* robust precision at T = #(correct ∧ radius >= T) / #(radius >= T)
* coverage at T = #(radius >= T) / N
* accuracy under attack at eps = #(pred_adv correct) / N_attacked
* robust precision under attack at (eps, T) = #(pred_adv correct ∧ radius_adv >= T) /
  #(radius_adv >= T): an attack counts as successful only if the attacked prediction is
  wrong *and* certified at T on the attacked input.

A ratio whose denominator is 0 (no examples, or nothing certified at T) is ``None``, not
0 or nan: leaderboards show an empty cell. NaN radii count as not certified.

The functions accept torch tensors (any device) or numpy arrays of shape ``(N,)``.
:class:`MetricSet` keeps integer counts only, so results are exact and identical however
the test set was batched or sharded (``merge``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import numpy as np

from bench.errors import ConfigError

__all__ = [
    "MetricSet",
    "accuracy",
    "accuracy_under_attack",
    "coverage",
    "guaranteed_accuracy",
    "metric_key",
    "robust_precision",
    "robust_precision_under_attack",
]

Array = Any  # a NumPy array or a torch.Tensor (torch is not imported here)


def metric_key(prefix: str, *values: float) -> str:
    """Column name of a metric at radius/threshold/eps values: ``prefix@v1@v2``.

    Numbers are written with ``f"{v:g}"`` (6 significant digits, no float repr noise):
    ``metric_key("guaranteed_accuracy", 0.1) == "guaranteed_accuracy@0.1"``,
    ``metric_key("robust_precision_under_attack", 0.5, 0.05) ==
    "robust_precision_under_attack@0.5@0.05"``.
    """
    return prefix + "".join(f"@{float(v):g}" for v in values)


# --------------------------------------------------------------------------- helpers
def _np(x: Array, name: str, dtype: type) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch.Tensor
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must have shape (N,), got shape {arr.shape}")
    return arr.astype(dtype, copy=False)


def _labels(pred: Array, y: Array, pred_name: str = "pred") -> tuple[np.ndarray, np.ndarray]:
    p, t = _np(pred, pred_name, np.int64), _np(y, "y", np.int64)
    if p.shape != t.shape:
        raise ValueError(f"{pred_name} has shape {p.shape} but y has shape {t.shape}")
    return p, t


def _radius(radius: Array, n: int, name: str = "radius") -> np.ndarray:
    r = _np(radius, name, np.float64)
    if r.shape != (n,):
        raise ValueError(f"{name} has shape {r.shape}, expected ({n},) like the labels")
    return r


def _ratio(num: int, den: int) -> float | None:
    return None if den == 0 else num / den


# --------------------------------------------------------------------------- functional
def accuracy(pred: Array, y: Array) -> float | None:
    """Fraction of ``pred == y`` (abstain ``-1`` is wrong); None when ``N == 0``."""
    p, t = _labels(pred, y)
    return _ratio(int(np.count_nonzero(p == t)), t.size)


def guaranteed_accuracy(pred: Array, y: Array, radius: Array, r: float) -> float | None:
    """Fraction correct *and* certified at ``r``: ``mean(pred == y ∧ radius >= r)``.

    Args:
        pred, y: ``(N,)`` labels (``pred == -1`` abstains and counts wrong).
        radius: ``(N,)`` certified radii in input units. r: the radius, ``>= 0``.

    Returns:
        A fraction in [0, 1]; None when ``N == 0``.
    """
    p, t = _labels(pred, y)
    rad = _radius(radius, t.size)
    return _ratio(int(np.count_nonzero((p == t) & (rad >= r))), t.size)


def robust_precision(pred: Array, y: Array, radius: Array, T: float) -> float | None:
    """Among predictions certified at threshold ``T``, the fraction correct.

    ``#(pred == y ∧ radius >= T) / #(radius >= T)``; None when nothing is certified at T.
    """
    p, t = _labels(pred, y)
    rad = _radius(radius, t.size)
    certified = rad >= T
    return _ratio(int(np.count_nonzero((p == t) & certified)), int(np.count_nonzero(certified)))


def coverage(radius: Array, T: float) -> float | None:
    """Fraction of predictions certified at threshold ``T``; None when ``N == 0``."""
    rad = _np(radius, "radius", np.float64)
    return _ratio(int(np.count_nonzero(rad >= T)), rad.size)


def accuracy_under_attack(pred_adv: Array, y: Array) -> float | None:
    """Fraction of attacked inputs still classified correctly; None when ``N == 0``."""
    p, t = _labels(pred_adv, y, "pred_adv")
    return _ratio(int(np.count_nonzero(p == t)), t.size)


def robust_precision_under_attack(
    pred_adv: Array, y: Array, radius_adv: Array, T: float
) -> float | None:
    """Among attacked inputs certified at ``T``, the fraction still correct.

    An attack succeeds only if the attacked prediction is wrong *and* ``radius_adv >= T``:
    ``#(pred_adv == y ∧ radius_adv >= T) / #(radius_adv >= T)``; None when no attacked
    input is certified at T.
    """
    p, t = _labels(pred_adv, y, "pred_adv")
    rad = _radius(radius_adv, t.size, "radius_adv")
    certified = rad >= T
    return _ratio(int(np.count_nonzero((p == t) & certified)), int(np.count_nonzero(certified)))


# --------------------------------------------------------------------------- accumulator
def _unique_keys(values: Iterable[float], field: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    keys = [metric_key("", v) for v in out]
    for v in out:
        if not np.isfinite(v):
            raise ConfigError(f"{field} must be finite numbers, got {v!r}")
    if len(set(keys)) != len(keys):
        raise ConfigError(
            f"{field} has values that coincide at 6 significant digits: {list(out)!r}"
        )
    return out


class MetricSet:
    """Accumulates the leaderboard metrics over batches (and shards); ``compute()`` at the end.

    Args:
        radii: radii ``r`` of the ``guaranteed_accuracy@r`` columns (input units).
        thresholds: thresholds ``T`` of ``robust_precision@T`` / ``coverage@T`` (and of
            ``robust_precision_under_attack@eps@T``).
        eps_list: attack sizes ``eps`` of ``accuracy_under_attack@eps``.
        certifies: whether the defense certifies the board's norm. If False, guaranteed
            accuracy and coverage are None (empty cells: nothing is certified, which is not
            the same as 0 or 1), robust precision equals accuracy and robust precision under
            attack equals accuracy under attack; radii passed to :meth:`update` are ignored.

    State is integer counts only: batching and sharding do not change the result, and
    ``merge`` adds shards exactly (Ray workers return their MetricSet, the driver merges).
    Robust precision under attack at ``eps`` is None unless every attacked input at that
    eps came with a ``radius_adv``.
    """

    higher_is_better: ClassVar[bool] = True

    def __init__(
        self,
        radii: Iterable[float] = (),
        thresholds: Iterable[float] = (),
        eps_list: Iterable[float] = (),
        certifies: bool = True,
    ) -> None:
        self.radii = _unique_keys(radii, "radii")
        self.thresholds = _unique_keys(thresholds, "thresholds")
        self.eps_list = _unique_keys(eps_list, "eps_list")
        self.certifies = bool(certifies)
        self._eps_by_key = {metric_key("", e): i for i, e in enumerate(self.eps_list)}
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Zero every count."""
        n_r, n_t, n_e = len(self.radii), len(self.thresholds), len(self.eps_list)
        self.n = 0
        self.correct = 0
        self.certified_correct_at_r = [0] * n_r
        self.certified_at_t = [0] * n_t
        self.certified_correct_at_t = [0] * n_t
        self.adv_n = [0] * n_e
        self.adv_correct = [0] * n_e
        self.adv_with_radius = [0] * n_e
        self.adv_certified = [[0] * n_t for _ in range(n_e)]
        self.adv_certified_correct = [[0] * n_t for _ in range(n_e)]

    def _config(self) -> tuple[Any, ...]:
        return (self.radii, self.thresholds, self.eps_list, self.certifies)

    def _eps_index(self, eps: float, field: str) -> int:
        key = metric_key("", eps)
        if key not in self._eps_by_key:
            raise ValueError(
                f"{field} has eps {eps!r}, which is not in eps_list {list(self.eps_list)!r}"
            )
        return self._eps_by_key[key]

    # ------------------------------------------------------------------ API
    def update(
        self,
        *,
        y: Array,
        pred: Array,
        radius: Array | None = None,
        pred_adv: Mapping[float, Array] | None = None,
        radius_adv: Mapping[float, Array] | None = None,
    ) -> None:
        """Add one batch.

        Args:
            y: ``(B,)`` true labels.
            pred: ``(B,)`` predictions on clean inputs (``-1`` = abstain).
            radius: ``(B,)`` certified radii of the clean predictions; required when
                ``certifies`` (ignored otherwise).
            pred_adv: eps -> ``(B,)`` predictions on the attacked inputs (eps in
                ``eps_list``; the same examples as ``y``).
            radius_adv: eps -> ``(B,)`` certified radii on the attacked inputs (only for
                eps also in ``pred_adv``; ignored when not ``certifies``).
        """
        p, t = _labels(pred, y)
        ok = p == t
        rad: np.ndarray | None = None
        if self.certifies:
            if radius is None:
                raise ValueError("radius is required for a MetricSet with certifies=True")
            rad = _radius(radius, t.size)
        # Validate everything before touching the counts, so a bad batch changes nothing.
        adv: list[tuple[int, np.ndarray, np.ndarray | None]] = []
        pred_adv = dict(pred_adv or {})
        radius_adv = dict(radius_adv or {}) if self.certifies else {}
        rad_adv_idx = {self._eps_index(e, "radius_adv"): r for e, r in radius_adv.items()}
        for eps, pa in pred_adv.items():
            i = self._eps_index(eps, "pred_adv")
            if any(i == seen for seen, _, _ in adv):
                raise ValueError(f"pred_adv has two keys for eps {self.eps_list[i]!r}")
            pa_np, _ = _labels(pa, t, "pred_adv")
            ra = rad_adv_idx.pop(i, None)
            adv.append((i, pa_np == t, None if ra is None else _radius(ra, t.size, "radius_adv")))
        if rad_adv_idx:
            missing = [self.eps_list[i] for i in rad_adv_idx]
            raise ValueError(f"radius_adv given for eps {missing!r} without pred_adv")

        self.n += t.size
        self.correct += int(np.count_nonzero(ok))
        if rad is not None:
            for j, r in enumerate(self.radii):
                self.certified_correct_at_r[j] += int(np.count_nonzero(ok & (rad >= r)))
            for j, thr in enumerate(self.thresholds):
                cert = rad >= thr
                self.certified_at_t[j] += int(np.count_nonzero(cert))
                self.certified_correct_at_t[j] += int(np.count_nonzero(ok & cert))
        for i, ok_adv, ra in adv:
            self.adv_n[i] += t.size
            self.adv_correct[i] += int(np.count_nonzero(ok_adv))
            if ra is None:
                continue
            self.adv_with_radius[i] += t.size
            for j, thr in enumerate(self.thresholds):
                cert = ra >= thr
                self.adv_certified[i][j] += int(np.count_nonzero(cert))
                self.adv_certified_correct[i][j] += int(np.count_nonzero(ok_adv & cert))

    def merge(self, other: MetricSet) -> MetricSet:
        """Add ``other``'s counts (a shard of the same test set) into ``self``; returns self."""
        if not isinstance(other, MetricSet) or other._config() != self._config():
            raise ValueError(
                "can only merge a MetricSet with the same radii, thresholds, eps_list and certifies"
            )
        self.n += other.n
        self.correct += other.correct
        for name in (
            "certified_correct_at_r",
            "certified_at_t",
            "certified_correct_at_t",
            "adv_n",
            "adv_correct",
            "adv_with_radius",
        ):
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, [a + b for a, b in zip(mine, theirs, strict=True)])
        for name in ("adv_certified", "adv_certified_correct"):
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(
                self,
                name,
                [
                    [a + b for a, b in zip(r1, r2, strict=True)]
                    for r1, r2 in zip(mine, theirs, strict=True)
                ],
            )
        return self

    def keys(self) -> list[str]:
        """The metric names :meth:`compute` returns, in column order."""
        keys = ["accuracy"]
        keys += [metric_key("guaranteed_accuracy", r) for r in self.radii]
        keys += [metric_key("robust_precision", t) for t in self.thresholds]
        keys += [metric_key("coverage", t) for t in self.thresholds]
        keys += [metric_key("accuracy_under_attack", e) for e in self.eps_list]
        keys += [
            metric_key("robust_precision_under_attack", e, t)
            for e in self.eps_list
            for t in self.thresholds
        ]
        return keys

    def compute(self) -> dict[str, float | None]:
        """Metric name -> value (a Python float in [0, 1], or None for an empty cell).

        Keys, in order: ``accuracy``, ``guaranteed_accuracy@{r}``, ``robust_precision@{T}``,
        ``coverage@{T}``, ``accuracy_under_attack@{eps}``,
        ``robust_precision_under_attack@{eps}@{T}`` (numbers as in :func:`metric_key`).
        """
        out: dict[str, float | None] = {}
        acc = _ratio(self.correct, self.n)
        out["accuracy"] = acc
        for j, r in enumerate(self.radii):
            value = _ratio(self.certified_correct_at_r[j], self.n) if self.certifies else None
            out[metric_key("guaranteed_accuracy", r)] = value
        for j, thr in enumerate(self.thresholds):
            value = (
                _ratio(self.certified_correct_at_t[j], self.certified_at_t[j])
                if self.certifies
                else acc
            )
            out[metric_key("robust_precision", thr)] = value
        for j, thr in enumerate(self.thresholds):
            value = _ratio(self.certified_at_t[j], self.n) if self.certifies else None
            out[metric_key("coverage", thr)] = value
        adv_acc = [_ratio(c, n) for c, n in zip(self.adv_correct, self.adv_n, strict=True)]
        for i, e in enumerate(self.eps_list):
            out[metric_key("accuracy_under_attack", e)] = adv_acc[i]
        for i, e in enumerate(self.eps_list):
            complete = self.adv_n[i] > 0 and self.adv_with_radius[i] == self.adv_n[i]
            for j, thr in enumerate(self.thresholds):
                if not self.certifies:
                    value = adv_acc[i]
                elif complete:
                    value = _ratio(self.adv_certified_correct[i][j], self.adv_certified[i][j])
                else:
                    value = None
                out[metric_key("robust_precision_under_attack", e, thr)] = value
        return out

    def counts(self) -> dict[str, tuple[int, int]]:
        """The counts behind every defined fraction of :meth:`compute`: metric name ->
        ``(k, n)`` with value ``k / n`` (``n`` = the examples the value rests on).

        Fractions defined by convention rather than by counting (robust precision of a
        defense that certifies nothing, which equals its accuracy) are left out, as are
        undefined ones (``n == 0``). Confidence intervals over test examples are computed
        from these (:func:`bench.stats.clopper_pearson_interval`).
        """
        out: dict[str, tuple[int, int]] = {"accuracy": (self.correct, self.n)}
        if self.certifies:
            for j, r in enumerate(self.radii):
                out[metric_key("guaranteed_accuracy", r)] = (
                    self.certified_correct_at_r[j],
                    self.n,
                )
            for j, thr in enumerate(self.thresholds):
                out[metric_key("robust_precision", thr)] = (
                    self.certified_correct_at_t[j],
                    self.certified_at_t[j],
                )
                out[metric_key("coverage", thr)] = (self.certified_at_t[j], self.n)
        for i, e in enumerate(self.eps_list):
            out[metric_key("accuracy_under_attack", e)] = (self.adv_correct[i], self.adv_n[i])
            complete = self.adv_n[i] > 0 and self.adv_with_radius[i] == self.adv_n[i]
            if self.certifies and complete:
                for j, thr in enumerate(self.thresholds):
                    out[metric_key("robust_precision_under_attack", e, thr)] = (
                        self.adv_certified_correct[i][j],
                        self.adv_certified[i][j],
                    )
        return {k: v for k, v in out.items() if v[1] > 0}

    def __repr__(self) -> str:
        return (
            f"MetricSet(radii={list(self.radii)!r}, thresholds={list(self.thresholds)!r}, "
            f"eps_list={list(self.eps_list)!r}, certifies={self.certifies!r}; n={self.n})"
        )
