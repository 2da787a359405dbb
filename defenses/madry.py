"""Madry et al. (ICLR 2018) adversarial training: minimise the PGD-maximised cross-entropy.

Training solves ``min_θ E max_{‖δ‖ ≤ ε} CE(f(x + δ), y)``; the inner maximisation is projected
gradient ascent (:func:`pgd`) with a random start, restricted to the ε-ball around ``x`` and to
the pixel box ``[0, 1]``. The defense certifies nothing (its :meth:`certify` returns radius 0);
its robustness is measured by attacks.

Reference settings (REFERENCE.md §4), chosen in :meth:`Madry.setup` from the input shape when a
hyper-parameter is ``None``:

============  ====  ==========  =====  ===========  ==============================================
input shape   norm  eps         steps  step size    optimiser (``train_defaults``)
============  ====  ==========  =====  ===========  ==============================================
1×28×28       linf  0.3         40     0.01         Adam lr 1e-4, batch 50 (MNIST/Fashion-MNIST)
3×32×32       linf  8/255       7      2/255        SGD lr 0.1, momentum 0.9, wd 2e-4, batch 128
other         linf  0.1         10     2.5·eps/10   (none; e.g. scikit-learn's 8×8 digits)
1×28×28       l2    1.5         40     2.5·eps/40   Adam lr 1e-4, batch 50
3×32×32       l2    0.5         7      2.5·eps/7    SGD as above
other         l2    0.5         10     2.5·eps/10   (none)
============  ====  ==========  =====  ===========  ==============================================

The ℓ∞ rows for MNIST and CIFAR-10 are Madry et al.'s. The ℓ2 radii are the ones the
literature's ℓ2 leaderboards use (RobustBench: 0.5 on CIFAR-10; 1.5 is the usual MNIST ℓ2
radius). For other shapes (digits: pixels are sixteenths, so 0.1 ≈ 1.6 grey levels) the radii
are a scaled setting, not a published one. When a step size is not given it is the reference
step if ``eps`` and ``steps`` are the reference values too, else ``2.5 · eps / steps`` — the
rule of thumb of Madry et al., long enough to cross the ball from any starting point.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.registry import register_defense
from defenses.base import Defense, TrainProgress

PGD_NORMS = ("linf", "l2")

# (C, H, W) -> norm -> (eps, steps, step_size); step_size None = 2.5 * eps / steps.
_REFERENCE: dict[tuple[int, ...], dict[str, tuple[float, int, float | None]]] = {
    (1, 28, 28): {"linf": (0.3, 40, 0.01), "l2": (1.5, 40, None)},
    (3, 32, 32): {"linf": (8 / 255, 7, 2 / 255), "l2": (0.5, 7, None)},
}
_GENERIC: dict[str, tuple[float, int, float | None]] = {
    "linf": (0.1, 10, None),
    "l2": (0.5, 10, None),
}
_TRAIN_DEFAULTS: dict[tuple[int, ...], dict[str, Any]] = {
    (1, 28, 28): {"optimizer": "adam", "lr": 1e-4, "batch_size": 50},
    (3, 32, 32): {
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 2e-4,
        "batch_size": 128,
    },
}


def reference_setting(input_shape: tuple[int, ...], norm: str) -> tuple[float, int, float]:
    """The reference ``(eps, steps, step_size)`` for inputs of ``input_shape`` = (C, H, W)."""
    if norm not in PGD_NORMS:
        raise ValueError(f"norm must be one of {', '.join(PGD_NORMS)}, got {norm!r}")
    eps, steps, step = _REFERENCE.get(tuple(input_shape), _GENERIC)[norm]
    return eps, steps, (2.5 * eps / steps if step is None else step)


def _per_example_l2(t: Tensor) -> Tensor:
    """ℓ2 norm of each example of ``t`` (N, ...), shaped (N, 1, ..., 1) for broadcasting."""
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


def _per_example(value: float | Tensor, name: str, x: Tensor) -> Tensor:
    """``value`` (a scalar or an ``(N,)`` tensor, >= 0, finite) shaped ``(N, 1, ..., 1)``."""
    t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != x.shape[0]):
        raise ValueError(
            f"pgd: {name} must be a number or a tensor of shape ({x.shape[0]},), "
            f"got shape {tuple(t.shape)}"
        )
    if t.numel() and not (torch.isfinite(t).all() and (t >= 0).all()):
        raise ValueError(f"pgd: {name} must be finite and >= 0, got {value!r}")
    shape = (-1,) + (1,) * (x.dim() - 1)
    return t.reshape(shape) if t.dim() == 1 else t.expand(x.shape[0]).reshape(shape)


def _project(delta: Tensor, eps: Tensor, norm: str) -> Tensor:
    """Euclidean projection of each example of ``delta`` onto its ``norm`` ball of radius eps.

    ``eps`` is shaped ``(N, 1, ..., 1)``.
    """
    if norm == "linf":
        return torch.minimum(torch.maximum(delta, -eps), eps)
    nrm = _per_example_l2(delta)
    factor = torch.where(nrm > eps, eps / nrm.clamp_min(1e-30), torch.ones_like(nrm))
    return delta * factor


def _random_start(x: Tensor, eps: Tensor, norm: str, generator: torch.Generator | None) -> Tensor:
    """A point drawn uniformly from the ``norm`` ball of radius eps around each example."""
    if norm == "linf":
        u = torch.rand(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        return (2.0 * u - 1.0) * eps
    # Uniform in the ℓ2 ball: uniform direction times radius eps · U^(1/d).
    d = x[0].numel() if x.shape[0] else 1
    g = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
    direction = g / _per_example_l2(g).clamp_min(1e-30)
    u = torch.rand(eps.shape, dtype=x.dtype, device=x.device, generator=generator)
    return direction * (eps * u.pow(1.0 / d))


@contextlib.contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` of every parameter of ``module``; restore each flag on exit."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def pgd(
    model_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor,
    norm: str = "linf",
    steps: int,
    step_size: float | Tensor,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Untargeted projected gradient ascent on the cross-entropy (Madry et al. 2018).

    Args:
        model_fn: maps ``(N, C, H, W)`` inputs to ``(N, K)`` logits (or log-probabilities,
            e.g. the log of a softmax averaged over noise draws for an expectation-over-noise
            attack); called as is, its train/eval mode is left alone. If it is an
            ``nn.Module`` its parameters are frozen during the attack and their
            ``requires_grad`` flags restored afterwards; parameter ``.grad`` fields are never
            touched (gradients are taken w.r.t. the input only). Works inside
            ``torch.no_grad()``.
        x: clean inputs ``(N, C, H, W)`` (any shape with a leading batch dim), pixels in [0, 1].
        y: labels ``(N,)`` int64 whose cross-entropy is maximised.
        eps: radius of the threat model in pixel units, ``>= 0``: a number, or an ``(N,)``
            tensor of per-example radii (e.g. each example's certified radius).
        norm: ``"linf"`` (steps ``step_size · sign(∇)``) or ``"l2"`` (steps
            ``step_size · ∇/‖∇‖₂`` per example; a zero gradient gives no step).
        steps: number of ascent steps, ``>= 0``.
        step_size: length of each step in ``norm``, ``>= 0``; a number or ``(N,)`` tensor.
        random_start: start at a point uniform in the ε-ball (then clipped to [0, 1]) instead
            of at ``x``.
        generator: torch generator for the random start (on ``x``'s device); ``None`` uses
            torch's global RNG.

    Returns:
        ``x_adv``, detached, same shape/dtype/device as ``x``, with ``x_adv ∈ [0, 1]`` and
        ``‖x_adv − x‖ ≤ eps`` per example (up to float rounding, ~1 ulp). Every iterate is
        first projected onto the ε-ball and then clipped to [0, 1]; for ``x`` in [0, 1]
        clipping only moves coordinates towards ``x``, so it never leaves the ball.

    Raises:
        ValueError: unknown ``norm``, negative or non-finite ``eps``/``step_size``, negative
        ``steps``, a per-example tensor of the wrong length, or ``x`` outside [0, 1].
    """
    if norm not in PGD_NORMS:
        raise ValueError(f"pgd: norm must be one of {', '.join(PGD_NORMS)}, got {norm!r}")
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise ValueError(f"pgd: steps must be an integer >= 0, got {steps!r}")
    x = x.detach()
    eps_t = _per_example(eps, "eps", x)
    step_t = _per_example(step_size, "step_size", x)
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(
            f"pgd: inputs must lie in [0, 1], got range [{float(x.min()):.4g}, "
            f"{float(x.max()):.4g}]"
        )
    y = y.detach()
    delta = _random_start(x, eps_t, norm, generator) if random_start else torch.zeros_like(x)
    x_adv = (x + _project(delta, eps_t, norm)).clamp_(0.0, 1.0)

    with contextlib.ExitStack() as stack:
        if isinstance(model_fn, nn.Module):
            stack.enter_context(frozen_parameters(model_fn))
        stack.enter_context(torch.enable_grad())
        for _ in range(int(steps)):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model_fn(x_adv), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach()
            if norm == "linf":
                step = grad.sign()
            else:
                gn = _per_example_l2(grad)
                step = torch.where(gn > 0, grad / gn.clamp_min(1e-30), torch.zeros_like(grad))
            delta = _project(x_adv + step_t * step - x, eps_t, norm)
            x_adv = (x + delta).clamp_(0.0, 1.0)
    return x_adv.detach()


