"""Noise layers and the hook through which the Monte Carlo engine supplies their noise.

Every randomized defense (PixelDP, randomized smoothing, plugins) expresses its randomness
as one or more :class:`NoiseLayer` modules inside its network. A noise layer adds
``scale * z`` to its input, where ``z`` is *standard* noise of the input's shape, drawn from a
registered distribution (its *kind*): built in are ``"gaussian"`` (unit variance) and
``"laplace"`` (unit scale, density ``exp(-|z|)/2``).

**A new distribution** is one decorated sampler in a module listed under the entry-point group
``certbench.noises`` (:mod:`bench.registry`); the sampling engine then seeds it like the
built-ins, so a randomized defense never samples by itself::

    @register_noise("uniform")  # uniform on [-1, 1)
    def uniform(shape, *, dtype, device, generator):
        return torch.rand(shape, dtype=dtype, device=device, generator=generator).mul_(2).sub_(1)

A sampler must draw every random number from ``generator`` (``None``: torch's global
generator), so that its output is fixed by the generator's state, and return a tensor of
``shape``, ``dtype`` and ``device``.

By default ``z`` comes from torch's global generator, which is what training and single
forward passes (attacks) use. The sampling engine (:mod:`bench.sampling`) instead installs a
*noise source* with :func:`noise_source`: a callable ``source(kind, shape, like) -> Tensor``
that returns the pre-generated, per-example-seeded noise for the rows being evaluated. That
makes the draws independent of batch size and of how a test set is sharded. A source
may also have a method ``add(kind, h, scale) -> Tensor`` returning ``h + scale * z`` itself
(rounded exactly as that expression: ``scale * z`` first); a noise layer at prediction uses
it, so the engine can form the noisy activation in the buffer it has just filled with ``z``
instead of allocating two temporaries per forward pass.

Noise is on in ``train()`` and ``eval()`` mode alike: a randomized defense is randomized at
prediction time, and attack libraries that call ``model.eval()`` must not switch it off.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

import torch
from torch import Tensor, nn

from bench.registry import NOISES, register_noise

__all__ = [
    "NOISE_KINDS",
    "NoiseLayer",
    "add_standard_noise",
    "is_randomized",
    "noise_kinds",
    "noise_layers",
    "noise_source",
    "register_noise",
    "sample_standard",
    "standard_noise",
]

NOISE_KINDS = ("gaussian", "laplace")
"""The built-in kinds; :func:`noise_kinds` lists every registered one (plugins too)."""

NoiseSource = Callable[[str, torch.Size, Tensor], Tensor]

_SOURCE: contextvars.ContextVar[NoiseSource | None] = contextvars.ContextVar(
    "certbench_noise_source", default=None
)


@register_noise("gaussian")
def gaussian(
    shape: tuple[int, ...] | torch.Size,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator | None,
) -> Tensor:
    """Standard Gaussian N(0, 1), one ``torch.randn`` call."""
    return torch.randn(shape, dtype=dtype, device=device, generator=generator)


@register_noise("laplace")
def laplace(
    shape: tuple[int, ...] | torch.Size,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator | None,
) -> Tensor:
    """Standard Laplace(0, 1) by the inverse CDF of one uniform per element (one
    ``torch.rand`` call, so the output is fixed by the generator's state)."""
    u = torch.rand(shape, dtype=dtype, device=device, generator=generator)
    v = u.mul_(2.0).sub_(1.0)  # uniform on [-1, 1)
    # |v| = 1 only when rand returns exactly 0; cap it just below 1 so the magnitude stays
    # finite (24·ln 2 ≈ 16.6 in float32) instead of -log(0) = inf.
    top = 1.0 - torch.finfo(dtype).eps / 2
    mag = torch.log1p(-v.abs().clamp_(max=top)).neg_()
    return mag.mul_(torch.sign(v))


def noise_kinds() -> list[str]:
    """Every registered noise kind (built-ins and plugins), sorted."""
    return NOISES.names()


def _sampler(kind: str):
    if kind not in NOISES:
        raise ValueError(f"unknown noise kind {kind!r}; allowed: {', '.join(noise_kinds())}")
    return NOISES.get(kind)


def sample_standard(
    kind: str,
    shape: tuple[int, ...] | torch.Size,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Standard noise of ``shape`` from the registered distribution ``kind`` (N(0, 1) for
    ``"gaussian"``, Laplace(0, 1) for ``"laplace"``), deterministic given ``generator``'s
    state (torch's global generator when ``None``)."""
    return _sampler(kind)(shape, dtype=dtype, device=device, generator=generator)


def standard_noise(kind: str, shape: torch.Size, like: Tensor) -> Tensor:
    """Standard noise for a noise layer: from the installed source, else from torch's RNG."""
    source = _SOURCE.get()
    if source is not None:
        return source(kind, shape, like)
    return sample_standard(kind, shape, dtype=like.dtype, device=like.device)


def add_standard_noise(kind: str, h: Tensor, scale: Tensor) -> Tensor:
    """``h + scale * z``, ``z`` standard noise of ``h``'s shape (from the installed source).

    ``scale``: a 0-d tensor of ``h``'s dtype. Uses the source's ``add`` method when it has
    one (module doc); the value is the same either way for the same ``z``.
    """
    source = _SOURCE.get()
    if source is None:
        return h + scale * sample_standard(kind, h.shape, dtype=h.dtype, device=h.device)
    add = getattr(source, "add", None)
    if add is not None:
        return add(kind, h, scale)
    return h + scale * source(kind, h.shape, h)


class noise_source(contextlib.AbstractContextManager):
    """Route every :class:`NoiseLayer` draw inside the ``with`` block through ``source``.

    ``with noise_source(source): ...``; ``None`` restores torch's global generator inside
    the block. A class rather than a generator function: the sampling engine enters it once
    per forward pass.
    """

    __slots__ = ("_source", "_tokens")

    def __init__(self, source: NoiseSource | None) -> None:
        self._source = source
        self._tokens: list[contextvars.Token[NoiseSource | None]] = []

    def __enter__(self) -> None:
        self._tokens.append(_SOURCE.set(self._source))

    def __exit__(self, *exc: object) -> None:
        _SOURCE.reset(self._tokens.pop())


class NoiseLayer(nn.Module):
    """Adds ``multiplier * scale * z`` with ``z`` standard noise of ``kind``.

    Args:
        kind: a registered noise kind: ``"gaussian"`` (z ~ N(0, I)), ``"laplace"`` (z_i ~
            Laplace(0, 1), i.i.d.) or a plugin's (:func:`noise_kinds`).
        scale: the noise standard deviation (Gaussian) or Laplace scale b, in the units of the
            layer's input (pixels in [0, 1] when placed on the image).
        scale_fn: optional callable returning a scalar tensor that multiplies ``scale`` inside
            the autograd graph (PixelDP's *optimise* sensitivity option: the noise follows the
            current sensitivity of the pre-noise layer).

    ``multiplier`` is a training-only warm-up factor in (0, 1]; it is forced to 1 whenever the
    layer is used for prediction through the sampling engine, and defaults to 1.
    """

    def __init__(
        self, kind: str, scale: float, *, scale_fn: Callable[[], Tensor] | None = None
    ) -> None:
        super().__init__()
        _sampler(kind)  # unknown kinds fail here, listing the registered ones
        if not scale >= 0.0:
            raise ValueError(f"noise scale must be >= 0, got {scale!r}")
        self.kind = kind
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.scale_fn = scale_fn
        self.multiplier = 1.0

    def effective_scale(self) -> Tensor:
        """The scale actually applied (``scale``, times ``scale_fn()`` when given)."""
        s = self.scale
        if self.scale_fn is not None:
            s = s * self.scale_fn()
        return s

    def forward(self, h: Tensor) -> Tensor:
        if self.scale_fn is None and self.multiplier == 1.0:  # prediction: no scalar ops
            s = self.scale if self.scale.dtype == h.dtype else self.scale.to(h.dtype)
            return add_standard_noise(self.kind, h, s)
        z = standard_noise(self.kind, h.shape, h)
        return h + (self.multiplier * self.effective_scale()).to(h.dtype) * z

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, scale={float(self.scale):.6g}"


def noise_layers(model: nn.Module) -> list[NoiseLayer]:
    """Every :class:`NoiseLayer` in ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, NoiseLayer)]


def is_randomized(model: nn.Module) -> bool:
    """True if ``model`` contains at least one noise layer."""
    return bool(noise_layers(model))
