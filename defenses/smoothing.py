"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019): a certified ℓ2 defense.

The smoothed classifier is ``g(x) = argmax_c P(f(x + ε) = c)`` with ``ε ~ N(0, σ² I)`` in pixel
units, for a base classifier ``f``. Training is Gaussian data augmentation at the same σ: the
defended network is ``NoiseLayer("gaussian", σ) → f``, so each forward pass of the runner's
training loop adds one fresh noise draw per example (no clipping to [0, 1], as in the paper).

Prediction and certification are Cohen et al.'s PREDICT and CERTIFY
(:mod:`bench.sampling.cohen`), run on ``f`` by the shared sampling engine, which adds the noise
itself, seeded per example (``seed`` + global ``indices``), so the draws do not depend on batch
size or sharding. CERTIFY guarantees, with probability ``>= 1 − alpha``
over the draws, ``g(x + δ) = label`` for all ``‖δ‖₂ < R = σ Φ⁻¹(p̲_A)``. Conservative
conversions of that ℓ2 radius are reported too: ``R/√d`` for ℓ∞ (``d = C·H·W``) and ``R``
for ℓ1 (:func:`bench.certificates.convert_radius`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor, nn

from bench.certificates import convert_radius
from bench.errors import CheckpointError
from bench.noise import NoiseLayer
from bench.registry import register_defense
from bench.sampling import DEFAULT_BLOCK_SIZE, smoothed_certify, smoothed_predict
from bench.threat import NORMS
from bench.validation import check_choice, check_int, check_number
from defenses.base import ABSTAIN, Certificate, Defense, DefenseRecord

BOUND = "cohen-gaussian"


@register_defense("randomized-smoothing")
class RandomizedSmoothing(Defense):
    """Gaussian randomized smoothing with Cohen et al.'s CERTIFY / PREDICT.

    Args:
        sigma: noise standard deviation in pixel units (inputs in [0, 1]), ``> 0``; used for
            training augmentation and for certification alike.
        n0: selection draws per example (pick the class), ``>= 1``.
        n: estimation draws per example (bound its probability), ``>= 1``. With the default
            1e5 and ``alpha = 0.001`` the largest certifiable radius is ≈ 3.81 σ.
        alpha: failure probability of each certificate and level of PREDICT's test, in (0, 1).
        n_predict: draws per example for :meth:`predict`; ``None`` = ``n``.
        block_size: draws per seeded noise block of the sampling engine; changing it changes
            the draws, so it is part of the run record.
    """

    randomized = True
    certifies = ("l2",)
    norms = ("l2",)
    param_help: ClassVar[dict[str, str]] = {
        "sigma": "Gaussian noise std in pixel units, for training and certification",
        "n0": "selection draws per example (Cohen's n0)",
        "n": "estimation draws per example (Cohen's n); max radius grows like sqrt(log n)",
        "alpha": "failure probability of each certificate / PREDICT test level",
        "n_predict": "draws per example for predict (None: n)",
        "block_size": "draws per seeded noise block (part of the record)",
    }

    check_params: ClassVar[dict[str, Any]] = {"n0": 10, "n": 200, "n_predict": 200}

    base_classifier_: nn.Module

    def __init__(
        self,
        *,
        sigma: float = 0.25,
        n0: int = 100,
        n: int = 100_000,
        alpha: float = 0.001,
        n_predict: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        check_number(sigma, "sigma", low=0.0, low_open=True)
        check_int(n0, "n0", minimum=1)
        check_int(n, "n", minimum=1)
        check_number(alpha, "alpha", low=0.0, high=1.0, low_open=True, high_open=True)
        if n_predict is not None:
            check_int(n_predict, "n_predict", minimum=1)
        check_int(block_size, "block_size", minimum=1)
        self.sigma = sigma
        self.n0 = n0
        self.n = n
        self.alpha = alpha
        self.n_predict = n_predict
        self.block_size = block_size

    def record(self) -> DefenseRecord:
        """Board row: ``n`` estimation draws per certificate, confidence ``alpha``, Cohen's
        Gaussian bound."""
        return DefenseRecord(n_draws=self.n, alpha=self.alpha, bound=BOUND)

    # ------------------------------------------------------------------ building
    def build(self, model: nn.Module) -> nn.Module:
        """``NoiseLayer("gaussian", sigma) → model``; ``model`` is kept as ``base_classifier_``."""
        self.base_classifier_ = model
        return nn.Sequential(NoiseLayer("gaussian", float(self.sigma)), model)

    def _engine_kwargs(self, batch_size: int | None) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes_,
            "batch_size": batch_size,
            "block_size": self.block_size,
        }

    # ------------------------------------------------------------------ prediction
    def predict(
        self,
        x: Tensor,
        *,
        seed: int = 0,
        indices: Tensor | None = None,
        batch_size: int | None = None,
    ) -> Tensor:
        """Cohen's PREDICT with ``n_predict`` draws: ``(N,)`` int64 labels, ``-1`` = abstain.

        ``x``: ``(N, C, H, W)`` in [0, 1]. A returned label differs from ``g(x)`` with
        probability ``<= alpha``. ``seed`` and global ``indices`` fix the draws.
        """
        self.model_.eval()
        return smoothed_predict(
            self.base_classifier_,
            x,
            sigma=float(self.sigma),
            n=self.n if self.n_predict is None else self.n_predict,
            alpha=float(self.alpha),
            seed=seed,
            indices=indices,
            **self._engine_kwargs(batch_size),
        )

    def certify(
        self,
        x: Tensor,
        *,
        norm: str,
        seed: int = 0,
        indices: Tensor | None = None,
        batch_size: int | None = None,
        radii: Sequence[float] | None = None,
    ) -> Certificate:
        """Cohen's CERTIFY on ``x`` ``(N, C, H, W)`` in [0, 1].

        Returns a :class:`Certificate` with ``labels`` ``(N,)`` int64 (``-1`` = abstain) and
        float64 ``radii`` for ``"l2"`` (``σ Φ⁻¹(p̲_A)``), ``"linf"`` (``R/√d``) and ``"l1"``
        (``R``), all 0 on abstain, bound ``"cohen-gaussian"``. With probability
        ``>= 1 − alpha`` per example, ``g(x + δ) = label`` for every ``δ`` of smaller norm.
        All three norms are always reported; ``norm`` (the runner's threat model) must be one
        of ``"l1"``, ``"l2"``, ``"linf"``. ``radii`` is ignored: the certificate is a radius.
        """
        check_choice(norm, "norm", NORMS)
        self.model_.eval()
        labels, r_l2 = smoothed_certify(
            self.base_classifier_,
            x,
            sigma=float(self.sigma),
            n0=self.n0,
            n=self.n,
            alpha=float(self.alpha),
            seed=seed,
            indices=indices,
            **self._engine_kwargs(batch_size),
        )
        r_l2 = r_l2.masked_fill(labels == ABSTAIN, 0.0)
        dim = math.prod(x.shape[1:])
        radii = {
            "l2": r_l2,
            "linf": convert_radius(r_l2, from_norm="l2", to_norm="linf", dim=dim),
            "l1": convert_radius(r_l2, from_norm="l2", to_norm="l1", dim=dim),
        }
        return Certificate(labels=labels, radii=radii, bound=BOUND)

    # ------------------------------------------------------------------ state
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load a checkpoint; its noise scale must equal this defense's ``sigma``."""
        scale = state.get("0.scale")
        if scale is not None and not math.isclose(
            float(scale), float(self.sigma), rel_tol=1e-6, abs_tol=0.0
        ):
            raise CheckpointError(
                f"checkpoint was trained with sigma={float(scale):.6g} but this "
                f"randomized-smoothing defense has sigma={self.sigma!r}"
            )
        super().load_state_dict(state)
