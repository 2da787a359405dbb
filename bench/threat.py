"""Threat-model geometry: lp norms, projection onto the ε-ball ∩ [0, 1], random starts, radius
conversion between norms, and the one projected-gradient-ascent loop (PGD) that Madry training
and certbench's attacks share.

Conventions used throughout:

* ``x`` is ``(N, C, H, W)`` (any shape with a leading batch dimension), floating point, pixels
  in ``[0, 1]``. Norms are taken over each row's flattened pixels, in pixel units.
* A radius ``eps`` (and a PGD step size) is either a Python number, the same for every row, or
  a tensor of per-row values shaped ``(N, 1, ..., 1)`` (:func:`per_example` builds one).
  The two are computed with the ops natural to each (a number as a scalar operand, e.g.
  ``eps / t`` is torch's ``t.reciprocal() * eps``; a tensor elementwise), which round
  differently in the last bit; callers keep the form they have always used so that stored
  adversarial examples and trained weights reproduce bit for bit.
* The feasible set of a threat model is ``{x' : ||x' - x||_norm <= eps} ∩ [0, 1]^d``.
  Projection onto the ball followed by clipping to the box lands in that set: ``x`` lies in
  the box, so clipping moves every coordinate of ``x + delta`` towards ``x`` and cannot leave
  the ball.

This module imports nothing from ``attacks`` or ``defenses`` (it is the lower layer both use).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bench.errors import ValidationError
from bench.validation import check_choice, check_int

__all__ = [
    "NORMS",
    "PGD_NORMS",
    "convert_radius",
    "frozen_parameters",
    "lp_norm",
    "per_example",
    "project",
    "project_delta",
    "projected_gradient_ascent",
    "random_delta",
    "random_in_ball",
]

NORMS: tuple[str, ...] = ("l1", "l2", "linf")
"""Threat-model norms, in pixel units with pixels in [0, 1]."""

PGD_NORMS: tuple[str, ...] = ("linf", "l2")
"""The norms :func:`projected_gradient_ascent` has a steepest-ascent step for (sign of the
gradient for linf, the normalised gradient for l2)."""

Radius = float | Tensor
"""A Python number for every row, or a tensor of per-row values shaped ``(N, 1, ..., 1)``."""

_TINY = 1e-30  # keeps a division by a zero norm finite


# --------------------------------------------------------------------------- norms
def lp_norm(delta: Tensor, norm: str) -> Tensor:
    """Per-row ``norm`` of ``delta`` ``(N, ...)`` -> ``(N,)`` (0 for rows with no entries)."""
    flat = delta.reshape(delta.shape[0], -1)
    if norm == "linf":
        return flat.abs().amax(dim=1) if flat.shape[1] else flat.new_zeros(flat.shape[0])
    if norm == "l2":
        return flat.norm(p=2, dim=1)
    check_choice(norm, "norm", NORMS)
    return flat.abs().sum(dim=1)


def _per_row(t: Tensor, like: Tensor) -> Tensor:
    """``(N,)`` values of ``t`` shaped ``(N, 1, ..., 1)`` to broadcast against ``like``."""
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def per_example(value: float | Tensor, name: str, x: Tensor, *, where: str = "") -> Tensor:
    """``value`` (a number or an ``(N,)`` tensor; finite, ``>= 0``) as an ``(N, 1, ..., 1)``
    tensor of ``x``'s dtype and device, e.g. per-example radii (each example's certified
    radius). Raises :class:`bench.errors.ValidationError` naming ``name``."""
    prefix = f"{where}: " if where else ""
    t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != x.shape[0]):
        raise ValidationError(
            f"{prefix}{name} must be a number or a tensor of shape ({x.shape[0]},), "
            f"got shape {tuple(t.shape)}"
        )
    if t.numel() and not (torch.isfinite(t).all() and (t >= 0).all()):
        raise ValidationError(f"{prefix}{name} must be finite and >= 0, got {value!r}")
    return _per_row(t if t.dim() == 1 else t.expand(x.shape[0]), x)


# --------------------------------------------------------------------------- projection
def _project_l1(flat: Tensor, eps: Radius) -> Tensor:
    """Euclidean projection of each row of ``flat`` ``(N, d)`` onto the l1 ball of radius
    ``eps`` (a number or ``(N, 1)``).

    Soft thresholding ``sign(v) max(|v| - theta, 0)`` with the threshold found by sorting
    (Duchi et al., 2008); rows already inside the ball are returned unchanged.
    """
    a = flat.abs()
    inside = a.sum(dim=1, keepdim=True) <= eps
    if bool(inside.all()):
        return flat
    u, _ = a.sort(dim=1, descending=True)
    css = u.cumsum(dim=1)
    j = torch.arange(1, u.shape[1] + 1, device=flat.device, dtype=flat.dtype)
    cond = u - (css - eps) / j > 0
    rho = cond.to(flat.dtype).mul(j).argmax(dim=1, keepdim=True)  # last index where cond holds
    theta = ((css.gather(1, rho) - eps) / (rho + 1).to(flat.dtype)).clamp(min=0)
    projected = flat.sign() * (a - theta).clamp(min=0)
    return torch.where(inside, flat, projected)


def project_delta(delta: Tensor, eps: Radius, norm: str) -> Tensor:
    """Euclidean projection of each row of ``delta`` ``(N, ...)`` onto the ``norm`` ball of
    radius ``eps``: coordinate clamp (linf), radial rescaling (l2), soft thresholding (l1).
    Rows inside the ball are unchanged. Same shape and dtype as ``delta``."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    if norm == "l2":
        nrm = _per_row(lp_norm(delta, "l2"), delta)
        factor = torch.where(nrm > eps, eps / nrm.clamp_min(_TINY), torch.ones_like(nrm))
        return delta * factor
    check_choice(norm, "norm", NORMS)
    flat = delta.reshape(delta.shape[0], -1)
    e = eps.reshape(-1, 1) if isinstance(eps, Tensor) else eps
    return _project_l1(flat, e).reshape(delta.shape)