@register_defense("madry")
class Madry(Defense):
    """PGD adversarial training (Madry et al., ICLR 2018); certifies nothing.

    Args:
        eps: training radius in pixel units; ``None`` = the reference for the input shape.
        norm: ``"linf"`` or ``"l2"`` threat model of the inner maximisation.
        steps: PGD steps per training batch; ``None`` = reference.
        step_size: PGD step length; ``None`` = reference (see the module docstring).
        random_start: start PGD at a uniform point of the ε-ball (Madry et al. do).

    After :meth:`setup`, ``resolved_params_`` holds the values actually used
    (``eps``, ``norm``, ``steps``, ``step_size``, ``random_start``); the parameters themselves
    stay as passed, so ``get_params()`` is the run record.
    """

    randomized = False
    certifies = ()
    norms = PGD_NORMS
    param_help: ClassVar[dict[str, str]] = {
        "eps": "training radius in pixel units (None: 0.3 MNIST, 8/255 CIFAR, 0.1 otherwise "
        "for linf; 1.5 / 0.5 / 0.5 for l2)",
        "norm": "threat model of the inner maximisation: linf or l2",
        "steps": "PGD steps per batch (None: 40 MNIST, 7 CIFAR, 10 otherwise)",
        "step_size": "PGD step (None: 0.01 MNIST, 2/255 CIFAR linf, else 2.5*eps/steps)",
        "random_start": "start PGD at a uniform random point of the eps-ball",
    }

    check_params: ClassVar[dict[str, Any]] = {"steps": 3}

    resolved_params_: dict[str, Any]

    def __init__(
        self,
        *,
        eps: float | None = None,
        norm: str = "linf",
        steps: int | None = None,
        step_size: float | None = None,
        random_start: bool = True,
    ) -> None:
        if norm not in PGD_NORMS:
            raise ValueError(f"norm must be one of {', '.join(PGD_NORMS)}, got {norm!r}")
        if eps is not None and not (
            isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 <= eps < math.inf
        ):
            raise ValueError(f"eps must be a finite number >= 0 or None, got {eps!r}")
        if steps is not None and (
            isinstance(steps, bool) or not isinstance(steps, int) or steps < 1
        ):
            raise ValueError(f"steps must be an integer >= 1 or None, got {steps!r}")
        if step_size is not None and not (
            isinstance(step_size, (int, float)) and 0 < step_size < math.inf
        ):
            raise ValueError(f"step_size must be a finite number > 0 or None, got {step_size!r}")
        if not isinstance(random_start, bool):
            raise ValueError(f"random_start must be true or false, got {random_start!r}")
        self.eps = eps
        self.norm = norm
        self.steps = steps
        self.step_size = step_size
        self.random_start = random_start

    def resolve_params(self, input_shape: tuple[int, ...]) -> dict[str, Any]:
        """The hyper-parameters, each ``None`` replaced by the reference for ``input_shape``."""
        ref_eps, ref_steps, ref_step = reference_setting(input_shape, self.norm)
        eps = ref_eps if self.eps is None else float(self.eps)
        steps = ref_steps if self.steps is None else int(self.steps)
        if self.step_size is not None:
            step_size = float(self.step_size)
        elif eps == ref_eps and steps == ref_steps:
            step_size = ref_step
        else:
            step_size = 2.5 * eps / steps
        return {
            "eps": eps,
            "norm": self.norm,
            "steps": steps,
            "step_size": step_size,
            "random_start": self.random_start,
        }

    def setup(self, model: nn.Module, *, input_shape: tuple[int, ...], num_classes: int) -> Madry:
        """Attach to ``model`` and resolve the reference setting for ``input_shape``."""
        super().setup(model, input_shape=input_shape, num_classes=num_classes)
        self.resolved_params_ = self.resolve_params(self.input_shape_)
        return self

    def adversarial_examples(
        self, x: Tensor, y: Tensor, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """PGD examples ``(N, C, H, W)`` in [0, 1] at the resolved training setting."""
        p = self.resolved_params_
        return pgd(
            self.model_,
            x,
            y,
            eps=p["eps"],
            norm=p["norm"],
            steps=p["steps"],
            step_size=p["step_size"],
            random_start=p["random_start"],
            generator=generator,
        )

    def training_loss(self, x: Tensor, y: Tensor, progress: TrainProgress) -> Tensor:
        """``CE(f(x_adv), y)``, ``x_adv`` from PGD; the model's mode stays as the runner set it.

        The attack takes gradients w.r.t. the input only (parameters frozen, flags restored),
        so only the returned loss puts gradients into the parameters.
        """
        x_adv = self.adversarial_examples(x, y)
        return F.cross_entropy(self.model_(x_adv), y)

    def train_defaults(self) -> dict[str, Any]:
        """Madry et al.'s optimiser for MNIST-shaped and CIFAR-shaped inputs; else nothing."""
        shape = getattr(self, "input_shape_", None)
        if shape is None:
            return {}
        return dict(_TRAIN_DEFAULTS.get(tuple(shape), {}))
