"""One calling convention for every attack, the attack registry and Monte Carlo re-scoring of
adversarial examples (the threat-model geometry — ``lp_norm``, ``project``,
``random_in_ball`` — lives in :mod:`bench.threat` and is re-exported here).

Every attack, whichever library implements it, is called the same way::

    x_adv = attack(defense, x, y, norm="l2", eps=0.5)                      # certbench EOT-PGD
    x_adv = attack(defense, x, y, norm="linf", eps=0.1, library="torchattacks", name="pgd")
    pred_adv, radius_adv = rescore(defense, x_adv, y, norm="l2", seed=0)

``x`` is ``(N, C, H, W)`` float with pixels in ``[0, 1]``, ``y`` is ``(N,)`` int64. The result
``x_adv`` has the shape, dtype and device of ``x`` and satisfies, for every row,
``||x_adv - x||_norm <= eps`` (exactly, for the stored numbers: the difference is measured
in float64) and ``0 <= x_adv <= 1``: whatever an adapter returns is projected onto the eps ball
and then clipped to ``[0, 1]`` (clipping after the projection cannot leave the ball, because
``x`` itself lies in the box, so clipping moves every coordinate of ``x + delta`` towards
``x``; :func:`bench.threat.project`). Minimum-distortion attacks (Carlini–Wagner) therefore
count only within the budget.

Attacks on randomized defenses see the noise: the defended network stays noisy in ``eval()``
mode (:mod:`bench.noise`), and every adapter differentiates through
:class:`attacks.eot.ExpectationOverNoise` (20 draws per step by default, as in the PixelDP
reference) or through the library's own expectation over transformation (AutoAttack ``rand``).
Their output is then judged by :func:`rescore` with the defense's own Monte Carlo prediction,
never by the single noisy forward pass a library uses to decide success.

Adapters register themselves with :func:`register_attack` under ``library:name``; adding an
attack library is one module of decorated functions plus its line in the ``certbench.attacks``
entry-point group (a third-party package declares it in its own ``pyproject.toml``). Unknown
names and parameters raise :class:`bench.errors.ConfigError` listing what is allowed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bench.errors import ConfigError, DataError
from bench.noise import is_randomized
from bench.registry import ATTACKS
from bench.threat import NORMS, frozen_parameters, lp_norm, project, random_in_ball
from bench.validation import check_choice, check_int, check_number
from defenses.base import Defense

# Re-exported: the threat-model geometry lives in bench.threat.
__all__ = [
    "DEFAULT_DRAWS",
    "PGD_DEFAULTS",
    "RESCORE_SEED_OFFSET",
    "AttackEntry",
    "attack",
    "attack_libraries",
    "attack_mode",
    "defense_is_randomized",
    "describe_attack",
    "get_attack",
    "list_attacks",
    "lp_norm",
    "pgd_resolver",
    "project",
    "random_in_ball",
    "register_attack",
    "rescore",
    "resolve_step_size",
    "seeded",
]

#: Added to the caller's seed when re-scoring attacked inputs, so the Monte Carlo draws that
#: judge an adversarial example are fresh (independent of the draws of the clean evaluation,
#: which uses ``seed`` itself, and of the attack's own draws).
RESCORE_SEED_OFFSET = 1_000_003

#: Noise draws per gradient step used by every adapter on randomized defenses unless told
#: otherwise (PixelDP's attacks average the loss over 20 draws per step).
DEFAULT_DRAWS = 20

AttackFn = Callable[..., Tensor]
Resolver = Callable[[dict[str, Any], "Defense | None", "str | None", "float | None"], None]


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class AttackEntry:
    """A registered attack.

    Attributes:
        library: library key (``"certbench"``, ``"torchattacks"``, ``"art"``, ``"autoattack"``).
        name: attack name within the library.
        fn: ``fn(defense, x, y, *, norm, eps, seed, **params) -> x_adv`` (pixels in [0, 1]).
        norms: threat-model norms the attack supports.
        defaults: every accepted parameter with its default (``None`` = derived, see resolve).
        resolve: optional ``resolve(params, defense, norm, eps)`` that fills derived defaults
            in place (e.g. a step size from ``eps``) and validates values.
        summary: one line for listings.
    """

    library: str
    name: str
    fn: AttackFn
    norms: tuple[str, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    resolve: Resolver | None = None
    summary: str = ""

    @property
    def key(self) -> str:
        return f"{self.library}:{self.name}"


def register_attack(
    library: str,
    name: str,
    *,
    norms: tuple[str, ...],
    defaults: Mapping[str, Any] | None = None,
    resolve: Resolver | None = None,
    summary: str = "",
) -> Callable[[AttackFn], AttackFn]:
    """Decorator registering ``fn(defense, x, y, *, norm, eps, seed, **params)`` as
    ``library:name`` in the attack registry (:data:`bench.registry.ATTACKS`).

    The adapter's module is listed under the ``certbench.attacks`` entry-point group.
    Registering the same ``library:name`` from two different functions raises.
    """

    def decorator(fn: AttackFn) -> AttackFn:
        entry = AttackEntry(
            library=library,
            name=name,
            fn=fn,
            norms=tuple(norms),
            defaults=dict(defaults or {}),
            resolve=resolve,
            summary=summary,
        )
        ATTACKS.add(entry, entry.key, source=f"{fn.__module__}:{fn.__qualname__}")
        return fn

    return decorator


def list_attacks(library: str | None = None) -> list[str]:
    """Sorted ``"library:name"`` keys, optionally of one library."""
    return [k for k in ATTACKS.names() if library is None or k.split(":")[0] == library]


def attack_libraries() -> list[str]:
    """The libraries that have at least one registered attack adapter."""
    return sorted({k.split(":")[0] for k in ATTACKS.names()})


def get_attack(library: str, name: str) -> AttackEntry:
    """The registered attack; raises :class:`ConfigError` listing the known ones."""
    key = f"{library}:{name}"
    if key not in ATTACKS:
        raise ConfigError(
            f"unknown attack {name!r} of library {library!r}; known attacks "
            f"(library:name): {', '.join(list_attacks())}"
        )
    return ATTACKS.get(key)


def describe_attack(
    library: str,
    name: str,
    *,
    defense: Defense | None = None,
    norm: str | None = None,
    eps: float | None = None,
    **params: Any,
) -> dict[str, Any]:
    """The resolved parameters an :func:`attack` call would use, for the run record.

    Returns ``{"library", "name", ["norm", "eps",] **every parameter}`` with defaults filled
    in. Derived defaults (a step size from ``eps``, ``draws = 1`` for a deterministic defense,
    AutoAttack's version from ``defense.randomized``) are resolved when ``defense`` / ``norm``
    / ``eps`` are given and stay ``None`` / ``"auto"`` otherwise. Unknown parameters raise
    :class:`ConfigError`.
    """
    entry = get_attack(library, name)
    resolved = _resolve(entry, params, defense, norm, eps)
    out: dict[str, Any] = {"library": library, "name": name}
    if norm is not None:
        out["norm"] = norm
    if eps is not None:
        out["eps"] = float(eps)
    out.update(resolved)
    return out


def _resolve(
    entry: AttackEntry,
    params: Mapping[str, Any],
    defense: Defense | None,
    norm: str | None,
    eps: float | None,
) -> dict[str, Any]:
    unknown = sorted(set(params) - set(entry.defaults))
    if unknown:
        raise ConfigError(
            f"attack {entry.key} has no parameter(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(entry.defaults)) or '(none)'}"
        )
    resolved = {**entry.defaults, **params}
    if "draws" in resolved:
        resolved["draws"] = check_int(resolved["draws"], "draws", minimum=1, where=entry.key)
        if defense is not None and not defense_is_randomized(defense):
            resolved["draws"] = 1
    if entry.resolve is not None:
        entry.resolve(resolved, defense, norm, eps)
    return resolved


# --------------------------------------------------------------------------- parameters
def resolve_step_size(
    params: dict[str, Any], eps: float | None, *, key: str, steps_field: str = "steps"
) -> None:
    """Fill ``params["step_size"]`` (None → 2.5 · eps / steps, Madry et al.'s rule)."""
    steps = check_int(params[steps_field], steps_field, minimum=1, where=key)
    params[steps_field] = steps
    if params.get("step_size") is None:
        if eps is not None:
            params["step_size"] = 2.5 * float(eps) / steps
    else:
        params["step_size"] = check_number(
            params["step_size"], "step_size", low=0.0, low_open=True, where=key
        )


#: Parameters shared by every PGD adapter (certbench, torchattacks, ART).
PGD_DEFAULTS: dict[str, Any] = {
    "steps": 40,
    "step_size": None,
    "random_start": True,
    "draws": DEFAULT_DRAWS,
}


def pgd_resolver(key: str):
    """The ``resolve`` hook of a PGD adapter registered as ``key`` (e.g. ``"art:pgd"``):
    step size from eps and steps when not given, ``random_start`` as a bool."""

    def resolve(params: dict[str, Any], defense: Any, norm: Any, eps: float | None) -> None:
        resolve_step_size(params, eps, key=key)
        params["random_start"] = bool(params["random_start"])

    return resolve


def defense_is_randomized(defense: Defense) -> bool:
    """True if the defense declares itself randomized or its network has a noise layer."""
    model = getattr(defense, "model_", None)
    return bool(defense.randomized) or (model is not None and is_randomized(model))


# --------------------------------------------------------------------------- state helpers
@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's (CPU and ``device``'s) and numpy's global RNGs, restoring them afterwards.

    Libraries draw random starts from these global generators (torchattacks and the noise
    layers from torch's, ART from numpy's), so one seed fixes an attack run.
    """
    devices = [device] if device.type == "cuda" else []
    np_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            yield
    finally:
        np.random.set_state(np_state)


@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (noise layers stay on) and parameters frozen while an attack runs; restores
    both afterwards. Frozen parameters keep libraries that call ``backward()`` from
    accumulating ``.grad`` on the defended network."""
    was_training = model.training
    with frozen_parameters(model):
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)


