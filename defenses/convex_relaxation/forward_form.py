"""Pre-activation bounds of every ReLU in one forward pass: the *forward form* (exact columns).

Wong, Schmidt, Metzen & Kolter (NeurIPS 2018), §3.1. The bounds ``l, u`` of a ReLU layer are
``J(±I)`` of the network truncated there (:func:`.dual.bounds_from_definition` computes them
so, one backward pass per unit). ``J`` is linear in ``c`` apart from the norm and ``[·]_+``
terms, so it suffices to push through the linearised network (each earlier ReLU replaced by
its slope ``d``) one column per input coordinate and one column per unstable unit of the
earlier layers; the bounds of all units of a layer then follow at once. This costs
(inputs + unstable units) passes through each layer and never forms a dense matrix of a
convolution (convolutions run as ``conv2d``; the one-hot columns of a new unstable layer go
through the next ``Linear``/``Conv2d`` as a gather from its weight). The identity pushed
through the affine block before the first ReLU is the same for every example: it is
computed once per call and shared.

With ``k`` (training only) the columns of a layer wider than ``k`` are replaced by the random
projections of :mod:`.projection`: an estimate, not a bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .input_set import InputSet, offsets
from .network import Conv2dOp, FlattenOp, LinearOp, Op, apply_batched
from .projection import ProjectedInputColumns, ProjectedReluColumns
from .relaxation import ReluRelaxation, relax_relu

__all__ = ["InputColumns", "ReluColumns", "forward_bounds", "onehot_image"]


def onehot_image(op: Op, unit: Tensor, val: Tensor) -> Tensor | None:
    """``op`` applied to the columns ``val[m] · e_{unit[m]}`` without forming them, or None.

    ``unit`` indexes the flattened ``op.in_shape``. Handles ``nn.Linear`` on flat inputs and
    ``nn.Conv2d`` with ``groups=1`` (a gather from the kernel); None means "not handled".
    """
    if isinstance(op, LinearOp) and len(op.in_shape) == 1:
        return op.weight[:, unit].t() * val[:, None]
    if not isinstance(op, Conv2dOp) or op.kw["groups"] != 1:
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


class ReluColumns:
    """Columns ``d_j e_j`` for every unstable unit ``j`` of one ReLU layer, stacked over the
    examples (``owner`` maps each column to its example), pushed forward exactly.

    The one-hot columns are never formed when the next operator can map them by a gather.
    ``bounds`` gives this layer's share ``Σ_j l_j [∓v_j]_+`` of later layers' bounds.
    """

    def __init__(self, info: ReluRelaxation):
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

    def affine(self, op: Op) -> None:
        if self.cols is None:
            if isinstance(op, FlattenOp):  # flat unit indices are unchanged
                self.shape = op.out_shape
                return
            image = onehot_image(op, self.unit, self.val)
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


class InputColumns:
    """Columns that carry ``A``, the linear map from the input to the current layer: one per
    input coordinate (the identity, shared by all examples until the first ReLU)."""

    def __init__(self, s: InputSet):
        x = s.x
        d_in = x[0].numel()
        self.s = s
        self.shared = True
        self.shared_abs: Tensor | None = None  # |e| flattened to (Q, units), while shared
        self.e = torch.eye(d_in, dtype=x.dtype, device=x.device).reshape(d_in, *x.shape[1:])

    def affine(self, op: Op) -> None:
        self.shared_abs = None
        self.e = op.apply(self.e) if self.shared else apply_batched(op.apply, self.e, 2)

    def relu(self, d: Tensor) -> None:
        self.shared_abs = None
        self.e = (self.e.unsqueeze(0) if self.shared else self.e) * d.unsqueeze(1)
        self.shared = False

    def bounds(self, shift: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
        """Offsets ``(lo, up)``, ``(N, units)``, of the input term around the centre pass;
        ``shift`` ``(N, units)`` is the box centre's offset from it (see :func:`.offsets`)."""
        s = self.s
        n = s.x.shape[0]
        ball = box = None
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
        return offsets(ball, box, shift, n)


def _affine(op: Op, v: Tensor | None) -> Tensor | None:
    return None if v is None else op.apply(v)


def forward_bounds(
    ops: Sequence[Op], s: InputSet, k: int | None, cache: dict[str, Tensor] | None = None
) -> list[ReluRelaxation]:
    """Pre-activation bounds of every ReLU of ``ops`` over ``S``, one relaxation per ReLU.

    Sound when ``k`` is ``None``; with ``k``, layers wider than ``k`` are estimated by random
    projections (training only). ``cache`` (a dict kept by the caller across chunks of the
    same network) stores the identity pushed through the affine block before the first ReLU.
    """
    relus = [i for i, op in enumerate(ops) if op.relu]
    n = s.x.shape[0]
    centre = s.x
    # The box's centre minus x, through the linearised network. It differs per example, so
    # unlike the input columns it goes through the first affine block even when the cache
    # holds that block's image of the identity.
    delta = s.box_delta
    inputs: InputColumns | ProjectedInputColumns = (
        ProjectedInputColumns(s, k) if k is not None and s.x[0].numel() > k else InputColumns(s)
    )
    groups: list[ReluColumns | ProjectedReluColumns] = []
    infos: list[ReluRelaxation] = []
    done = 0  # the input columns already went through ops[:done]
    moved = 0  # delta already went through ops[:moved]
    if relus and isinstance(inputs, InputColumns) and cache is not None and relus[0] > 0:
        if "prefix" not in cache:
            for op in ops[: relus[0]]:
                inputs.affine(op)
                delta = _affine(op, delta)
            cache["prefix"], moved = inputs.e, relus[0]
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
            if idx >= moved:
                delta = _affine(op, delta)
            for grp in groups:
                grp.affine(op)
        lo, up = inputs.bounds(0.0 if delta is None else delta.reshape(n, -1))
        for grp in groups:
            glo, gup = grp.bounds()
            lo, up = lo + glo, up + gup
        flat = centre.reshape(n, -1)
        info = relax_relu((flat + lo).reshape(centre.shape), (flat + up).reshape(centre.shape))
        infos.append(info)
        start = r + 1
        if j == len(relus) - 1:
            break
        centre = centre * info.d
        inputs.relu(info.d)
        if delta is not None:
            delta = delta * info.d
        for grp in groups:
            grp.relu(info.d)
        counts = info.unstable.reshape(n, -1).sum(1)
        if k is not None and int(counts.max()) > k:
            groups.append(ProjectedReluColumns(info, k))
        elif int(counts.sum()) > 0:
            groups.append(ReluColumns(info))
    return infos
