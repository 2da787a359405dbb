"""Random-projection estimates of the forward form's columns (training only, NOT sound).

Wong, Schmidt, Metzen & Kolter (NeurIPS 2018), §3.2: instead of pushing one column per input
coordinate and per unstable unit through the network, push ``k`` random columns and estimate

* an ℓ1 term ``Σ_j |w_j| |v_j|`` by the median of ``|·|`` over ``k`` Cauchy projections (the
  median of ``|Cauchy(0, s)|`` is ``s``);
* an ℓ2 term ``‖v‖₂`` by the root mean square over ``k`` Gaussian projections.

The estimates replace the exact intermediate bounds ``l, u`` during training only; they are
random and may overshoot, so no certificate uses them. The final objective ``J`` given the
(estimated) ``l, u`` is still computed exactly by the backward pass. The classes follow the
interface of :mod:`.forward_form`'s exact columns (``affine``, ``relu``, ``bounds``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .input_set import InputSet, offsets
from .network import Op, apply_batched
from .relaxation import ReluRelaxation

__all__ = ["ProjectedInputColumns", "ProjectedReluColumns"]


def _sqrt_zero_safe(v: Tensor) -> Tensor:
    """``sqrt(v)`` for ``v >= 0`` with gradient 0 instead of NaN (0 · inf) where ``v = 0``.

    A unit whose columns are all zero (every path to it passes an inactive ReLU) has ``v = 0``.
    """
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, 1.0).sqrt(), 0.0)


class ProjectedReluColumns:
    """Estimate of one unstable layer's terms ``Σ_j l_j [∓v_j]_+`` (training only).

    ``Σ_j l_j [∓v_j]_+ = ½(-Σ_j |l_j||v_j| ∓ Σ_j l_j v_j)``: the linear part is pushed forward
    exactly (one column), the ℓ1 part is estimated from ``k`` Cauchy columns.
    """

    def __init__(self, info: ReluRelaxation, k: int):
        n = info.d.shape[0]
        r = torch.empty(n, k, *info.d.shape[1:], device=info.d.device, dtype=info.d.dtype)
        r.cauchy_()
        weight = info.d * info.l_unstable  # l_j d_j on unstable units, 0 elsewhere
        self.cols = r * weight.abs().unsqueeze(1)
        self.one = weight

    def affine(self, op: Op) -> None:
        self.cols = apply_batched(op.apply, self.cols, 2)
        self.one = op.apply(self.one)

    def relu(self, d: Tensor) -> None:
        self.cols = self.cols * d.unsqueeze(1)
        self.one = self.one * d

    def bounds(self) -> tuple[Tensor, Tensor]:
        n = self.one.shape[0]
        est = self.cols.abs().reshape(n, self.cols.shape[1], -1).median(dim=1).values
        w = self.one.reshape(n, -1)
        return 0.5 * (-est - w), 0.5 * (est - w)


class ProjectedInputColumns:
    """Estimate of the input term's range (training only): ``k`` Cauchy columns scaled by the
    box half-widths (ℓ1 term) and/or ``k`` Gaussian columns (ℓ2 term)."""

    def __init__(self, s: InputSet, k: int):
        x = s.x
        n = x.shape[0]
        self.s = s
        self.cauchy = self.gauss = None
        if s.box_radius is not None:
            r = torch.empty(n, k, *x.shape[1:], dtype=x.dtype, device=x.device).cauchy_()
            self.cauchy = r * s.box_radius.unsqueeze(1)
        if s.ball_eps is not None:
            self.gauss = torch.randn(n, k, *x.shape[1:], dtype=x.dtype, device=x.device)

    def affine(self, op: Op) -> None:
        if self.cauchy is not None:
            self.cauchy = apply_batched(op.apply, self.cauchy, 2)
        if self.gauss is not None:
            self.gauss = apply_batched(op.apply, self.gauss, 2)

    def relu(self, d: Tensor) -> None:
        if self.cauchy is not None:
            self.cauchy = self.cauchy * d.unsqueeze(1)
        if self.gauss is not None:
            self.gauss = self.gauss * d.unsqueeze(1)

    def bounds(self, shift: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
        """Estimated offsets ``(lo, up)``, ``(N, units)``, around the centre pass; ``shift``
        as for :meth:`.forward_form.InputColumns.bounds`."""
        s = self.s
        n = s.x.shape[0]
        ball = box = None
        if self.gauss is not None:
            assert s.ball_eps is not None
            g = self.gauss.reshape(n, self.gauss.shape[1], -1)
            ball = s.ball_eps[:, None] * _sqrt_zero_safe(g.square().mean(dim=1))
        if self.cauchy is not None:
            cf = self.cauchy.reshape(n, self.cauchy.shape[1], -1)
            box = cf.abs().median(dim=1).values
        return offsets(ball, box, shift, n)