def _check_inputs(x: Tensor, y: Tensor, norm: str, eps: float) -> None:
    check_choice(norm, "norm", NORMS)
    check_number(eps, "eps", low=0.0, where="attack")
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise DataError(
            f"attack input x must be a float tensor (N, C, H, W), got "
            f"{getattr(x, 'shape', type(x))}"
        )
    if not isinstance(y, Tensor) or y.shape != (x.shape[0],):
        raise DataError(
            f"attack labels y must have shape ({x.shape[0]},), got {getattr(y, 'shape', type(y))}"
        )
    if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise DataError(
            f"attack input x must have pixels in [0, 1]; got range "
            f"[{float(x.min()):.4g}, {float(x.max()):.4g}]"
        )


# --------------------------------------------------------------------------- entry points
def attack(
    defense: Defense,
    x: Tensor,
    y: Tensor,
    *,
    norm: str,
    eps: float,
    library: str = "certbench",
    name: str = "pgd",
    seed: int = 0,
    batch_size: int | None = None,
    **params: Any,
) -> Tensor:
    """Adversarial examples for ``defense`` within the ``norm`` ball of radius ``eps``.

    Args:
        defense: a set-up :class:`Defense` (``defense.model_`` exists).
        x: ``(N, C, H, W)`` float, pixels in [0, 1], on the defense's device.
        y: ``(N,)`` int64 true labels.
        norm: ``"linf"``, ``"l2"`` or ``"l1"`` (each attack lists the ones it supports).
        eps: perturbation budget in pixel units of ``norm``.
        library, name: which registered attack (:func:`list_attacks`); the default is
            certbench's own expectation-over-noise PGD.
        seed: fixes the attack's randomness (random starts, the attack's noise draws); the
            global RNG states are restored afterwards.
        batch_size: attack this many rows at a time (default: all at once).
        **params: attack parameters (:func:`describe_attack` lists them with defaults).

    Returns:
        ``x_adv``, like ``x``, with ``||x_adv - x||_norm <= eps`` and pixels in [0, 1] per row
        (enforced by :func:`project` on every adapter's output; non-finite pixels an adapter
        returns are reset to the clean value first). The defended network's
        train/eval mode and ``requires_grad`` flags are restored.
    """
    entry = get_attack(library, name)
    _check_inputs(x, y, norm, eps)
    if norm not in entry.norms:
        raise ConfigError(
            f"attack {entry.key} supports norm(s) {', '.join(entry.norms)}, not {norm!r}"
        )
    resolved = _resolve(entry, params, defense, norm, eps)
    x = x.detach()
    if eps == 0 or x.shape[0] == 0:
        return x.clone()
    bs = (
        x.shape[0]
        if batch_size is None
        else check_int(batch_size, "batch_size", minimum=1, where="attack")
    )
    y = y.to(x.device)
    outs = []
    with seeded(int(seed), x.device), attack_mode(defense.model_):
        for start in range(0, x.shape[0], bs):
            xb, yb = x[start : start + bs], y[start : start + bs]
            adv = entry.fn(defense, xb, yb, norm=norm, eps=float(eps), seed=int(seed), **resolved)
            if adv.shape != xb.shape:
                raise ConfigError(
                    f"attack {entry.key} returned shape {tuple(adv.shape)} for "
                    f"input {tuple(xb.shape)}"
                )
            adv = adv.detach().to(device=xb.device, dtype=xb.dtype)
            adv = torch.where(torch.isfinite(adv), adv, xb)  # a diverged pixel stays clean
            outs.append(project(xb, adv, norm=norm, eps=float(eps)))
    return torch.cat(outs)