def project(x: Tensor, x_adv: Tensor, *, norm: str, eps: Radius, exact: bool = True) -> Tensor:
    """Closest point to ``x_adv`` in ``{x' : ||x' - x||_norm <= eps}``, then clipped to [0, 1].

    Args:
        x: clean inputs ``(N, ...)``, pixels in [0, 1].
        x_adv: candidate points, same shape.
        norm: ``"l1"``, ``"l2"`` or ``"linf"``.
        eps: radius in pixel units (a number or per-row ``(N, 1, ..., 1)``).
        exact: also make the *stored* numbers satisfy the budget, measured exactly (float64):
            ``x + delta`` rounds, so ``out - x`` can exceed ``eps`` by an ulp; offending
            coordinates or rows are moved towards ``x`` (:func:`_enforce_budget`). Attacks
            need this (their outputs are judged against the budget); a training loss does not.

    Returns:
        Detached, ``x``'s dtype and shape, pixels in [0, 1], within the ball (exactly when
        ``exact``, else up to the rounding of ``x + delta``).
    """
    x = x.detach()
    delta = x_adv.detach().to(x.dtype) - x
    out = (x + project_delta(delta, eps, norm)).clamp(0.0, 1.0)
    if not exact:
        return out
    return _enforce_budget(x, out, norm=norm, eps=eps if isinstance(eps, Tensor) else float(eps))


