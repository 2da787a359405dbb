"""Checkpoints: safetensors tensors plus a JSON record; loading never unpickles.

A certbench checkpoint is a pair ``NAME.safetensors`` + ``NAME.json``. The JSON record holds
the defense name and hyper-parameters, the model name, input shape, class count and
provenance, so ``load_defense`` rebuilds the defended network without any other input.

A plain PyTorch state dict (``.pth`` / ``.pt``, e.g. the authors' released weights) is accepted
for the *base model* only through ``torch.load(weights_only=True)``, which refuses arbitrary
pickled objects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench.errors import CheckpointError
from bench.files import atomic_write_bytes

FORMAT_VERSION = 1


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """``(tensors, record)`` paths for a checkpoint named ``path`` (suffix optional)."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_suffix(".safetensors"), p.with_suffix(".json")


def save_checkpoint(path: str | Path, state: dict[str, Tensor], record: dict[str, Any]) -> Path:
    """Write ``state`` (tensors) and ``record`` (JSON-serialisable) atomically; tensors first.

    The JSON record is written last, so a checkpoint whose record exists is complete.
    """
    from safetensors.torch import save

    tensors_path, record_path = checkpoint_paths(path)
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    # Drop an old record first: a kill between the two writes then leaves no record (an
    # incomplete checkpoint that nothing loads), never an old record beside new tensors.
    record_path.unlink(missing_ok=True)
    atomic_write_bytes(tensors_path, save(contiguous))
    full = {"format": "certbench-checkpoint", "format_version": FORMAT_VERSION, **record}
    atomic_write_bytes(record_path, json.dumps(full, indent=2, sort_keys=True).encode())
    return tensors_path


def read_record(path: str | Path) -> dict[str, Any]:
    """The JSON record of a certbench checkpoint."""
    _, record_path = checkpoint_paths(path)
    if not record_path.is_file():
        raise CheckpointError(f"{record_path}: checkpoint record not found")
    try:
        record = json.loads(record_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{record_path}: not a valid JSON checkpoint record ({exc})") from exc
    if not isinstance(record, dict) or record.get("format") != "certbench-checkpoint":
        raise CheckpointError(f"{record_path}: not a certbench checkpoint record")
    return record


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Tensors of a checkpoint: ``.safetensors`` (certbench) or a plain state-dict ``.pth``.

    ``.pth``/``.pt`` files are read with ``torch.load(weights_only=True)``: a file that would
    need arbitrary unpickling (e.g. code execution through ``__reduce__``) is refused.
    """
    p = Path(path)
    if p.suffix not in (".pth", ".pt", ".safetensors"):
        p = checkpoint_paths(p)[0]
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint file not found")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device=str(device))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{p}: not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(p, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{p}: refused or unreadable PyTorch file (only plain state dicts are loaded, "
            f"with weights_only=True): {msg}"
        ) from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{p}: expected a state dict of tensors, got {type(obj).__name__}")
    return dict(obj)


def check_state(own: dict[str, Tensor], state: dict[str, Tensor], *, source: str) -> None:
    """Raise :class:`CheckpointError` naming ``source`` unless ``state`` matches ``own``
    key for key and shape for shape, with finite floating-point values."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        raise CheckpointError(f"{source}: does not match the architecture ({'; '.join(parts)})")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise CheckpointError(
                f"{source}: tensor {k!r} has shape {tuple(v.shape)}, "
                f"the architecture expects {tuple(own[k].shape)}"
            )
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{source}: tensor {k!r} contains NaN or inf")


def load_into(module: nn.Module, state: dict[str, Tensor], *, source: str) -> None:
    """``module.load_state_dict(state)`` with a one-line error naming ``source`` on mismatch."""
    check_state(module.state_dict(), state, source=source)
    module.load_state_dict(state, strict=True)
