"""The undefended baseline: standard cross-entropy training, argmax prediction, no certificate."""

from __future__ import annotations

from bench.registry import register_defense
from defenses.base import Defense


@register_defense("undefended")
class Undefended(Defense):
    """No defense: the model as trained with plain cross-entropy.

    Deterministic; certifies nothing (its guaranteed accuracy is reported as an empty cell,
    and its robust precision equals its accuracy).
    """

    randomized = False
    certifies = ()
    norms = ("l1", "l2", "linf")
    param_help: dict[str, str] = {}

    def __init__(self) -> None:
        pass
