"""The Monte Carlo noise-sampling engine shared by every randomized defense.

A randomized network contains one or more :class:`~bench.noise.NoiseLayer` modules (the
*noise sites*). :func:`sample` evaluates it ``n`` times per input and returns the histogram
of argmax labels (and optionally the sum and sum of squares of the softmax), accumulated on
the input's device, under :func:`torch.inference_mode` with the model in ``eval()`` mode.
:func:`smoothed_certify` and :func:`smoothed_predict` are Cohen et al.'s CERTIFY and PREDICT
on top of it, for a base classifier smoothed with Gaussian noise on its input.

**Per-example seeding.** Draw ``j`` of example ``i`` belongs to *block* ``b = j // block_size``.
For every (example, block) a :class:`torch.Generator` on the noise's device is seeded with
:func:`block_seed` ``(seed, indices[i], stream, b)`` (a splitmix64 mix), and the block's
standard noise for every noise site is drawn from it, site after site in call order, one call
per site (shape ``(rows_in_block, *site_shape)``). Forward passes only take rows of these
blocks, so the draws of example ``i`` depend on ``(seed, indices[i], stream)`` and on
``block_size`` alone: not on the batch size, the other examples in ``x`` or how a test set is
sharded (``indices`` are *global* example ids). ``block_size`` is therefore part of the run
record. Forward outputs are bit-identical across groupings for the usual row-independent
layers (conv, linear, eval-mode batch norm); counts are then identical too, while float64
softmax sums may differ in the last bits because the summation order changes.

**Streams** separate the uses of noise: :data:`SELECTION` (Cohen's ``n0`` draws that pick the
class), :data:`ESTIMATION` (the fresh draws behind a confidence bound), :data:`PREDICTION`
and :data:`RESCORE` (re-scoring adversarial examples). Reusing selection draws to estimate
would invalidate the bound, so the two are always different streams (CERTIFY still packs
rows of both into the same forward passes; that changes no draw).

**Memory and speed.** Rows of several examples/blocks are packed into one forward pass of up
to ``batch_size`` rows; a block is split across forward passes only when it is larger than
``batch_size`` (its noise is then generated once and cached: ``block_size * sum(site sizes)``
elements). The default ``batch_size`` is ``MEMORY_BUDGET_BYTES[device type] // (pipelines *
bytes_per_row)`` (64 MiB on CPU, 1 GiB on an accelerator, shared by the CPU pipelines below;
capped at :data:`MAX_BATCH_SIZE`), where
``bytes_per_row`` counts, per noisy row, the input, each noise site's noise twice (the buffer
and the scaled copy made by the noise layer) and the output of every leaf module, measured in
a one-row dry run that is remembered per model and input signature (an over-estimate:
inference frees activations as it goes). It is then rounded so that blocks fill forward passes
exactly: down to a multiple of the block's rows when it holds at least one, else to
``ceil(rows / pieces)`` with ``pieces = ceil(rows / budget_rows)``. Full, equal passes matter
on CPU, where every parallel kernel has a fixed cost (large on a busy machine); for the same
reason a pass of one example reuses one contiguous copy of it as input and the argmax
runs in pieces small enough for ATen to run inline.

**CPU pipelines.** Part of every pass is serial: torch's CPU Gaussian sampler (one Mersenne
Twister stream), the argmax and count, the Python around them. With one pass at a time on
all cores, the other cores wait through it. On CPU the passes are therefore dealt to
``workers`` threads (default: one per intra-op thread of the caller), each running its passes
with its share of the intra-op threads, so one pipeline's serial steps overlap another's
forward pass (on 2 cores: 1.1-1.3x the draws/s of one pipeline, benchmarks/RESULTS.md). A
pipeline takes whole units of work (a pass, or the passes of a block split across passes,
whose cached noise it generates once) and keeps its own buffers and counts, summed at the
end; pipelines that run out of work hand their threads to the ones still running. No draw
depends on which pipeline ran a pass, so counts do not depend on ``workers``. The pipelines
share the memory budget: two passes of 167 rows of a 1x28x28 CNN ran 1.2x faster than two
of 334 (whose 50 MB of activations fight for the cache), while 1x8x8 stays at 1000 rows.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
import operator
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy import special
from torch import Tensor, nn

from bench.errors import ConfigError
from bench.noise import NoiseLayer, noise_layers, noise_source, sample_standard
from bench.stats import binomial_test_pvalue, lower_confidence_bound

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "ESTIMATION",
    "MAX_BATCH_SIZE",
    "MAX_CPU_WORKERS",
    "MEMORY_BUDGET_BYTES",
    "PREDICTION",
    "RESCORE",
    "SELECTION",
    "NotRandomizedError",
    "Samples",
    "block_seed",
    "default_batch_size",
    "sample",
    "smoothed_certify",
    "smoothed_predict",
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
MEMORY_BUDGET_BYTES = {"cpu": 64 * 2**20, "default": 1024 * 2**20}
"""Bytes of input + noise + activations the forward passes in flight may use together when
``batch_size`` is not given, by device type (``"default"``: any accelerator); CPU pipelines
split it. On CPU the compute per row hardly depends on the pass size, but larger passes make
glibc hand freed activations back to the OS and page-fault them in again on every pass (on
one core the CNNs of ``benchmarks/bench_certify.py`` spent up to 2/3 of their time in page
faults at 2000+ rows) and crowd the caches. With this budget, two pipelines and the
:data:`MAX_BATCH_SIZE` cap they run 1000 (1x8x8) and 167 (1x28x28) rows per pass, which
measured fastest on an idle 2-core machine (benchmarks/RESULTS.md). On a GPU larger passes
amortise kernel launches."""
MAX_BATCH_SIZE = {"cpu": 1000, "default": 16384}
"""Upper bound on the automatically chosen ``batch_size``, by device type. On CPU, passes of
more than ~1000 rows bring no speed and cost page faults (measured: benchmarks/RESULTS.md)."""

_MASK64 = (1 << 64) - 1


class NotRandomizedError(ConfigError, ValueError):
    """The model given to the sampling engine has no noise layer that runs in its forward."""


@dataclass
class Samples:
    """Monte Carlo statistics of ``n`` noisy forward passes per example.

    Attributes:
        counts: ``(N, K)`` int64, how many of the ``n`` draws had each class as argmax
            (each row sums to ``n``).
        n: number of draws per example.
        softmax_sum: ``(N, K)`` float64 sum of the softmax over the draws, or ``None``.
        softmax_sq_sum: ``(N, K)`` float64 sum of the squared softmax, or ``None``.
    """

    counts: Tensor
    n: int
    softmax_sum: Tensor | None = None
    softmax_sq_sum: Tensor | None = None


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def block_seed(seed: int, index: int, stream: int, block: int) -> int:
    """The 64-bit generator seed of one (example, block): splitmix64 chained over the fields."""
    h = _splitmix64(seed & _MASK64)
    for v in (index, stream, block):
        h = _splitmix64(h ^ (v & _MASK64))
    return h


@dataclass(frozen=True)
class _Site:
    """One noise-layer call: its noise kind, per-row shape, dtype and device."""

    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@contextlib.contextmanager
def _prediction_mode(model: nn.Module) -> Iterator[None]:
    """eval() mode and noise multiplier 1 inside the block; restore both afterwards."""
    modules = list(model.modules())
    # Usually the model is already in eval mode: then eval() (a recursive walk) is skipped.
    modes = [(m, m.training) for m in modules] if any(m.training for m in modules) else []
    changed = [(m, m.multiplier) for m in modules if isinstance(m, NoiseLayer)]
    if modes:
        model.eval()
    for layer, _ in changed:
        layer.multiplier = 1.0
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for layer, mult in changed:
            layer.multiplier = mult


def _probe(model: nn.Module, x1: Tensor) -> tuple[list[_Site], Tensor, int]:
    """Dry run on one row: the noise sites in call order, the output, and the leaf-output size."""
    sites: list[_Site] = []
    leaf_numel = 0

    def record(kind: str, shape: torch.Size, like: Tensor) -> Tensor:
        if len(shape) == 0 or shape[0] != 1:
            raise ConfigError(
                f"noise layer input has shape {tuple(shape)} for a one-example batch; the "
                "sampling engine needs noise layers whose input keeps the batch dimension first"
            )
        sites.append(_Site(kind, tuple(shape[1:]), like.dtype, like.device))
        return torch.zeros(shape, dtype=like.dtype, device=like.device)

    def hook(_module: nn.Module, _inp: object, out: object) -> None:
        nonlocal leaf_numel
        if isinstance(out, Tensor):
            leaf_numel += out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not any(m.children())]
    try:
        with noise_source(record):
            out = model(x1)
    finally:
        for h in handles:
            h.remove()
    return sites, out, leaf_numel


_ROW_BYTES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[object, ...], int]] = (
    weakref.WeakKeyDictionary()
)


def _row_bytes(model: nn.Module, x: Tensor, *, owner: nn.Module | None = None) -> int:
    """Estimated bytes per noisy row of ``model`` on rows like ``x[0]`` (module doc).

    Measured by a one-row dry run (inside inference mode and eval mode, which the caller
    sets) and remembered per ``owner`` (default ``model``) and input signature, so repeated
    calls skip the dry run. A stale value could only change the batch size, never a result.
    """
    key = (owner is None, type(model).__name__, tuple(x.shape[1:]), x.dtype, x.device)
    remembered = _ROW_BYTES.setdefault(model if owner is None else owner, {})
    if key not in remembered:
        sites, _, leaf_numel = _probe(model, x[:1])
        if not sites:
            raise NotRandomizedError(
                f"no NoiseLayer of {type(model).__name__} ran in its forward pass"
            )
        per_row = x.element_size() * (x[0].numel() + leaf_numel)
        per_row += sum(2 * s.numel * torch.empty((), dtype=s.dtype).element_size() for s in sites)
        remembered[key] = per_row
    return remembered[key]


def _default_batch_size(x: Tensor, per_row: int, block_rows: int, pipelines: int = 1) -> int:
    """The row count of ``pipelines`` passes sharing the budget, rounded to fill forward
    passes with blocks (module doc)."""
    budget = MEMORY_BUDGET_BYTES.get(x.device.type, MEMORY_BUDGET_BYTES["default"]) // pipelines
    cap = MAX_BATCH_SIZE.get(x.device.type, MAX_BATCH_SIZE["default"])
    rows = max(1, min(cap, budget // max(1, per_row)))
    if rows >= block_rows:
        return rows // block_rows * block_rows
    return -(-block_rows // -(-block_rows // rows))


def default_batch_size(
    model: nn.Module,
    x: Tensor,
    *,
    n: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    workers: int | None = None,
) -> int:
    """The ``batch_size`` :func:`sample` uses for randomized ``model`` on inputs like ``x``.

    ``x``: ``(N, C, H, W)`` (only ``x[:1]`` is evaluated, in one dry run); ``n`` draws per
    example (``None``: at least one block); ``workers`` as for :func:`sample` (the pipelines
    share the memory budget). See the module docstring for the memory model.
    """
    _check_input(x)
    block_size = _check_int("block_size", block_size, 1)
    block_rows = block_size if n is None else min(block_size, _check_int("n", n, 1))
    if workers is not None:
        workers = _check_int("workers", workers, 1)
    pipelines = _pipelines(workers, x.device, torch.get_num_threads())
    with torch.inference_mode(), _prediction_mode(model):
        per_row = _row_bytes(model, x)
    return _default_batch_size(x, per_row, block_rows, pipelines)


_FUSED_SCALE_DTYPES = (torch.float32, torch.float64)
"""dtypes for which torch's CPU Gaussian sampler (blocks of >= 16 elements) rounds
``std * z`` once, like scaling afterwards (smaller blocks go through a float64 sampler that
does not); tests/test_sampling.py checks the equality bit for bit."""


def _fill_block(
    site: _Site, out: Tensor, generator: torch.Generator, std: float | None = None
) -> None:
    """Write one block's standard noise for ``site`` into ``out`` (``(rows, *site.shape)``).

    One generator call per block and site, so the values depend only on the generator's seed
    and the block's row count, whatever ``out`` is a view of. ``std`` (Gaussian only): write
    ``std * z`` instead, scaled inside the sampler (torch's CPU sampler rounds ``z * std`` once,
    exactly as multiplying afterwards does) to save a pass over the buffer.
    """
    if site.kind == "gaussian":
        if std is not None:
            out.normal_(0.0, std, generator=generator)
            return
        torch.randn(out.shape, generator=generator, dtype=out.dtype, device=out.device, out=out)
    else:
        out.copy_(
            sample_standard(
                site.kind, out.shape, dtype=out.dtype, device=out.device, generator=generator
            )
        )


_INLINE_NUMEL = 32768
"""ATen's grain size: CPU kernels on fewer elements run inline, without the thread pool."""


