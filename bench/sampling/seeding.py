"""Per-example seeding of the noise: streams, blocks and their 64-bit seeds.

Draw ``j`` of example ``i`` belongs to *block* ``b = j // block_size``. Every (example,
block) has its own generator, put by :func:`seed_generator` in a state fixed by all 64 bits of
:func:`block_seed` ``(seed, indices[i], stream, b)``, and the block's standard noise for every
noise site is drawn from it, site after site in call order, one call per site (shape
``(rows_in_block, *site_shape)``). The draws of example
``i`` therefore depend on ``(seed, indices[i], stream)`` and on ``block_size`` alone: not on
the batch size, the other examples of a call or how a test set is sharded (``indices`` are
*global* example ids). ``block_size`` is part of the run record.

**Streams** separate the uses of noise: :data:`SELECTION` (Cohen's ``n0`` draws that pick the
class), :data:`ESTIMATION` (the fresh draws behind a confidence bound), :data:`PREDICTION`
and :data:`RESCORE` (re-scoring adversarial examples). Reusing selection draws to estimate
would invalidate the bound, so the two are always different streams.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "ESTIMATION",
    "PREDICTION",
    "RESCORE",
    "SELECTION",
    "block_seed",
    "mt19937_state",
    "seed_generator",
    "splitmix64",
    "splitmix64_stream",
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
_GOLDEN = 0x9E3779B97F4A7C15


def splitmix64(z: int) -> int:
    """One step of Vigna's splitmix64: the output for state ``z`` (64-bit in, 64-bit out)."""
    z = (z + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def block_seed(seed: int, index: int, stream: int, block: int) -> int:
    """The 64-bit generator seed of one (example, block): splitmix64 chained over the fields."""
    h = splitmix64(seed & _MASK64)
    for v in (index, stream, block):
        h = splitmix64(h ^ (v & _MASK64))
    return h


def splitmix64_stream(seed: int, count: int) -> np.ndarray:
    """The first ``count`` outputs of splitmix64 started at state ``seed``: ``(count,)`` uint64,
    output ``i`` (from 0) being ``splitmix64(seed + i * 0x9E3779B97F4A7C15 mod 2^64)``."""
    z = _golden_steps(count) + np.uint64(seed & _MASK64)  # uint64 arrays wrap mod 2^64
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


@functools.cache
def _golden_steps(count: int) -> np.ndarray:
    """``(1, 2, ..., count) * 0x9E3779B97F4A7C15 mod 2^64``, read-only (shared by threads)."""
    steps = np.arange(1, count + 1, dtype=np.uint64) * np.uint64(_GOLDEN)
    steps.flags.writeable = False
    return steps


# torch's CPU generator is a Mersenne Twister (MT19937) whose state get_state()/set_state()
# exchange as bytes laid out like ATen's CPUGeneratorImplState (little-endian, verified
# against get_state() after manual_seed by tests/test_sampling.py): the initial seed (uint64)
# at byte 0, the position fields left = 1, seeded = 1 (int32) and next = 0 (uint64) of a
# freshly seeded twister at 8-24, its 624 state words (one uint32 in each uint64) at 24-5016,
# then the cached-normal fields, all zero (no cached normal).
_MT_WORDS = 624
_MT_STATE_BYTES = 5056
_MT_KEY = slice(24, 24 + 8 * _MT_WORDS)


@functools.cache
def _mt_template() -> np.ndarray:
    """The state bytes of a freshly seeded CPU generator (seed 0), to overwrite per block."""
    state = torch.Generator().manual_seed(0).get_state().numpy().copy()
    if state.shape != (_MT_STATE_BYTES,):
        raise RuntimeError(
            f"torch's CPU generator state has {state.shape[0]} bytes, not {_MT_STATE_BYTES}: "
            "this torch version is not supported by bench.sampling.seeding"
        )
    return state


def mt19937_state(key: np.ndarray, initial_seed: int) -> Tensor:
    """torch's CPU generator state (``get_state()`` bytes) of a Mersenne Twister freshly
    seeded to ``key``, its 624 32-bit state words, with ``initial_seed`` as its recorded seed."""
    state = _mt_template().copy()
    state[_MT_KEY].view(np.uint64)[:] = key
    state[:8].view(np.uint64)[0] = initial_seed & _MASK64
    return torch.from_numpy(state)


def seed_generator(generator: torch.Generator, seed: int) -> None:
    """Put ``generator`` in the state of a block whose :func:`block_seed` is ``seed`` (64-bit).

    On CPU, ``manual_seed`` would keep only the low 32 bits of ``seed`` (its Mersenne Twister
    is seeded from one 32-bit word), so among ``m`` blocks about ``m^2 / 2^33`` pairs would
    share their noise. Instead the twister's 624 state words are the splitmix64 stream started
    at ``seed`` (312 64-bit outputs, each split low half first), Vigna's recommended way to
    seed a large-state generator from 64 bits: each output is a bijection of ``seed``, so
    distinct seeds give distinct twister states (MT19937 ignores only the low 31 bits of word
    0). On other devices ``manual_seed`` is used: CUDA's generator is Philox, whose key is the
    whole 64-bit seed (ATen's ``CUDAGeneratorImpl::set_current_seed``).
    """
    if generator.device.type != "cpu":
        generator.manual_seed(seed)
        return
    z = splitmix64_stream(seed, _MT_WORDS // 2)
    key = np.empty(_MT_WORDS, dtype=np.uint64)
    key[0::2] = z & np.uint64(0xFFFFFFFF)
    key[1::2] = z >> np.uint64(32)
    generator.set_state(mt19937_state(key, seed))
