"""The training loop every defense goes through.

Defenses supply only what differs (``training_loss``, ``after_step``, ``train_defaults``);
this loop owns epochs, batches, shuffling, seeding, the optimiser and progress.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from bench.environment import seed_everything
from bench.errors import ConfigError, NumericalError
from bench.interrupts import deferred
from defenses.base import Defense, TrainProgress


@dataclass
class TrainSettings:
    """Optimiser and loop settings of the runner's training loop."""

    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainSettings:
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise ConfigError(f"unknown training setting(s) {unknown}; allowed: {sorted(allowed)}")
        s = cls(**values)
        if s.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"train.optimizer must be 'adam' or 'sgd', got {s.optimizer!r}")
        if s.epochs < 0 or s.batch_size < 1 or not s.lr > 0:
            raise ConfigError("train.epochs must be >= 0, batch_size >= 1 and lr > 0")
        return s

    @classmethod
    def for_defense(cls, d: Defense, overrides: dict[str, Any]) -> TrainSettings:
        """The defense's suggested defaults, overridden by every non-``None`` user setting."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls.from_dict({**d.train_defaults(), **given})


@dataclass
class TrainReport:
    steps: int = 0
    seconds: float = 0.0
    final_loss: float = float("nan")
    losses: list[float] = field(default_factory=list)


def _optimizer(params, s: TrainSettings) -> torch.optim.Optimizer:
    """SGD or Adam. The first optimiser of a process imports ``torch._dynamo`` (seconds);
    SIGINT/SIGTERM are held until that import is over (bench/interrupts.py)."""
    with deferred():
        if s.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay
            )
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)


def _check_finite_model(d: Defense, settings: TrainSettings, x: Tensor) -> None:
    """A last step can blow up after the last loss check: never keep a model whose weights
    or logits (on a few training inputs ``x``) are NaN/inf."""
    hint = f"lower the learning rate (train.lr={settings.lr})"
    for name, t in d.model_.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NumericalError(f"{d.name}: weight {name!r} became NaN/inf in training; {hint}")
    with torch.no_grad():
        logits = d.logits(x.to(d.device))
    if not torch.isfinite(logits).all():
        raise NumericalError(f"{d.name}: the trained model outputs NaN/inf logits; {hint}")


def train(
    d: Defense,
    x: Tensor,
    y: Tensor,
    settings: TrainSettings,
    *,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
    on_epoch_end: Callable[[int], None] | None = None,
) -> TrainReport:
    """Train ``d.model_`` on ``(x, y)`` (x: (N, C, H, W) in [0, 1]) with the defense's loss.

    Shuffling and every noise draw are seeded by ``seed``. A NaN/inf loss stops training
    with :class:`NumericalError` (the cell is not published).
    """
    device = d.device
    seed_everything(seed)
    shuffle_gen = torch.Generator().manual_seed(seed)
    model = d.model_
    opt = _optimizer([p for p in model.parameters() if p.requires_grad], settings)
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    report = TrainReport()
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="step")
    step = 0
    try:
        for epoch in range(settings.epochs):
            model.train()
            perm = torch.randperm(n, generator=shuffle_gen)
            running = 0.0
            for b in range(steps_per_epoch):
                idx = perm[b * settings.batch_size : (b + 1) * settings.batch_size]
                xb, yb = x[idx].to(device), y[idx].to(device)
                prog = TrainProgress(
                    step=step, total_steps=total, epoch=epoch, epochs=settings.epochs
                )
                loss = d.training_loss(xb, yb, prog)
                if not torch.isfinite(loss):
                    raise NumericalError(
                        f"{d.name}: training loss became {loss.item()} at epoch {epoch + 1}, "
                        f"step {step + 1}; lower the learning rate (train.lr={settings.lr})"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                try:
                    opt.step()
                except RuntimeError as exc:  # e.g. lr too large to represent
                    raise NumericalError(
                        f"{d.name}: optimiser step failed at epoch {epoch + 1}, step {step + 1} "
                        f"(train.lr={settings.lr}): {' '.join(str(exc).split())}"
                    ) from exc
                d.after_step(prog)
                step += 1
                running += float(loss.detach())
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{float(loss.detach()):.4f}", epoch=epoch + 1)
            report.losses.append(running / max(1, steps_per_epoch))
            if on_epoch_end is not None:
                on_epoch_end(epoch)
    finally:
        bar.close()
    model.eval()
    _check_finite_model(d, settings, x[: settings.batch_size])
    report.steps = step
    report.seconds = time.perf_counter() - t0
    report.final_loss = report.losses[-1] if report.losses else float("nan")
    return report
