"""A minimal certbench defense plugin: reduce the input's bit depth before the model.

Feature squeezing (Xu et al., 2018) quantises pixels in [0, 1] to ``2**bits`` levels. It is
deterministic and certifies nothing, so certbench reports its accuracy and accuracy under
attack, with an empty guaranteed-accuracy cell. (Gradient-based attacks see a zero gradient
through rounding; the straight-through estimator below keeps them meaningful.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bench.registry import register_defense
from defenses.base import Citation, Defense


class _Quantize(nn.Module):
    def __init__(self, bits: int) -> None:
        super().__init__()
        self.levels = 2**bits - 1

    def forward(self, x: Tensor) -> Tensor:
        q = torch.round(x.clamp(0, 1) * self.levels) / self.levels
        return x + (q - x).detach()  # straight-through estimator for gradients


@register_defense("bit-depth")
class BitDepth(Defense):
    """Quantise inputs in [0, 1] to ``2**bits`` levels before the model (feature squeezing)."""

    randomized = False
    certifies = ()
    norms = ("linf", "l2")
    param_help = {"bits": "bits per pixel kept (1-8)"}
    citation = Citation(  # plugins carry their paper too (shown on the leaderboard site)
        title="Feature Squeezing: Detecting Adversarial Examples in Deep Neural Networks",
        authors=("Weilin Xu", "David Evans", "Yanjun Qi"),
        venue="Network and Distributed System Security Symposium (NDSS)",
        year=2018,
        url="https://arxiv.org/abs/1704.01155",
    )

    def __init__(self, *, bits: int = 3) -> None:
        if not (isinstance(bits, int) and 1 <= bits <= 8):
            raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
        self.bits = bits

    def build(self, model: nn.Module) -> nn.Module:
        return nn.Sequential(_Quantize(self.bits), model)
