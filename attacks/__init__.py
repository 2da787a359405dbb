"""Attacks adapted to randomized defenses, behind one calling convention.

* :func:`attack` — ``attack(defense, x, y, *, norm, eps, library="certbench", name="pgd",
  seed=0, **params) -> x_adv``, dispatching to a registered adapter (:func:`list_attacks`):
  ``certbench:pgd`` (default; expectation-over-noise PGD), ``torchattacks:{fgsm, pgd, cw,
  apgd}``, ``art:{pgd, cw}``, ``autoattack:{standard, rand, autoattack}``.
* :func:`describe_attack` — the resolved parameters of a call, for the run record.
* :func:`rescore` — judge attacked inputs with the defense's own (Monte Carlo) predict /
  certify, on fresh draws.
* :class:`ExpectationOverNoise` — the averaging wrapper the adapters differentiate through.

Adapters are found through the ``certbench.attacks`` entry-point group (one module per
library, :mod:`bench.registry`); the third-party libraries themselves are imported only when
one of their attacks runs.
"""

from __future__ import annotations

from attacks.base import (
    DEFAULT_DRAWS,
    RESCORE_SEED_OFFSET,
    AttackEntry,
    attack,
    attack_libraries,
    describe_attack,
    get_attack,
    list_attacks,
    lp_norm,
    project,
    register_attack,
    rescore,
)
from attacks.eot import ExpectationOverNoise, eot_pgd

__all__ = [
    "DEFAULT_DRAWS",
    "RESCORE_SEED_OFFSET",
    "AttackEntry",
    "ExpectationOverNoise",
    "attack",
    "attack_libraries",
    "describe_attack",
    "eot_pgd",
    "get_attack",
    "list_attacks",
    "lp_norm",
    "project",
    "register_attack",
    "rescore",
]
