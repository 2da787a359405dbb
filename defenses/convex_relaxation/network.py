"""The network as a list of operators the dual bound can run forwards and backwards.

Supported: an ``nn.Sequential`` (nested ones are flattened) of ``nn.Linear``, ``nn.Conv2d``
(numeric zero padding), ``nn.Flatten`` (dims 1..-1) and ``nn.ReLU``, ending in flat logits
``(N, K)``. Each affine operator exposes ``apply`` (the linear part, bias kept separately in
``bias``, expanded to the per-example output shape), its transpose ``apply_t`` (the dual
network runs it backwards) and ``apply_abs`` (``|W|``, for interval arithmetic). Shapes are
per example (no batch dimension), found by a dry run on a zero input; operators act on
tensors with one leading batch dimension.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.errors import ConfigError
from bench.validation import check_int

__all__ = [
    "CHUNK_BYTES",
    "SUPPORTED_LAYERS",
    "Conv2dOp",
    "FlattenOp",
    "LinearOp",
    "Op",
    "ReluOp",
    "apply_batched",
    "check_supported",
    "example_chunks",
    "num_classes",
    "parse_network",
]

SUPPORTED_LAYERS = "nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten"
#: Memory budget (bytes) for the forward-form columns of one chunk of examples.
CHUNK_BYTES = 32 * 2**20


class LinearOp:
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


class Conv2dOp:
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


class FlattenOp:
    """``nn.Flatten(1, -1)``: a reshape, its own absolute value."""

    relu = False
    bias = None

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
        self.in_shape, self.out_shape = in_shape, out_shape

    def apply(self, v: Tensor) -> Tensor:
        return v.reshape(v.shape[0], *self.out_shape)

    def apply_t(self, v: Tensor) -> Tensor:
        return v.reshape(v.shape[0], *self.in_shape)

    apply_abs = apply


class ReluOp:
    """``nn.ReLU``: the only non-linearity; the bounds relax it (see ``relaxation``)."""

    relu = True
    bias = None

    def __init__(self, shape: tuple[int, ...]):
        self.in_shape = self.out_shape = shape


Op = LinearOp | Conv2dOp | FlattenOp | ReluOp


def _leaf_modules(model: nn.Module) -> Iterator[nn.Module]:
    if isinstance(model, nn.Sequential):
        for m in model:
            yield from _leaf_modules(m)
    else:
        yield model


def parse_network(model: nn.Module, in_shape: Sequence[int]) -> list[Op]:
    """Translate ``model`` into operators, with per-example shapes from a dry run.

    Raises:
        ConfigError: ``model`` is not an ``nn.Sequential`` of the supported layers, naming the
            offending layer.
    """
    if not isinstance(model, nn.Sequential):
        raise ConfigError(
            f"Wong–Kolter bounds need an nn.Sequential of {SUPPORTED_LAYERS}; "
            f"got {type(model).__name__}"
        )
    param = next(model.parameters(), None)
    like = dict(device=param.device, dtype=param.dtype) if param is not None else {}
    ops: list[Op] = []
    shape = tuple(int(s) for s in in_shape)
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
                f"Wong–Kolter bounds do not support {where}; supported layers: {SUPPORTED_LAYERS}"
            )
        try:
            with torch.no_grad():  # a shape probe; the ops below keep the weights' graph
                out = layer(v)
        except RuntimeError as exc:
            raise ConfigError(
                f"Wong–Kolter: {where} does not accept inputs of shape {shape}: {exc}"
            ) from exc
        out_shape = tuple(out.shape[1:])
        if isinstance(layer, nn.Linear):
            ops.append(LinearOp(layer, shape, out_shape))
        elif isinstance(layer, nn.Conv2d):
            ops.append(Conv2dOp(layer, shape, out_shape))
        elif isinstance(layer, nn.Flatten):
            ops.append(FlattenOp(shape, out_shape))
        else:
            ops.append(ReluOp(shape))
        v, shape = out, out_shape
    if len(shape) != 1:
        raise ConfigError(
            f"Wong–Kolter: the network must end in flat logits (N, K); its output per example "
            f"has shape {shape} (add nn.Flatten)"
        )
    return ops


def check_supported(model: nn.Module, input_shape: Sequence[int]) -> None:
    """Raise :class:`ConfigError` unless ``model`` is a network these bounds support.

    ``input_shape`` is one example's shape, e.g. ``(1, 28, 28)``.
    """
    parse_network(model, input_shape)


def num_classes(ops: Sequence[Op]) -> int:
    """Number of logits ``K`` of a parsed network."""
    return int(ops[-1].out_shape[0])


def apply_batched(fn: Callable[[Tensor], Tensor], v: Tensor, lead: int) -> Tensor:
    """Apply a per-example operator to ``v`` with ``lead`` leading batch dims."""
    head = v.shape[:lead]
    out = fn(v.reshape(-1, *v.shape[lead:]))
    return out.reshape(*head, *out.shape[1:])


def example_chunks(model: nn.Module, x: Tensor, batch_size: int | None) -> Iterator[slice]:
    """Slices of ``x``'s examples, ``batch_size`` at a time (default: see :func:`_auto_batch`)."""
    n = x.shape[0]
    if batch_size is None:
        batch_size = _auto_batch(model, x.shape[1:])
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def _auto_batch(model: nn.Module, in_shape: Sequence[int]) -> int:
    """Examples per chunk so the forward-form columns stay within :data:`CHUNK_BYTES`."""
    ops = parse_network(model, in_shape)
    d_in = math.prod(in_shape)
    widest = max((math.prod(op.out_shape) for op in ops), default=1)
    per_example = 4 * 4 * d_in * widest  # a few float32 copies of the (inputs x units) columns
    return max(1, min(256, CHUNK_BYTES // max(1, per_example)))
