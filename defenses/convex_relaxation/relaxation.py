"""The relaxation of one ReLU layer, given bounds ``l <= ẑ <= u`` on its pre-activations.

Each unstable unit (``l < 0 < u``) is replaced by the convex hull of ``relu`` on ``[l, u]``;
the dual bound evaluates that relaxation at the dual-feasible slope ``d = u / (u - l)``
(Wong & Kolter 2018, §3). Stable units are exact: ``d = 1`` (active, ``l >= 0``) or ``d = 0``
(inactive, ``u <= 0``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ReluRelaxation", "relax_relu"]


@dataclass
class ReluRelaxation:
    """Pre-activation bounds of one ReLU layer and its dual slope, all ``(N, *shape)``.

    ``l_unstable`` is ``l`` on unstable units and 0 elsewhere (the dual's ``Σ l [ν]_+`` term
    runs over unstable units only); ``unstable`` is the boolean mask ``l < 0 < u``.
    """

    lower: Tensor
    upper: Tensor
    d: Tensor
    l_unstable: Tensor
    unstable: Tensor


def relax_relu(lower: Tensor, upper: Tensor) -> ReluRelaxation:
    """Slopes ``d`` and the unstable mask of a ReLU layer whose input lies in ``[lower, upper]``."""
    unstable = (lower < 0) & (upper > 0)
    denom = torch.where(unstable, upper - lower, torch.ones_like(upper))
    d = torch.where(unstable, upper / denom, (lower >= 0).to(lower.dtype))
    l_unstable = torch.where(unstable, lower, torch.zeros_like(lower))
    return ReluRelaxation(lower, upper, d, l_unstable, unstable)
