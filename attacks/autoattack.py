"""AutoAttack adapters (PyPI ``pyautoattack`` 0.2, module ``pyautoattack``).

Names: ``standard`` (APGD-CE, APGD-T, FAB-T, Square; for deterministic defenses), ``rand``
(APGD-CE and APGD-DLR with AutoAttack's own expectation over 20 draws per step; for
randomized defenses), ``autoattack``, which picks ``rand`` when the defense is randomized
and ``standard`` otherwise, and ``apgd``: only AutoAttack's gradient attacks, APGD-CE and
APGD-T with the standard settings (deterministic defenses), or ``rand`` (randomized) — most
of AutoAttack's strength at a fraction of its cost (FAB-T and Square are the slow part).

The model handed to AutoAttack is one plain (noisy) forward pass,
:class:`attacks.eot.ExpectationOverNoise` with ``draws = 1``: in ``rand`` mode AutoAttack
averages the per-draw CE/DLR gradients itself (``eot_iter``). AutoAttack keeps an adversarial
example only where a *single* forward pass misclassifies it and returns the clean input
elsewhere; on a randomized defense that decision is a coin flip, so its output must be judged
with :func:`attacks.base.rescore` (many draws), never with AutoAttack's own ``y_adv``.

``run_standard_evaluation(x, y, batch_size=...)`` returns ``(x_adv, y_adv)`` in this
version; only ``x_adv`` is used. ``n_iter`` (APGD and FAB iterations, AutoAttack's default
100), ``eot_iter`` (``rand`` only, default 20) and ``n_queries`` (Square, default 5000) can be
lowered for quick runs.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from attacks.base import defense_is_randomized, register_attack
from attacks.eot import ExpectationOverNoise
from bench.errors import ConfigError
from bench.threat import NORMS
from bench.validation import check_int
from defenses.base import Defense

#: AutoAttack's spelling of each of certbench's norms (it supports all of them).
_AA_NORM = {"l1": "L1", "l2": "L2", "linf": "Linf"}
_DEFAULTS = {"n_iter": 100, "eot_iter": 20, "n_queries": 5000}


def _run(
    defense: Defense,
    x: Tensor,
    y: Tensor,
    *,
    norm: str,
    eps: float,
    seed: int,
    version: str,
    n_iter: int,
    eot_iter: int,
    n_queries: int,
    only: tuple[str, ...] | None = None,
) -> Tensor:
    try:
        from pyautoattack import AutoAttack
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError("attack library 'autoattack' needs the package pyautoattack") from exc
    model = ExpectationOverNoise(defense, draws=1)
    aa = AutoAttack(
        model, norm=_AA_NORM[norm], eps=eps, version=version, device=x.device, seed=seed
    )
    aa.apgd.n_iter = n_iter
    aa.apgd_targeted.n_iter = n_iter
    aa.fab.n_iter = n_iter
    aa.square.n_queries = n_queries
    if version == "rand":
        aa.apgd.eot_iter = eot_iter
    if only is not None:  # a subset of the version's attacks, with the version's settings
        aa.attacks_to_run = [a for a in aa.attacks_to_run if a in only]
    x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=x.shape[0])
    return x_adv


def _make_resolver(fixed: str | None):
    def resolve(params: dict[str, Any], defense: Defense | None, norm: Any, eps: Any) -> None:
        for k in _DEFAULTS:
            params[k] = check_int(params[k], k, minimum=1, where="autoattack")
        if fixed is not None:
            params["version"] = fixed
        elif defense is not None:
            params["version"] = "rand" if defense_is_randomized(defense) else "standard"
        else:
            params["version"] = "auto"
        if params["version"] == "standard":
            params.pop("eot_iter")  # only 'rand' averages over draws

    return resolve


def _register(
    name: str, fixed: str | None, summary: str, only: tuple[str, ...] | None = None
) -> None:
    @register_attack(
        "autoattack",
        name,
        norms=NORMS,
        defaults=dict(_DEFAULTS),
        resolve=_make_resolver(fixed),
        summary=summary,
    )
    def fn(
        defense: Defense, x: Tensor, y: Tensor, *, norm: str, eps: float, seed: int, **params: Any
    ) -> Tensor:
        params.setdefault("eot_iter", 1)
        return _run(defense, x, y, norm=norm, eps=eps, seed=seed, only=only, **params)

    fn.__qualname__ = f"autoattack_{name}"


_register("standard", "standard", "AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square)")
_register("rand", "rand", "AutoAttack rand (APGD-CE, APGD-DLR, EOT over 20 draws)")
_register("autoattack", None, "AutoAttack, 'rand' for randomized defenses else 'standard'")
_register(
    "apgd",
    None,
    "AutoAttack's APGD-CE + APGD-T (standard settings); rand (APGD-CE, APGD-DLR, EOT) for "
    "randomized defenses",
    only=("apgd-ce", "apgd-t", "apgd-dlr"),
)
