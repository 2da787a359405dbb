"""Per-example seeding of the noise: streams, blocks and their 64-bit seeds.

Draw ``j`` of example ``i`` belongs to *block* ``b = j // block_size``. Every (example,
block) has its own generator, seeded with :func:`block_seed` ``(seed, indices[i], stream,
b)``, and the block's standard noise for every noise site is drawn from it, site after site in
call order, one call per site (shape ``(rows_in_block, *site_shape)``). The draws of example
``i`` therefore depend on ``(seed, indices[i], stream)`` and on ``block_size`` alone: not on
the batch size, the other examples of a call or how a test set is sharded (``indices`` are
*global* example ids). ``block_size`` is part of the run record.

**Streams** separate the uses of noise: :data:`SELECTION` (Cohen's ``n0`` draws that pick the
class), :data:`ESTIMATION` (the fresh draws behind a confidence bound), :data:`PREDICTION`
and :data:`RESCORE` (re-scoring adversarial examples). Reusing selection draws to estimate
would invalidate the bound, so the two are always different streams.
"""

from __future__ import annotations

import torch

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "ESTIMATION",
    "PREDICTION",
    "RESCORE",
    "SELECTION",
    "block_seed",
    "seed_generator",
    "splitmix64",
]

SELECTION = 0
"""Stream of the draws that select a class (Cohen's ``n0``)."""
ESTIMATION = 1
"""Stream of the fresh draws behind a confidence bound (Cohen's ``n``)."""
PREDICTION = 2
"""Stream of Monte Carlo predictions (Cohen's PREDICT)."""
RESCORE = 3
"""Stream used to re-score attacked inputs."""

DEFAULT_BLOCK_SIZE = 1000
"""Draws per seeded block unless a caller says otherwise (part of the run record)."""

_MASK64 = (1 << 64) - 1


def splitmix64(z: int) -> int:
    """One step of Vigna's splitmix64: the output for state ``z`` (64-bit in, 64-bit out)."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def block_seed(seed: int, index: int, stream: int, block: int) -> int:
    """The 64-bit generator seed of one (example, block): splitmix64 chained over the fields."""
    h = splitmix64(seed & _MASK64)
    for v in (index, stream, block):
        h = splitmix64(h ^ (v & _MASK64))
    return h


def seed_generator(generator: torch.Generator, seed: int) -> None:
    """Put ``generator`` in the state of a block whose :func:`block_seed` is ``seed``."""
    generator.manual_seed(seed)
