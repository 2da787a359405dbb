"""The Wong–Kolter dual bound (ICML 2018, Theorem 1 and Algorithm 1).

For a network ``f`` of affine layers ``W_i·+b_i`` and ReLUs whose pre-activations are known
to lie in ``[l, u]``, each ReLU is relaxed to its convex hull. The dual of the resulting
linear program, at the feasible point that fixes every unstable ReLU's slope to
``d = u / (u - l)``, is the *dual network*. For a specification ``c`` the bound runs the dual
network backwards from ``ν_k = -c``::

    ν̂_i = W_iᵀ ν_{i+1},   ν_i = D_i ν̂_i   (D = 0 inactive, 1 active, u/(u-l) unstable)
    J(c) = -Σ_i ν_{i+1}ᵀ b_i  +  min_{x' ∈ S} (-ν̂_1)ᵀ x'  +  Σ_i Σ_{j unstable} l_ij [ν_ij]_+

and ``J(c) <= min_{x' ∈ S} cᵀ f(x')`` (weak duality): the guarantee. ``S`` is the threat set
of :mod:`.input_set` (an ℓ∞ or ℓ2 ball, optionally ∩ ``[0, 1]^d``). The bounds ``l, u`` come
from the same dual applied to the network truncated at each ReLU with ``c = ±I``, layer by
layer (:func:`bounds_from_definition` literally; :func:`.forward_form.forward_bounds` with the
same result in one forward pass, and the only form with the training-only projection).

With the margin specification ``c = e_y - e_j`` the input is certified for label ``y`` iff
``J(e_y - e_j) > 0`` for every ``j != y``; ``CE(-J, y)`` bounds the worst-case cross-entropy
(the robust training loss).

Conventions: ``x`` is ``(N, *in)`` (``(N, C, H, W)`` or ``(N, D)``) with pixels in
``[0, 1]``, no normalisation; ``eps`` is a float or an ``(N,)`` tensor in pixel units; results
follow the model's device and dtype. Bounds are computed in the model's floating-point
precision (float32 for the released model): the guarantee is exact in real arithmetic and
holds up to rounding. Note that with the same ``l, u`` both IBP and this bound are below the
LP relaxation, but neither is always below the other: the fixed slope ``u/(u-l)`` can make
this bound looser than IBP (a one-ReLU counterexample is pinned in the tests).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.errors import ConfigError, DataError
from bench.validation import check_choice, check_int

from .forward_form import forward_bounds
from .input_set import EpsLike, InputSet, eps_vector, input_terms, prepare
from .network import CHUNK_BYTES, Op, apply_batched, example_chunks, num_classes
from .relaxation import ReluRelaxation, relax_relu

__all__ = [
    "METHODS",
    "bounds_from_definition",
    "check_labels",
    "dual_lower_bound",
    "dual_objective",
    "margin_chunks",
    "margin_lower_bounds",
    "margin_spec",
    "pre_activation_bounds",
    "relu_bounds",
    "robust_loss",
]

#: How :func:`pre_activation_bounds` computes ``l, u``: in one forward pass (the default),
#: or from the definition (one backward pass per unit; a cross-check).
METHODS = ("forward", "backward")


def dual_objective(
    ops: Sequence[Op],
    infos: Sequence[ReluRelaxation],
    c: Tensor,
    s: InputSet,
    both: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``J(c)`` (and ``J(-c)`` if ``both``): the Wong–Kolter dual objective.

    ``J(c)[n, q] <= c[n, q] · f(x')`` for every ``x'`` in ``S``. One backward pass of the dual
    network serves both signs (``ν`` is linear in ``c``; only the ``[ν]_+`` and norm terms
    differ).

    Args:
        ops: the network (possibly truncated); ``infos`` holds one entry per ReLU in ``ops``.
        c: ``(N, Q, *out_shape)`` specifications.
    Returns:
        ``(N, Q)`` bounds ``J(c)`` and ``J(-c)`` (``None`` unless ``both``).
    """
    n, q = c.shape[:2]
    nu = -c
    lin = c.new_zeros(n, q)  # the part of J that is linear in c
    pos = c.new_zeros(n, q)  # Σ l [ν]_+
    neg = c.new_zeros(n, q) if both else None  # Σ l [-ν]_+
    k = len(infos)
    for op in reversed(ops):
        if op.relu:
            k -= 1
            info = infos[k]
            nu = nu * info.d.unsqueeze(1)
            lu = info.l_unstable.unsqueeze(1)
            pos = pos + (nu.clamp(min=0) * lu).reshape(n, q, -1).sum(2)
            if neg is not None:
                neg = neg + ((-nu).clamp(min=0) * lu).reshape(n, q, -1).sum(2)
            continue
        if op.bias is not None:
            lin = lin - (nu * op.bias).reshape(n, q, -1).sum(2)
        nu = apply_batched(op.apply_t, nu, 2)
    first, second = input_terms(-nu, s, both)
    if not both:
        return lin + pos + first, None
    assert neg is not None and second is not None
    return lin + pos + first, -lin + neg + second


