"""``example:fgsm`` — one signed gradient step of size eps (Goodfellow et al., ICLR 2015).

The whole adapter: a decorated function with certbench's attack signature. The gradient is
the expectation over noise of the cross-entropy gradient (one draw for deterministic
defenses); :func:`attacks.attack` seeds the RNGs, batches, and projects the result onto the
eps ball ∩ [0, 1].
"""

from __future__ import annotations

from torch import Tensor

from attacks import DEFAULT_DRAWS, ExpectationOverNoise, register_attack


@register_attack(
    "example",
    "fgsm",
    norms=("linf",),
    defaults={"draws": DEFAULT_DRAWS},
    summary="one sign-of-gradient step of size eps (test fixture)",
)
def fgsm(
    defense: object, x: Tensor, y: Tensor, *, norm: str, eps: float, seed: int, draws: int
) -> Tensor:
    _, grad = ExpectationOverNoise(defense, draws).loss_grad(x, y)
    return x + eps * grad.sign()
