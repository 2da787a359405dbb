"""Sequential CERTIFY and PREDICT: draw in rounds, stop once every decision is fixed.

A board asks one question per example and grid radius ``r``: is it certified at ``r``?
Cohen et al.'s CERTIFY answers it with a fixed ``n`` (100 000 by default) for every example,
although most examples settle every radius of a grid after a few thousand draws. Here the
estimation draws are taken in rounds and a ``(1 - alpha)`` confidence sequence
(:mod:`bench.confseq`) on the tested class's probability ``p`` is updated after each round;
with ``t_r = Phi(r / sigma)``:

* certified at ``r`` once the lower bound reaches ``t_r`` (then for good: the sequence's
  running maximum is used);
* not certified at ``r`` once the upper bound falls below ``t_r``, or once the lower bound
  could not reach ``t_r`` at ``max_n`` even if every remaining draw hit the class
  (*futility*: an ℓ2 radius of 1.0 at sigma = 0.25 needs ``p >= Phi(4)``, which no
  ``n <= 100 000`` can certify, so such radii are given up at once instead of holding every
  confident example to ``max_n``);
* sampling stops for an example when every radius of the grid is decided, or at ``max_n``.

Guarantee (:func:`smoothed_certify_sequential`): with probability ``>= 1 - alpha`` over the
draws, the lower bounds hold at every look, so every radius reported is a true certificate:
``g(x + delta) = label`` for all ``||delta||_2 < radius`` (and ``< r`` for every smaller grid
radius). Only the lower bound carries the guarantee; the upper bound and the futility rule
can only make a certifiable radius go uncertified (a loss of power, never of soundness).
The decisions are the fixed-n test's, so a radius is reported iff ``sigma * Phi^-1(lower)
>= r`` at some look, and the returned radius is the largest such grid radius.

Seeding: round ``k`` takes draws ``[n_{k-1}, n_k)`` of the example's ``ESTIMATION`` stream
(:mod:`bench.sampling.seeding`); the looks ``n_k`` (:func:`look_schedule`) end on block
boundaries and depend only on ``max_n``, ``block_size`` and ``growth``. An example's draws,
counts and decisions therefore depend on its own seed and global index alone, not on the
batch size, the other examples of a call or the sharding; and its draws are the first
``n_k`` draws a fixed-n CERTIFY with ``n = max_n`` takes, so the two can be compared draw for
draw. Selection draws (without true labels) come from the ``SELECTION`` stream, as in
CERTIFY.

:func:`run_rounds` is the round loop itself, shared with PixelDP's sequential robustness test
(:meth:`defenses.pixeldp.PixelDP.certify`); it takes the draws from any source, which the
statistical tests use to run thousands of trials on exact binomial counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from bench.certificates import gaussian_radius_from_bound
from bench.confseq import SEQUENCES, ConfidenceSequence, confidence_sequence
from bench.errors import ConfigError
from bench.sampling.cohen import (
    ABSTAIN,
    _check_alpha,
    _infer_classes,
    _resolve_seed,
    _smoothed,
)
from bench.sampling.engine import check_indices, check_input, sample_streams
from bench.sampling.seeding import DEFAULT_BLOCK_SIZE, ESTIMATION, PREDICTION, SELECTION
from bench.validation import check_choice, check_int, check_number

__all__ = [
    "DEFAULT_GROWTH",
    "DEFAULT_SEQUENCE",
    "Draw",
    "GridTest",
    "PredictTest",
    "certify_rounds",
    "engine_draw",
    "look_schedule",
    "predict_rounds",
    "run_rounds",
    "smoothed_certify_sequential",
    "smoothed_predict_sequential",
]

DEFAULT_SEQUENCE = "clopper-pearson-union"
"""The confidence sequence used unless a caller names another (:data:`bench.confseq.SEQUENCES`);
the measurement behind the choice is in the README and benchmarks/RESULTS.md."""
DEFAULT_GROWTH = 1.25
"""Each look is at least this factor (and at least one block) beyond the previous one."""

Draw = Callable[[np.ndarray, int, int], np.ndarray]
"""``draw(positions, start, count)``: ``(len(positions), K)`` int64 counts of the draws
``[start, start + count)`` of the examples at ``positions`` (numpy int64)."""


def look_schedule(max_n: int, block_size: int, growth: float = DEFAULT_GROWTH) -> list[int]:
    """The draw counts ``n_1 < n_2 < ... = max_n`` at which a sequential test looks.

    ``n_1`` is one block; then ``n_{k+1} = block_size * max(b_k + 1, ceil(growth * b_k))``
    with ``b_k = n_k / block_size`` blocks, until ``max_n`` (the last look, which may end
    inside a block exactly where a fixed-n run's last block ends). Depends on nothing else,
    so neither do the rounds.
    """
    max_n = check_int(max_n, "max_n", minimum=1)
    block_size = check_int(block_size, "block_size", minimum=1)
    growth = check_number(growth, "growth", low=1.0)
    looks: list[int] = []
    blocks = 0
    while True:
        blocks = 1 if blocks == 0 else max(blocks + 1, math.ceil(growth * blocks))
        if blocks * block_size >= max_n:
            looks.append(max_n)
            return looks
        looks.append(blocks * block_size)


def run_rounds(
    num_examples: int,
    num_classes: int,
    looks: Sequence[int],
    draw: Draw,
    decide: Callable[[np.ndarray, np.ndarray, int], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """The round loop: draw up to each look for the examples still open, then let ``decide``
    close some.

    ``decide(positions, counts, n)`` gets the cumulative ``(len(positions), K)`` counts of the
    open examples after ``n`` draws and returns which of them stay open (bool). Returns the
    final ``(N, K)`` int64 counts and the ``(N,)`` int64 draws spent per example.
    """
    counts = np.zeros((num_examples, num_classes), dtype=np.int64)
    spent = np.zeros(num_examples, dtype=np.int64)
    open_ = np.arange(num_examples, dtype=np.int64)
    start = 0
    for n in looks:
        if open_.size == 0:
            break
        counts[open_] += draw(open_, start, n - start)
        spent[open_] = n
        still = np.asarray(decide(open_, counts[open_], n), dtype=bool)
        open_ = open_[still]
        start = n
    return counts, spent


def _grid(radii: Sequence[float] | Tensor | np.ndarray, name: str = "radii") -> np.ndarray:
    """Sorted unique radii with 0 first (the radius of the label itself), as float64."""
    values = np.asarray(
        radii.detach().cpu().numpy() if isinstance(radii, Tensor) else list(radii),
        dtype=np.float64,
    ).ravel()
    bad = ~(np.isfinite(values) & (values >= 0))
    if bad.any():
        raise ConfigError(f"{name} must be finite numbers >= 0, got {values[bad][0]!r}")
    return np.unique(np.concatenate([[0.0], values]))


class GridTest:
    """The decisions of a sequential test at a grid of radii, from a confidence sequence on
    one probability ``p`` per example (the tested class's, for randomized smoothing).

    Certified at ``r`` iff ``radius_of(lower) >= r`` for the running maximum of the lower
    bounds; not certified once ``radius_of(upper) < r`` (running minimum of the upper
    bounds) or ``radius_of(best) < r``, ``best`` being the lower bound at ``max_n`` if every
    remaining draw were a success. ``radius_of(q) = sigma Phi^-1(q)`` for smoothing.
    ``grid`` is sorted and starts at 0 (:func:`_grid`); ``level[i]`` counts the grid radii
    certified for example ``i`` (0: abstain).
    """

    def __init__(
        self,
        grid: np.ndarray,
        radius_of: Callable[[np.ndarray], np.ndarray],
        sequence: ConfidenceSequence,
        max_n: int,
        num_examples: int,
    ) -> None:
        self.grid, self.radius_of, self.sequence, self.max_n = grid, radius_of, sequence, max_n
        self.lower = np.zeros(num_examples)
        self.upper = np.ones(num_examples)
        self.level = np.zeros(num_examples, dtype=np.int64)

    def update(self, positions: np.ndarray, successes: np.ndarray, n: int) -> np.ndarray:
        """Fold in the bounds after ``n`` draws; return which examples stay open."""
        seq = self.sequence
        lower = np.maximum(self.lower[positions], seq.lower(successes, n))
        upper = np.minimum(self.upper[positions], seq.upper(successes, n))
        self.lower[positions], self.upper[positions] = lower, upper
        level = np.searchsorted(self.grid, self.radius_of(lower), side="right")
        self.level[positions] = level
        if n >= self.max_n:
            return np.zeros(positions.size, dtype=bool)
        undecided = level < self.grid.size
        nxt = self.grid[np.minimum(level, self.grid.size - 1)]
        best = seq.lower(successes + (self.max_n - n), self.max_n)
        beyond = (self.radius_of(upper) < nxt) | (self.radius_of(best) < nxt)
        return undecided & ~beyond

    def radii(self) -> np.ndarray:
        """``(N,)`` the largest certified grid radius (0 where none, or abstaining)."""
        return np.where(self.level > 0, self.grid[np.maximum(self.level - 1, 0)], 0.0)


class PredictTest:
    """Sequential PREDICT's decisions: the leading class ``c`` is returned once, for every
    other class ``j``, the confidence sequence on ``q = p_c / (p_c + p_j)`` (draws that hit
    ``c`` or ``j``) puts it above 1/2; abstention is certain once neither the leader nor the
    runner-up could get there by ``max_n`` even with every remaining draw.

    The runner-up (largest other count) is the binding ``j``: a lower bound decreases as the
    other count grows. ``sequence`` must be at level ``alpha / (K - 1)``, the union over the
    ``K - 1`` classes that could be returned in place of the true ``g(x)``.
    """

    def __init__(self, sequence: ConfidenceSequence, max_n: int, num_examples: int) -> None:
        self.sequence, self.max_n = sequence, max_n
        self.labels = np.full(num_examples, ABSTAIN, dtype=np.int64)

    def update(self, positions: np.ndarray, counts: np.ndarray, n: int) -> np.ndarray:
        """Decide after ``n`` draws; return which examples stay open."""
        order = np.argsort(-counts, axis=1, kind="stable")[:, :2]
        top = order[:, 0]
        c1 = np.take_along_axis(counts, order[:, :1], axis=1)[:, 0]
        c2 = np.take_along_axis(counts, order[:, 1:2], axis=1)[:, 0]
        seq = self.sequence
        decided = seq.lower(c1, np.maximum(c1 + c2, 1)) > 0.5
        self.labels[positions] = np.where(decided, top, ABSTAIN)
        if n >= self.max_n:
            return np.zeros(positions.size, dtype=bool)
        rest = self.max_n - n
        leader_can = seq.lower(c1 + rest, c1 + rest + c2) > 0.5
        runner_can = seq.lower(c2 + rest, c2 + rest + c1) > 0.5
        return ~decided & (leader_can | runner_can)


def engine_draw(
    model: nn.Module,
    x: Tensor,
    ids: list[int],
    stream: int,
    *,
    num_classes: int,
    seed: int,
    batch_size: int | None,
    block_size: int,
    workers: int | None,
    owner: nn.Module,
) -> Draw:
    """A :data:`Draw` running the sampling engine on ``stream`` of the randomized ``model``
    for rows of ``x`` (global ids ``ids``); ``start`` must be a multiple of ``block_size``."""
    ids_t = torch.tensor(ids, dtype=torch.int64)

    def draw(positions: np.ndarray, start: int, count: int) -> np.ndarray:
        pos = torch.from_numpy(positions)
        (res,) = sample_streams(
            model,
            x[pos.to(x.device)],
            [(stream, count)],
            num_classes=num_classes,
            seed=seed,
            indices=ids_t[pos],
            batch_size=batch_size,
            block_size=block_size,
            row_bytes_owner=owner,
            workers=workers,
            first_block=start // block_size,
        )
        return res.counts.cpu().numpy()

    return draw


def _check_labels(labels: Tensor, num_examples: int, num_classes: int) -> np.ndarray:
    if (
        not isinstance(labels, Tensor)
        or labels.dtype.is_floating_point
        or labels.shape != (num_examples,)
    ):
        raise ConfigError(f"labels must be an integer tensor of shape ({num_examples},)")
    y = labels.detach().cpu().numpy().astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ConfigError(f"labels must lie in [0, {num_classes}), got {int(y.min())}..{y.max()}")
    return y


def certify_rounds(
    draw: Draw,
    tested: np.ndarray,
    *,
    num_classes: int,
    sigma: float,
    radii: Sequence[float] | Tensor | np.ndarray,
    alpha: float,
    max_n: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
    sequence: str = DEFAULT_SEQUENCE,
    growth: float = DEFAULT_GROWTH,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The decisions of sequential CERTIFY on estimation draws from any source.

    ``tested``: ``(N,)`` the class tested per example (``c_hat`` or the true label);
    ``draw``: estimation counts (:data:`Draw`). The radii grid is in ℓ2 units; the rest as
    for :func:`smoothed_certify_sequential`, which runs this on the sampling engine (the
    statistical tests run it on exact binomial counts). Returns numpy ``labels``, ``radii``
    and estimation ``draws`` per example.
    """
    alpha = _check_alpha(alpha)
    sigma = check_number(sigma, "sigma", low=0.0, low_open=True)
    max_n = check_int(max_n, "max_n", minimum=1)
    check_choice(sequence, "sequence", SEQUENCES)
    looks = look_schedule(max_n, block_size, growth)
    num = tested.shape[0]
    test = GridTest(
        _grid(radii),
        lambda q: np.asarray(gaussian_radius_from_bound(q, sigma)),
        confidence_sequence(sequence, alpha, len(looks)),
        max_n,
        num,
    )

    def decide(positions: np.ndarray, counts: np.ndarray, n: int) -> np.ndarray:
        hits = counts[np.arange(positions.size), tested[positions]]
        return test.update(positions, hits, n)

    _, spent = run_rounds(num, num_classes, looks, draw, decide)
    labels = np.where(test.level > 0, tested, ABSTAIN).astype(np.int64)
    return labels, test.radii(), spent


def predict_rounds(
    draw: Draw,
    num_examples: int,
    *,
    num_classes: int,
    alpha: float,
    max_n: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
    sequence: str = DEFAULT_SEQUENCE,
    growth: float = DEFAULT_GROWTH,
) -> tuple[np.ndarray, np.ndarray]:
    """The decisions of sequential PREDICT (:class:`PredictTest`) on draws from any source;
    returns numpy ``labels`` (``-1`` = abstain) and ``draws`` per example."""
    alpha = _check_alpha(alpha)
    max_n = check_int(max_n, "max_n", minimum=1)
    num_classes = check_int(num_classes, "num_classes", minimum=2)
    check_choice(sequence, "sequence", SEQUENCES)
    looks = look_schedule(max_n, block_size, growth)
    level = alpha / (num_classes - 1)
    test = PredictTest(confidence_sequence(sequence, level, len(looks)), max_n, num_examples)
    _, spent = run_rounds(num_examples, num_classes, looks, draw, test.update)
    return test.labels, spent


def smoothed_certify_sequential(
    model: nn.Module,
    x: Tensor,
    *,
    sigma: float,
    radii: Sequence[float] | Tensor,
    alpha: float,
    max_n: int,
    n0: int = 100,
    labels: Tensor | None = None,
    seed: int | None = None,
    indices: Tensor | None = None,
    batch_size: int | None = None,
    sequence: str = DEFAULT_SEQUENCE,
    growth: float = DEFAULT_GROWTH,
    num_classes: int | None = None,
    generator: torch.Generator | None = None,
    workers: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sequential CERTIFY at a grid of ℓ2 radii for the Gaussian smoothing ``g`` of ``model``.

    The tested class is ``c_hat``, the most frequent of ``n0`` draws on the ``SELECTION``
    stream (as CERTIFY), or the true label where ``labels`` are given (no selection draws).
    Its probability ``p`` is bounded by the confidence sequence ``sequence`` (module doc)
    over the ``ESTIMATION`` draws, taken in rounds up to :func:`look_schedule` ``(max_n,
    block_size, growth)``, until every radius of the grid is decided (:func:`certify_rounds`).

    Guarantee: with probability ``>= 1 - alpha`` over the estimation draws, wherever the label
    is not ``-1``, ``g(x + delta) = label`` for every ``||delta||_2 < radius``. With true
    labels the event is about ``p_y`` alone: the label ``y`` is returned only if ``p_y``'s
    lower bound is ``>= 1/2`` (so ``y`` is ``g(x)``), a misclassified example abstains (its
    smoothed prediction is never reported as certified), and no selection error can occur.

    Args:
        model: base classifier (no noise layer), ``(B, C, H, W) -> (B, K)`` scores.
        x: ``(N, C, H, W)`` inputs, pixels in ``[0, 1]``.
        sigma: noise standard deviation in pixel units.
        radii: the grid of ℓ2 radii (pixel units, ``>= 0``); 0 is always tested (the label).
        alpha: failure probability of the certificates, in (0, 1).
        max_n: the most estimation draws per example.
        n0: selection draws per example (ignored when ``labels`` are given).
        labels: optional ``(N,)`` true labels to test directly.
        seed, indices, generator, batch_size, workers, block_size, num_classes: as for
            :func:`bench.sampling.smoothed_certify` (seed and global ``indices`` fix the draws;
            batch size and workers do not change them).
        sequence: a name of :data:`bench.confseq.SEQUENCES`.
        growth: look spacing of :func:`look_schedule`.

    Returns:
        ``labels`` ``(N,)`` int64 (``-1`` = abstain), ``radii`` ``(N,)`` float64 (the largest
        certified grid radius, or 0) and ``draws`` ``(N,)`` int64 (forward passes spent on
        each example, selection draws included), on ``x.device``.
    """
    check_input(x)
    _check_alpha(alpha)  # bad arguments fail before any draw
    check_int(max_n, "max_n", minimum=1)
    check_choice(sequence, "sequence", SEQUENCES)
    look_schedule(max_n, block_size, growth)
    grid = _grid(radii)
    num = x.shape[0]
    ids = check_indices(indices, num)
    k = _infer_classes(model, x, num_classes)
    noisy = _smoothed(model, x, sigma)
    common = dict(
        num_classes=k,
        seed=_resolve_seed(seed, generator),
        batch_size=batch_size,
        block_size=block_size,
        workers=workers,
        owner=model,
    )
    spent0 = 0
    if labels is not None:
        tested = _check_labels(labels, num, k)
    else:
        n0 = check_int(n0, "n0", minimum=1)
        select = engine_draw(noisy, x, ids, SELECTION, **common)  # type: ignore[arg-type]
        tested = select(np.arange(num, dtype=np.int64), 0, n0).argmax(axis=1)
        spent0 = n0
    out, radius, spent = certify_rounds(
        engine_draw(noisy, x, ids, ESTIMATION, **common),  # type: ignore[arg-type]
        tested,
        num_classes=k,
        sigma=sigma,
        radii=grid,
        alpha=alpha,
        max_n=max_n,
        block_size=block_size,
        sequence=sequence,
        growth=growth,
    )
    dev = x.device
    return (
        torch.from_numpy(out).to(dev),
        torch.from_numpy(radius).to(dev),
        torch.from_numpy(spent + spent0).to(dev),
    )


def smoothed_predict_sequential(
    model: nn.Module,
    x: Tensor,
    *,
    sigma: float,
    alpha: float,
    max_n: int,
    seed: int | None = None,
    indices: Tensor | None = None,
    batch_size: int | None = None,
    sequence: str = DEFAULT_SEQUENCE,
    growth: float = DEFAULT_GROWTH,
    num_classes: int | None = None,
    generator: torch.Generator | None = None,
    workers: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Sequential PREDICT for the Gaussian smoothing ``g`` of ``model`` (:class:`PredictTest`).

    Draws on the ``PREDICTION`` stream in the rounds of :func:`look_schedule`; stops once the
    leading class beats every other one (confidence sequence at ``alpha / (K - 1)`` on each
    pairwise share) or abstention is certain, else at ``max_n``. Guarantee: the returned
    label differs from ``g(x)`` (and is not ``-1``) with probability ``<= alpha``, under the
    optional stopping. Arguments as for :func:`smoothed_certify_sequential`; returns
    ``(N,)`` int64 labels (``-1`` = abstain) and ``(N,)`` int64 draws, on ``x.device``.
    """
    check_input(x)
    num = x.shape[0]
    k = _infer_classes(model, x, num_classes)
    draw = engine_draw(
        _smoothed(model, x, sigma),
        x,
        check_indices(indices, num),
        PREDICTION,
        num_classes=k,
        seed=_resolve_seed(seed, generator),
        batch_size=batch_size,
        block_size=block_size,
        workers=workers,
        owner=model,
    )
    labels, spent = predict_rounds(
        draw,
        num,
        num_classes=k,
        alpha=alpha,
        max_n=max_n,
        block_size=block_size,
        sequence=sequence,
        growth=growth,
    )
    dev = x.device
    return torch.from_numpy(labels).to(dev), torch.from_numpy(spent).to(dev)