def _definition_bounds_at(
    ops: Sequence[Op], i: int, infos: Sequence[ReluRelaxation], s: InputSet
) -> ReluRelaxation:
    """Bounds on the input of the ReLU ``ops[i]`` with ``c = ±I`` (one backward pass per unit)."""
    shape = ops[i].in_shape
    units = math.prod(shape)
    n = s.x.shape[0]
    widest = max([math.prod(op.out_shape) for op in ops[:i]] + [math.prod(s.x.shape[1:])])
    step = max(1, CHUNK_BYTES // (16 * n * widest))
    lowers, uppers = [], []
    for start in range(0, units, step):
        stop = min(units, start + step)
        eye = torch.eye(units, dtype=s.x.dtype, device=s.x.device)[start:stop]
        c = eye.reshape(1, stop - start, *shape).expand(n, stop - start, *shape)
        low, neg_up = dual_objective(ops[:i], infos, c, s, both=True)
        assert neg_up is not None
        lowers.append(low)
        uppers.append(-neg_up)
    return relax_relu(
        torch.cat(lowers, 1).reshape(n, *shape), torch.cat(uppers, 1).reshape(n, *shape)
    )


def bounds_from_definition(ops: Sequence[Op], s: InputSet) -> list[ReluRelaxation]:
    """Pre-activation bounds from the definition: ``c = ±I`` on each truncated network."""
    infos: list[ReluRelaxation] = []
    for i, op in enumerate(ops):
        if op.relu:
            infos.append(_definition_bounds_at(ops, i, infos, s))
    return infos


def relu_bounds(
    ops: Sequence[Op],
    s: InputSet,
    projection_dim: int | None,
    method: str,
    cache: dict[str, Tensor] | None = None,
) -> list[ReluRelaxation]:
    """The relaxation of every ReLU of ``ops`` over ``S``, by ``method`` (see :data:`METHODS`)."""
    if projection_dim is not None:
        projection_dim = check_int(projection_dim, "projection_dim", minimum=1)
    check_choice(method, "method", METHODS)
    if method == "forward":
        return forward_bounds(ops, s, projection_dim, cache)
    if projection_dim is not None:
        raise ConfigError("method='backward' is exact; use projection_dim=None")
    return bounds_from_definition(ops, s)


def margin_spec(y: Tensor, k: int, like: Tensor) -> Tensor:
    """``(N, K, K)`` margin specifications: row ``j`` of example ``n`` is ``e_{y_n} - e_j``."""
    eye = torch.eye(k, dtype=like.dtype, device=like.device)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)


def check_labels(y: Tensor, n: int, k: int, device: torch.device) -> Tensor:
    """``y`` as ``(n,)`` int64 labels in ``[0, k)`` on ``device``; raises DataError otherwise."""
    y = torch.as_tensor(y, device=device).long()
    if y.shape != (n,):
        raise DataError(f"labels y must have shape ({n},); got {tuple(y.shape)}")
    if n and (int(y.min()) < 0 or int(y.max()) >= k):
        raise DataError(f"labels y must lie in [0, {k - 1}]")
    return y


def margin_chunks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: EpsLike,
    norm: str,
    clip_box: bool,
    batch_size: int | None,
) -> Iterator[tuple[list[Op], InputSet, Tensor]]:
    """Per chunk of ``batch_size`` examples: the operators, ``S`` and the margin specs.

    The specs are :func:`margin_spec` of the chunk's labels, ``(n, K, K)``; ``eps`` is checked
    once for all ``N`` examples.
    """
    e = eps_vector(eps, x.shape[0], x.float() if not x.is_floating_point() else x)
    y = torch.as_tensor(y)
    for idx in example_chunks(model, x, batch_size):
        ops, s, xc = prepare(model, x[idx], e[idx], norm, clip_box)
        k = num_classes(ops)
        yc = check_labels(y[idx], xc.shape[0], k, xc.device)
        yield ops, s, margin_spec(yc, k, xc)


