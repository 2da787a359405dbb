"""Certified radii from the dual bound: a yes/no test per radius, searched two ways.

The test at radius ``r``: every margin bound ``J(e_y - e_j)``, ``j != y``, of
:func:`.dual.margin_lower_bounds` at ``eps = r`` is ``> 0``, so no ``x'`` within ``r`` of
``x`` (in ``norm``, pixel units) changes the label away from ``y``. The dual bound is not
guaranteed to be monotone in the radius (the slopes ``u/(u-l)`` change with it), so a
certificate at ``r`` says nothing by itself about smaller radii: both searches below return
only radii that were tested.

* :func:`certified_radius` bisects ``[0, eps_max]`` (a continuous radius, to a tolerance);
* :func:`certified_radius_on_grid` tests the radii a caller will score (a board's grid) and
  returns per example the largest one below which every grid radius is certified.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bench.validation import check_number

from .dual import margin_lower_bounds
from .input_set import EpsLike

__all__ = ["certified_radius", "certified_radius_on_grid", "worst_margin"]


def worst_margin(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: EpsLike,
    norm: str = "linf",
    clip_box: bool = False,
    batch_size: int | None = None,
) -> Tensor:
    """``min_{j != y} J(e_y - e_j)`` at radius ``eps``, ``(N,)`` in the model's dtype.

    Positive iff the exact dual bound certifies label ``y`` (``+inf`` with a single class).
    """
    bound = margin_lower_bounds(
        model, x, y, eps=eps, norm=norm, clip_box=clip_box, batch_size=batch_size
    )
    bound = bound.scatter(1, torch.as_tensor(y).view(-1, 1).to(bound.device), math.inf)
    return bound.min(dim=1).values


def _certified_mask(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: EpsLike,
    norm: str,
    clip_box: bool,
    batch_size: int | None,
) -> Tensor:
    """``(N,)`` bool on the CPU: label ``y`` certified at ``eps``."""
    worst = worst_margin(model, x, y, eps=eps, norm=norm, clip_box=clip_box, batch_size=batch_size)
    return (worst > 0).cpu()


@torch.no_grad()
def certified_radius(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: str = "linf",
    eps_max: float,
    tol: float = 1e-4,
    clip_box: bool = False,
    batch_size: int | None = None,
) -> Tensor:
    """Largest radius in ``[0, eps_max]`` certified for label ``y`` (bisection), ``(N,)`` float64.

    ``x`` ``(N, *in)`` in ``[0, 1]``, ``y`` ``(N,)`` labels, radii in pixel units of ``norm``
    (``"linf"`` or ``"l2"``). Every returned ``r > 0`` is certified by an exact Wong–Kolter
    bound computed *at* ``r`` (all margins ``J(e_y - e_j) > 0``), so the label cannot change
    within the ``norm`` ball of radius ``r``; 0 means nothing is certified. The search
    brackets the boundary to within ``tol``; the dual bound is not guaranteed to be monotone
    in the radius, so the result is a certified radius, not necessarily the supremum of all
    certified radii.
    """
    eps_max = check_number(eps_max, "eps_max", low=0, low_open=True)
    tol = check_number(tol, "tol", low=0, low_open=True)
    n = x.shape[0]
    y = torch.as_tensor(y).long()
    lo = torch.zeros(n, dtype=torch.float64)
    hi = torch.full((n,), float(eps_max), dtype=torch.float64)
    top = _certified_mask(model, x, y, hi, norm, clip_box, batch_size)
    lo[top] = eps_max
    zero_ok = _certified_mask(
        model, x, y, torch.zeros(n, dtype=torch.float64), norm, clip_box, batch_size
    )
    hi[~zero_ok] = 0.0
    active = ~top & zero_ok
    while bool(active.any()):
        idx = active.nonzero(as_tuple=True)[0]
        mid = (lo[idx] + hi[idx]) / 2
        ok = _certified_mask(model, x[idx], y[idx], mid, norm, clip_box, batch_size)
        lo[idx[ok]] = mid[ok]
        hi[idx[~ok]] = mid[~ok]
        active = (hi - lo > tol) & ~top & zero_ok
    return lo


@torch.no_grad()
def certified_radius_on_grid(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    radii: Sequence[float] | Tensor,
    *,
    norm: str = "linf",
    clip_box: bool = False,
    batch_size: int | None = None,
) -> Tensor:
    """Per example the largest ``r`` in ``radii`` such that the exact dual bound certifies
    label ``y`` at every positive radius of ``radii`` up to and including ``r``; ``(N,)``
    float64, 0 if the smallest positive radius is not certified.

    ``x`` ``(N, *in)`` in ``[0, 1]``, ``y`` ``(N,)`` labels, ``radii`` (any order, finite,
    ``>= 0``) in pixel units of ``norm`` (``"linf"`` or ``"l2"``). A radius of 0 is no
    perturbation and is not tested. So for every ``r`` in ``radii``, ``result >= r`` implies
    a certificate computed at ``r`` (what a board's "guaranteed accuracy at r" needs), without
    assuming the bound monotone. Radii are tested from the smallest up, each on the examples
    still certified, so an example costs one bound evaluation per radius it passes, plus one.
    """
    values = radii.tolist() if isinstance(radii, Tensor) else list(radii)
    grid = sorted({check_number(r, "radii", low=0) for r in values})
    n = x.shape[0]
    y = torch.as_tensor(y).long()
    out = torch.zeros(n, dtype=torch.float64)
    active = torch.arange(n)
    for r in grid:
        if r == 0:
            continue
        if active.numel() == 0:
            break
        ok = _certified_mask(model, x[active], y[active], r, norm, clip_box, batch_size)
        active = active[ok]
        out[active] = r
    return out
