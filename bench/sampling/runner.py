"""One forward pass of the engine: its noise, the model call, and the counting.

A :class:`Runner` evaluates forward passes made of block segments (:mod:`bench.sampling.plan`)
and adds their argmax counts (and softmax sums) to :class:`Samples`. It is the noise source
(:mod:`bench.noise`) of the passes it runs: each noise site's noise is generated when the
site asks for it, from the generator of each block (:mod:`bench.sampling.seeding`).

For speed on CPU, where every parallel kernel has a fixed cost (large on a busy machine), a
pass of one example reuses one contiguous copy of it as input, the noise is formed in place
in reusable buffers, and the argmax runs in pieces small enough for ATen to run inline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from bench.errors import ConfigError
from bench.noise import noise_source, sample_standard
from bench.sampling.plan import Segment
from bench.sampling.seeding import block_seed, seed_generator
from bench.sampling.sites import NotRandomizedError, Site

__all__ = ["Runner", "Samples", "argmax_rows", "fill_block", "zero_results"]


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


def zero_results(
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


_FUSED_SCALE_DTYPES = (torch.float32, torch.float64)
"""dtypes for which torch's CPU Gaussian sampler (blocks of >= 16 elements) rounds
``std * z`` once, like scaling afterwards (smaller blocks go through a float64 sampler that
does not); tests/test_sampling.py checks the equality bit for bit."""


def fill_block(
    site: Site, out: Tensor, generator: torch.Generator, std: float | None = None
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


def argmax_rows(out: Tensor) -> Tensor:
    """``out.argmax(dim=1)`` for ``(B, K)`` scores; on CPU in pieces that ATen runs inline.

    Waking the intra-op thread pool has a fixed cost that, on a busy CPU, can exceed the whole
    argmax (a worker thread may have to be rescheduled); the pieces avoid it. On CPU the
    indices of ``torch.max(dim=1)`` are used: the same first-maximum rule (NaN counts as the
    maximum), cheaper than ``argmax`` for a narrow ``K`` (benchmarks/RESULTS.md);
    ``tests/test_sampling.py`` checks the equality on ties and NaN.
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


class Runner:
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
        self.sites: list[Site] = []
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
        self.chunk: list[Segment] = []
        self.num_rows = 0
        self.calls = 0
        self.seeded: set[tuple[int, torch.device]] = set()
        self.source = noise_source(self)
        self.ones = torch.ones(batch_size, dtype=torch.int64, device=x.device)

    def resized(self, batch_size: int) -> Runner:
        """A runner like this one for passes of at most ``batch_size`` rows (after an
        out-of-memory pass); it keeps the noise sites already discovered, with smaller buffers.
        """
        runner = Runner(
            self.model, self.x, self.ids, self.seed, self.streams, batch_size, self.num_classes
        )
        if self.sites_known:
            runner.sites_known, runner.sites = True, self.sites
            runner.buffers = [
                torch.empty((batch_size, *s.shape), dtype=s.dtype, device=s.device)
                for s in self.sites
            ]
        return runner

    def _seed(self, e: int, slot: int, b: int) -> int:
        return block_seed(self.seed, self.ids[e], self.streams[slot], b)

    def _generator(self, key: int, device: torch.device) -> torch.Generator:
        """A reusable generator on ``device`` (``key``: position in a pass, or a cache slot)."""
        gens = self.pool.setdefault(device, {})
        if key not in gens:
            gens[key] = torch.Generator(device=device)
        return gens[key]

    def _site(self, k: int, kind: str, shape: torch.Size, like: Tensor, rows: int) -> Site:
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
        site = Site(kind, tuple(shape[1:]), like.dtype, like.device)
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
                seed_generator(g, self._seed(e, slot, b))
            if len(self.cache_store) <= j or self.cache_store[j].shape[0] < rows:
                store = torch.empty((rows, *site.shape), dtype=site.dtype, device=site.device)
                self.cache_store[j : j + 1] = [store]
            block = self.cache_store[j][:rows]
            fill_block(site, block, g)
            self.cache.append(block)
        return self.cache[k]

    def _repeated(self, e: int, rows: int) -> Tensor:
        """``rows`` contiguous copies of example ``e``, kept while passes stay on ``e``.

        A contiguous input makes the noise addition a flat elementwise loop, faster than adding
        noise to an expanded (stride-0) view (benchmarks/RESULTS.md). The copy is a
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

    def run(self, chunk: list[Segment], results: list[Samples]) -> None:
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
        Gaussian noise on the CPU, where the sampler scales for free; see :func:`fill_block`).
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
                    seed_generator(g, self._seed(e, slot, b))
                    self.seeded.add((position, site.device))
                fill_block(site, view, g, fused)
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
        first: Segment,
        groups: list[int],
        row_group: Tensor | None,
        e0: int,
        ne: int,
        num_slots: int,
        results: list[Samples],
    ) -> None:
        """Add the pass's argmax counts (and softmax sums) to each (request, example)."""
        k = self.num_classes
        pred = argmax_rows(out)
        softmax = results[0].softmax_sum is not None
        p = torch.softmax(out.float(), dim=1).double() if softmax else None
        if row_group is None:  # one (request, example) in the whole pass
            e, res = first[0], results[first[1]]
            # index_add_ of ones: one kernel, no temporary (cheaper than bincount + add_ right
            # after a pass, benchmarks/RESULTS.md); integer, so exact.
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
