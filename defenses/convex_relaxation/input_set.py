"""The threat set ``S`` around each input and the dual's input term ``min_{x' ∈ S} aᵀx'``.

``S`` is the ``norm`` ball of radius ``eps`` around ``x`` (pixel units, pixels in ``[0, 1]``),
intersected with the pixel box ``[0, 1]^d`` when ``clip_box`` is set:

* ℓ∞ ball: ``min_{x'∈S} aᵀx' = aᵀx - ε‖a‖₁``;
* ℓ∞ ball ∩ box: the box ``[max(x-ε, 0), min(x+ε, 1)]`` is the exact intersection; its
  per-coordinate centre ``m`` and half-width ``r`` give ``aᵀm - Σ_j r_j |a_j|``;
* ℓ2 ball: ``aᵀx - ε‖a‖₂``;
* ℓ2 ball ∩ box: the minimum over the intersection is at least the larger of the ball's and
  the box's minima (the box ``[max(x-ε, 0), min(x+ε, 1)]`` contains the intersection); that
  maximum is used. Sound and never looser than either set alone, but not the exact minimum
  over the intersection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bench.errors import ConfigError, DataError
from bench.validation import check_choice

from .network import Op, parse_network

__all__ = ["BALL_NORMS", "EpsLike", "InputSet", "eps_vector", "input_terms", "offsets", "prepare"]

#: The norms of :data:`bench.threat.NORMS` whose balls the relaxation handles.
BALL_NORMS = ("linf", "l2")

EpsLike = float | Tensor
"""A radius: one float for every example, or an ``(N,)`` tensor (per-example radius)."""


@dataclass
class InputSet:
    """``S = ball ∩ box`` around ``x`` (either may be absent, not both).

    ``ball_eps`` ``(N,)``: ℓ2 radius. ``box_delta``/``box_radius`` ``(N, *in)``: the box is
    ``x + box_delta ± box_radius`` (``box_delta`` is ``None`` when the box is centred on x).
    """

    x: Tensor
    ball_eps: Tensor | None
    box_delta: Tensor | None
    box_radius: Tensor | None


def eps_vector(eps: EpsLike, n: int, like: Tensor) -> Tensor:
    """``eps`` as an ``(n,)`` tensor of ``like``'s dtype and device; finite and >= 0."""
    e = torch.as_tensor(eps, dtype=like.dtype, device=like.device)
    if e.dim() == 0:
        e = e.expand(n)
    if e.shape != (n,):
        raise ConfigError(f"eps must be a float or a tensor of shape ({n},); got {tuple(e.shape)}")
    if not bool(torch.isfinite(e).all()) or bool((e < 0).any()):
        raise ConfigError("eps must be finite and >= 0")
    return e


def _input_set(x: Tensor, eps: EpsLike, norm: str, clip_box: bool) -> InputSet:
    check_choice(norm, "norm", BALL_NORMS, where="Wong–Kolter bounds")
    n = x.shape[0]
    e = eps_vector(eps, n, x)
    ev = e.view(n, *([1] * (x.dim() - 1)))
    if clip_box and (bool((x < 0).any()) or bool((x > 1).any())):
        raise DataError("clip_box=True needs inputs with pixels in [0, 1]")
    if clip_box:
        lo = (x - ev).clamp(min=0.0)
        hi = (x + ev).clamp(max=1.0)
        delta, radius = (lo + hi) / 2 - x, (hi - lo) / 2
    else:
        delta, radius = None, ev.expand_as(x)
    if norm == "linf":
        return InputSet(x=x, ball_eps=None, box_delta=delta, box_radius=radius)
    if clip_box:
        return InputSet(x=x, ball_eps=e, box_delta=delta, box_radius=radius)
    return InputSet(x=x, ball_eps=e, box_delta=None, box_radius=None)


def prepare(
    model: nn.Module, x: Tensor, eps: EpsLike, norm: str, clip_box: bool
) -> tuple[list[Op], InputSet, Tensor]:
    """Parse ``model`` and build ``S`` around ``x`` (moved to the model's device and dtype).

    Returns the operators, the input set and the converted ``x`` ``(N, *in)``.
    """
    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype)
    if x.dim() < 2:
        raise DataError(f"x must be a batch (N, ...); got shape {tuple(x.shape)}")
    ops = parse_network(model, x.shape[1:])
    return ops, _input_set(x, eps, norm, clip_box), x


def input_terms(a: Tensor, s: InputSet, both: bool = False) -> tuple[Tensor, Tensor | None]:
    """``min_{x' ∈ S} aᵀx'`` per row, and (``both``) the same for ``-a``; ``a``: (N, Q, *in).

    Exact for a ball or a box; for ball ∩ box it is the larger of the two minima (sound).
    Returns ``(N, Q)`` tensors (the second ``None`` unless ``both``).
    """
    n, q = a.shape[:2]
    af = a.reshape(n, q, -1)
    lin = torch.einsum("nqd,nd->nq", af, s.x.reshape(n, -1))
    ball = spread = shift = None
    if s.ball_eps is not None:
        ball = -s.ball_eps[:, None] * torch.linalg.vector_norm(af, 2, dim=2)
    if s.box_radius is not None:
        spread = -torch.einsum("nqd,nd->nq", af.abs(), s.box_radius.reshape(n, -1))
        if s.box_delta is not None:
            shift = torch.einsum("nqd,nd->nq", af, s.box_delta.reshape(n, -1))

    def combine(sign: float) -> Tensor:
        box = None
        if spread is not None:
            box = spread if shift is None else spread + sign * shift
        if ball is not None and box is not None:
            return sign * lin + torch.maximum(ball, box)
        return sign * lin + (ball if ball is not None else box)

    return combine(1.0), (combine(-1.0) if both else None)


def offsets(
    ball: Tensor | None, box: Tensor | None, shift: Tensor | float, n: int
) -> tuple[Tensor, Tensor]:
    """Range ``(lo, up)`` of ``A(x' - x)`` over ``S`` given per-unit half-widths.

    ``ball``: the ball's half-width ``ε‖A_u‖₂`` per unit, ``box``: the box's ``Σ r|A_u|``
    around ``shift`` (the box centre's offset ``A·box_delta``). With both sets, the
    intersection of the two ranges (each contains the range over ``S``).
    """
    if ball is not None and box is not None:
        return torch.maximum(-ball, shift - box), torch.minimum(ball, shift + box)
    if ball is not None:
        return -ball.expand(n, -1), ball.expand(n, -1)
    assert box is not None
    return shift - box, shift + box
