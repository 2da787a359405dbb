"""The Wong–Kolter provable defense: train on, and certify with, the convex-relaxation bound.

Wong & Kolter, "Provable defenses against adversarial examples via the convex outer
adversarial polytope" (ICML 2018); scaled version: Wong, Schmidt, Metzen & Kolter (NeurIPS
2018). The bounds themselves live in :mod:`defenses.convex_relaxation` (one module per
concern); this module keeps the small defense class and re-exports the public functions,
so ``from defenses.wong_kolter import margin_lower_bounds`` keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bench.registry import register_defense
from bench.validation import check_bool, check_choice, check_int, check_number
from defenses.base import Certificate, Citation, Defense, DefenseRecord, TrainProgress
from defenses.convex_relaxation import (
    BALL_NORMS,
    METHODS,
    certified_radius,
    certified_radius_on_grid,
    check_supported,
    dual_lower_bound,
    interval_margin_lower_bounds,
    margin_lower_bounds,
    pre_activation_bounds,
    robust_loss,
    worst_margin,
)

__all__ = [
    "BALL_NORMS",
    "METHODS",
    "WongKolter",
    "certified_radius",
    "certified_radius_on_grid",
    "check_supported",
    "dual_lower_bound",
    "interval_margin_lower_bounds",
    "margin_lower_bounds",
    "pre_activation_bounds",
    "robust_loss",
]

_WHERE = "wong-kolter"


@register_defense("wong-kolter")
class WongKolter(Defense):
    """Provable defense of Wong & Kolter (2018): train on, and certify with, the dual bound.

    Training minimises the robust cross-entropy ``CE(-J(e_y - e_j), y)``
    (:func:`robust_loss`) with ``eps`` ramped linearly from 0 over the first
    ``eps_warmup_fraction`` of training; ``projection_dim=k`` replaces the exact intermediate
    bounds by their random-projection estimate (faster, not sound; training only).
    :meth:`certify` always uses the exact bound. Exact training keeps (inputs + unstable
    units) columns per example and layer for the backward pass, so its memory grows as
    batch × input size × layer width: use ``projection_dim`` (the paper uses k = 50) for
    image-sized convolutional networks.

    The model must be an ``nn.Sequential`` of ``nn.Linear``, ``nn.Conv2d``, ``nn.ReLU`` and
    ``nn.Flatten`` (checked by :meth:`build`); inputs ``(N, C, H, W)`` in ``[0, 1]``; radii in
    pixel units of ``norm`` (``"linf"`` or ``"l2"``).
    """

    citation = Citation(
        title="Provable Defenses against Adversarial Examples via the Convex Outer "
        "Adversarial Polytope",
        authors=("Eric Wong", "J. Zico Kolter"),
        venue="International Conference on Machine Learning (ICML)",
        year=2018,
        url="https://arxiv.org/abs/1711.00851",
    )

    randomized: ClassVar[bool] = False
    certifies: ClassVar[tuple[str, ...]] = BALL_NORMS
    norms: ClassVar[tuple[str, ...]] = BALL_NORMS
    param_help: ClassVar[dict[str, str]] = {
        "eps": "training radius of the norm ball, in pixel units",
        "norm": "training threat model: 'linf' or 'l2'",
        "eps_warmup_fraction": "fraction of training over which eps ramps linearly from 0",
        "projection_dim": "None = exact bound in training; k = Cauchy/Gaussian projections",
        "clip_box": "intersect the ball with the [0,1] pixel box (training and certification)",
        "certify_eps": "radius certified by certify() (default: eps, or the caller's radii)",
        "radius_search": "certify() bisects the largest certified radius in [0, certify_eps]",
    }
    #: Bisection steps of the radius search: tolerance = certify_eps / 2**RADIUS_STEPS.
    RADIUS_STEPS: ClassVar[int] = 10

    def __init__(
        self,
        *,
        eps: float = 0.1,
        norm: str = "linf",
        eps_warmup_fraction: float = 0.5,
        projection_dim: int | None = None,
        clip_box: bool = False,
        certify_eps: float | None = None,
        radius_search: bool = False,
    ):
        self.eps = eps
        self.norm = norm
        self.eps_warmup_fraction = eps_warmup_fraction
        self.projection_dim = projection_dim
        self.clip_box = clip_box
        self.certify_eps = certify_eps
        self.radius_search = radius_search
        check_number(eps, "eps", low=0, where=_WHERE)
        check_choice(norm, "norm", BALL_NORMS, where=_WHERE)
        check_number(eps_warmup_fraction, "eps_warmup_fraction", low=0, high=1, where=_WHERE)
        if projection_dim is not None:
            check_int(projection_dim, "projection_dim", minimum=1, where=_WHERE)
        check_bool(clip_box, "clip_box", where=_WHERE)
        if certify_eps is not None:
            check_number(certify_eps, "certify_eps", low=0, where=_WHERE)
        check_bool(radius_search, "radius_search", where=_WHERE)

    def record(self) -> DefenseRecord:
        """Deterministic: no draws, no confidence level; radii from the exact dual bound."""
        return DefenseRecord(n_draws=None, alpha=None, bound="wong-kolter-dual")

    def build(self, model: nn.Module) -> nn.Module:
        check_supported(model, self.input_shape_)
        return model

    def train_defaults(self) -> dict[str, Any]:
        """Wong & Kolter's MNIST/Fashion-MNIST optimiser: Adam, lr 1e-3, batches of 50."""
        return {"optimizer": "adam", "lr": 1e-3, "batch_size": 50}

    def current_eps(self, progress: TrainProgress) -> float:
        """Training radius at ``progress``: linear ramp from 0 to ``eps``, then constant."""
        if self.eps_warmup_fraction <= 0:
            return float(self.eps)
        return float(self.eps) * min(1.0, progress.fraction / self.eps_warmup_fraction)

    def training_loss(self, x: Tensor, y: Tensor, progress: TrainProgress) -> Tensor:
        return robust_loss(
            self.model_,
            x,
            y,
            eps=self.current_eps(progress),
            norm=self.norm,
            clip_box=self.clip_box,
            projection_dim=self.projection_dim,
        )

    @torch.no_grad()
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
        """Certify the clean prediction (argmax of the logits) of each example, ``x`` ``(N, ...)``.

        ``radii[norm]`` (float64, 0 where nothing is certified) is, in this order of
        precedence:

        1. ``certify_eps`` set: ``certify_eps`` where every exact margin bound
           ``J(e_label - e_j)``, ``j != label``, is > 0 at ``certify_eps``, else 0; with
           ``radius_search``, the bisected largest certified radius in ``[0, certify_eps]``
           (tolerance ``certify_eps / 2**RADIUS_STEPS``);
        2. else ``radius_search``: the same bisection in ``[0, eps]``;
        3. else ``radii`` given (the caller's grid): the largest radius of ``radii`` such that
           the bound certifies every positive grid radius up to it (0 if none; see
           :func:`certified_radius_on_grid`). ``radii=[eps]`` tests exactly at ``eps``;
        4. else: ``eps`` if certified at ``eps``, else 0.

        Cases 1, 2 and 4 also return ``extra["margin_lower_bound"]``, ``min_j J(e_label -
        e_j)`` at ``certify_eps`` (default ``eps``). Deterministic: ``seed``/``indices`` are
        unused.
        """
        check_choice(norm, "norm", self.certifies, where=_WHERE)
        self.model_.eval()
        x = x.to(self.device)
        labels = self.logits(x).argmax(dim=1)
        kw: dict[str, Any] = dict(norm=norm, clip_box=self.clip_box, batch_size=batch_size)
        bound = self.record().bound or ""
        if radii is not None and self.certify_eps is None and not self.radius_search:
            grid = certified_radius_on_grid(self.model_, x, labels, radii, **kw)
            return Certificate(labels=labels.cpu(), radii={norm: grid}, bound=bound)
        radius_eps = float(self.eps if self.certify_eps is None else self.certify_eps)
        worst = worst_margin(self.model_, x, labels, eps=radius_eps, **kw).double().cpu()
        if self.radius_search and radius_eps > 0:
            tol = radius_eps / 2**self.RADIUS_STEPS
            radius = certified_radius(self.model_, x, labels, eps_max=radius_eps, tol=tol, **kw)
        else:
            radius = torch.where(worst > 0, radius_eps, 0.0).double()
        return Certificate(
            labels=labels.cpu(),
            radii={norm: radius},
            bound=bound,
            extra={"margin_lower_bound": worst},
        )
