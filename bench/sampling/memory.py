"""The memory model: bytes per noisy row, and the pass size that fits the budget.

Rows of several examples/blocks are packed into one forward pass of up to ``batch_size``
rows; a block is split across passes only when it is larger than ``batch_size`` (its noise is
then generated once and cached: ``block_size * sum(site sizes)`` elements). The default
``batch_size`` is ``MEMORY_BUDGET_BYTES[device type] // (pipelines * bytes_per_row)``, capped
at :data:`MAX_BATCH_SIZE`, where ``bytes_per_row`` counts, per noisy row, the input, each noise
site's noise twice (the buffer and the scaled copy made by the noise layer) and the output of
every leaf module, measured in a one-row dry run that is remembered per model and input
signature (an over-estimate: inference frees activations as it goes). It is then rounded so
that blocks fill forward passes exactly: down to a multiple of the block's rows when it holds
at least one, else to ``ceil(rows / pieces)`` with ``pieces = ceil(rows / budget_rows)``.
Full, equal passes matter on CPU, where every parallel kernel has a fixed cost (large on a busy
machine).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from bench.sampling.sites import NotRandomizedError, probe

__all__ = ["MAX_BATCH_SIZE", "MEMORY_BUDGET_BYTES", "budget_batch_size", "row_bytes"]

MEMORY_BUDGET_BYTES = {"cpu": 64 * 2**20, "default": 1024 * 2**20}
"""Bytes of input + noise + activations the forward passes in flight may use together when
``batch_size`` is not given, by device type (``"default"``: any accelerator); CPU pipelines
split it. On CPU the compute per row hardly depends on the pass size, but larger passes make
glibc hand freed activations back to the OS and page-fault them in again on every pass, and
crowd the caches, so the budget is the pass size that measured fastest with two pipelines on
the benchmark CNNs (benchmarks/RESULTS.md). On a GPU larger passes amortise kernel launches."""
MAX_BATCH_SIZE = {"cpu": 1000, "default": 16384}
"""Upper bound on the automatically chosen ``batch_size``, by device type. On CPU, larger
passes brought no speed and cost page faults (benchmarks/RESULTS.md)."""

_ROW_BYTES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[object, ...], int]] = (
    weakref.WeakKeyDictionary()
)


def row_bytes(model: nn.Module, x: Tensor, *, owner: nn.Module | None = None) -> int:
    """Estimated bytes per noisy row of ``model`` on rows like ``x[0]`` (module doc).

    Measured by a one-row dry run (inside inference mode and eval mode, which the caller
    sets) and remembered per ``owner`` (default ``model``) and input signature, so repeated
    calls skip the dry run. A stale value could only change the batch size, never a result.
    """
    key = (owner is None, type(model).__name__, tuple(x.shape[1:]), x.dtype, x.device)
    remembered = _ROW_BYTES.setdefault(model if owner is None else owner, {})
    if key not in remembered:
        sites, _, leaf_numel = probe(model, x[:1])
        if not sites:
            raise NotRandomizedError(
                f"no NoiseLayer of {type(model).__name__} ran in its forward pass"
            )
        per_row = x.element_size() * (x[0].numel() + leaf_numel)
        per_row += sum(2 * s.numel * torch.empty((), dtype=s.dtype).element_size() for s in sites)
        remembered[key] = per_row
    return remembered[key]


def budget_batch_size(x: Tensor, per_row: int, block_rows: int, pipelines: int = 1) -> int:
    """The row count of ``pipelines`` passes sharing the budget, rounded to fill forward
    passes with blocks (module doc)."""
    budget = MEMORY_BUDGET_BYTES.get(x.device.type, MEMORY_BUDGET_BYTES["default"]) // pipelines
    cap = MAX_BATCH_SIZE.get(x.device.type, MAX_BATCH_SIZE["default"])
    rows = max(1, min(cap, budget // max(1, per_row)))
    if rows >= block_rows:
        return rows // block_rows * block_rows
    return -(-block_rows // -(-block_rows // rows))
