"""Interval bound propagation (IBP): the simple baseline next to the dual bound.

Intervals ``[lo, hi]`` are propagated layer by layer (``centre ± |W|·radius`` through affine
layers, ``relu`` of both ends through ReLUs). Through the affine block before the first ReLU
the threat set is mapped exactly: the box as an interval, the ℓ2 ball as ``centre ±
eps‖row‖₂`` per unit. The margin specification ``e_y - e_j`` is folded into the affine block
after the last ReLU (the usual "elision of the last layer"). Sound; neither IBP nor the dual
bound is always the tighter (see :mod:`.dual`), though on networks trained with the dual
bound IBP is usually far looser.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .dual import margin_chunks
from .forward_form import InputColumns
from .input_set import EpsLike, InputSet, input_terms
from .network import Op, apply_batched

__all__ = ["interval_margin_lower_bounds"]


def _interval_to_relu(ops: Sequence[Op], s: InputSet) -> tuple[Tensor, Tensor, int] | None:
    """Interval bounds after the last ReLU, ``(lo, hi, index of that ReLU)``; None if none."""
    relus = [i for i, op in enumerate(ops) if op.relu]
    if not relus:
        return None
    first = relus[0]
    n = s.x.shape[0]
    # Through the first affine chain, the ball is mapped exactly: centre ± eps‖row‖₂.
    centre = s.x
    for op in ops[:first]:
        centre = op.apply(centre) + (0 if op.bias is None else op.bias)
    lo = hi = None
    if s.ball_eps is not None:
        cols = InputColumns(InputSet(s.x, s.ball_eps, None, None))
        for op in ops[:first]:
            cols.affine(op)
        blo, bup = cols.bounds()
        flat = centre.reshape(n, -1)
        lo, hi = (flat + blo).reshape(centre.shape), (flat + bup).reshape(centre.shape)
    if s.box_radius is not None:
        mid = s.x if s.box_delta is None else s.x + s.box_delta
        rad = s.box_radius
        for op in ops[:first]:
            mid = op.apply(mid) + (0 if op.bias is None else op.bias)
            rad = op.apply_abs(rad)
        lo = mid - rad if lo is None else torch.maximum(lo, mid - rad)
        hi = mid + rad if hi is None else torch.minimum(hi, mid + rad)
    assert lo is not None and hi is not None
    lo, hi = lo.clamp(min=0), hi.clamp(min=0)
    for op in ops[first + 1 : relus[-1] + 1]:
        if op.relu:
            lo, hi = lo.clamp(min=0), hi.clamp(min=0)
            continue
        mid, rad = op.apply((lo + hi) / 2), op.apply_abs((hi - lo) / 2)
        if op.bias is not None:
            mid = mid + op.bias
        lo, hi = mid - rad, mid + rad
    return lo, hi, relus[-1]


def interval_margin_lower_bounds(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: EpsLike,
    norm: str = "linf",
    clip_box: bool = False,
    batch_size: int | None = None,
) -> Tensor:
    """Interval bound propagation (IBP) lower bounds on ``logit_y - logit_j``, ``(N, K)``.

    Same threat model and arguments as :func:`.dual.margin_lower_bounds` (``x`` ``(N, *in)``
    in ``[0, 1]``, ``eps`` a float or ``(N,)`` in pixel units, ``norm`` ``"linf"`` or
    ``"l2"``): for every ``x'`` in the set, ``model(x')[y] - model(x')[j] >= bound[:, j]``.
    Sound; column ``y`` is 0.
    """
    out = []
    for ops, s, c in margin_chunks(model, x, y, eps, norm, clip_box, batch_size):
        res = _interval_to_relu(ops, s)
        start = 0 if res is None else res[2] + 1
        a, const = c, c.new_zeros(c.shape[:2])
        for op in reversed(ops[start:]):
            if op.bias is not None:
                const = const + (a * op.bias).reshape(*a.shape[:2], -1).sum(2)
            a = apply_batched(op.apply_t, a, 2)
        if res is None:
            out.append(const + input_terms(a, s)[0])
            continue
        lo, hi = res[0].unsqueeze(1), res[1].unsqueeze(1)
        val = a.clamp(min=0) * lo + a.clamp(max=0) * hi
        out.append(const + val.reshape(*a.shape[:2], -1).sum(2))
    return torch.cat(out) if out else x.new_zeros(0, 0)