def _argmax_rows(out: Tensor) -> Tensor:
    """``out.argmax(dim=1)`` for ``(B, K)`` scores; on CPU in pieces that ATen runs inline.

    Waking the intra-op thread pool has a fixed cost that, on a busy CPU, can exceed the whole
    argmax (milliseconds when a worker thread has to be rescheduled); the pieces avoid it. On
    CPU the indices of ``torch.max(dim=1)`` are used: the same first-maximum rule (NaN counts as
    the maximum) at half the cost of ``argmax`` for a narrow ``K`` (1000 x 10: 16 us vs 32 us
    on the benchmark machine); ``tests/test_sampling.py`` checks the equality on ties and NaN.
    """
    if out.device.type != "cpu":
        return out.argmax(dim=1)
    rows_inline = max(1, _INLINE_NUMEL // max(1, out.shape[1]))
    if out.shape[0] <= rows_inline:
        return torch.max(out, dim=1).indices
    pred = torch.empty(out.shape[0], dtype=torch.int64)
    for start in range(0, out.shape[0], rows_inline):
        pred[start : start + rows_inline] = torch.max(out[start : start + rows_inline], 1).indices
    return pred


# A forward pass is a list of segments:
# (local example, request slot, block, block rows, first row, end row).
_Segment = tuple[int, int, int, int, int, int]


def _plan(
    num_examples: int, requests: list[tuple[int, int]], block_size: int, batch_size: int
) -> Iterator[list[_Segment]]:
    """Group the rows into forward passes of <= batch_size rows.

    Rows are ordered by request (``(stream, n)``), then example, then draw, so that small
    blocks (e.g. Cohen's ``n0`` selection draws) of many examples share passes. Whole blocks
    are packed together; a block larger than ``batch_size`` is split into
    ``ceil(rows / batch_size)`` near-equal pieces, one forward pass each.
    """
    chunk: list[_Segment] = []
    used = 0
    for slot, (_, n) in enumerate(requests):
        for e in range(num_examples):
            for b in range(-(-n // block_size)):
                rows = min(block_size, n - b * block_size)
                if rows <= batch_size:
                    if used + rows > batch_size:
                        yield chunk
                        chunk, used = [], 0
                    chunk.append((e, slot, b, rows, 0, rows))
                    used += rows
                    continue
                if chunk:
                    yield chunk
                    chunk, used = [], 0
                pieces = -(-rows // batch_size)
                bounds = [rows * p // pieces for p in range(pieces + 1)]
                for r0, r1 in itertools.pairwise(bounds):
                    yield [(e, slot, b, rows, r0, r1)]
    if chunk:
        yield chunk


def _split_segments(chunk: list[_Segment], max_rows: int) -> Iterator[list[_Segment]]:
    """Cut a pass's segments into passes of at most ``max_rows`` rows (segments may split)."""
    piece: list[_Segment] = []
    used = 0
    for e, slot, b, rows, r0, r1 in chunk:
        while r0 < r1:
            take = min(r1 - r0, max_rows - used)
            piece.append((e, slot, b, rows, r0, r0 + take))
            used += take
            r0 += take
            if used == max_rows:
                yield piece
                piece, used = [], 0
    if piece:
        yield piece


def _is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA/CPU allocation failures (torch raises them as RuntimeError subclasses)."""
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    if oom and isinstance(exc, oom):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg
    )


def _check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as a Python int (numpy/0-d tensor integers accepted, bools not), ``>= minimum``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        number = None
    if number is None or number < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return number


def _check_indices(indices: Tensor | None, num_examples: int) -> list[int]:
    if indices is None:
        return list(range(num_examples))
    if not isinstance(indices, Tensor) or indices.dtype.is_floating_point or indices.dim() != 1:
        raise ConfigError("indices must be a 1-D integer tensor of global example ids")
    if indices.numel() != num_examples:
        raise ConfigError(
            f"indices has {indices.numel()} entries but x has {num_examples} examples"
        )
    ids = [int(i) for i in indices.tolist()]
    if ids and min(ids) < 0:
        raise ConfigError(f"indices must be >= 0, got {min(ids)}")
    return ids


def _check_input(x: Tensor) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ConfigError("x must be a floating-point tensor of shape (N, C, H, W) in [0, 1]")


def sample(
    model: nn.Module,
    x: Tensor,
    n: int,
    *,
    num_classes: int,
    seed: int = 0,
    stream: int = ESTIMATION,
    indices: Tensor | None = None,
    batch_size: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    softmax: bool = False,
    progress: bool = False,
    workers: int | None = None,
) -> Samples:
    """Run ``n`` noisy forward passes of a randomized ``model`` per example of ``x``.

    Args:
        model: a network containing at least one :class:`~bench.noise.NoiseLayer` that runs
            in its forward; maps ``(B, C, H, W)`` to ``(B, num_classes)`` scores. Evaluated in
            ``eval()`` mode with noise multipliers 1 (both restored afterwards). A noise
            layer's output is formed in a buffer the engine refills on the next pass: a model
            (or hook) that keeps it beyond the pass must keep a clone.
        x: ``(N, C, H, W)`` inputs, pixels in ``[0, 1]``, on the model's device. A model that
            writes into its input gets a fresh copy for the next pass (rows of one example
            share one copy).
        n: draws per example.
        num_classes: ``K``, the width of the model's output.
        seed: run seed; with ``indices``, ``stream`` and ``block_size`` it fixes every draw.
        stream: :data:`SELECTION`, :data:`ESTIMATION`, :data:`PREDICTION` or :data:`RESCORE`.
        indices: ``(N,)`` global example ids (default ``arange(N)``); give the ids of a shard
            to get exactly the draws the full set would get.
        batch_size: rows per forward pass (default: from :data:`MEMORY_BUDGET_BYTES`). Does
            not change the draws.
        block_size: draws per seeded block; changing it changes the draws (part of the record).
        softmax: also accumulate softmax sums and sums of squares.
        progress: show a tqdm progress bar over the ``N * n`` rows.
        workers: CPU pipelines (threads) that run the forward passes side by side, each
            with ``torch.get_num_threads() // workers`` intra-op threads (default: one per
            intra-op thread, at most :data:`MAX_CPU_WORKERS`, or the environment variable
            ``CERTBENCH_SAMPLER_WORKERS``; ``1`` runs every pass in the calling thread with
            all of torch's threads). Off the CPU, and for work of one
            pass, the passes always run in the calling thread. Does not change a draw or a
            count (softmax sums: the last bits may differ from ``workers=1``, never from
            run to run). With several pipelines the model is called from several threads
            at once: its forward must not change shared state (true of torch's layers).

    Raises:
        NotRandomizedError: (a ``ValueError``) if no noise layer runs in the forward.
        ConfigError: for invalid arguments or a model output that is not ``(B, num_classes)``.
    """
    _check_input(x)
    n = _check_int("n", n, 1)
    stream = _check_int("stream", stream, 0)
    return _sample_streams(
        model,
        x,
        [(stream, n)],
        num_classes=num_classes,
        seed=seed,
        indices=indices,
        batch_size=batch_size,
        block_size=block_size,
        softmax=softmax,
        progress=progress,
        workers=workers,
    )[0]


def _sample_streams(
    model: nn.Module,
    x: Tensor,
    requests: list[tuple[int, int]],
    *,
    num_classes: int,
    seed: int,
    indices: Tensor | None,
    batch_size: int | None,
    block_size: int,
    softmax: bool = False,
    progress: bool = False,
    row_bytes_owner: nn.Module | None = None,
    workers: int | None = None,
) -> list[Samples]:
    """:func:`sample` for several ``(stream, n)`` requests at once, sharing forward passes.

    Each request's draws are exactly those :func:`sample` gives it alone (same blocks and
    seeds); packing them together only saves forward passes. ``row_bytes_owner``: the module
    under which the memory estimate is remembered (default ``model``).
    """
    num_classes = _check_int("num_classes", num_classes, 1)
    block_size = _check_int("block_size", block_size, 1)
    seed = _check_int("seed", seed, -(2**63))
    if batch_size is not None:
        batch_size = _check_int("batch_size", batch_size, 1)
    if workers is not None:
        workers = _check_int("workers", workers, 1)
    if not noise_layers(model):
        raise NotRandomizedError(
            f"sample() needs a randomized model (one with a NoiseLayer); got {type(model).__name__}"
        )
    num_examples = x.shape[0]
    ids = _check_indices(indices, num_examples)
    device = x.device
    results = _zero_results(requests, num_examples, num_classes, softmax, device)
    if num_examples == 0:
        return results

    with torch.inference_mode(), _prediction_mode(model):
        threads = torch.get_num_threads()
        wanted = _pipelines(workers, device, threads)
        if batch_size is None:
            block_rows = min(block_size, max(n for _, n in requests))
            per_row = _row_bytes(model, x, owner=row_bytes_owner)
            batch_size = _default_batch_size(x, per_row, block_rows, wanted)
        streams = [stream for stream, _ in requests]
        units = list(_units(_plan(num_examples, requests, block_size, batch_size)))
        pool = min(wanted, len(units))

        def pipeline() -> _Pipeline:
            return _Pipeline(_Runner(model, x, ids, seed, streams, batch_size, num_classes))

        bar = None
        if progress:
            from tqdm.auto import tqdm

            total = num_examples * sum(n for _, n in requests)
            bar = tqdm(total=total, desc="noise draws", unit="draw")
        try:
            if pool == 1:
                line = pipeline()
                for unit in units:
                    for chunk in unit:
                        line.run(chunk, results)
                    if bar is not None:
                        bar.update(_unit_rows(unit))
            else:
                partial = _run_threads(
                    units,
                    pool,
                    threads,
                    pipeline,
                    lambda: _zero_results(requests, num_examples, num_classes, softmax, device),
                    bar,
                    ordered=softmax,
                )
                for part in partial:  # in worker order: a fixed summation order
                    for res, add in zip(results, part, strict=True):
                        res.counts += add.counts
                        if res.softmax_sum is not None and add.softmax_sum is not None:
                            res.softmax_sum += add.softmax_sum
                        if res.softmax_sq_sum is not None and add.softmax_sq_sum is not None:
                            res.softmax_sq_sum += add.softmax_sq_sum
        finally:
            if bar is not None:
                bar.close()
    return results


def _zero_results(
    requests: list[tuple[int, int]],
    num_examples: int,
    num_classes: int,
    softmax: bool,
    device: torch.device,
) -> list[Samples]:
    """One zeroed :class:`Samples` per request."""
    results = []
    for _, n in requests:
        sm_sum = sm_sq = None
        if softmax:
            sm_sum = torch.zeros(num_examples, num_classes, dtype=torch.float64, device=device)
            sm_sq = torch.zeros_like(sm_sum)
        counts = torch.zeros(num_examples, num_classes, dtype=torch.int64, device=device)
        results.append(Samples(counts, n, sm_sum, sm_sq))
    return results


def _units(plan: Iterator[list[_Segment]]) -> Iterator[list[list[_Segment]]]:
    """Group a plan's passes into units of work: the passes of a block split across passes
    stay together (one runner generates the block's noise once and slices it); every other
    pass is a unit of its own."""
    unit: list[list[_Segment]] = []
    for chunk in plan:
        split = len(chunk) == 1 and chunk[0][5] - chunk[0][4] < chunk[0][3]
        if unit and split and chunk[0][4] > 0:  # a later piece of the block being split
            unit.append(chunk)
            continue
        if unit:
            yield unit
        unit = [chunk]
    if unit:
        yield unit


def _unit_rows(unit: list[list[_Segment]]) -> int:
    return sum(seg[5] - seg[4] for chunk in unit for seg in chunk)


MAX_CPU_WORKERS = 8
"""Upper bound on the default number of CPU pipelines (see :func:`sample`'s ``workers``):
each holds its own pass buffers and activations, and all share one interpreter lock."""


WORKERS_ENV = "CERTBENCH_SAMPLER_WORKERS"
"""Environment variable giving the default ``workers`` of :func:`sample` (e.g. ``1`` for a
model whose forward is not safe to call from two threads at once)."""


def _pipelines(workers: int | None, device: torch.device, threads: int) -> int:
    """How many pipelines a call asks for: 1 off the CPU, else ``workers`` or (by default)
    :data:`WORKERS_ENV` or one per intra-op thread of the caller (``threads``), at most
    :data:`MAX_CPU_WORKERS`. The passes actually run on ``min(that, units of work)``."""
    if workers is None and os.environ.get(WORKERS_ENV, "").strip():
        value = os.environ[WORKERS_ENV].strip()
        try:
            workers = int(value)
        except ValueError:
            workers = 0
        if workers < 1:
            raise ConfigError(f"{WORKERS_ENV} must be an integer >= 1, got {value!r}")
    if device.type != "cpu":
        return 1
    return max(1, min(threads, MAX_CPU_WORKERS) if workers is None else workers)


class _Pipeline:
    """A :class:`_Runner` and its pass-size limit, lowered when a pass runs out of memory."""

    def __init__(self, runner: _Runner) -> None:
        self.runner = runner
        self.batch_size = self.limit = runner.batch_size

    def run(self, chunk: list[_Segment], results: list[Samples]) -> None:
        """Evaluate one planned pass (cut to the current limit) and add its statistics."""
        if self.limit == self.batch_size:  # no out-of-memory so far: the pass as planned
            self._process(chunk, results)
        else:
            for piece in _split_segments(chunk, self.limit):
                self._process(piece, results)

    def _process(self, piece: list[_Segment], results: list[Samples]) -> None:
        """Run one pass; on out-of-memory halve the pass size and retry its pieces.

        The draws of a row depend only on its block's seed, never on how rows are grouped
        into passes, so a retried pass gives exactly the counts the original would have.
        """
        rows = sum(r1 - r0 for *_, r0, r1 in piece)
        if rows > self.limit:  # the limit fell since this piece was cut
            for sub_piece in _split_segments(piece, self.limit):
                self._process(sub_piece, results)
            return
        try:
            self.runner.run(piece, results)
            return
        except Exception as exc:
            if not _is_out_of_memory(exc) or rows <= 1:
                raise
        device = self.runner.x.device
        if device.type == "cuda":
            torch.cuda.empty_cache()
        self.limit = max(1, rows // 2)
        warnings.warn(
            f"out of memory in a forward pass of {rows} rows; retrying with {self.limit}",
            RuntimeWarning,
            stacklevel=2,
        )
        old = self.runner
        self.runner = _Runner(
            old.model, old.x, old.ids, old.seed, old.streams, self.limit, old.num_classes
        )
        if old.sites_known:  # keep the discovered noise sites, with smaller buffers
            self.runner.sites_known, self.runner.sites = True, old.sites
            self.runner.buffers = [
                torch.empty((self.limit, *s.shape), dtype=s.dtype, device=s.device)
                for s in old.sites
            ]
        for sub_piece in _split_segments(piece, self.limit):
            self._process(sub_piece, results)


def _run_threads(
    units: list[list[list[_Segment]]],
    workers: int,
    threads: int,
    pipeline: Callable[[], _Pipeline],
    zero_results: Callable[[], list[Samples]],
    bar: object | None,
    *,
    ordered: bool,
) -> list[list[Samples]]:
    """Run ``units`` on ``workers`` CPU pipelines, each in its own thread; return each
    worker's statistics (in worker order).

    Each pipeline runs torch with ``threads // workers`` intra-op threads (at least one) and
    widens to ``threads // active`` when others have finished, so the last units still use
    every core. The serial steps of a pass (the Gaussian sampler, argmax, counting, Python)
    then overlap with another pipeline's forward pass instead of idling the other cores.
    Units are taken in plan order as workers free up; with ``ordered`` (float sums, whose
    rounding depends on the order of addition) worker ``w`` takes units ``w, w + workers,
    ...``, so the sums do not depend on timing. The caller's thread count is restored on
    return. The first error (in plan order) is re-raised after every worker has stopped.
    """
    lock = threading.Lock()
    parts = [zero_results() for _ in range(workers)]
    state = {"next": 0, "active": workers, "stop": False}
    errors: list[tuple[int, BaseException]] = []
    finished = threading.Event()

    def claim(w: int, done: int) -> int | None:
        with lock:
            if state["stop"]:
                return None
            if ordered:
                index = w + done * workers
            else:
                index = state["next"]
                state["next"] = index + 1
            return index if index < len(units) else None

    def work(w: int) -> None:
        index = -1
        try:
            current = 0
            line = None
            done = 0
            with torch.inference_mode():
                while (index := claim(w, done)) is not None:
                    want = max(1, threads // max(1, state["active"]))
                    if want != current:
                        torch.set_num_threads(want)
                        current = want
                    if line is None:
                        line = pipeline()
                    for chunk in units[index]:
                        if state["stop"]:  # another pipeline failed, or the caller stopped
                            return
                        line.run(chunk, parts[w])
                    done += 1
                    if bar is not None:
                        with lock:
                            bar.update(_unit_rows(units[index]))  # type: ignore[attr-defined]
        except BaseException as exc:
            with lock:
                errors.append((index, exc))
                state["stop"] = True
        finally:
            with lock:
                state["active"] -= 1
                if state["active"] == 0:
                    finished.set()

    pool = [
        threading.Thread(target=work, args=(w,), name=f"certbench-sampler-{w}", daemon=True)
        for w in range(workers)
    ]
    try:
        for t in pool:
            t.start()
        # Wait on an event, not in Thread.join: on Python 3.11 an exception raised inside
        # join (Ctrl-C) can mark a running thread as finished. Short waits let this thread
        # run the signal handler when the signal was delivered to another thread.
        while not finished.wait(0.05):
            pass
    except BaseException:  # e.g. KeyboardInterrupt: stop after the passes in flight
        with lock:
            state["stop"] = True
            state["active"] -= sum(t.ident is None for t in pool)  # never started
            if state["active"] <= 0:
                finished.set()
        finished.wait()
        raise
    finally:
        torch.set_num_threads(threads)
    for t in pool:
        t.join()
    if errors:
        raise min(errors, key=lambda item: item[0])[1]
    return parts


class _Runner:
    """Evaluates forward passes made of block segments and accumulates their statistics.

    Noise sites are discovered in the first forward pass (their kind and per-row shape are
    then checked on every pass). Each site's noise is generated when the site asks for it: a
    whole block straight into its rows of the site's buffer (the generator of each block is
    seeded once and the sites draw from it in call order); a block split across passes is
    generated once into a cache and sliced. Passes of one example share one contiguous copy of
    it (made once per example); a pass packing several examples gathers them.
    """

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        ids: list[int],
        seed: int,
        streams: list[int],
        batch_size: int,
        num_classes: int,
    ) -> None:
        self.model, self.x, self.ids = model, x, ids
        self.seed, self.streams = seed, streams
        self.batch_size, self.num_classes = batch_size, num_classes
        self.sites: list[_Site] = []
        self.sites_known = False
        self.buffers: list[Tensor] = []
        self.pool: dict[torch.device, dict[int, torch.Generator]] = {}
        self.cache_key: tuple[int, int, int] | None = None
        self.cache_gens: dict[torch.device, torch.Generator] = {}
        self.cache: list[Tensor] = []
        self.cache_store: list[Tensor] = []
        self.repeated: tuple[int, Tensor] | None = None
        self.repeated_version = 0
        # the pass being evaluated (read by the noise-source methods below)
        self.chunk: list[_Segment] = []
        self.num_rows = 0
        self.calls = 0
        self.seeded: set[tuple[int, torch.device]] = set()
        self.source = noise_source(self)
        self.ones = torch.ones(batch_size, dtype=torch.int64, device=x.device)

    def _seed(self, e: int, slot: int, b: int) -> int:
        return block_seed(self.seed, self.ids[e], self.streams[slot], b)

    def _generator(self, key: int, device: torch.device) -> torch.Generator:
        """A reusable generator on ``device`` (``key``: position in a pass, or a cache slot)."""
        gens = self.pool.setdefault(device, {})
        if key not in gens:
            gens[key] = torch.Generator(device=device)
        return gens[key]

    def _site(self, k: int, kind: str, shape: torch.Size, like: Tensor, rows: int) -> _Site:
        """Record (first pass) or check (later passes) the ``k``-th noise-layer call."""
        if len(shape) == 0 or shape[0] != rows:
            raise ConfigError(
                f"noise layer {k} got an input of shape {tuple(shape)} in a pass of {rows} rows; "
                "the sampling engine needs noise layers whose input keeps the batch dim first"
            )
        if k < len(self.sites):
            site = self.sites[k]
            if kind != site.kind or tuple(shape[1:]) != site.shape:
                raise ConfigError(
                    f"noise site {k} asked for {kind} noise of shape {tuple(shape)}; earlier "
                    f"passes saw {site.kind} noise of shape (rows, *{site.shape})"
                )
            return site
        if self.sites_known:
            raise ConfigError(
                f"the model called its noise layers more than the {len(self.sites)} times of "
                "its first pass; the sampling engine needs a fixed sequence of noise sites"
            )
        site = _Site(kind, tuple(shape[1:]), like.dtype, like.device)
        self.sites.append(site)
        self.buffers.append(
            torch.empty((self.batch_size, *site.shape), dtype=site.dtype, device=site.device)
        )
        return site

    def _cached(self, e: int, slot: int, b: int, rows: int, k: int) -> Tensor:
        """Site ``k``'s noise for a whole block that is split across passes.

        Sites are generated in call order as they are first asked for; the storage of each
        site's cached block is reused from block to block.
        """
        if self.cache_key != (e, slot, b):
            self.cache_key, self.cache_gens, self.cache = (e, slot, b), {}, []
        while len(self.cache) <= k:
            j = len(self.cache)
            site = self.sites[j]
            g = self.cache_gens.get(site.device)
            if g is None:
                g = self.cache_gens[site.device] = self._generator(-1 - j, site.device)
                g.manual_seed(self._seed(e, slot, b))
            if len(self.cache_store) <= j or self.cache_store[j].shape[0] < rows:
                store = torch.empty((rows, *site.shape), dtype=site.dtype, device=site.device)
                self.cache_store[j : j + 1] = [store]
            block = self.cache_store[j][:rows]
            _fill_block(site, block, g)
            self.cache.append(block)
        return self.cache[k]

    def _repeated(self, e: int, rows: int) -> Tensor:
        """``rows`` contiguous copies of example ``e``, kept while passes stay on ``e``.

        A contiguous input makes the noise addition a flat elementwise loop; adding noise to an
        expanded (stride-0) view was measured 5% slower per pass on 1x8x8 inputs. The copy is a
        normal (not inference) tensor so that its version counter shows whether a model wrote
        into its input; it is then made again.
        """
        kept = self.repeated
        if (
            kept is None
            or kept[0] != e
            or kept[1].shape[0] < rows
            or kept[1]._version != self.repeated_version
        ):
            with torch.inference_mode(False):
                rep = self.x[e : e + 1].expand(rows, *self.x.shape[1:]).contiguous()
            self.repeated, self.repeated_version = (e, rep), rep._version
            kept = self.repeated
        return kept[1][:rows]

    def run(self, chunk: list[_Segment], results: list[Samples]) -> None:
        """Evaluate one forward pass made of ``chunk``'s segments; add its statistics."""
        if len(chunk) == 1:  # the common case: one example (and one request) in the pass
            e0, ne = chunk[0][0], 1
            num_rows = chunk[0][5] - chunk[0][4]
            groups, row_group = [chunk[0][1]], None
            inp = self._repeated(e0, num_rows)
        else:
            lengths = [r1 - r0 for _, _, _, _, r0, r1 in chunk]
            num_rows = sum(lengths)
            e0 = min(seg[0] for seg in chunk)
            ne = max(seg[0] for seg in chunk) + 1 - e0
            groups = [(seg[1] * ne + seg[0] - e0) for seg in chunk]  # (slot, example) of a seg
            row_group = None
            if ne == 1:
                inp = self._repeated(e0, num_rows)
            else:
                seg_example = np.array([seg[0] - e0 for seg in chunk], dtype=np.int64)
                row_example = torch.from_numpy(np.repeat(seg_example, lengths)).to(self.x.device)
                inp = self.x[e0 : e0 + ne].index_select(0, row_example)
            if len(set(groups)) > 1:
                row_group = np.repeat(np.array(groups, dtype=np.int64), lengths)
                row_group = torch.from_numpy(row_group).to(self.x.device)

        self.chunk, self.num_rows, self.calls = chunk, num_rows, 0
        self.seeded.clear()
        with self.source:
            out = self.model(inp)
        if not self.sites_known:
            if self.calls == 0:
                raise NotRandomizedError(
                    f"no NoiseLayer of {type(self.model).__name__} ran in its forward pass"
                )
            self.sites_known = True
        if self.calls != len(self.sites):
            raise ConfigError(
                f"the model called {self.calls} noise layers, its first pass {len(self.sites)}"
            )
        if out.dim() != 2 or out.shape != (num_rows, self.num_classes):
            raise ConfigError(
                f"model output has shape {tuple(out.shape)} for {num_rows} rows; expected "
                f"({num_rows}, num_classes={self.num_classes})"
            )
        self._accumulate(out, chunk[0], groups, row_group, e0, ne, len(results), results)

    def _draw(
        self, kind: str, shape: torch.Size, like: Tensor, std: float | None = None
    ) -> tuple[Tensor, bool, bool]:
        """The current pass's noise for its next noise site: ``(z, scratch, scaled)``.

        ``scratch``: ``z`` lies in the site's pass buffer (which the caller may overwrite: it
        is refilled before every use) rather than in the cache of a block split across
        passes. ``scaled``: ``z`` is already ``std * z`` (only for a pass of one whole block of
        Gaussian noise on the CPU, where the sampler scales for free; see :func:`_fill_block`).
        """
        k = self.calls
        chunk, num_rows = self.chunk, self.num_rows
        site = self._site(k, kind, shape, like, num_rows)
        self.calls = k + 1
        if len(chunk) == 1 and num_rows < chunk[0][3]:
            e, slot, b, rows, r0, r1 = chunk[0]
            return self._cached(e, slot, b, rows, k)[r0:r1], False, False
        fused = (
            std
            if len(chunk) == 1
            and site.kind == "gaussian"
            and site.device.type == "cpu"
            and site.dtype in _FUSED_SCALE_DTYPES
            and num_rows * site.numel >= 16
            else None
        )
        buf = self.buffers[k]
        offset = 0
        for position, (e, slot, b, rows, r0, r1) in enumerate(chunk):
            view = buf[offset : offset + r1 - r0]
            if r1 - r0 == rows:
                g = self._generator(position, site.device)
                if (position, site.device) not in self.seeded:
                    g.manual_seed(self._seed(e, slot, b))
                    self.seeded.add((position, site.device))
                _fill_block(site, view, g, fused)
            else:
                view.copy_(self._cached(e, slot, b, rows, k)[r0:r1])
            offset += r1 - r0
        return buf[:num_rows], True, fused is not None

    def __call__(self, kind: str, shape: torch.Size, like: Tensor) -> Tensor:
        """Noise source protocol (:mod:`bench.noise`): standard noise for the next site."""
        return self._draw(kind, shape, like)[0]

    def add(self, kind: str, h: Tensor, scale: Tensor) -> Tensor:
        """Noise source protocol: ``h + scale * z``, formed in the site's pass buffer.

        Same rounding as the expression (``scale * z`` first), so counts do not depend on
        which of the two paths a noise layer takes.
        """
        std = float(scale) if scale.device.type == "cpu" and scale.dim() == 0 else None
        z, scratch, scaled = self._draw(kind, h.shape, h, std)
        if h.dtype != z.dtype:  # a later pass in another dtype than the first (shape: checked)
            return h + scale * z
        if not scratch:
            z = torch.mul(z, scale, out=self.buffers[self.calls - 1][: z.shape[0]])
        elif not scaled:
            z.mul_(scale)
        return z.add_(h)

    def _accumulate(
        self,
        out: Tensor,
        first: _Segment,
        groups: list[int],
        row_group: Tensor | None,
        e0: int,
        ne: int,
        num_slots: int,
        results: list[Samples],
    ) -> None:
        """Add the pass's argmax counts (and softmax sums) to each (request, example)."""
        k = self.num_classes
        pred = _argmax_rows(out)
        softmax = results[0].softmax_sum is not None
        p = torch.softmax(out.float(), dim=1).double() if softmax else None
        if row_group is None:  # one (request, example) in the whole pass
            e, res = first[0], results[first[1]]
            # index_add_ of ones: one kernel, no temporary (bincount + add_ measured 137 us vs
            # 90 us per 1000 rows right after a pass on 2 CPU threads); integer, so exact.
            if self.ones.shape[0] < pred.shape[0] or self.ones.device != pred.device:
                self.ones = torch.ones(pred.shape[0], dtype=torch.int64, device=pred.device)
            res.counts[e].index_add_(0, pred, self.ones[: pred.shape[0]])
            if p is not None and res.softmax_sum is not None and res.softmax_sq_sum is not None:
                res.softmax_sum[e] += p.sum(dim=0)
                res.softmax_sq_sum[e] += (p * p).sum(dim=0)
            return
        num_groups = num_slots * ne
        hist = torch.bincount(row_group * k + pred, minlength=num_groups * k)
        hist = hist.view(num_slots, ne, k)
        if p is not None:
            sums = torch.zeros(num_groups, k, dtype=torch.float64, device=out.device)
            sq = torch.zeros_like(sums)
            sums.index_add_(0, row_group, p)
            sq.index_add_(0, row_group, p * p)
            sums, sq = sums.view(num_slots, ne, k), sq.view(num_slots, ne, k)
        for slot in sorted({g // ne for g in groups}):
            res = results[slot]
            res.counts[e0 : e0 + ne] += hist[slot]
            if p is not None and res.softmax_sum is not None and res.softmax_sq_sum is not None:
                res.softmax_sum[e0 : e0 + ne] += sums[slot]
                res.softmax_sq_sum[e0 : e0 + ne] += sq[slot]


# ---------------------------------------------------------------------------------------------
# Cohen et al. (2019) randomized smoothing on a base classifier
# ---------------------------------------------------------------------------------------------


def _smoothed(model: nn.Module, x: Tensor, sigma: float) -> nn.Sequential:
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not 0 < sigma < math.inf:
        raise ConfigError(f"sigma must be a positive finite number, got {sigma!r}")
    layer = NoiseLayer("gaussian", float(sigma))
    if layer.scale.device != x.device:
        layer = layer.to(x.device)
    return nn.Sequential(layer, model)


def _infer_classes(model: nn.Module, x: Tensor, num_classes: int | None) -> int:
    if num_classes is not None:
        return _check_int("num_classes", num_classes, 2)
    with torch.inference_mode(), _prediction_mode(model):
        out = model(x[:1])
    if out.dim() != 2:
        raise ConfigError(f"base classifier output has shape {tuple(out.shape)}; expected (1, K)")
    return _check_int("num_classes (inferred from the model output)", int(out.shape[1]), 2)


def _resolve_seed(seed: int | None, generator: torch.Generator | None) -> int:
    if seed is not None:
        return _check_int("seed", seed, -(2**63))
    if generator is not None:
        return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device))
    return 0


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha!r}")
    return float(alpha)


def smoothed_certify(
    model: nn.Module,
    x: Tensor,
    *,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    num_classes: int | None = None,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    indices: Tensor | None = None,
    workers: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Cohen et al.'s CERTIFY for the Gaussian smoothing of a base classifier ``model``.

    ``g(x) = argmax_c P(model(x + eps) = c)``, ``eps ~ N(0, sigma^2 I)`` in pixel units. ``n0``
    draws (stream :data:`SELECTION`) pick ``c_hat``; ``n`` fresh draws (stream
    :data:`ESTIMATION`) count ``n_A`` hits of ``c_hat``; ``p_lower`` is the one-sided
    ``(1 - alpha)`` Clopper-Pearson lower bound on ``P(model(x + eps) = c_hat)``.

    Guarantee: with probability ``>= 1 - alpha`` over the draws, if the label is not ``-1``
    then ``g(x + delta) = label`` for every ``||delta||_2 < radius``.

    Args:
        model: base classifier (no noise layer needed), ``(B, C, H, W) -> (B, K)`` scores.
        x: ``(N, C, H, W)`` inputs, pixels in ``[0, 1]``.
        sigma: noise standard deviation in pixel units.
        n0, n: selection and estimation draws per example.
        alpha: failure probability of the certificate.
        num_classes: ``K``; inferred from one forward pass if ``None``.
        batch_size: rows per forward pass (does not change the result).
        generator: if ``seed`` is ``None``, the seed is one integer drawn from it.
        seed: run seed (default 0); with ``indices`` it fixes every draw.
        indices: ``(N,)`` global example ids (default ``arange(N)``).
        workers: CPU pipelines running passes side by side (see :func:`sample`; does not
            change the result).

    Returns:
        ``labels`` ``(N,)`` int64 (``-1`` = abstain, when ``p_lower < 0.5``) and ``radii``
        ``(N,)`` float64 ``sigma * Phi^-1(p_lower)`` (``0.0`` on abstain), on ``x.device``.
    """
    _check_input(x)
    alpha = _check_alpha(alpha)
    n0 = _check_int("n0", n0, 1)
    n = _check_int("n", n, 1)
    k = _infer_classes(model, x, num_classes)
    run_seed = _resolve_seed(seed, generator)
    # Both streams share forward passes; the estimation draws are independent of the
    # selection draws (other stream), so c_hat is independent of them as CERTIFY requires.
    selection, estimation = _sample_streams(
        _smoothed(model, x, sigma),
        x,
        [(SELECTION, n0), (ESTIMATION, n)],
        num_classes=k,
        seed=run_seed,
        indices=indices,
        batch_size=batch_size,
        block_size=DEFAULT_BLOCK_SIZE,
        row_bytes_owner=model,
        workers=workers,
    )
    c_hat = selection.counts.argmax(dim=1)
    n_a = estimation.counts.gather(1, c_hat[:, None])[:, 0].cpu().numpy()
    p_lower = torch.as_tensor(lower_confidence_bound(n_a, n, alpha), dtype=torch.float64)
    certified = p_lower >= 0.5
    radii = torch.where(
        certified,
        float(sigma) * torch.as_tensor(special.ndtri(p_lower.numpy()), dtype=torch.float64),
        torch.zeros_like(p_lower),
    )
    labels = torch.where(certified, c_hat.cpu(), torch.full_like(c_hat.cpu(), -1))
    return labels.to(x.device), radii.to(x.device)


def smoothed_predict(
    model: nn.Module,
    x: Tensor,
    *,
    sigma: float,
    n: int,
    alpha: float,
    num_classes: int | None = None,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    indices: Tensor | None = None,
    workers: int | None = None,
) -> Tensor:
    """Cohen et al.'s PREDICT for the Gaussian smoothing of a base classifier ``model``.

    ``n`` draws (stream :data:`PREDICTION`); with top two counts ``c1 >= c2``, abstain if the
    two-sided binomial test of ``c1`` successes in ``c1 + c2`` trials at ``p = 1/2`` has
    p-value ``> alpha``. Guarantee: the returned label differs from ``g(x)`` (and is not
    ``-1``) with probability ``<= alpha``.

    Arguments as for :func:`smoothed_certify`. Returns ``(N,)`` int64 labels on ``x.device``,
    ``-1`` = abstain.
    """
    _check_input(x)
    alpha = _check_alpha(alpha)
    n = _check_int("n", n, 1)
    k = _infer_classes(model, x, num_classes)
    run_seed = _resolve_seed(seed, generator)
    (samples,) = _sample_streams(
        _smoothed(model, x, sigma),
        x,
        [(PREDICTION, n)],
        num_classes=k,
        seed=run_seed,
        indices=indices,
        batch_size=batch_size,
        block_size=DEFAULT_BLOCK_SIZE,
        row_bytes_owner=model,
        workers=workers,
    )
    top = torch.topk(samples.counts, 2, dim=1)
    c1 = top.values[:, 0].cpu().numpy()
    c2 = top.values[:, 1].cpu().numpy()
    pvalues = torch.as_tensor(binomial_test_pvalue(c1, c2), dtype=torch.float64)
    label = samples.counts.argmax(dim=1).cpu()
    labels = torch.where(pvalues > alpha, torch.full_like(label, -1), label)
    return labels.to(x.device)
