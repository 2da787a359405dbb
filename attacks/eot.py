"""Expectation over noise: gradients of randomized defenses, and certbench's own EOT-PGD.

A randomized defense's single forward pass is a random function; attacking one noisy draw
follows the noise rather than the classifier (Athalye et al.'s expectation over
transformation; PixelDP's attacks average the loss over 20 draws per step). Two ways to get
the expectation are provided:

* :meth:`ExpectationOverNoise.loss_grad` — the **mean over draws of the per-draw
  cross-entropy gradients**, ``(1/D) Σ_k ∇_x CE(f(x + noise_k), y)``, exactly as the PixelDP
  reference computes it. certbench's PGD (``attack(..., library="certbench", name="pgd")``)
  uses this.
* :meth:`ExpectationOverNoise.forward` — scores for libraries that only call
  ``model(x)``: the **log of the mean softmax** over draws, ``log p̄(x)`` with
  ``p̄ = (1/D) Σ_k softmax(f(x + noise_k))``. These are log-probabilities of the expected
  softmax (what a softmax-expectation prediction uses), so ``argmax`` is that prediction and
  a library's cross-entropy on them equals ``-log p̄_y``. Its gradient is

      ∇_x(-log p̄_y) = Σ_k w_k ∇_x CE(f(x + noise_k), y),   w_k = p_k(y) / Σ_j p_j(y),

  a convex combination of the per-draw CE gradients: an expectation over draws, reweighted
  towards the draws that still predict ``y`` (those an attack must flip). It equals the plain
  mean whenever the draws agree on ``p(y)``. No output tensor ``o`` gives the plain mean for
  every label: a library back-propagates ``softmax(o) - e_y`` through ``∂o/∂x``, and matching
  ``(1/D) Σ_k (p_k - e_y)ᵀ J_k`` for all ``y`` would need one ``K``-vector ``q`` with
  ``qᵀ (1/D) Σ_k J_k = (1/D) Σ_k p_kᵀ J_k`` (``J_k`` the per-draw logit Jacobians), which has
  no solution in general. Exact mean-of-CE-gradients is therefore :meth:`loss_grad`. Margin losses
  (Carlini–Wagner, DLR) on ``log p̄`` attack the expected-softmax classifier directly.

With ``draws = 1``, or for a deterministic defense, ``forward`` is the plain
``defense.logits(x)``. The module holds the defended network as a sub-module, so
``parameters()`` (torchattacks reads the device from the first parameter), ``eval()`` and
``to()`` reach it; a zero-size parameter stands in when the network has none. Noise layers
stay on in ``eval()`` mode (:mod:`bench.noise`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import (
    DEFAULT_DRAWS,
    PGD_DEFAULTS,
    defense_is_randomized,
    pgd_resolver,
    register_attack,
)
from bench.errors import ConfigError
from bench.threat import PGD_NORMS, projected_gradient_ascent, random_in_ball
from bench.validation import check_choice, check_int
from defenses.base import Defense

#: l2 steps of certbench's EOT-PGD divide the mean gradient by ``max(||g||_2, 1e-12)``: a mean
#: gradient shorter than that is float32 rounding noise (a confidently classified input), and a
#: full step along it would go wherever the noise points
#: (:func:`bench.threat.projected_gradient_ascent`, ``min_grad_norm``).
EOT_MIN_GRAD_NORM = 1e-12


class ExpectationOverNoise(nn.Module):
    """Averages a randomized defense over ``draws`` noise draws per call.

    Args:
        defense: a set-up defense; its ``logits(x)`` is one differentiable (noisy) forward.
        draws: noise draws per call (forced to 1 for deterministic defenses).

    Shapes: ``x`` is ``(N, C, H, W)``, pixels in [0, 1]; outputs are ``(N, K)``. All draws
    of a call run as one batch of ``draws · N`` rows (row ``k · N + i`` is draw ``k`` of
    example ``i``); noise comes from the noise layers' source (torch's global RNG unless a
    :func:`bench.noise.noise_source` is installed).
    """

    def __init__(self, defense: Defense, draws: int = DEFAULT_DRAWS) -> None:
        super().__init__()
        draws = check_int(draws, "draws", minimum=1, where="ExpectationOverNoise")
        if not hasattr(defense, "model_"):
            raise ConfigError(
                "ExpectationOverNoise needs a set-up defense (call defense.setup(model, ...) first)"
            )
        object.__setattr__(self, "defense", defense)  # not a sub-module: model_ is
        self.model = defense.model_
        self.randomized = defense_is_randomized(defense)
        self.draws = draws if self.randomized else 1
        if next(self.model.parameters(), None) is None:  # torchattacks needs a parameter
            self._device_anchor = nn.Parameter(
                torch.zeros(0, device=defense.device), requires_grad=False
            )

    def extra_repr(self) -> str:
        return f"draws={self.draws}, randomized={self.randomized}"

    def _draw_logits(self, x: Tensor) -> Tensor:
        """``(draws, N, K)`` logits of ``draws`` noisy forwards (one batched pass)."""
        n = x.shape[0]
        xr = x.repeat(self.draws, *([1] * (x.dim() - 1)))
        z = self.defense.logits(xr)
        return z.reshape(self.draws, n, *z.shape[1:])

    def forward(self, x: Tensor) -> Tensor:
        """``(N, K)`` scores: ``log`` of the mean softmax over draws (``defense.logits(x)`` if
        ``draws == 1``). Differentiable; see the module docstring for its CE gradient."""
        if self.draws == 1:
            return self.defense.logits(x)
        logp = F.log_softmax(self._draw_logits(x), dim=-1)
        return torch.logsumexp(logp, dim=0) - math.log(self.draws)

    def loss_grad(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mean over draws of the per-draw cross-entropy and of its input gradient.

        Returns ``(loss, grad)``: ``loss`` ``(N,)`` = ``(1/D) Σ_k CE(f(x + noise_k), y)`` and
        ``grad`` like ``x`` = ``(1/D) Σ_k ∇_x CE(f(x + noise_k), y)`` (per example; the
        examples do not interact). Both detached.
        """
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            z = self._draw_logits(x)
            ce = F.cross_entropy(
                z.reshape(-1, z.shape[-1]), y.repeat(self.draws), reduction="none"
            ).reshape(self.draws, x.shape[0])
            loss = ce.mean(dim=0)
            (grad,) = torch.autograd.grad(loss.sum(), x)
        return loss.detach(), grad


