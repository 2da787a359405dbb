"""The runner: the one training loop and the one evaluation loop that every defense goes through.

Defenses supply only what differs (``training_loss``, ``after_step``, ``certify``...); the
runner owns epochs, batches, seeding, progress bars, checkpoints and the attack stage.
Everything is device-agnostic: tensors follow ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

import bench
from bench.checkpoint import check_state, load_into, load_tensors, read_record, save_checkpoint
from bench.errors import CheckpointError, ConfigError, NumericalError
from bench.interrupts import deferred
from bench.models import create_model
from bench.registry import create_defense
from defenses.base import Certificate, Defense, TrainProgress

# --------------------------------------------------------------------------- environment


def resolve_device(device: str | None) -> torch.device:
    """``"auto"``/``None`` → ``cuda`` when available, else ``cpu``; otherwise validated as given."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device!r} requested but CUDA is not available here")
    return dev


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op threads (default: the CPUs available to this process).

    On small CPU boxes torch's intra-op pool and several worker processes fight; parallel
    executors call this with 1 per worker.
    """
    if num_threads is None:
        env = os.environ.get("CERTBENCH_NUM_THREADS")
        if env:
            num_threads = int(env)
        else:
            try:
                num_threads = len(os.sched_getaffinity(0))
            except AttributeError:  # pragma: no cover - non-Linux
                num_threads = os.cpu_count() or 1
    num_threads = max(1, int(num_threads))
    if torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
    return num_threads


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@lru_cache(maxsize=1)
def git_commit() -> str:
    """The git commit of the certbench source tree, or ``""`` when not in a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def provenance() -> dict[str, str]:
    """Versions and time stamp recorded with every result."""
    return {
        "certbench_version": bench.__version__,
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- building


def build_defense(
    defense: str,
    params: dict[str, Any] | None,
    model: str,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    device: torch.device | str = "cpu",
    model_kwargs: dict[str, Any] | None = None,
    base_state: dict[str, Tensor] | None = None,
    base_source: str = "",
) -> Defense:
    """Create ``model``, optionally load base weights, attach ``defense``, move to ``device``."""
    net = create_model(
        model, input_shape=input_shape, num_classes=num_classes, **(model_kwargs or {})
    )
    if base_state is not None:
        load_into(net, base_state, source=base_source or "checkpoint")
    d = create_defense(defense, **(params or {}))
    d.setup(net, input_shape=input_shape, num_classes=num_classes)
    d.model_.to(device)
    return d


def checkpoint_record(
    d: Defense, *, model: str, dataset: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON record saved next to a defense's tensors."""
    return {
        "defense": d.name,
        "params": d.get_params(),
        "model": model,
        "dataset": dataset,
        "input_shape": list(d.input_shape_),
        "num_classes": d.num_classes_,
        **provenance(),
        **(extra or {}),
    }


def load_defense_state(d: Defense, state: dict[str, Tensor], *, source: str) -> None:
    """Load checkpoint tensors into a set-up defense, with one-line errors on mismatch."""
    check_state(d.state_dict(), state, source=source)
    try:
        d.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: does not match the architecture ({exc})") from exc


def save_defense(path: str | Path, d: Defense, *, model: str, dataset: str, **extra: Any) -> Path:
    """Checkpoint a set-up defense as safetensors + JSON record."""
    return save_checkpoint(
        path, d.state_dict(), checkpoint_record(d, model=model, dataset=dataset, extra=extra)
    )


def load_defense(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    defense: str | None = None,
    params: dict[str, Any] | None = None,
    model: str | None = None,
) -> tuple[Defense, dict[str, Any]]:
    """Rebuild a defense from a checkpoint.

    * a certbench checkpoint (``.safetensors`` + ``.json``): everything comes from the record
      (``defense``/``params``/``model`` given here must agree with it);
    * a plain state dict (``.pth``/``.pt``): weights of the *base* model ``model``; the
      defense (default ``undefended``) is attached afterwards; ``input_shape`` and
      ``num_classes`` must be given (from the dataset).
    """
    p = Path(path)
    if p.suffix in (".pth", ".pt"):
        if model is None or input_shape is None or num_classes is None:
            raise ConfigError(f"{p}: a plain state dict needs --model and a dataset")
        state = load_tensors(p, device="cpu")
        d = build_defense(
            defense or "undefended",
            params,
            model,
            input_shape=input_shape,
            num_classes=num_classes,
            device=device,
            base_state=state,
            base_source=str(p),
        )
        return d, {"defense": d.name, "params": d.get_params(), "model": model}
    record = read_record(p)
    for key, given in (("defense", defense), ("model", model)):
        if given is not None and record.get(key) != given:
            raise CheckpointError(
                f"{p}: checkpoint was saved for {key} {record.get(key)!r}, not {given!r}"
            )
    try:
        shape = tuple(int(s) for s in record["input_shape"])
        k = int(record["num_classes"])
        rec_params = dict(record["params"])
        rec_defense, rec_model = str(record["defense"]), str(record["model"])
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise CheckpointError(
            f"{p}: checkpoint record is missing or has a bad field ({exc})"
        ) from exc
    if len(shape) != 3 or not all(1 <= s <= 65536 for s in shape) or not 1 <= k <= 1_000_000:
        raise CheckpointError(
            f"{p}: checkpoint record has an invalid input_shape {shape} or num_classes {k} "
            "(expected (C, H, W) with positive sides and a positive class count)"
        )
    if num_classes is not None and int(num_classes) != k:
        raise CheckpointError(f"{p}: saved for {k} classes, the dataset has {num_classes}")
    if input_shape is not None and tuple(input_shape) != shape:
        raise CheckpointError(
            f"{p}: saved for inputs {shape}, the dataset has {tuple(input_shape)}"
        )
    if params:
        rec_params.update(params)
    d = build_defense(rec_defense, rec_params, rec_model, input_shape=shape, num_classes=k)
    load_defense_state(d, load_tensors(p, device="cpu"), source=str(p))
    d.model_.to(device)
    return d, record


# --------------------------------------------------------------------------- training


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


# --------------------------------------------------------------------------- evaluation


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def predict_all(
    d: Defense,
    x: Tensor,
    *,
    seed: int = 0,
    batch_size: int = 256,
    eval_batch_size: int | None = None,
    progress: bool = False,
    offset: int = 0,
) -> Tensor:
    """Predictions ``(N,)`` for every row of ``x``, in chunks; indices are global (offset+i)."""
    device = d.device
    out = []
    for a, b in tqdm(
        list(_batches(x.shape[0], batch_size)), desc="predict", disable=not progress, leave=False
    ):
        idx = torch.arange(offset + a, offset + b)
        with torch.no_grad():
            out.append(
                d.predict(
                    x[a:b].to(device), seed=seed, indices=idx, batch_size=eval_batch_size
                ).cpu()
            )
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def certify_all(
    d: Defense,
    x: Tensor,
    *,
    norm: str,
    seed: int = 0,
    batch_size: int = 256,
    eval_batch_size: int | None = None,
    progress: bool = False,
    offset: int = 0,
) -> Certificate:
    """Certificates for every row of ``x`` (chunked; per-example seeding by global index)."""
    device = d.device
    labels, radii, bound = [], [], ""
    extra: dict[str, list[Tensor]] = {}
    chunks = list(_batches(x.shape[0], batch_size))
    for a, b in tqdm(
        chunks, desc=f"certify {d.name}", disable=not progress, leave=False, unit="chunk"
    ):
        idx = torch.arange(offset + a, offset + b)
        cert = d.certify(
            x[a:b].to(device), norm=norm, seed=seed, indices=idx, batch_size=eval_batch_size
        )
        labels.append(cert.labels.cpu())
        radii.append(cert.radius(norm).cpu().to(torch.float64))
        bound = cert.bound
        for k, v in cert.extra.items():
            extra.setdefault(k, []).append(v.cpu())
    return Certificate(
        labels=torch.cat(labels),
        radii={norm: torch.cat(radii)},
        bound=bound,
        extra={k: torch.cat(v) for k, v in extra.items()},
    )


def accuracy_of(pred: Tensor, y: Tensor) -> float:
    """Fraction of ``pred == y`` (abstentions, ``-1``, count as wrong)."""
    return float((pred.cpu() == y.cpu()).double().mean()) if y.numel() else float("nan")
