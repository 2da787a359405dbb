"""Adversarial Robustness Toolbox (ART 1.20) adapters: ``pgd`` and ``cw``.

Both wrap :class:`attacks.eot.ExpectationOverNoise` (``draws`` noise draws per forward, 1 for
deterministic defenses) in ``art.estimators.classification.PyTorchClassifier`` with
``clip_values=(0, 1)`` and cross-entropy loss, on the input's device. ART converts to numpy
float32 and back; its random starts use numpy's global RNG, which :func:`attacks.base.attack`
seeds and restores.

* ``pgd`` — ``ProjectedGradientDescent`` (ART picks its PyTorch implementation), linf or l2,
  ``num_random_init = 1`` when ``random_start``.
* ``cw`` — ``CarliniL2Method`` with the PixelDP reference's settings by default (9 binary
  search steps, initial constant 1e-3, 100 iterations, learning rate 1e-2; ART optimises with
  its own line search rather than Adam). Minimum-distortion: the result is projected onto the
  eps ball.

ART is imported when an attack runs, not when certbench is imported.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from attacks.base import DEFAULT_DRAWS, PGD_DEFAULTS, pgd_resolver, register_attack
from attacks.eot import ExpectationOverNoise
from bench.errors import ConfigError
from bench.threat import PGD_NORMS
from bench.validation import check_int, check_number
from defenses.base import Defense


def _classifier(defense: Defense, x: Tensor, draws: int) -> Any:
    try:
        from art.estimators.classification import PyTorchClassifier
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "attack library 'art' is not installed; install adversarial-robustness-toolbox"
        ) from exc
    model = ExpectationOverNoise(defense, draws)
    num_classes = getattr(defense, "num_classes_", None)
    if num_classes is None:
        with torch.no_grad():
            num_classes = int(model(x[:1]).shape[1])
    return PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=int(num_classes),
        clip_values=(0.0, 1.0),
        device_type="gpu" if x.device.type == "cuda" else "cpu",
    )


def _to_numpy(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


@register_attack(
    "art",
    "pgd",
    norms=PGD_NORMS,
    defaults=PGD_DEFAULTS,
    resolve=pgd_resolver("art:pgd"),
    summary="ART ProjectedGradientDescent on the expectation-over-noise scores",
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
    from art.attacks.evasion import ProjectedGradientDescent

    clf = _classifier(defense, x, draws)
    atk = ProjectedGradientDescent(
        clf,
        norm=np.inf if norm == "linf" else 2,
        eps=eps,
        eps_step=step_size,
        max_iter=steps,
        targeted=False,
        num_random_init=1 if random_start else 0,
        batch_size=x.shape[0],
        verbose=False,
    )
    adv = atk.generate(_to_numpy(x), y=y.detach().cpu().numpy())
    return torch.from_numpy(np.asarray(adv)).to(device=x.device, dtype=x.dtype)


def _resolve_cw(params: dict[str, Any], defense: Any, norm: Any, eps: Any) -> None:
    key = "art:cw"
    params["confidence"] = check_number(params["confidence"], "confidence", low=0.0, where=key)
    for name in ("learning_rate", "initial_const"):
        params[name] = check_number(params[name], name, low=0.0, low_open=True, where=key)
    for name in ("binary_search_steps", "max_iter"):
        params[name] = check_int(params[name], name, minimum=1, where=key)


@register_attack(
    "art",
    "cw",
    norms=("l2",),
    defaults={
        "confidence": 0.0,
        "learning_rate": 0.01,
        "binary_search_steps": 9,
        "max_iter": 100,
        "initial_const": 1e-3,
        "draws": DEFAULT_DRAWS,
    },
    resolve=_resolve_cw,
    summary="ART CarliniL2Method (PixelDP reference settings) on the expectation-over-noise "
    "scores; minimum-distortion, so the result is projected onto the eps ball",
)
def _cw(
    defense: Defense,
    x: Tensor,
    y: Tensor,
    *,
    norm: str,
    eps: float,
    seed: int,
    confidence: float,
    learning_rate: float,
    binary_search_steps: int,
    max_iter: int,
    initial_const: float,
    draws: int,
) -> Tensor:
    from art.attacks.evasion import CarliniL2Method

    clf = _classifier(defense, x, draws)
    atk = CarliniL2Method(
        clf,
        confidence=confidence,
        targeted=False,
        learning_rate=learning_rate,
        binary_search_steps=binary_search_steps,
        max_iter=max_iter,
        initial_const=initial_const,
        batch_size=x.shape[0],
        verbose=False,
    )
    adv = atk.generate(_to_numpy(x), y=y.detach().cpu().numpy())
    return torch.from_numpy(np.asarray(adv)).to(device=x.device, dtype=x.dtype)