# --------------------------------------------------------------------------- certbench EOT-PGD
def eot_pgd(
    defense: Defense,
    x: Tensor,
    y: Tensor,
    *,
    norm: str,
    eps: float,
    steps: int = 40,
    step_size: float | None = None,
    random_start: bool = True,
    draws: int = DEFAULT_DRAWS,
) -> Tensor:
    """Projected gradient ascent on the expected cross-entropy (untargeted).

    Each step estimates ``g = E_noise[∇_x CE]`` as the mean of ``draws`` per-draw gradients
    (:meth:`ExpectationOverNoise.loss_grad`), then moves ``step_size`` along ``sign(g)``
    (linf) or ``g / max(||g||_2, 1e-12)`` (l2: the normalised *mean* gradient, not the sign of
    a sum), projects onto the ``eps`` ball around ``x`` and clips to [0, 1], every iterate
    within the budget exactly (:func:`bench.threat.project`). ``random_start`` draws the start
    uniformly from the ball (torch's global RNG, which :func:`attacks.attack` seeds). The loop
    is :func:`bench.threat.projected_gradient_ascent`.

    Args:
        defense: a set-up defense; ``x``: ``(N, C, H, W)`` in [0, 1]; ``y``: ``(N,)`` labels.
        norm: ``"linf"`` or ``"l2"``; ``eps``: radius in pixel units.
        steps, step_size: ascent steps and their length (``None``: ``2.5 · eps / steps``).
        random_start, draws: as above.

    Returns:
        The last iterate, ``(N, C, H, W)`` in [0, 1], ``||x_adv - x||_norm <= eps``.
    """
    check_choice(norm, "norm", PGD_NORMS, where="certbench:pgd")
    alpha = 2.5 * eps / steps if step_size is None else float(step_size)
    eot = ExpectationOverNoise(defense, draws)
    x0 = x.detach()
    return projected_gradient_ascent(
        lambda x_adv: eot.loss_grad(x_adv, y)[1],
        x0,
        norm=norm,
        eps=eps,
        steps=steps,
        step_size=alpha,
        start=random_in_ball(x0, norm=norm, eps=eps) if random_start else None,
        exact_budget=True,
        min_grad_norm=EOT_MIN_GRAD_NORM,
    )


@register_attack(
    "certbench",
    "pgd",
    norms=PGD_NORMS,
    defaults=PGD_DEFAULTS,
    resolve=pgd_resolver("certbench:pgd"),
    summary="PGD on the mean of per-draw CE gradients (EOT), sign step (linf) or "
    "normalised mean gradient (l2); the default attack",
)
def _certbench_pgd(
    defense: Defense, x: Tensor, y: Tensor, *, norm: str, eps: float, seed: int, **params: Any
) -> Tensor:
    return eot_pgd(defense, x, y, norm=norm, eps=eps, **params)
