"""Cohen, Rosenfeld & Kolter (ICML 2019), *Certified Adversarial Robustness via Randomized
Smoothing*: the algorithms CERTIFY and PREDICT (their Pseudocode 1).

For a base classifier ``f`` and noise level ``sigma`` the smoothed classifier is
``g(x) = argmax_c P(f(x + eps) = c)``, ``eps ~ N(0, sigma^2 I)`` in pixel units (inputs in
[0, 1]). Both algorithms only count ``f``'s labels under noise (the paper's SAMPLEUNDERNOISE),
which the shared engine does (:func:`bench.sampling.engine.sample_streams`), seeded per
example so that the draws do not depend on batch size or sharding; the confidence bound, the
radius and the binomial test come from :mod:`bench.certificates` and :mod:`bench.stats`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bench.certificates import smoothing_radius
from bench.errors import ConfigError
from bench.noise import NoiseLayer
from bench.sampling.engine import check_input, sample_streams
from bench.sampling.seeding import DEFAULT_BLOCK_SIZE, ESTIMATION, PREDICTION, SELECTION
from bench.sampling.sites import prediction_mode
from bench.stats import binomial_test_pvalue
from bench.validation import check_int, check_number

__all__ = ["ABSTAIN", "predict_from_counts", "smoothed_certify", "smoothed_predict"]

ABSTAIN = -1
"""The label returned when the smoothed classifier abstains."""


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
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Cohen et al.'s CERTIFY for the Gaussian smoothing ``g`` of a base classifier ``model``.

    ``n0`` draws (stream ``SELECTION``) pick ``c_hat``; ``n`` fresh draws (stream
    ``ESTIMATION``) count ``n_A`` hits of ``c_hat``; ``p_lower`` is the one-sided
    ``(1 - alpha)`` Clopper-Pearson lower bound on ``P(model(x + eps) = c_hat)``; the radius is
    ``sigma * Phi^-1(p_lower)``, and CERTIFY abstains when ``p_lower < 1/2``.

    Guarantee: with probability ``>= 1 - alpha`` over the draws, if the label is not ``-1``
    then ``g(x + delta) = label`` for every ``||delta||_2 < radius``.

    Args:
        model: base classifier (no noise layer needed), ``(B, C, H, W) -> (B, K)`` scores.
        x: ``(N, C, H, W)`` inputs, pixels in ``[0, 1]``.
        sigma: noise standard deviation in pixel units.
        n0, n: selection and estimation draws per example.
        alpha: failure probability of the certificate.
        num_classes: ``K``; inferred from one forward pass if ``None``.
        batch_size: rows per forward pass (does not change the draws).
        generator: if ``seed`` is ``None``, the seed is one integer drawn from it.
        seed: run seed (default 0); with ``indices`` it fixes every draw.
        indices: ``(N,)`` global example ids (default ``arange(N)``).
        workers: CPU pipelines running passes side by side (see
            :func:`bench.sampling.sample`; does not change the draws).
        block_size: draws per seeded noise block; changing it changes the draws.

    Returns:
        ``labels`` ``(N,)`` int64 (``-1`` = abstain) and ``radii`` ``(N,)`` float64 l2 radii in
        pixel units (``0.0`` on abstain), on ``x.device``.
    """
    check_input(x)
    alpha = _check_alpha(alpha)
    n0 = check_int(n0, "n0", minimum=1)
    n = check_int(n, "n", minimum=1)
    # Both streams share forward passes; the estimation draws are independent of the
    # selection draws (other stream), so c_hat is independent of them as CERTIFY requires.
    counts0, counts = _sample_under_noise(
        model, x, [(SELECTION, n0), (ESTIMATION, n)], sigma, num_classes, generator, seed,
        indices, batch_size, workers, block_size,
    )  # fmt: skip
    c_hat = counts0.argmax(dim=1).cpu()
    n_a = counts.cpu().gather(1, c_hat[:, None])[:, 0]
    radius = smoothing_radius(n_a, n, sigma, alpha)  # sigma * Phi^-1(p_lower)
    certified = radius >= 0.0  # p_lower >= 1/2
    labels = torch.where(certified, c_hat, ABSTAIN)
    return labels.to(x.device), torch.where(certified, radius, 0.0).to(x.device)


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
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Tensor:
    """Cohen et al.'s PREDICT for the Gaussian smoothing ``g`` of a base classifier ``model``.

    ``n`` draws (stream ``PREDICTION``); with top two counts ``c1 >= c2``, abstain if the
    two-sided binomial test of ``c1`` successes in ``c1 + c2`` trials at ``p = 1/2`` has
    p-value ``> alpha``. Guarantee: the returned label differs from ``g(x)`` (and is not
    ``-1``) with probability ``<= alpha``.

    Arguments as for :func:`smoothed_certify` (``x``: ``(N, C, H, W)`` in [0, 1]). Returns
    ``(N,)`` int64 labels on ``x.device``, ``-1`` = abstain.
    """
    check_input(x)
    alpha = _check_alpha(alpha)
    n = check_int(n, "n", minimum=1)
    (counts,) = _sample_under_noise(
        model, x, [(PREDICTION, n)], sigma, num_classes, generator, seed, indices, batch_size,
        workers, block_size,
    )  # fmt: skip
    return predict_from_counts(counts, alpha).to(x.device)


