"""torchattacks 3.5 adapters: ``fgsm``, ``pgd`` (PGD for linf, PGDL2 for l2), ``cw``, ``apgd``.

Every attack runs on :class:`attacks.eot.ExpectationOverNoise` (``draws`` noise draws per
forward, 1 for deterministic defenses), not on torchattacks' own ``EOTPGD``: that one sums
the per-draw gradients and takes ``sign()``, right for linf but not for l2 steps, which need
the normalised mean. torchattacks switches the model to ``eval()`` (noise layers stay on) and
reads its device from the model's first parameter, which the wrapper provides.

torchattacks is imported when an attack runs, not when certbench is imported; install it
with ``pip install --no-deps torchattacks`` (its metadata pins torchvision).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from attacks.base import DEFAULT_DRAWS, PGD_DEFAULTS, pgd_resolver, register_attack
from attacks.eot import ExpectationOverNoise
from bench.errors import ConfigError
from bench.threat import PGD_NORMS
from bench.validation import check_choice, check_int, check_number
from defenses.base import Defense

#: torchattacks' spelling of the norms its APGD supports.
_APGD_NORMS = {"linf": "Linf", "l2": "L2"}


def _library() -> Any:
    try:
        import torchattacks
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "attack library 'torchattacks' is not installed; install it with "
            "`pip install --no-deps torchattacks`"
        ) from exc
    return torchattacks


class _NonNegativeScores(nn.Module):
    """Shifts each row of scores so its minimum is 0 (value only; gradients unchanged).

    torchattacks' CW finds the best wrong class as ``max((1 - onehot) * z)``, which reads the
    masked true class as a score of 0 and breaks when every other score is negative (always
    the case for log-probabilities). A per-row shift changes neither the CW margin nor any
    prediction.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        s = self.inner(x)
        return s - s.amin(dim=1, keepdim=True).detach()


@register_attack(
    "torchattacks",
    "fgsm",
    norms=("linf",),
    defaults={"draws": DEFAULT_DRAWS},
    summary="torchattacks.FGSM on the expectation-over-noise scores (one sign step of eps)",
)
def _fgsm(
    defense: Defense, x: Tensor, y: Tensor, *, norm: str, eps: float, seed: int, draws: int
) -> Tensor:
    ta = _library()
    return ta.FGSM(ExpectationOverNoise(defense, draws), eps=eps)(x, y)


@register_attack(
    "torchattacks",
    "pgd",
    norms=PGD_NORMS,
    defaults=PGD_DEFAULTS,
    resolve=pgd_resolver("torchattacks:pgd"),
    summary="torchattacks.PGD (linf) / PGDL2 (l2) on the expectation-over-noise scores",
)
def _pgd(
    defense: Defense,
    x: Tensor,
    y: Tensor,
    *,
    norm: str,
    eps: float,
    seed: int,
    steps: int,
    step_size: float,
    random_start: bool,
    draws: int,
) -> Tensor:
    ta = _library()
    model = ExpectationOverNoise(defense, draws)
    cls = ta.PGD if norm == "linf" else ta.PGDL2
    atk = cls(model, eps=eps, alpha=step_size, steps=steps, random_start=random_start)
    return atk(x, y)


def _resolve_cw(params: dict[str, Any], defense: Any, norm: Any, eps: Any) -> None:
    key = "torchattacks:cw"
    params["c"] = check_number(params["c"], "c", low=0.0, low_open=True, where=key)
    params["kappa"] = check_number(params["kappa"], "kappa", low=0.0, where=key)
    params["steps"] = check_int(params["steps"], "steps", minimum=1, where=key)
    params["lr"] = check_number(params["lr"], "lr", low=0.0, low_open=True, where=key)


@register_attack(
    "torchattacks",
    "cw",
    norms=("l2",),
    defaults={"c": 1.0, "kappa": 0.0, "steps": 100, "lr": 0.01, "draws": DEFAULT_DRAWS},
    resolve=_resolve_cw,
    summary="torchattacks.CW (Carlini-Wagner L2, Adam, fixed c); minimum-distortion, so the "
    "result is projected onto the eps ball",
)
def _cw(
    defense: Defense,
    x: Tensor,
    y: Tensor,
    *,
    norm: str,
    eps: float,
    seed: int,
    c: float,
    kappa: float,
    steps: int,
    lr: float,
    draws: int,
) -> Tensor:
    ta = _library()
    model = _NonNegativeScores(ExpectationOverNoise(defense, draws))
    return ta.CW(model, c=c, kappa=kappa, steps=steps, lr=lr)(x, y)


def _resolve_apgd(params: dict[str, Any], defense: Any, norm: Any, eps: Any) -> None:
    key = "torchattacks:apgd"
    params["steps"] = check_int(params["steps"], "steps", minimum=1, where=key)
    params["restarts"] = check_int(params["restarts"], "restarts", minimum=1, where=key)
    params["rho"] = check_number(params["rho"], "rho", low=0.0, low_open=True, where=key)
    check_choice(params["loss"], "loss", ("ce", "dlr"), where=key)


@register_attack(
    "torchattacks",
    "apgd",
    norms=tuple(_APGD_NORMS),
    defaults={"steps": 100, "restarts": 1, "loss": "ce", "rho": 0.75, "draws": DEFAULT_DRAWS},
    resolve=_resolve_apgd,
    summary="torchattacks.APGD (Croce & Hein) on the expectation-over-noise scores",
)
def _apgd(
    defense: Defense,
    x: Tensor,
    y: Tensor,
    *,
    norm: str,
    eps: float,
    seed: int,
    steps: int,
    restarts: int,
    loss: str,
    rho: float,
    draws: int,
) -> Tensor:
    ta = _library()
    model = ExpectationOverNoise(defense, draws)
    atk = ta.APGD(
        model,
        norm=_APGD_NORMS[norm],
        eps=eps,
        steps=steps,
        n_restarts=restarts,
        seed=seed,
        loss=loss,
        eot_iter=1,
        rho=rho,
        verbose=False,
    )
    return atk(x, y)
