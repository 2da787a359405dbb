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
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.registry import register_defense
from bench.threat import (
    PGD_NORMS,
    frozen_parameters,
    per_example,
    project_delta,
    projected_gradient_ascent,
    random_delta,
)
from bench.validation import check_bool, check_choice, check_int, check_number
from defenses.base import Citation, Defense, TrainProgress

__all__ = ["PGD_NORMS", "Madry", "frozen_parameters", "pgd", "reference_setting"]

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
    check_choice(norm, "norm", PGD_NORMS)
    eps, steps, step = _REFERENCE.get(tuple(input_shape), _GENERIC)[norm]
    return eps, steps, (2.5 * eps / steps if step is None else step)


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

    The loop is :func:`bench.threat.projected_gradient_ascent`; this function supplies the
    loss (the summed cross-entropy of ``model_fn``, so each example's gradient is its own) and
    the random start.

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
        ``‖x_adv − x‖ ≤ eps`` per example (up to float rounding, ~1 ulp: training examples
        only feed a loss, so the exact-budget correction attacks apply is skipped). Every
        iterate is first projected onto the ε-ball and then clipped to [0, 1]; for ``x`` in
        [0, 1] clipping only moves coordinates towards ``x``, so it never leaves the ball.

    Raises:
        ValueError: unknown ``norm``, negative or non-finite ``eps``/``step_size``, negative
        ``steps``, a per-example tensor of the wrong length, or ``x`` outside [0, 1].
    """
    check_choice(norm, "norm", PGD_NORMS, where="pgd")
    check_int(steps, "steps", minimum=0, where="pgd")
    x = x.detach()
    eps_t = per_example(eps, "eps", x, where="pgd")
    step_t = per_example(step_size, "step_size", x, where="pgd")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(
            f"pgd: inputs must lie in [0, 1], got range [{float(x.min()):.4g}, "
            f"{float(x.max()):.4g}]"
        )
    y = y.detach()
    start = None
    if random_start:  # a draw can round an ulp outside the ball: project it onto the ball
        delta = project_delta(random_delta(x, eps_t, norm, generator), eps_t, norm)
        start = (x + delta).clamp_(0.0, 1.0)

    def loss_grad(x_adv: Tensor) -> Tensor:
        x_adv = x_adv.detach().requires_grad_(True)
        loss = F.cross_entropy(model_fn(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        return grad

    with contextlib.ExitStack() as stack:
        if isinstance(model_fn, nn.Module):
            stack.enter_context(frozen_parameters(model_fn))
        stack.enter_context(torch.enable_grad())
        x_adv = projected_gradient_ascent(
            loss_grad,
            x,
            norm=norm,
            eps=eps_t,
            steps=steps,
            step_size=step_t,
            start=start,
            exact_budget=False,
        )
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

    citation = Citation(
        title="Towards Deep Learning Models Resistant to Adversarial Attacks",
        authors=(
            "Aleksander Madry",
            "Aleksandar Makelov",
            "Ludwig Schmidt",
            "Dimitris Tsipras",
            "Adrian Vladu",
        ),
        venue="International Conference on Learning Representations (ICLR)",
        year=2018,
        url="https://arxiv.org/abs/1706.06083",
    )

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
        check_choice(norm, "norm", PGD_NORMS, where="madry")
        if eps is not None:
            check_number(eps, "eps", low=0.0, where="madry", what="a finite number >= 0 or None")
        if steps is not None:
            check_int(steps, "steps", minimum=1, where="madry")
        if step_size is not None:
            check_number(
                step_size,
                "step_size",
                low=0.0,
                low_open=True,
                where="madry",
                what="a finite number > 0 or None",
            )
        check_bool(random_start, "random_start", where="madry")
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
