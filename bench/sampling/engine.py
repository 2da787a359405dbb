"""The engine's entry points: :func:`sample` and the request packing behind it.

:func:`sample` evaluates a randomized network (one or more :class:`~bench.noise.NoiseLayer`
modules, the *noise sites*) ``n`` times per input and returns the histogram of argmax labels
(and optionally the sum and sum of squares of the softmax), accumulated on the input's device,
under :func:`torch.inference_mode` with the model in ``eval()`` mode. Noise is seeded per
(example, block) (:mod:`bench.sampling.seeding`), passes are planned to a memory budget
(:mod:`bench.sampling.plan`, :mod:`bench.sampling.memory`), run by a
:class:`~bench.sampling.runner.Runner`, on CPU in several pipelines
(:mod:`bench.sampling.pipelines`).

What does not depend on the batch size, ``workers`` or sharding: every draw. The counts then
do not either whenever the model's output for a row does not depend on which rows share its
forward pass (true of torch's CPU layers in the tests; an accelerator may pick kernels by batch
shape that round differently). Float64 softmax sums, and anything computed from them, may
differ in the last bits, because the order in which the passes' sums are added changes; for a
given batch size and ``workers`` they are the same from run to run.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bench.errors import ConfigError
from bench.noise import noise_layers
from bench.sampling.memory import budget_batch_size, row_bytes
from bench.sampling.pipelines import Pipeline, pipeline_count, run_threads
from bench.sampling.plan import plan_passes, unit_rows, work_units
from bench.sampling.runner import Runner, Samples, zero_results
from bench.sampling.seeding import DEFAULT_BLOCK_SIZE, ESTIMATION
from bench.sampling.sites import NotRandomizedError, prediction_mode
from bench.validation import check_int

__all__ = ["check_indices", "check_input", "default_batch_size", "sample", "sample_streams"]


def check_indices(indices: Tensor | None, num_examples: int) -> list[int]:
    """The global example ids as a list: ``indices`` (1-D, integer, >= 0, one per example)
    or ``0 .. num_examples - 1``."""
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


def check_input(x: Tensor) -> None:
    """Raise unless ``x`` is a floating-point batch ``(N, ...)`` (``(N, C, H, W)`` images)."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ConfigError("x must be a floating-point tensor of shape (N, C, H, W) in [0, 1]")


def default_batch_size(
    model: nn.Module,
    x: Tensor,
    *,
    n: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    workers: int | None = None,
) -> int:
    """The ``batch_size`` :func:`sample` uses for randomized ``model`` on inputs like ``x``.

    ``x``: ``(N, C, H, W)`` in [0, 1] (only ``x[:1]`` is evaluated, in one dry run); ``n``
    draws per example (``None``: at least one block); ``workers`` as for :func:`sample` (the
    pipelines share the memory budget). The memory model: :mod:`bench.sampling.memory`.
    """
    check_input(x)
    block_size = check_int(block_size, "block_size", minimum=1)
    block_rows = block_size if n is None else min(block_size, check_int(n, "n", minimum=1))
    if workers is not None:
        workers = check_int(workers, "workers", minimum=1)
    pipelines = pipeline_count(workers, x.device, torch.get_num_threads())
    with torch.inference_mode(), prediction_mode(model):
        per_row = row_bytes(model, x)
    return budget_batch_size(x, per_row, block_rows, pipelines)


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
        stream: ``SELECTION``, ``ESTIMATION``, ``PREDICTION`` or ``RESCORE``
            (:mod:`bench.sampling.seeding`).
        indices: ``(N,)`` global example ids (default ``arange(N)``); give the ids of a shard
            to get exactly the draws the full set would get.
        batch_size: rows per forward pass (default: from
            :data:`~bench.sampling.memory.MEMORY_BUDGET_BYTES`). Does not change the draws
            (counts and softmax sums: see the module doc).
        block_size: draws per seeded block; changing it changes the draws (part of the record).
        softmax: also accumulate softmax sums and sums of squares.
        progress: show a tqdm progress bar over the ``N * n`` rows.
        workers: CPU pipelines (threads) that run the forward passes side by side, each
            with ``torch.get_num_threads() // workers`` intra-op threads (default: one per
            intra-op thread, at most :data:`~bench.sampling.pipelines.MAX_CPU_WORKERS`, or
            the environment variable ``CERTBENCH_SAMPLER_WORKERS``; ``1`` runs every pass in
            the calling thread with all of torch's threads). Off the CPU, and for work of one
            pass, the passes always run in the calling thread. Does not change a draw or a
            count (softmax sums: the last bits may differ from ``workers=1``, never from
            run to run). With several pipelines the model is called from several threads
            at once: its forward must not change shared state (true of torch's layers).

    Raises:
        NotRandomizedError: (a ``ValueError``) if no noise layer runs in the forward.
        ConfigError: for invalid arguments or a model output that is not ``(B, num_classes)``.
    """
    check_input(x)
    n = check_int(n, "n", minimum=1)
    stream = check_int(stream, "stream", minimum=0)
    return sample_streams(
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


def sample_streams(
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
    first_block: int = 0,
) -> list[Samples]:
    """:func:`sample` for several ``(stream, n)`` requests at once, sharing forward passes.

    Each request's draws are exactly those :func:`sample` gives it alone (same blocks and
    seeds); packing them together only saves forward passes. ``row_bytes_owner``: the module
    under which the memory estimate is remembered (default ``model``). ``first_block``: the
    requests take the draws from draw ``first_block * block_size`` of their streams on
    (:func:`~bench.sampling.plan.plan_passes`): the counts of ``(stream, m)`` at first
    block ``b`` are those of ``(stream, b * block_size + m)`` minus those of
    ``(stream, b * block_size)``, which lets a sequential test draw in rounds.
    """
    num_classes = check_int(num_classes, "num_classes", minimum=1)
    block_size = check_int(block_size, "block_size", minimum=1)
    seed = check_int(seed, "seed", minimum=-(2**63))
    if batch_size is not None:
        batch_size = check_int(batch_size, "batch_size", minimum=1)
    if workers is not None:
        workers = check_int(workers, "workers", minimum=1)
    first_block = check_int(first_block, "first_block", minimum=0)
    if not noise_layers(model):
        raise NotRandomizedError(
            f"sample() needs a randomized model (one with a NoiseLayer); got {type(model).__name__}"
        )
    num_examples = x.shape[0]
    ids = check_indices(indices, num_examples)
    device = x.device
    results = zero_results(requests, num_examples, num_classes, softmax, device)
    if num_examples == 0:
        return results

    with torch.inference_mode(), prediction_mode(model):
        threads = torch.get_num_threads()
        wanted = pipeline_count(workers, device, threads)
        if batch_size is None:
            block_rows = min(block_size, max(n for _, n in requests))
            per_row = row_bytes(model, x, owner=row_bytes_owner)
            batch_size = budget_batch_size(x, per_row, block_rows, wanted)
        streams = [stream for stream, _ in requests]
        plan = plan_passes(num_examples, requests, block_size, batch_size, first_block)
        units = list(work_units(plan))
        pool = min(wanted, len(units))

        def pipeline() -> Pipeline:
            return Pipeline(Runner(model, x, ids, seed, streams, batch_size, num_classes))

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
                        bar.update(unit_rows(unit))
            else:
                partial = run_threads(
                    units,
                    pool,
                    threads,
                    pipeline,
                    lambda: zero_results(requests, num_examples, num_classes, softmax, device),
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
