"""Uniform noise on [-1, 1), registered as the noise kind ``"uniform"``.

A ``NoiseLayer("uniform", lam)`` then adds ``U[-lam, lam)`` noise to each input coordinate.
The sampling engine hands the sampler a generator seeded per example and block, so the draws
are reproducible and independent of batch size; the sampler only has to draw everything from
that generator.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bench.noise import register_noise


@register_noise("uniform")
def uniform(
    shape: tuple[int, ...] | torch.Size,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator | None,
) -> Tensor:
    """Standard uniform noise on [-1, 1) of ``shape``: one ``torch.rand`` call."""
    return torch.rand(shape, dtype=dtype, device=device, generator=generator).mul_(2.0).sub_(1.0)
