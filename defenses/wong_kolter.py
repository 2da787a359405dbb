"""Wong–Kolter convex outer adversarial polytope: dual bounds, robust training, certification.

Wong & Kolter, "Provable defenses against adversarial examples via the convex outer
adversarial polytope" (ICML 2018), and its scaled version (Wong, Schmidt, Metzen & Kolter,
NeurIPS 2018). See REFERENCE.md §3.

The network is a sequence of affine operators (``nn.Linear``, ``nn.Conv2d``, ``nn.Flatten``)
and ``nn.ReLU``. Each ReLU whose pre-activation ``ẑ`` is known to lie in ``[l, u]`` is
relaxed to its convex hull; the dual of the resulting linear program, evaluated at the
feasible point that fixes every unstable ReLU's slope to ``d = u / (u - l)``, is the *dual
network*. For a specification ``c`` (one row per output combination) the bound is computed
by running the dual network backwards from ``ν_k = -c``::

    ν̂_i = W_iᵀ ν_{i+1},   ν_i = D_i ν̂_i   (D = 0 inactive, 1 active, u/(u-l) unstable)
    J(c) = -Σ_i ν_{i+1}ᵀ b_i  +  min_{x' ∈ S} (-ν̂_1)ᵀ x'  +  Σ_i Σ_{j unstable} l_ij [ν_ij]_+

``J(c) <= min_{x' ∈ S} cᵀ f(x')`` for every ``c`` (weak duality; soundness). For the input
set ``S``:

* ℓ∞ ball of radius ε around ``x``: ``min_{x'∈S} aᵀx' = aᵀx - ε‖a‖₁`` (with ``a = -ν̂_1``);
* ℓ∞ ball intersected with the pixel box ``[0, 1]`` (``clip_box=True``): the box
  ``[max(x-ε, 0), min(x+ε, 1)]`` is the exact intersection; per-coordinate centre ``m`` and
  half-width ``r`` give ``aᵀm - Σ_j r_j |a_j|``;
* ℓ2 ball: ``aᵀx - ε‖a‖₂``;
* ℓ2 ball intersected with ``[0, 1]`` (``clip_box=True``): the minimum over the intersection
  is at least the larger of the ball's and the box's minima (the box being
  ``[max(x-ε, 0), min(x+ε, 1)]``, which contains the intersection); that maximum is used. It is
  sound and never looser than either set alone, but not the exact minimum over the
  intersection.

Pre-activation bounds ``l, u`` of every ReLU come from the same dual, applied to the network
truncated at that ReLU with ``c = ±I``. They are computed in the *forward* form of the
NeurIPS'18 paper: because ``J`` is linear in ``c`` apart from the norm and ``[·]_+`` terms, it
suffices to push through the (linearised) network one column per input coordinate and one
column per unstable ReLU of the earlier layers; the bounds of all units of a layer then
follow at once. This costs (inputs + unstable units) passes through each layer and never
forms a dense matrix of a convolution (convolutions run as ``conv2d``/``conv_transpose2d``;
the one-hot columns of a new unstable layer go through the next ``Linear``/``Conv2d`` as a
gather from its weight). The identity pushed through the first affine block is computed once
per call and shared by all examples.
``method="backward"`` computes the same bounds literally from the definition (one backward
pass per hidden unit, ``c = ±I``) and exists to cross-check the forward form.

Random projections (``projection_dim=k``, training only). The ℓ1 terms of the intermediate
bounds are *estimated* with ``k`` Cauchy projections (median estimator), the ℓ2 term with
``k`` Gaussian projections: this is an estimate, **not a sound bound**, and is never used by
:meth:`WongKolter.certify`, :func:`margin_lower_bounds` (default) or
:func:`certified_radius`. The final objective given the (estimated) ``l, u`` is computed
exactly by the backward pass.

Conventions: inputs ``x`` are ``(N, C, H, W)`` (or ``(N, D)``) float tensors with pixels in
``[0, 1]``, no normalisation; ``eps`` is a float or an ``(N,)`` tensor (per-example radius)
in pixel units; results follow the model's device and dtype. Bounds are computed in the
model's floating-point precision (float32 for the released model): the guarantee is exact in
real arithmetic and holds up to rounding.

Note on the ordering "IBP ≤ Wong–Kolter": with the same pre-activation bounds, IBP ≤ LP ≤
exact and Wong–Kolter ≤ LP ≤ exact, but Wong–Kolter's fixed lower slope ``u/(u-l)`` can make it
*looser* than IBP (one unstable unit feeding a positive output weight is a two-line
counterexample, pinned down in the tests). On Wong–Kolter-trained networks IBP is usually far
looser.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.errors import ConfigError, DataError
from bench.registry import register_defense
from defenses.base import Certificate, Defense, TrainProgress

__all__ = [
    "WongKolter",
    "certified_radius",
    "dual_lower_bound",
    "interval_margin_lower_bounds",
    "margin_lower_bounds",
    "pre_activation_bounds",
    "robust_loss",
]

BALL_NORMS = ("linf", "l2")
_SUPPORTED_LAYERS = "nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten"
# Memory budget (bytes) for the forward-form columns of one chunk of examples.
_CHUNK_BYTES = 32 * 2**20

EpsLike = float | Tensor


# ---------------------------------------------------------------------------- network parsing
class _Linear:
    """``nn.Linear`` as a linear operator on the last dimension (bias kept separately)."""

    relu = False

    def __init__(self, layer: nn.Linear, in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
        self.weight = layer.weight
        self.in_shape, self.out_shape = in_shape, out_shape
        self.bias = None if layer.bias is None else layer.bias.expand(out_shape)

    def apply(self, v: Tensor) -> Tensor:
        return F.linear(v, self.weight)

    def apply_t(self, v: Tensor) -> Tensor:
        return v @ self.weight

    def apply_abs(self, v: Tensor) -> Tensor:
        return F.linear(v, self.weight.abs())


class _Conv2d:
    """``nn.Conv2d`` as a linear operator; its transpose is ``conv_transpose2d``."""

    relu = False

    def __init__(self, layer: nn.Conv2d, in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
        self.weight = layer.weight
        self.in_shape, self.out_shape = in_shape, out_shape
        self.kw: dict[str, Any] = dict(
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
        )
        # conv_transpose2d needs output_padding to reproduce the input size exactly.
        pads = []
        for dim in range(2):
            full = (
                (out_shape[1 + dim] - 1) * layer.stride[dim]
                - 2 * layer.padding[dim]
                + layer.dilation[dim] * (layer.kernel_size[dim] - 1)
                + 1
            )
            pads.append(in_shape[1 + dim] - full)
        self.output_padding = tuple(pads)
        self.bias = None if layer.bias is None else layer.bias.view(-1, 1, 1).expand(out_shape)

    def apply(self, v: Tensor) -> Tensor:
        return F.conv2d(v, self.weight, None, **self.kw)

    def apply_t(self, v: Tensor) -> Tensor:
        return F.conv_transpose2d(
            v,
            self.weight,
            None,
            self.kw["stride"],
            self.kw["padding"],
            self.output_padding,
            self.kw["groups"],
            self.kw["dilation"],
        )

    def apply_abs(self, v: Tensor) -> Tensor:
        return F.conv2d(v, self.weight.abs(), None, **self.kw)


class _Flatten:
    relu = False
    bias = None

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
        self.in_shape, self.out_shape = in_shape, out_shape

    def apply(self, v: Tensor) -> Tensor:
        return v.reshape(v.shape[0], *self.out_shape)

    def apply_t(self, v: Tensor) -> Tensor:
        return v.reshape(v.shape[0], *self.in_shape)

    apply_abs = apply


class _ReLU:
    relu = True
    bias = None

    def __init__(self, shape: tuple[int, ...]):
        self.in_shape = self.out_shape = shape


_Op = _Linear | _Conv2d | _Flatten | _ReLU


def _leaf_modules(model: nn.Module) -> Iterator[nn.Module]:
    if isinstance(model, nn.Sequential):
        for m in model:
            yield from _leaf_modules(m)
    else:
        yield model


def _parse(model: nn.Module, in_shape: Sequence[int]) -> list[_Op]:
    """Translate ``model`` into operators, with per-example shapes from a dry run.

    Raises:
        ConfigError: ``model`` is not an ``nn.Sequential`` of the supported layers, naming the
            offending layer.
    """
    if not isinstance(model, nn.Sequential):
        raise ConfigError(
            f"Wong–Kolter bounds need an nn.Sequential of {_SUPPORTED_LAYERS}; "
            f"got {type(model).__name__}"
        )
    param = next(model.parameters(), None)
    like = dict(device=param.device, dtype=param.dtype) if param is not None else {}
    ops: list[_Op] = []
    shape = tuple(int(s) for s in in_shape)
    with torch.no_grad():
        v = torch.zeros(1, *shape, **like)
        for i, layer in enumerate(_leaf_modules(model)):
            where = f"layer {i} ({type(layer).__name__})"
            if isinstance(layer, nn.Conv2d):
                if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                    raise ConfigError(
                        f"Wong–Kolter: {where} uses padding={layer.padding!r}, "
                        f"padding_mode={layer.padding_mode!r}; only numeric zero padding is "
                        "supported"
                    )
            elif isinstance(layer, nn.Flatten):
                if layer.start_dim != 1 or layer.end_dim != -1:
                    raise ConfigError(
                        f"Wong–Kolter: {where} must flatten dims 1..-1 (start_dim=1, end_dim=-1)"
                    )
            elif not isinstance(layer, nn.Linear | nn.ReLU):
                raise ConfigError(
                    f"Wong–Kolter bounds do not support {where}; supported layers: "
                    f"{_SUPPORTED_LAYERS}"
                )
            try:
                out = layer(v)
            except RuntimeError as exc:
                raise ConfigError(
                    f"Wong–Kolter: {where} does not accept inputs of shape {shape}: {exc}"
                ) from exc
            out_shape = tuple(out.shape[1:])
            if isinstance(layer, nn.Linear):
                ops.append(_Linear(layer, shape, out_shape))
            elif isinstance(layer, nn.Conv2d):
                ops.append(_Conv2d(layer, shape, out_shape))
            elif isinstance(layer, nn.Flatten):
                ops.append(_Flatten(shape, out_shape))
            else:
                ops.append(_ReLU(shape))
            v, shape = out, out_shape
    if len(shape) != 1:
        raise ConfigError(
            f"Wong–Kolter: the network must end in flat logits (N, K); its output per example "
            f"has shape {shape} (add nn.Flatten)"
        )
    return ops


def check_supported(model: nn.Module, input_shape: Sequence[int]) -> None:
    """Raise :class:`ConfigError` unless ``model`` is a network these bounds support."""
    _parse(model, input_shape)


# ---------------------------------------------------------------------------- the input set
@dataclass
class _InputSet:
    """``S = ball ∩ box`` around ``x`` (either may be absent, not both).

    ``ball_eps`` ``(N,)``: ℓ2 radius. ``box_delta``/``box_radius`` ``(N, *in)``: the box is
    ``x + box_delta ± box_radius`` (``box_delta`` is ``None`` when the box is centred on x).
    """

    x: Tensor
    ball_eps: Tensor | None
    box_delta: Tensor | None
    box_radius: Tensor | None


def _eps_vector(eps: EpsLike, n: int, like: Tensor) -> Tensor:
    e = torch.as_tensor(eps, dtype=like.dtype, device=like.device)
    if e.dim() == 0:
        e = e.expand(n)
    if e.shape != (n,):
        raise ConfigError(f"eps must be a float or a tensor of shape ({n},); got {tuple(e.shape)}")
    if not bool(torch.isfinite(e).all()) or bool((e < 0).any()):
        raise ConfigError("eps must be finite and >= 0")
    return e


def _input_set(x: Tensor, eps: EpsLike, norm: str, clip_box: bool) -> _InputSet:
    if norm not in BALL_NORMS:
        raise ConfigError(f"norm={norm!r} is not supported; allowed: {', '.join(BALL_NORMS)}")
    n = x.shape[0]
    e = _eps_vector(eps, n, x)
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
        return _InputSet(x=x, ball_eps=None, box_delta=delta, box_radius=radius)
    if clip_box:
        return _InputSet(x=x, ball_eps=e, box_delta=delta, box_radius=radius)
    return _InputSet(x=x, ball_eps=e, box_delta=None, box_radius=None)


def _input_terms(a: Tensor, s: _InputSet, both: bool = False) -> tuple[Tensor, Tensor | None]:
    """``min_{x' ∈ S} aᵀx'`` per row, and (``both``) the same for ``-a``; ``a``: (N, Q, *in).

    Exact for a ball or a box; for ball ∩ box it is the larger of the two minima (sound).
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


# ---------------------------------------------------------------------------- dual network
@dataclass
class _ReluInfo:
    """Pre-activation bounds of one ReLU layer and its dual slope, all ``(N, *shape)``."""

    lower: Tensor
    upper: Tensor
    d: Tensor
    l_unstable: Tensor  # l on unstable units, 0 elsewhere
    unstable: Tensor


def _relu_info(lower: Tensor, upper: Tensor) -> _ReluInfo:
    unstable = (lower < 0) & (upper > 0)
    denom = torch.where(unstable, upper - lower, torch.ones_like(upper))
    d = torch.where(unstable, upper / denom, (lower >= 0).to(lower.dtype))
    l_unstable = torch.where(unstable, lower, torch.zeros_like(lower))
    return _ReluInfo(lower, upper, d, l_unstable, unstable)


def _apply_batched(fn, v: Tensor, lead: int) -> Tensor:
    """Apply a per-example operator to ``v`` with ``lead`` leading batch dims."""
    head = v.shape[:lead]
    out = fn(v.reshape(-1, *v.shape[lead:]))
    return out.reshape(*head, *out.shape[1:])


def _dual_objective(
    ops: Sequence[_Op],
    infos: Sequence[_ReluInfo],
    c: Tensor,
    s: _InputSet,
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
        nu = _apply_batched(op.apply_t, nu, 2)
    first, second = _input_terms(-nu, s, both)
    if not both:
        return lin + pos + first, None
    assert neg is not None and second is not None
    return lin + pos + first, -lin + neg + second


def _onehot_image(op: _Op, unit: Tensor, val: Tensor) -> Tensor | None:
    """``op`` applied to the columns ``val[m] · e_{unit[m]}`` without forming them, or None.

    ``unit`` indexes the flattened ``op.in_shape``. Handles ``nn.Linear`` on flat inputs and
    ``nn.Conv2d`` with ``groups=1`` (a gather from the kernel); None means "not handled".
    """
    if isinstance(op, _Linear) and len(op.in_shape) == 1:
        return op.weight[:, unit].t() * val[:, None]
    if not isinstance(op, _Conv2d) or op.kw["groups"] != 1:
        return None
    _, height, width = op.in_shape
    m = unit.numel()
    out_ch, h_out, w_out = op.out_shape
    kh_size, kw_size = op.weight.shape[2:]
    row, col = (unit // width) % height, unit % width

    def taps(pos: Tensor, n_out: int, dim: int, size: int) -> tuple[Tensor, Tensor]:
        stride, pad, dil = op.kw["stride"][dim], op.kw["padding"][dim], op.kw["dilation"][dim]
        k = pos[:, None] + pad - torch.arange(n_out, device=pos.device) * stride
        valid = (k >= 0) & (k % dil == 0) & (k < dil * size)
        return (k // dil).clamp(0, size - 1), valid

    kh, vh = taps(row, h_out, 0, kh_size)
    kw, vw = taps(col, w_out, 1, kw_size)
    kernel = op.weight[:, unit // (height * width)].permute(1, 0, 2, 3)  # (M, O, KH, KW)
    rows = torch.gather(kernel, 2, kh[:, None, :, None].expand(m, out_ch, h_out, kw_size))
    out = torch.gather(rows, 3, kw[:, None, None, :].expand(m, out_ch, h_out, w_out))
    mask = (vh[:, :, None] & vw[:, None, :]).to(val.dtype) * val[:, None, None]
    return out * mask.unsqueeze(1)


class _ExactReluGroup:
    """Columns ``d_j e_j`` for every unstable unit ``j`` of one ReLU layer, stacked over the
    examples (``owner`` maps each column to its example), pushed forward exactly.

    The one-hot columns are never formed when the next operator can map them by a gather.
    """

    def __init__(self, info: _ReluInfo):
        self.n = info.d.shape[0]
        mask = info.unstable.reshape(self.n, -1)
        self.owner, self.unit = mask.nonzero(as_tuple=True)
        self.val = info.d.reshape(self.n, -1)[self.owner, self.unit]
        self.lval = info.lower.reshape(self.n, -1)[self.owner, self.unit]
        self.shape = tuple(info.d.shape[1:])
        self.cols: Tensor | None = None  # None while the columns are still one-hot

    @property
    def width(self) -> int:
        return self.owner.numel()

    def _materialise(self) -> Tensor:
        if self.cols is None:
            m = self.unit.numel()
            cols = self.val.new_zeros(m, math.prod(self.shape))
            cols[torch.arange(m, device=self.unit.device), self.unit] = self.val
            self.cols = cols.reshape(m, *self.shape)
        return self.cols

    def affine(self, op: _Op) -> None:
        if self.cols is None:
            if isinstance(op, _Flatten):  # flat unit indices are unchanged
                self.shape = op.out_shape
                return
            image = _onehot_image(op, self.unit, self.val)
            if image is not None:
                self.cols, self.shape = image, op.out_shape
                return
        self.cols = op.apply(self._materialise())
        self.shape = op.out_shape

    def relu(self, d: Tensor) -> None:
        if self.cols is None:
            self.val = self.val * d.reshape(self.n, -1)[self.owner, self.unit]
        else:
            self.cols = self.cols * d[self.owner]

    def bounds(self) -> tuple[Tensor, Tensor]:
        v = self._materialise().reshape(self.width, -1)
        lv = self.lval[:, None]
        zero = v.new_zeros(self.n, v.shape[1])
        lower = zero.index_add(0, self.owner, lv * (-v).clamp(min=0))
        upper = zero.index_add(0, self.owner, -lv * v.clamp(min=0))
        return lower, upper


class _ProjectedReluGroup:
    """Random-projection estimate of an unstable layer's terms (training only, NOT sound).

    ``Σ_j l_j [∓v_j]_+ = ½(-Σ_j |l_j||v_j| ∓ Σ_j l_j v_j)``: the linear part is pushed forward
    exactly (one column), the ℓ1 part is estimated as the median of ``|·|`` over ``k`` Cauchy
    projections (the median of ``|Cauchy(0, s)|`` is ``s``).
    """

    def __init__(self, info: _ReluInfo, k: int):
        n = info.d.shape[0]
        r = torch.empty(n, k, *info.d.shape[1:], device=info.d.device, dtype=info.d.dtype)
        r.cauchy_()
        weight = info.d * info.l_unstable  # l_j d_j on unstable units, 0 elsewhere
        self.cols = r * weight.abs().unsqueeze(1)
        self.one = weight

    def affine(self, op: _Op) -> None:
        self.cols = _apply_batched(op.apply, self.cols, 2)
        self.one = op.apply(self.one)

    def relu(self, d: Tensor) -> None:
        self.cols = self.cols * d.unsqueeze(1)
        self.one = self.one * d

    def bounds(self) -> tuple[Tensor, Tensor]:
        n = self.one.shape[0]
        est = self.cols.abs().reshape(n, self.cols.shape[1], -1).median(dim=1).values
        w = self.one.reshape(n, -1)
        return 0.5 * (-est - w), 0.5 * (est - w)


class _InputColumns:
    """Columns that carry ``A``, the linear map from the input to the current layer.

    Exact: one column per input coordinate (the identity, shared by all examples until the
    first ReLU). Projected (training only): ``k`` Cauchy columns scaled by the box
    half-widths (ℓ1 term) and/or ``k`` Gaussian columns (ℓ2 term).
    """

    def __init__(self, s: _InputSet, k: int | None):
        x = s.x
        n, d_in = x.shape[0], x[0].numel()
        self.s = s
        self.exact = k is None or d_in <= k
        self.shared = self.exact
        self.e = self.cauchy = self.gauss = None
        self.shared_abs: Tensor | None = None  # |e| flattened to (Q, units), while shared
        if self.exact:
            self.e = torch.eye(d_in, dtype=x.dtype, device=x.device).reshape(d_in, *x.shape[1:])
        else:
            assert k is not None
            if s.box_radius is not None:
                r = torch.empty(n, k, *x.shape[1:], dtype=x.dtype, device=x.device).cauchy_()
                self.cauchy = r * s.box_radius.unsqueeze(1)
            if s.ball_eps is not None:
                self.gauss = torch.randn(n, k, *x.shape[1:], dtype=x.dtype, device=x.device)
        self.delta = s.box_delta

    def affine(self, op: _Op) -> None:
        self.shared_abs = None
        if self.e is not None:
            self.e = op.apply(self.e) if self.shared else _apply_batched(op.apply, self.e, 2)
        if self.cauchy is not None:
            self.cauchy = _apply_batched(op.apply, self.cauchy, 2)
        if self.gauss is not None:
            self.gauss = _apply_batched(op.apply, self.gauss, 2)
        if self.delta is not None:
            self.delta = op.apply(self.delta)

    def relu(self, d: Tensor) -> None:
        self.shared_abs = None
        if self.e is not None:
            self.e = (self.e.unsqueeze(0) if self.shared else self.e) * d.unsqueeze(1)
            self.shared = False
        if self.cauchy is not None:
            self.cauchy = self.cauchy * d.unsqueeze(1)
        if self.gauss is not None:
            self.gauss = self.gauss * d.unsqueeze(1)
        if self.delta is not None:
            self.delta = self.delta * d

    def bounds(self) -> tuple[Tensor, Tensor]:
        """Offsets ``(lo, up)``, ``(N, units)``, of the input term around the centre pass."""
        s = self.s
        n = s.x.shape[0]
        ball = box = None
        if self.e is not None:
            if self.shared:  # (Q, *shape): identical for every example
                ef = self.e.reshape(self.e.shape[0], -1)
            else:  # (N, Q, *shape)
                ef = self.e.reshape(n, self.e.shape[1], -1)
            if s.ball_eps is not None:
                ball = s.ball_eps[:, None] * torch.linalg.vector_norm(ef, 2, dim=-2)
            if s.box_radius is not None:
                r = s.box_radius.reshape(n, -1)
                if self.shared:
                    box = r @ (ef.abs() if self.shared_abs is None else self.shared_abs)
                else:
                    box = torch.einsum("nq,nqk->nk", r, ef.abs())
        else:
            if self.gauss is not None:
                g = self.gauss.reshape(n, self.gauss.shape[1], -1)
                ball = s.ball_eps[:, None] * g.square().mean(dim=1).sqrt()
            if self.cauchy is not None:
                cf = self.cauchy.reshape(n, self.cauchy.shape[1], -1)
                box = cf.abs().median(dim=1).values
        shift = 0.0 if self.delta is None else self.delta.reshape(n, -1)
        if ball is not None and box is not None:
            return torch.maximum(-ball, shift - box), torch.minimum(ball, shift + box)
        if ball is not None:
            return -ball.expand(n, -1), ball.expand(n, -1)
        assert box is not None
        return shift - box, shift + box


def _backward_bounds_at(
    ops: Sequence[_Op], i: int, infos: Sequence[_ReluInfo], s: _InputSet
) -> _ReluInfo:
    """Bounds on the input of the ReLU ``ops[i]`` with ``c = ±I`` (one backward pass per unit)."""
    shape = ops[i].in_shape
    units = math.prod(shape)
    n = s.x.shape[0]
    widest = max([math.prod(op.out_shape) for op in ops[:i]] + [math.prod(s.x.shape[1:])])
    step = max(1, _CHUNK_BYTES // (16 * n * widest))
    lowers, uppers = [], []
    for start in range(0, units, step):
        stop = min(units, start + step)
        eye = torch.eye(units, dtype=s.x.dtype, device=s.x.device)[start:stop]
        c = eye.reshape(1, stop - start, *shape).expand(n, stop - start, *shape)
        low, neg_up = _dual_objective(ops[:i], infos, c, s, both=True)
        assert neg_up is not None
        lowers.append(low)
        uppers.append(-neg_up)
    return _relu_info(
        torch.cat(lowers, 1).reshape(n, *shape), torch.cat(uppers, 1).reshape(n, *shape)
    )


def _bounds_forward(
    ops: Sequence[_Op], s: _InputSet, k: int | None, cache: dict[str, Tensor] | None = None
) -> list[_ReluInfo]:
    """Pre-activation bounds of every ReLU, forward form (see the module docstring).

    ``cache`` (a dict kept by the caller across chunks of the same network) stores the
    identity pushed through the affine block before the first ReLU, shared by all examples.
    """
    relus = [i for i, op in enumerate(ops) if op.relu]
    n = s.x.shape[0]
    centre = s.x
    inputs = _InputColumns(s, k)
    groups: list[_ExactReluGroup | _ProjectedReluGroup] = []
    infos: list[_ReluInfo] = []
    done = 0  # the input columns already went through ops[:done]
    if relus and inputs.shared and cache is not None and relus[0] > 0:
        if "prefix" not in cache:
            for op in ops[: relus[0]]:
                inputs.affine(op)
            cache["prefix"] = inputs.e
        if s.box_radius is not None and "prefix_abs" not in cache:
            cache["prefix_abs"] = cache["prefix"].abs().reshape(s.x[0].numel(), -1)
        inputs.e, inputs.shared_abs, done = cache["prefix"], cache.get("prefix_abs"), relus[0]
    start = 0
    for j, r in enumerate(relus):
        for idx in range(start, r):
            op = ops[idx]
            centre = op.apply(centre)
            if op.bias is not None:
                centre = centre + op.bias
            if idx >= done:
                inputs.affine(op)
            for grp in groups:
                grp.affine(op)
        lo, up = inputs.bounds()
        for grp in groups:
            glo, gup = grp.bounds()
            lo, up = lo + glo, up + gup
        flat = centre.reshape(n, -1)
        info = _relu_info((flat + lo).reshape(centre.shape), (flat + up).reshape(centre.shape))
        infos.append(info)
        start = r + 1
        if j == len(relus) - 1:
            break
        centre = centre * info.d
        inputs.relu(info.d)
        for grp in groups:
            grp.relu(info.d)
        counts = info.unstable.reshape(n, -1).sum(1)
        if k is not None and int(counts.max()) > k:
            groups.append(_ProjectedReluGroup(info, k))
        elif int(counts.sum()) > 0:
            groups.append(_ExactReluGroup(info))
    return infos


def _bounds_backward(ops: Sequence[_Op], s: _InputSet) -> list[_ReluInfo]:
    """Pre-activation bounds from the definition: ``c = ±I`` on each truncated network."""
    infos: list[_ReluInfo] = []
    for i, op in enumerate(ops):
        if op.relu:
            infos.append(_backward_bounds_at(ops, i, infos, s))
    return infos


def _prepare(
    model: nn.Module,
    x: Tensor,
    eps: EpsLike,
    norm: str,
    clip_box: bool,
) -> tuple[list[_Op], _InputSet, Tensor]:
    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype)
    if x.dim() < 2:
        raise DataError(f"x must be a batch (N, ...); got shape {tuple(x.shape)}")
    ops = _parse(model, x.shape[1:])
    return ops, _input_set(x, eps, norm, clip_box), x


def _check_projection(projection_dim: int | None) -> None:
    if projection_dim is not None and (
        isinstance(projection_dim, bool)
        or not isinstance(projection_dim, int)
        or projection_dim < 1
    ):
        raise ConfigError(f"projection_dim must be None or a positive int; got {projection_dim!r}")


METHODS = ("forward", "backward")


def _bounds(
    ops: Sequence[_Op],
    s: _InputSet,
    projection_dim: int | None,
    method: str,
    cache: dict[str, Tensor] | None = None,
) -> list[_ReluInfo]:
    _check_projection(projection_dim)
    if method == "forward":
        return _bounds_forward(ops, s, projection_dim, cache)
    if method == "backward":
        if projection_dim is not None:
            raise ConfigError("method='backward' is exact; use projection_dim=None")
        return _bounds_backward(ops, s)
    raise ConfigError(f"method={method!r}; allowed: {', '.join(METHODS)}")


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
    ops, s, _ = _prepare(model, x, eps, norm, clip_box)
    return [(i.lower, i.upper) for i in _bounds(ops, s, projection_dim, method)]


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
    ops, s, x = _prepare(model, x, eps, norm, clip_box)
    c = c.to(device=x.device, dtype=x.dtype)
    if c.dim() == 2:
        c = c.unsqueeze(0).expand(x.shape[0], *c.shape)
    infos = _bounds(ops, s, projection_dim, method)
    return _dual_objective(ops, infos, c, s)[0]


def _margin_spec(y: Tensor, k: int, like: Tensor) -> Tensor:
    eye = torch.eye(k, dtype=like.dtype, device=like.device)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)  # (N, K, K): row j = e_y - e_j


def _num_classes(ops: Sequence[_Op]) -> int:
    return int(ops[-1].out_shape[0])


def _check_labels(y: Tensor, n: int, k: int, device: torch.device) -> Tensor:
    y = torch.as_tensor(y, device=device).long()
    if y.shape != (n,):
        raise DataError(f"labels y must have shape ({n},); got {tuple(y.shape)}")
    if n and (int(y.min()) < 0 or int(y.max()) >= k):
        raise DataError(f"labels y must lie in [0, {k - 1}]")
    return y


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
    n = x.shape[0]
    e = _eps_vector(eps, n, x.float() if not x.is_floating_point() else x)
    y = torch.as_tensor(y)
    out = []
    cache: dict[str, Tensor] = {}
    for idx in _chunks(model, x, batch_size):
        ops, s, xc = _prepare(model, x[idx], e[idx], norm, clip_box)
        k = _num_classes(ops)
        yc = _check_labels(y[idx], xc.shape[0], k, xc.device)
        infos = _bounds(ops, s, projection_dim, "forward", cache)
        out.append(_dual_objective(ops, infos, _margin_spec(yc, k, xc), s)[0])
    return torch.cat(out) if out else x.new_zeros(0, 0)


def _chunks(model: nn.Module, x: Tensor, batch_size: int | None) -> Iterator[slice]:
    n = x.shape[0]
    if batch_size is None:
        batch_size = _auto_batch_size(model, x.shape[1:])
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1; got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def _auto_batch_size(model: nn.Module, in_shape: Sequence[int]) -> int:
    """Examples per chunk so the forward-form columns stay within ``_CHUNK_BYTES``."""
    ops = _parse(model, in_shape)
    d_in = math.prod(in_shape)
    widest = max((math.prod(op.out_shape) for op in ops), default=1)
    per_example = 4 * 4 * d_in * widest  # a few float32 copies of the (inputs x units) columns
    return max(1, min(256, _CHUNK_BYTES // max(1, per_example)))


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


# ---------------------------------------------------------------------------- IBP
def _interval_to_relu(ops: Sequence[_Op], s: _InputSet) -> tuple[Tensor, Tensor, int] | None:
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
        cols = _InputColumns(_InputSet(s.x, s.ball_eps, None, None), None)
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

    Same threat model as :func:`margin_lower_bounds`. Intervals are propagated layer by layer
    (for ℓ2 the ball is mapped exactly through the first affine block: ``centre ± eps‖row‖₂``);
    the specification ``e_y - e_j`` is folded into the affine block after the last ReLU (the
    usual "elision of the last layer"). Sound; column ``y`` is 0.
    """
    n = x.shape[0]
    e = _eps_vector(eps, n, x.float() if not x.is_floating_point() else x)
    y = torch.as_tensor(y)
    out = []
    for idx in _chunks(model, x, batch_size):
        ops, s, xc = _prepare(model, x[idx], e[idx], norm, clip_box)
        k = _num_classes(ops)
        yc = _check_labels(y[idx], xc.shape[0], k, xc.device)
        c = _margin_spec(yc, k, xc)
        res = _interval_to_relu(ops, s)
        start = 0 if res is None else res[2] + 1
        a, const = c, c.new_zeros(c.shape[:2])
        for op in reversed(ops[start:]):
            if op.bias is not None:
                const = const + (a * op.bias).reshape(*a.shape[:2], -1).sum(2)
            a = _apply_batched(op.apply_t, a, 2)
        if res is None:
            out.append(const + _input_terms(a, s)[0])
            continue
        lo, hi = res[0].unsqueeze(1), res[1].unsqueeze(1)
        val = a.clamp(min=0) * lo + a.clamp(max=0) * hi
        out.append(const + val.reshape(*a.shape[:2], -1).sum(2))
    return torch.cat(out) if out else x.new_zeros(0, 0)


# ---------------------------------------------------------------------------- radius search
def _certified_mask(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: Tensor,
    norm: str,
    clip_box: bool,
    batch_size: int | None,
) -> Tensor:
    bound = margin_lower_bounds(
        model, x, y, eps=eps, norm=norm, clip_box=clip_box, batch_size=batch_size
    )
    bound = bound.scatter(1, y.view(-1, 1).to(bound.device), math.inf)
    return (bound > 0).all(dim=1).cpu()


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

    Every returned ``r > 0`` is certified by an exact Wong–Kolter bound computed *at* ``r``
    (all margins ``J(e_y - e_j) > 0``), so the label cannot change within the ``norm`` ball of
    radius ``r``; 0 means nothing is certified. The search brackets the boundary to within
    ``tol``; the dual bound is not guaranteed to be monotone in the radius, so the result is
    a certified radius, not necessarily the supremum of all certified radii.
    """
    if not eps_max > 0 or not tol > 0:
        raise ConfigError(f"eps_max and tol must be > 0; got eps_max={eps_max}, tol={tol}")
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


# ---------------------------------------------------------------------------- the defense
@register_defense("wong-kolter")
class WongKolter(Defense):
    """Provable defense of Wong & Kolter (2018): train on, and certify with, the dual bound.

    Training minimises the robust cross-entropy ``CE(-J(e_y - e_j), y)`` with ``eps`` ramped
    linearly from 0 over the first ``eps_warmup_fraction`` of training; ``projection_dim=k``
    replaces the exact intermediate bounds by their random-projection estimate (faster, not
    sound; training only). :meth:`certify` always uses the exact bound. Exact training keeps
    (inputs + unstable units) columns per example and layer for the backward pass, so its
    memory grows as batch × input size × layer width: use ``projection_dim`` (the paper uses
    k = 50) for image-sized convolutional networks.

    Certification of the released Fashion-MNIST model (``wk-small``) costs about 30 ms of CPU
    time per image on one thread.
    """

    randomized: ClassVar[bool] = False
    certifies: ClassVar[tuple[str, ...]] = ("linf", "l2")
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    param_help: ClassVar[dict[str, str]] = {
        "eps": "training radius of the norm ball, in pixel units",
        "norm": "training threat model: 'linf' or 'l2'",
        "eps_warmup_fraction": "fraction of training over which eps ramps linearly from 0",
        "projection_dim": "None = exact bound in training; k = Cauchy/Gaussian projections",
        "clip_box": "intersect the ball with the [0,1] pixel box (training and certification)",
        "certify_eps": "radius certified by certify() (default: eps)",
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
        if not isinstance(eps, int | float) or isinstance(eps, bool) or not eps >= 0:
            raise ConfigError(f"wong-kolter: eps must be a number >= 0; got {eps!r}")
        if norm not in BALL_NORMS:
            raise ConfigError(f"wong-kolter: norm={norm!r}; allowed: {', '.join(BALL_NORMS)}")
        if not isinstance(eps_warmup_fraction, int | float) or not 0 <= eps_warmup_fraction <= 1:
            raise ConfigError(
                f"wong-kolter: eps_warmup_fraction must be in [0, 1]; got {eps_warmup_fraction!r}"
            )
        _check_projection(projection_dim)
        if certify_eps is not None and (
            not isinstance(certify_eps, int | float) or not certify_eps >= 0
        ):
            raise ConfigError(f"wong-kolter: certify_eps must be >= 0; got {certify_eps!r}")

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
    ) -> Certificate:
        """Certify the clean prediction (argmax of the logits) of each example, ``x`` ``(N, ...)``.

        ``radii[norm]`` is ``certify_eps`` (default ``eps``) where every exact margin bound
        ``J(e_label - e_j)``, ``j != label``, is > 0, else 0 (float64). With
        ``radius_search`` it is the bisected largest certified radius in ``[0, certify_eps]``
        (tolerance ``certify_eps / 2**10``). Deterministic: ``seed``/``indices`` are unused.
        ``extra["margin_lower_bound"]`` is ``min_j J(e_label - e_j)`` at ``certify_eps``.
        """
        if norm not in self.certifies:
            raise ConfigError(
                f"wong-kolter certifies norms {', '.join(self.certifies)}; got norm={norm!r}"
            )
        self.model_.eval()
        radius_eps = float(self.eps if self.certify_eps is None else self.certify_eps)
        x = x.to(self.device)
        labels = self.logits(x).argmax(dim=1)
        bound = margin_lower_bounds(
            self.model_,
            x,
            labels,
            eps=radius_eps,
            norm=norm,
            clip_box=self.clip_box,
            batch_size=batch_size,
        )
        bound = bound.scatter(1, labels.view(-1, 1), math.inf)
        worst = bound.min(dim=1).values.double().cpu()
        if self.radius_search and radius_eps > 0:
            radii = certified_radius(
                self.model_,
                x,
                labels,
                norm=norm,
                eps_max=radius_eps,
                tol=radius_eps / 2**self.RADIUS_STEPS,
                clip_box=self.clip_box,
                batch_size=batch_size,
            )
        else:
            radii = torch.where(worst > 0, radius_eps, 0.0).double()
        return Certificate(
            labels=labels.cpu(),
            radii={norm: radii},
            bound="wong-kolter-dual",
            extra={"margin_lower_bound": worst},
        )
