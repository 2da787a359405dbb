"""The Monte Carlo noise-sampling engine shared by every randomized defense.

:func:`sample` evaluates a randomized network ``n`` times per input and returns the histogram
of argmax labels (and optionally softmax sums); :func:`smoothed_certify` and
:func:`smoothed_predict` are Cohen et al.'s CERTIFY and PREDICT on top of it, for a base
classifier smoothed with Gaussian noise on its input. One concern per module:

* :mod:`~bench.sampling.seeding` -- streams, blocks and their seeds (what fixes every draw);
* :mod:`~bench.sampling.sites` -- prediction mode, noise sites, the one-row dry run;
* :mod:`~bench.sampling.memory` -- bytes per noisy row and the default pass size;
* :mod:`~bench.sampling.plan` -- rows into forward passes, passes into units of work;
* :mod:`~bench.sampling.runner` -- one forward pass: its noise, the model call, the counts;
* :mod:`~bench.sampling.pipelines` -- CPU worker threads and out-of-memory back-off;
* :mod:`~bench.sampling.engine` -- :func:`sample` and :func:`default_batch_size`;
* :mod:`~bench.sampling.cohen` -- CERTIFY and PREDICT;
* :mod:`~bench.sampling.sequential` -- sequential CERTIFY and PREDICT (rounds, confidence
  sequences, stop once every grid decision is fixed).
"""

from __future__ import annotations

from bench.sampling.cohen import smoothed_certify, smoothed_predict
from bench.sampling.engine import default_batch_size, sample
from bench.sampling.memory import MAX_BATCH_SIZE, MEMORY_BUDGET_BYTES
from bench.sampling.pipelines import MAX_CPU_WORKERS, WORKERS_ENV
from bench.sampling.runner import Samples
from bench.sampling.seeding import (
    DEFAULT_BLOCK_SIZE,
    ESTIMATION,
    PREDICTION,
    RESCORE,
    SELECTION,
    block_seed,
)
from bench.sampling.sequential import (
    smoothed_certify_sequential,
    smoothed_predict_sequential,
)
from bench.sampling.sites import NotRandomizedError

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "ESTIMATION",
    "MAX_BATCH_SIZE",
    "MAX_CPU_WORKERS",
    "MEMORY_BUDGET_BYTES",
    "PREDICTION",
    "RESCORE",
    "SELECTION",
    "WORKERS_ENV",
    "NotRandomizedError",
    "Samples",
    "block_seed",
    "default_batch_size",
    "sample",
    "smoothed_certify",
    "smoothed_certify_sequential",
    "smoothed_predict",
    "smoothed_predict_sequential",
]
