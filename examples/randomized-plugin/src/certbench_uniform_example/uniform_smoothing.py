"""Randomized smoothing with uniform noise: an l1 certificate (a randomized certbench plugin).

The smoothed classifier is ``g(x) = argmax_c P(f(x + u) = c)`` with ``u ~ U[-lam, lam)^d`` on
the pixels (inputs in [0, 1]). Shifting the input by ``delta`` moves the uniform box, and the
two boxes' distributions differ in total variation by at most ``||delta||_1 / (2 lam)``; so if
``P(f(x + u) = c) >= p > 1/2``, ``g`` keeps predicting ``c`` for every
``||delta||_1 < 2 lam (p - 1/2)`` (Lee et al., NeurIPS 2019; Yang et al., ICML 2020, Table 1).
:meth:`UniformSmoothing.certify` uses the one-sided Clopper-Pearson lower bound ``p`` of
Cohen et al.'s CERTIFY (``n0`` draws pick the class, ``n`` fresh draws bound its
probability), so the radius holds with probability ``>= 1 - alpha`` over the draws.

What the plugin writes: the noise layer (``build``), the certificate (``certify``) and what
its board row records (``record``). What it does not: sampling, seeding, batching and
``predict`` -- certbench's engine draws the registered ``"uniform"`` noise, seeded per
example, and the default :meth:`defenses.base.Defense.predict` is a seeded Monte Carlo vote.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

import certbench_uniform_example.noise  # noqa: F401  (registers the "uniform" noise kind)
from bench.noise import NoiseLayer
from bench.registry import register_defense
from bench.sampling import ESTIMATION, SELECTION, sample
from bench.stats import lower_confidence_bound
from bench.threat import convert_radius
from bench.validation import check_int, check_number
from defenses.base import ABSTAIN, Certificate, Citation, Defense, DefenseRecord

BOUND = "uniform-l1"


@register_defense("uniform-smoothing")
class UniformSmoothing(Defense):
    """Smoothing with uniform noise ``U[-lam, lam)`` on each pixel; certifies l1 radii
    (converted conservatively to l2 and linf).

    Args:
        lam: half-width of the uniform noise, in pixel units (inputs in [0, 1]), ``> 0``.
        n0: selection draws per example, ``>= 1``.
        n: estimation draws per example (also the draws of ``predict``), ``>= 1``.
        alpha: failure probability of each certificate and level of predict's test.
    """

    citation = Citation(
        title="Randomized Smoothing of All Shapes and Sizes",
        authors=(
            "Greg Yang",
            "Tony Duan",
            "J. Edward Hu",
            "Hadi Salman",
            "Ilya Razenshteyn",
            "Jerry Li",
        ),
        venue="International Conference on Machine Learning (ICML)",
        year=2020,
        url="https://arxiv.org/abs/2002.08118",
    )

    randomized = True
    certifies = ("l1", "l2", "linf")
    norms = ("l1",)
    param_help: ClassVar[dict[str, str]] = {
        "lam": "half-width of the uniform noise on each pixel (pixel units)",
        "n0": "selection draws per example",
        "n": "estimation draws per example (and draws per prediction)",
        "alpha": "failure probability of each certificate / predict's test level",
    }
    check_params: ClassVar[dict[str, Any]] = {"n0": 10, "n": 200}

    def __init__(
        self, *, lam: float = 0.5, n0: int = 100, n: int = 10_000, alpha: float = 0.001
    ) -> None:
        check_number(lam, "lam", low=0.0, low_open=True)
        check_int(n0, "n0", minimum=1)
        check_int(n, "n", minimum=1)
        check_number(alpha, "alpha", low=0.0, high=1.0, low_open=True, high_open=True)
        self.lam = lam
        self.n0 = n0
        self.n = n
        self.alpha = alpha

    def record(self) -> DefenseRecord:
        """Board row: ``n`` draws per certificate (and prediction), confidence ``alpha``."""
        return DefenseRecord(n_draws=self.n, alpha=self.alpha, bound=BOUND)

    def build(self, model: nn.Module) -> nn.Module:
        """``NoiseLayer("uniform", lam) -> model``: the engine supplies (and seeds) the noise;
        training adds one draw per example (noise augmentation)."""
        return nn.Sequential(NoiseLayer("uniform", float(self.lam)), model)

    def certify(
        self,
        x: Tensor,
        *,
        norm: str,
        seed: int = 0,
        indices: Tensor | None = None,
        batch_size: int | None = None,
        radii: Sequence[float] | None = None,
    ) -> Certificate:
        """CERTIFY with uniform noise on ``x`` ``(N, C, H, W)`` in [0, 1].

        Returns labels ``(N,)`` int64 (``-1`` = abstain) and float64 radii: l1
        ``2 lam (p - 1/2)``, l2 ``r/sqrt(d)``, linf ``r/d`` (``d = C*H*W``), 0 on abstain;
        with probability ``>= 1 - alpha`` each holds. ``radii`` is ignored.
        """
        self.model_.eval()
        common = dict(
            num_classes=self.num_classes_, seed=seed, indices=indices, batch_size=batch_size
        )
        pick = sample(self.model_, x, self.n0, stream=SELECTION, **common)
        c_hat = pick.counts.argmax(dim=1)
        est = sample(self.model_, x, self.n, stream=ESTIMATION, **common)
        n_a = est.counts.gather(1, c_hat[:, None])[:, 0].cpu()
        p_lower = lower_confidence_bound(n_a, self.n, self.alpha)
        r_l1 = (2.0 * self.lam * (p_lower - 0.5)).to(torch.float64)
        certified = r_l1 > 0
        labels = torch.where(certified, c_hat.cpu(), ABSTAIN)
        r_l1 = torch.where(certified, r_l1, 0.0)
        dim = math.prod(x.shape[1:])
        out = {
            "l1": r_l1,
            "l2": convert_radius(r_l1, from_norm="l1", to_norm="l2", dim=dim),
            "linf": convert_radius(r_l1, from_norm="l1", to_norm="linf", dim=dim),
        }
        return Certificate(labels=labels, radii=out, bound=BOUND)

    def shared_certificate_norms(self) -> tuple[str, ...]:
        """:meth:`certify` reports all three norms from the same draws, whatever norm it is
        asked for: cells of several norms are certified once (``certbench run`` then
        spends half the draws on an l1 and an l2 cell)."""
        return self.certifies