# ---------------------------------------------------------------------------- public bounds
def pre_activation_bounds(
    model: nn.Module,
    x: Tensor,
    *,
    eps: EpsLike,
    norm: str = "linf",
    clip_box: bool = False,
    projection_dim: int | None = None,
    method: str = "forward",
) -> list[tuple[Tensor, Tensor]]:
    """Wong–Kolter bounds ``(l, u)`` on the input of every ReLU, each ``(N, *shape)``.

    Sound (``l <= ẑ <= u`` for every ``x'`` in the ``norm`` ball of radius ``eps`` around
    ``x``, intersected with ``[0, 1]`` if ``clip_box``) when ``projection_dim`` is ``None``.
    """
    ops, s, _ = prepare(model, x, eps, norm, clip_box)
    return [(i.lower, i.upper) for i in relu_bounds(ops, s, projection_dim, method)]


def dual_lower_bound(
    model: nn.Module,
    x: Tensor,
    c: Tensor,
    *,
    eps: EpsLike,
    norm: str = "linf",
    clip_box: bool = False,
    projection_dim: int | None = None,
    method: str = "forward",
) -> Tensor:
    """Wong–Kolter lower bound ``J(c)`` on ``min_{x'} cᵀ model(x')``.

    Args:
        model: ``nn.Sequential`` of ``nn.Linear``, ``nn.Conv2d``, ``nn.ReLU``, ``nn.Flatten``.
        x: ``(N, *in)`` inputs, pixels in ``[0, 1]``.
        c: ``(N, Q, K)`` specifications (or ``(Q, K)``, shared by all examples).
        eps: radius (float or ``(N,)``) of the ``norm`` ball (``"linf"`` or ``"l2"``).
        clip_box: intersect the ball with ``[0, 1]^d``.
        projection_dim: ``None`` for the exact (sound) bound; ``k`` for the random-projection
            estimate of the intermediate bounds (training only, not sound).
    Returns:
        ``(N, Q)`` tensor; ``J(c)[n, q] <= c[n, q] · model(x')`` for every ``x'`` in the set.
    """
    ops, s, x = prepare(model, x, eps, norm, clip_box)
    c = c.to(device=x.device, dtype=x.dtype)
    if c.dim() == 2:
        c = c.unsqueeze(0).expand(x.shape[0], *c.shape)
    infos = relu_bounds(ops, s, projection_dim, method)
    return dual_objective(ops, infos, c, s)[0]


def margin_lower_bounds(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: EpsLike,
    norm: str = "linf",
    clip_box: bool = False,
    projection_dim: int | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """Lower bounds on ``logit_y - logit_j`` over the threat model, ``(N, K)``, column ``y`` = 0.

    ``J(e_y - e_j)`` of the Wong–Kolter dual: for every ``x'`` with ``‖x' - x‖ <= eps``
    (``norm`` ∈ {``"linf"``, ``"l2"``}; also ``x' ∈ [0, 1]^d`` if ``clip_box``),
    ``model(x')[y] - model(x')[j] >= bound[:, j]``. Sound when ``projection_dim`` is None
    (the default); the input is certified for label ``y`` iff every ``j != y`` column is > 0.
    Differentiable (used by the robust training loss). ``batch_size`` chunks the examples.
    """
    out = []
    cache: dict[str, Tensor] = {}
    for ops, s, c in margin_chunks(model, x, y, eps, norm, clip_box, batch_size):
        infos = relu_bounds(ops, s, projection_dim, "forward", cache)
        out.append(dual_objective(ops, infos, c, s)[0])
    return torch.cat(out) if out else x.new_zeros(0, 0)


def robust_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: EpsLike,
    norm: str = "linf",
    clip_box: bool = False,
    projection_dim: int | None = None,
) -> Tensor:
    """Robust cross-entropy ``CE(-J(e_y - e_j)_j, y)`` (mean over the batch), a scalar.

    An upper bound on the worst-case cross-entropy over the threat model when
    ``projection_dim`` is ``None``; with ``k`` it is the NeurIPS'18 random-projection
    estimate (training only).
    """
    bound = margin_lower_bounds(
        model, x, y, eps=eps, norm=norm, clip_box=clip_box, projection_dim=projection_dim
    )
    return F.cross_entropy(-bound, torch.as_tensor(y, device=bound.device).long())