def predict_from_counts(counts: Tensor, alpha: float) -> Tensor:
    """PREDICT's decision from the class counts of ``n`` draws per example.

    ``counts``: ``(N, K)`` int64, ``K >= 2``. With top two counts ``c1 >= c2``, returns the
    top class, or ``-1`` (abstain) where the two-sided binomial test of ``c1`` successes in
    ``c1 + c2`` trials at ``p = 1/2`` has p-value ``> alpha``. ``(N,)`` int64 on the CPU.
    Any randomized classifier's Monte Carlo majority vote (the default
    :meth:`defenses.base.Defense.predict`) abstains by the same rule.
    """
    alpha = _check_alpha(alpha)
    top = torch.topk(counts, 2, dim=1).values.cpu().numpy()
    pvalues = torch.as_tensor(binomial_test_pvalue(top[:, 0], top[:, 1]), dtype=torch.float64)
    label = counts.argmax(dim=1).cpu()
    return torch.where(pvalues > alpha, ABSTAIN, label)


def _sample_under_noise(
    model: nn.Module,
    x: Tensor,
    requests: list[tuple[int, int]],
    sigma: float,
    num_classes: int | None,
    generator: torch.Generator | None,
    seed: int | None,
    indices: Tensor | None,
    batch_size: int | None,
    workers: int | None,
    block_size: int,
) -> list[Tensor]:
    """The paper's SAMPLEUNDERNOISE for each ``(stream, n)`` request: ``(N, K)`` int64 counts
    of ``model``'s labels on ``x + eps``, ``eps ~ N(0, sigma^2 I)``, in shared passes."""
    k = _infer_classes(model, x, num_classes)
    run_seed = _resolve_seed(seed, generator)
    results = sample_streams(
        _smoothed(model, x, sigma),
        x,
        requests,
        num_classes=k,
        seed=run_seed,
        indices=indices,
        batch_size=batch_size,
        block_size=block_size,
        row_bytes_owner=model,
        workers=workers,
    )
    return [r.counts for r in results]


def _smoothed(model: nn.Module, x: Tensor, sigma: float) -> nn.Sequential:
    """``NoiseLayer("gaussian", sigma) -> model``, the noise on ``x``'s device."""
    sigma = check_number(sigma, "sigma", low=0.0, low_open=True)
    layer = NoiseLayer("gaussian", sigma)
    if layer.scale.device != x.device:
        layer = layer.to(x.device)
    return nn.Sequential(layer, model)


def _infer_classes(model: nn.Module, x: Tensor, num_classes: int | None) -> int:
    """``num_classes`` if given, else the width of ``model``'s output on ``x[:1]``."""
    if num_classes is not None:
        return check_int(num_classes, "num_classes", minimum=2)
    with torch.inference_mode(), prediction_mode(model):
        out = model(x[:1])
    if out.dim() != 2:
        raise ConfigError(f"base classifier output has shape {tuple(out.shape)}; expected (1, K)")
    return check_int(int(out.shape[1]), "num_classes (inferred from the model output)", minimum=2)


def _resolve_seed(seed: int | None, generator: torch.Generator | None) -> int:
    """The run seed: ``seed``, else one integer drawn from ``generator``, else 0."""
    if seed is not None:
        return check_int(seed, "seed", minimum=-(2**63))
    if generator is not None:
        return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device))
    return 0


def _check_alpha(alpha: float) -> float:
    return check_number(alpha, "alpha", low=0.0, high=1.0, low_open=True, high_open=True)
