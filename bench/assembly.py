"""Assembling a defense: model + defense + weights, and its checkpoints.

A certbench checkpoint is safetensors plus a JSON record (:mod:`bench.checkpoint`). A base
model's own weights (what a user brings: :func:`load_weights`) are a plain state dict
(``.pth``/``.pt``, loaded with ``weights_only=True``) or a ``.safetensors`` file without a
record. Nothing is ever unpickled from an untrusted file.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench.checkpoint import check_state, load_into, load_tensors, read_record, save_checkpoint
from bench.environment import provenance
from bench.errors import CheckpointError, ConfigError
from bench.models import create_model
from bench.registry import create_defense
from bench.weights import WEIGHT_SUFFIXES, sha256_file
from defenses.base import Defense


def load_weights(path: str | Path, *, sha256: str | None = None) -> dict[str, Tensor]:
    """A base model's state dict from ``path`` (``.safetensors``, or ``.pth``/``.pt`` read with
    ``weights_only=True``), on the CPU.

    ``sha256``: the hash the file must have (a pretrained cell's ``weights_sha256``); a file
    changed since the spec was read raises :class:`CheckpointError` instead of being scored
    under the old file's identity.
    """
    p = Path(path)
    if p.suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(
            f"{p}: weights must be a .safetensors file or a PyTorch state dict (.pth/.pt)"
        )
    if sha256 is not None and p.is_file() and sha256_file(p) != sha256:
        raise CheckpointError(
            f"{p}: the file changed since the spec was read (its SHA-256 is no longer "
            f"{sha256[:16]}...); run again to score the new weights"
        )
    return load_tensors(p, device="cpu")


def build_defense(
    defense: str,
    params: dict[str, Any] | None,
    model: str | nn.Module,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    device: torch.device | str = "cpu",
    model_kwargs: dict[str, Any] | None = None,
    base_state: dict[str, Tensor] | None = None,
    base_source: str = "",
) -> Defense:
    """Create ``model``, optionally load base weights, attach ``defense``, move to ``device``.

    ``model``: a model name (registered, or an import path: :mod:`bench.models`), or a module
    of the caller's, which is copied (the defense and the device move never touch the
    caller's module).
    """
    if isinstance(model, nn.Module):
        net = copy.deepcopy(model)
    else:
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
    * a base model's weights (``.pth``/``.pt`` state dict, or a ``.safetensors`` file with no
      ``.json`` record beside it): weights of the *base* model ``model`` (a registered name
      or an import path); the defense (default ``undefended``) is attached afterwards;
      ``input_shape`` and ``num_classes`` must be given (from the dataset).
    """
    p = Path(path)
    plain = p.suffix in (".pth", ".pt") or (
        p.suffix == ".safetensors" and not p.with_suffix(".json").is_file()
    )
    if plain:
        if model is None or input_shape is None or num_classes is None:
            raise ConfigError(f"{p}: a model's own weights need --model and a dataset")
        state = load_weights(p)
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