def _enforce_budget(x: Tensor, out: Tensor, *, norm: str, eps: Radius) -> Tensor:
    """Undo float rounding so the exact distance of the stored numbers is ``<= eps``.

    ``x + delta`` rounds, so ``out - x`` (computed exactly, in float64) can exceed ``eps`` by
    an ulp. Offending coordinates (linf) are set to ``x ± eps`` rounded in ``x``'s dtype and
    then stepped one ulp towards ``x`` until inside; offending rows (l1, l2) are shrunk towards
    ``x`` by a few ulps (relative), more on each retry. Moving towards ``x`` stays in [0, 1].
    A row still outside after the retries is replaced by ``x``.
    """
    tiny = torch.finfo(x.dtype).eps
    row_eps = eps.double().reshape(-1) if isinstance(eps, Tensor) else eps
    if norm == "linf":
        # Move an offending coordinate straight to x ± eps (rounded in x's dtype); the ulp
        # steps below then finish the job. Stepping from the original value alone can fall
        # short where ulps are small (near 0) and the overshoot is an ulp of x.
        e = eps.double() if isinstance(eps, Tensor) else eps
        diff = out.double() - x.double()
        clipped = (x.double() + torch.clamp(diff, min=-e, max=e)).to(x.dtype)
        out = torch.where(diff.abs() > e, clipped, out)
    for attempt in range(12):
        diff = out.double() - x.double()
        if norm == "linf":
            bad = diff.abs() > (eps.double() if isinstance(eps, Tensor) else eps)
            if not bool(bad.any()):
                return out
            out = torch.where(bad, torch.nextafter(out, x), out)
        else:
            dist = lp_norm(diff, norm)
            bad = dist > row_eps
            if not bool(bad.any()):
                return out
            margin = 1.0 - min(0.5, tiny * 4.0**attempt)
            shrink = (row_eps / dist.clamp_min(1e-300) * margin).clamp(max=1.0)
            shrink = torch.where(bad, shrink, torch.ones_like(shrink))
            out = (x.double() + diff * _per_row(shrink, x)).to(x.dtype).clamp(0.0, 1.0)
    # never reached in practice; a row that still violates the budget falls back to x itself
    bad_rows = lp_norm(out.double() - x.double(), norm) > row_eps
    return torch.where(_per_row(bad_rows, x), x, out)


# --------------------------------------------------------------------------- random starts
def random_delta(
    x: Tensor, eps: Radius, norm: str, generator: torch.Generator | None = None
) -> Tensor:
    """A perturbation drawn uniformly from the ``norm`` ball of radius ``eps``, per row of ``x``.

    linf: independent uniform coordinates on ``[-eps, eps]``. l2 and l1: a uniform direction
    on the unit sphere (normalised Gaussian; normalised exponentials with random signs for
    l1) times the radius ``eps · U^(1/d)``, ``d`` = pixels per row, which makes the point
    uniform in the ball's volume. Rounding can put a draw an ulp outside the ball.

    Args:
        x: ``(N, ...)``; gives shape, dtype and device.
        eps: radius (a number or per-row ``(N, 1, ..., 1)``), pixel units.
        norm: ``"l1"``, ``"l2"`` or ``"linf"``.
        generator: torch generator on ``x``'s device; ``None`` draws from torch's global RNG.

    Returns:
        ``delta`` like ``x`` (not clipped to the box).
    """
    kw: dict[str, Any] = {"dtype": x.dtype, "device": x.device, "generator": generator}
    if norm == "linf":
        if isinstance(eps, Tensor):  # uniform_ takes scalar bounds: scale a draw on [-1, 1]
            return (2.0 * torch.rand(x.shape, **kw) - 1.0) * eps
        return torch.empty_like(x).uniform_(-eps, eps, generator=generator)
    check_choice(norm, "norm", NORMS)
    n = x.shape[0]
    d = x[0].numel() if n else 1
    if norm == "l2":
        g = torch.randn(x.shape, **kw).reshape(n, -1)
        direction = g / g.norm(p=2, dim=1, keepdim=True).clamp_min(_TINY)
    else:  # uniform on the l1 sphere: normalised exponentials with random signs
        e = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        e = e.exponential_(generator=generator).reshape(n, -1)
        sign = torch.randint(0, 2, e.shape, **kw).mul_(2).sub_(1)
        direction = sign * e / e.sum(dim=1, keepdim=True)
    u = torch.rand((n,) + (1,) * (x.dim() - 1), **kw)
    return direction.reshape(x.shape) * (eps * u.pow(1.0 / d))


