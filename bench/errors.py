"""Exceptions that the CLI reports as one clear line on stderr (never a traceback)."""

from __future__ import annotations

from typing import Any


class CertbenchError(Exception):
    """Base class of every error certbench reports to a user as a single line."""


class DataError(CertbenchError):
    """A data file or directory is missing or malformed. The message names the file."""


class ConfigError(CertbenchError):
    """A spec, option or hyper-parameter is invalid. The message names the field."""


class RegistryError(CertbenchError):
    """An unknown or duplicate name in a registry (models, defenses, attacks)."""


class CheckpointError(CertbenchError):
    """A checkpoint cannot be read safely or does not match the architecture."""


class StoreError(CertbenchError):
    """The results store cannot be read or written (disk full, read-only, I/O error)."""


class NumericalError(CertbenchError):
    """Training or evaluation produced NaN/inf; the cell is stopped instead of publishing it."""


class ValidationError(ConfigError, ValueError):
    """A value failed a check of :mod:`bench.validation` (a ``ValueError`` too, so a defense's
    ``__init__`` may raise it where callers expect ``ValueError``)."""


class CellFailed(CertbenchError):
    """A cell an executor gave up on (e.g. its worker process died twice); an executor
    yields it in place of the cell's result, and the run reports it at the end."""

    def __init__(self, cell: Any, reason: str) -> None:
        super().__init__(
            f"{cell.label or cell.defense}/{cell.model}/{cell.norm} seed={cell.seed}: {reason}"
        )
        self.cell = cell
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.cell, self.reason))