@torch.no_grad()
def rescore(
    defense: Defense,
    x_adv: Tensor,
    y: Tensor | None = None,
    *,
    norm: str,
    seed: int = 0,
    indices: Tensor | None = None,
    batch_size: int | None = None,
    certify: bool = True,
    radii: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Judge adversarial examples the way the defense judges clean inputs.

    Randomized defenses are judged with their own Monte Carlo :meth:`Defense.predict` /
    :meth:`Defense.certify` (many draws), seeded with ``seed + RESCORE_SEED_OFFSET`` so the
    draws are fresh: independent of the clean evaluation (which uses ``seed``) and of the
    attack's own draws. Deterministic defenses use :meth:`Defense.predict` (the argmax of one
    forward pass unless the defense overrides it).

    Args:
        defense: the attacked defense.
        x_adv: ``(N, C, H, W)`` attacked inputs, pixels in [0, 1].
        y: ``(N,)`` true labels; only checked for shape (kept so calls read like attacks).
        norm: the threat-model norm whose certificate is wanted.
        seed, indices, batch_size: as for the defense's predict/certify (``indices`` are the
            global example indices that fix per-example noise).
        certify: when ``norm`` is in ``defense.certifies``, judge with :meth:`Defense.certify`
            and return the certified radius on the attacked input (for robust precision under
            attack); its labels are the prediction.
        radii: the radii (thresholds) the caller will score the certified radius at, passed
            to :meth:`Defense.certify` (a defense that tests per radius may use them).

    Returns:
        ``(pred_adv, radius_adv)``: ``(N,)`` int64 predictions (``-1`` = abstain, counts as
        wrong) and ``(N,)`` float64 certified radii in pixel units of ``norm``, or ``None``
        when the defense does not certify ``norm`` or ``certify`` is False.
    """
    check_choice(norm, "norm", NORMS)
    if y is not None and y.shape != (x_adv.shape[0],):
        raise DataError(f"rescore labels must have shape ({x_adv.shape[0]},), got {tuple(y.shape)}")
    x_adv = x_adv.detach()
    s = int(seed) + RESCORE_SEED_OFFSET if defense_is_randomized(defense) else int(seed)
    if certify and norm in defense.certifies:
        cert = defense.certify(
            x_adv, norm=norm, seed=s, indices=indices, batch_size=batch_size, radii=radii
        )
        labels = cert.labels.to(torch.int64)
        return labels, cert.radius(norm).to(device=labels.device, dtype=torch.float64)
    labels = defense.predict(x_adv, seed=s, indices=indices, batch_size=batch_size)
    return labels.to(torch.int64), None