def random_in_ball(
    x: Tensor, *, norm: str, eps: Radius, generator: torch.Generator | None = None
) -> Tensor:
    """``x + delta``, ``delta`` uniform in the ``norm`` ball of radius ``eps``
    (:func:`random_delta`), clipped to [0, 1]. ``generator=None`` uses torch's global RNG
    (:func:`attacks.attack` seeds it)."""
    return (x + random_delta(x, eps, norm, generator)).clamp(0.0, 1.0)


# --------------------------------------------------------------------------- PGD
@contextlib.contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` of every parameter of ``module``; restore each flag on exit.

    An attack takes gradients w.r.t. the input only; frozen parameters keep it (and libraries
    that call ``backward()``) from building parameter graphs or accumulating ``.grad``.
    """
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def _ascent_direction(grad: Tensor, norm: str, min_grad_norm: float) -> Tensor:
    """The unit-``norm`` steepest-ascent direction for ``grad`` (see
    :func:`projected_gradient_ascent` for ``min_grad_norm``)."""
    if norm == "linf":
        return grad.sign()
    gn = _per_row(lp_norm(grad, "l2"), grad)
    if min_grad_norm > 0:
        return grad / gn.clamp_min(min_grad_norm)
    return torch.where(gn > 0, grad / gn.clamp_min(_TINY), torch.zeros_like(grad))


def projected_gradient_ascent(
    loss_grad: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    norm: str,
    eps: Radius,
    steps: int,
    step_size: Radius,
    start: Tensor | None = None,
    exact_budget: bool = True,
    min_grad_norm: float = 0.0,
) -> Tensor:
    """Projected gradient ascent within the ``norm`` ball of radius ``eps`` around ``x``
    (Madry et al., ICLR 2018): ``steps`` times, step ``step_size`` along the steepest-ascent
    direction of the loss, then :func:`project` onto the ball ∩ [0, 1]. Returns the last
    iterate.

    The loss lives entirely in ``loss_grad``: Madry training passes the cross-entropy gradient
    of the network, certbench's EOT-PGD the mean of per-draw cross-entropy gradients over
    noise draws. Validation of ``eps``/``step_size`` is the caller's.

    Args:
        loss_grad: ``loss_grad(x_adv) -> grad``, the input gradient of the loss to maximise at
            the current iterate ``x_adv`` (``(N, C, H, W)``, detached), same shape. Rows must
            not interact (each row's gradient depends on that row only).
        x: clean inputs ``(N, C, H, W)`` (any leading-batch shape), pixels in [0, 1].
        norm: ``"linf"`` (steps ``step_size · sign(g)``) or ``"l2"`` (steps
            ``step_size · g / ||g||_2`` per row).
        eps: radius in pixel units, ``>= 0``: a number or per-row ``(N, 1, ..., 1)``.
        steps: number of ascent steps, ``>= 0``.
        step_size: step length in ``norm`` (a number or per-row ``(N, 1, ..., 1)``).
        start: first iterate, in the ball ∩ [0, 1] (e.g. :func:`random_in_ball`); ``None``
            starts at ``x``.
        exact_budget: every iterate meets the budget exactly in its stored numbers
            (``project(..., exact=True)``); off, up to the rounding of ``x + delta``.
        min_grad_norm: l2 only. ``0``: steps have length ``step_size`` exactly, and a row
            whose gradient norm is 0 (or NaN) does not move. ``> 0``: steps along
            ``g / max(||g||_2, min_grad_norm)``, so a gradient shorter than ``min_grad_norm``
            — rounding noise in float32, e.g. the cross-entropy gradient at a confidently
            classified input — gives a proportionally shorter step instead of a full step in
            a direction that noise decides.

    Returns:
        ``x_adv`` like ``x``, detached, pixels in [0, 1], ``||x_adv - x||_norm <= eps``.
    """
    check_choice(norm, "norm", PGD_NORMS, where="pgd")
    check_int(steps, "steps", minimum=0, where="pgd")
    x = x.detach()
    x_adv = x.clone() if start is None else start.detach()
    for _ in range(int(steps)):
        direction = _ascent_direction(loss_grad(x_adv), norm, min_grad_norm)
        x_adv = project(x, x_adv + step_size * direction, norm=norm, eps=eps, exact=exact_budget)
    return x_adv


# --------------------------------------------------------------------------- radius conversion
def _norm_factor(from_norm: str, to_norm: str, dim: int) -> float:
    """Largest ``c`` with ``{||d||_to < c r}`` inside ``{||d||_from < r}`` in R^dim.

    From the tight inequalities ``||d||_inf <= ||d||_2 <= ||d||_1 <= sqrt(dim) ||d||_2`` and
    ``||d||_2 <= sqrt(dim) ||d||_inf``, ``||d||_1 <= dim ||d||_inf``:
    ``||d||_to < c r`` must imply ``||d||_from < r``, i.e. ``c = 1 / max ||d||_from /
    ||d||_to``.
    """
    if from_norm == to_norm:
        return 1.0
    # max ||d||_from / ||d||_to over d != 0:
    worst = {
        ("l2", "l1"): 1.0,  # ||d||_2 <= ||d||_1
        ("linf", "l1"): 1.0,  # ||d||_inf <= ||d||_1
        ("linf", "l2"): 1.0,  # ||d||_inf <= ||d||_2
        ("l2", "linf"): np.sqrt(dim),  # ||d||_2 <= sqrt(d) ||d||_inf
        ("l1", "l2"): np.sqrt(dim),  # ||d||_1 <= sqrt(d) ||d||_2
        ("l1", "linf"): float(dim),  # ||d||_1 <= d ||d||_inf
    }[(from_norm, to_norm)]
    return 1.0 / worst


def convert_radius(radius: Any, *, from_norm: str, to_norm: str, dim: int) -> Any:
    """Conservatively convert a certified radius between norms on ``R^dim``.

    A radius ``r`` certified in ``from_norm`` certifies ``c r`` in ``to_norm`` where
    ``c`` is the largest constant with the ``to_norm`` ball of radius ``c r`` contained in
    the certified ``from_norm`` ball (the factors are tight):

    ============  ======  ===========  ===========
    from \\\\ to    l1      l2           linf
    ============  ======  ===========  ===========
    l1            1       1/sqrt(d)    1/d
    l2            1       1            1/sqrt(d)
    linf          1       1            1
    ============  ======  ===========  ===========

    (e.g. ``||x||_inf <= ||x||_2``, so an l2 ball of radius r lies inside the certified linf
    ball of radius r; ``||x||_2 <= sqrt(d) ||x||_inf``, so an l2 radius r certifies linf
    radius r/sqrt(d)). In finite dimension every pair has a containment, so no pair maps to
    0. Same norm is the identity. Non-positive radii (nothing certified / abstain) keep
    their sign; ``+inf`` stays ``+inf``.

    Args:
        radius: certified radii in ``from_norm``, any shape (numpy array, scalar or tensor).
        from_norm, to_norm: ``"l1"``, ``"l2"`` or ``"linf"``.
        dim: input dimension ``d = C*H*W``, integer ``>= 1``.

    Returns:
        ``float64`` radii in ``to_norm`` (a numpy array, or a tensor on the input's device).
    """
    # bench.stats (array/tensor round trip) pulls in scipy; defenses.base imports this module
    # for NORMS, so the import waits until a radius is converted.
    from bench.stats import _restore, _template, _to_numpy

    check_choice(from_norm, "from_norm", NORMS)
    check_choice(to_norm, "to_norm", NORMS)
    dim = check_int(dim, "dim (input dimension)", minimum=1)
    like = _template(radius)
    r = _to_numpy(radius, "radius")
    return _restore(r * _norm_factor(from_norm, to_norm, dim), like)
