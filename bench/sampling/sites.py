"""The randomized model as the engine sees it: prediction mode, noise sites, a one-row probe.

A *noise site* is one call of a :class:`~bench.noise.NoiseLayer` in the model's forward. The
engine needs the sites' kinds, per-row shapes, dtypes and devices before it can generate
their noise, and learns them either from a one-row dry run (:func:`probe`) or from the first
real forward pass (:class:`bench.sampling.runner.Runner`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bench.errors import ConfigError
from bench.noise import NoiseLayer, noise_source

__all__ = ["NotRandomizedError", "Site", "prediction_mode", "probe"]


class NotRandomizedError(ConfigError, ValueError):
    """The model given to the sampling engine has no noise layer that runs in its forward."""


@dataclass(frozen=True)
class Site:
    """One noise-layer call: its noise kind, per-row shape, dtype and device."""

    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@contextlib.contextmanager
def prediction_mode(model: nn.Module) -> Iterator[None]:
    """eval() mode and noise multiplier 1 inside the block; restore both afterwards."""
    modules = list(model.modules())
    # Usually the model is already in eval mode: then eval() (a recursive walk) is skipped.
    modes = [(m, m.training) for m in modules] if any(m.training for m in modules) else []
    changed = [(m, m.multiplier) for m in modules if isinstance(m, NoiseLayer)]
    if modes:
        model.eval()
    for layer, _ in changed:
        layer.multiplier = 1.0
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for layer, mult in changed:
            layer.multiplier = mult


def probe(model: nn.Module, x1: Tensor) -> tuple[list[Site], Tensor, int]:
    """Dry run on one row: the noise sites in call order, the output, and the leaf-output size.

    The sites get zero noise (only their shapes matter); ``x1`` is ``(1, C, H, W)``.
    """
    sites: list[Site] = []
    leaf_numel = 0

    def record(kind: str, shape: torch.Size, like: Tensor) -> Tensor:
        if len(shape) == 0 or shape[0] != 1:
            raise ConfigError(
                f"noise layer input has shape {tuple(shape)} for a one-example batch; the "
                "sampling engine needs noise layers whose input keeps the batch dimension first"
            )
        sites.append(Site(kind, tuple(shape[1:]), like.dtype, like.device))
        return torch.zeros(shape, dtype=like.dtype, device=like.device)

    def hook(_module: nn.Module, _inp: object, out: object) -> None:
        nonlocal leaf_numel
        if isinstance(out, Tensor):
            leaf_numel += out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not any(m.children())]
    try:
        with noise_source(record):
            out = model(x1)
    finally:
        for h in handles:
            h.remove()
    return sites, out, leaf_numel
