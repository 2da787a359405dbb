"""Weight files a user brings: which formats are read, where a relative path is found, and
the SHA-256 that identifies them.

A model's weights come from a ``.safetensors`` file or a plain PyTorch state dict
(``.pth``/``.pt``, read with ``torch.load(weights_only=True)`` by :mod:`bench.checkpoint`).
Their SHA-256 is part of a pretrained cell's identity (:class:`bench.spec.CellConfig`), so two
different weight files never share a stored result, and the same file moved elsewhere does.
This module reads bytes only (no torch), so specs validate without importing torch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from bench.errors import CheckpointError, ConfigError

__all__ = ["WEIGHT_SUFFIXES", "find_weights", "sha256_file"]

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")
"""File suffixes of the weight formats certbench reads."""

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of the file's bytes, 64 lowercase hex digits."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read weights: {exc.strerror or exc}") from None
    return h.hexdigest()


def find_weights(path: str | Path, *, base: str | Path | None = None, what: str = "") -> Path:
    """The weight file ``path``, absolute; a relative ``path`` is relative to ``base`` (a
    spec's directory; default: the current directory).

    Raises :class:`ConfigError` (prefixed with ``what``, e.g. the spec field) for an
    unsupported suffix or a missing file, naming where it was looked for.
    """
    prefix = f"{what}: " if what else ""
    p = Path(path).expanduser()
    if p.suffix not in WEIGHT_SUFFIXES:
        raise ConfigError(
            f"{prefix}weights must be a .safetensors file or a PyTorch state dict (.pth/.pt), "
            f"got {str(path)!r}"
        )
    full = p if p.is_absolute() else Path(base if base is not None else Path.cwd()) / p
    if not full.is_file():
        raise ConfigError(f"{prefix}no weight file {str(path)!r} (looked for {full})")
    return full.resolve()
