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

With ``sequential=True`` both are sequential (:mod:`bench.sampling.sequential`): draws in
rounds up to ``max_n`` per example, stopping once every radius of the grid the caller scores
is decided (certify) or the majority is decided (predict), at the same ``alpha``. The radius
returned is then the largest grid radius certified, and the draws spent are reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bench.certificates import convert_radius
from bench.confseq import SEQUENCES
from bench.errors import CheckpointError
from bench.noise import NoiseLayer
from bench.registry import register_defense
from bench.sampling import (
    DEFAULT_BLOCK_SIZE,
    smoothed_certify,
    smoothed_certify_sequential,
    smoothed_predict,
    smoothed_predict_sequential,
)
from bench.sampling.sequential import DEFAULT_SEQUENCE
from bench.threat import NORMS
from bench.validation import check_bool, check_choice, check_int, check_number
from defenses.base import ABSTAIN, Certificate, Citation, Defense, DefenseRecord

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
        sequential: certify and predict sequentially (:mod:`bench.sampling.sequential`)
            instead of with a fixed ``n``; same ``alpha``.
        max_n: the most estimation draws per example of the sequential tests (``None``:
            ``n``); sequential predict uses ``n_predict`` when it is set.
        sequence: the confidence sequence of the sequential tests
            (:data:`bench.confseq.SEQUENCES`).
        test_labels: sequential certify only: where the caller gives the true labels (the
            pipeline does for the clean test set, never for attacked inputs), test them
            directly instead of a class selected on ``n0`` draws. Saves the selection draws
            and the draws spent certifying wrong predictions; clean coverage and robust
            precision then count only correct certificates (a wrong prediction abstains).
    """

    citation = Citation(
        title="Certified Adversarial Robustness via Randomized Smoothing",
        authors=("Jeremy M. Cohen", "Elan Rosenfeld", "J. Zico Kolter"),
        venue="International Conference on Machine Learning (ICML)",
        year=2019,
        url="https://arxiv.org/abs/1902.02918",
    )

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
        "sequential": "certify/predict in rounds, stopping once every grid decision is fixed",
        "max_n": "most draws per example of the sequential tests (None: n)",
        "sequence": "confidence sequence of the sequential tests: " + ", ".join(SEQUENCES),
        "test_labels": "sequential certify tests the true label when given (no selection)",
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
        sequential: bool = False,
        max_n: int | None = None,
        sequence: str = DEFAULT_SEQUENCE,
        test_labels: bool = False,
    ) -> None:
        check_number(sigma, "sigma", low=0.0, low_open=True)
        check_int(n0, "n0", minimum=1)
        check_int(n, "n", minimum=1)
        check_number(alpha, "alpha", low=0.0, high=1.0, low_open=True, high_open=True)
        if n_predict is not None:
            check_int(n_predict, "n_predict", minimum=1)
        check_int(block_size, "block_size", minimum=1)
        check_bool(sequential, "sequential")
        if max_n is not None:
            check_int(max_n, "max_n", minimum=1)
        check_choice(sequence, "sequence", SEQUENCES)
        check_bool(test_labels, "test_labels")
        self.sigma = sigma
        self.n0 = n0
        self.n = n
        self.alpha = alpha
        self.n_predict = n_predict
        self.block_size = block_size
        self.sequential = sequential
        self.max_n = max_n
        self.sequence = sequence
        self.test_labels = test_labels

    def record(self) -> DefenseRecord:
        """Board row: ``n`` estimation draws per certificate (sequential: the cap ``max_n``;
        the pipeline records the mean actually spent), confidence ``alpha``, Cohen's Gaussian
        bound, and for a sequential test its method ``"sequential-<sequence>"`` (fixed ``n``
        declares none: the pipeline records ``"fixed-n"`` for a randomized defense)."""
        if self.sequential:
            return DefenseRecord(
                n_draws=self._max_n, alpha=self.alpha, bound=BOUND, method=self._method
            )
        return DefenseRecord(n_draws=self.n, alpha=self.alpha, bound=BOUND)

    @property
    def _max_n(self) -> int:
        return int(self.n if self.max_n is None else self.max_n)

    @property
    def _method(self) -> str:
        return f"sequential-{self.sequence}"

    # ------------------------------------------------------------------ building
    def build(self, model: nn.Module) -> nn.Module:
        """``NoiseLayer("gaussian", sigma) → model``; ``model`` is kept as ``base_classifier_``."""
        self.base_classifier_ = model
        return nn.Sequential(NoiseLayer("gaussian", float(self.sigma)), model)

    def _sequential_kwargs(self, batch_size: int | None) -> dict[str, Any]:
        return {**self._engine_kwargs(batch_size), "sequence": self.sequence}

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
        probability ``<= alpha``. ``seed`` and global ``indices`` fix the draws. Sequential:
        :func:`bench.sampling.smoothed_predict_sequential` with at most ``n_predict`` (else
        ``max_n``) draws, same guarantee.
        """
        self.model_.eval()
        if self.sequential:
            labels, _ = smoothed_predict_sequential(
                self.base_classifier_,
                x,
                sigma=float(self.sigma),
                alpha=float(self.alpha),
                max_n=self._max_n if self.n_predict is None else self.n_predict,
                seed=seed,
                indices=indices,
                **self._sequential_kwargs(batch_size),
            )
            return labels
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
        labels: Tensor | None = None,
    ) -> Certificate:
        """Cohen's CERTIFY on ``x`` ``(N, C, H, W)`` in [0, 1].

        Returns a :class:`Certificate` with ``labels`` ``(N,)`` int64 (``-1`` = abstain) and
        float64 ``radii`` for ``"l2"`` (``σ Φ⁻¹(p̲_A)``), ``"linf"`` (``R/√d``) and ``"l1"``
        (``R``), all 0 on abstain, bound ``"cohen-gaussian"``. With probability
        ``>= 1 − alpha`` per example, ``g(x + δ) = label`` for every ``δ`` of smaller norm.
        All three norms are always reported; ``norm`` (the runner's threat model) must be one
        of ``"l1"``, ``"l2"``, ``"linf"``. Fixed ``n``: ``radii`` and ``labels`` are ignored
        (the certificate is a radius). Sequential: see :meth:`_certify_sequential`
        (``labels`` are tested only with ``test_labels``).
        """
        check_choice(norm, "norm", NORMS)
        self.model_.eval()
        if self.sequential:
            return self._certify_sequential(x, norm, seed, indices, batch_size, radii, labels)
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

    def _certify_sequential(
        self,
        x: Tensor,
        norm: str,
        seed: int,
        indices: Tensor | None,
        batch_size: int | None,
        radii: Sequence[float] | None,
        labels: Tensor | None,
    ) -> Certificate:
        """Sequential CERTIFY (:func:`bench.sampling.smoothed_certify_sequential`).

        The grid is ``radii`` (units of ``norm``; none: radius 0 only, i.e. the label),
        each mapped to the ℓ2 radius whose conversion to ``norm`` reaches it. The radius
        reported for ``norm`` is the largest grid radius certified (exactly the grid value);
        the ℓ2 radius is the ℓ2 radius tested for it, and the other norms its conversions.
        ``labels`` (true labels) are tested directly when given and ``test_labels`` is set,
        else ignored. ``extra["draws"]``: the ``(N,)`` int64 forward passes spent per
        example.
        """
        dim = math.prod(x.shape[1:])
        grid = sorted({float(r) for r in (radii or [])} | {0.0})
        # l2 radius R certifies convert(R) in ``norm``, a linear map: R = r / convert(1).
        scale = float(convert_radius(1.0, from_norm="l2", to_norm=norm, dim=dim))
        l2_grid = [r / scale for r in grid]
        out, r_l2, draws = smoothed_certify_sequential(
            self.base_classifier_,
            x,
            sigma=float(self.sigma),
            radii=l2_grid,
            alpha=float(self.alpha),
            max_n=self._max_n,
            n0=self.n0,
            labels=labels if self.test_labels else None,
            seed=seed,
            indices=indices,
            **self._sequential_kwargs(batch_size),
        )
        # the grid radius in ``norm`` units, exactly as the caller wrote it
        pos = torch.searchsorted(torch.tensor(l2_grid, dtype=torch.float64), r_l2.cpu())
        in_norm = torch.tensor(grid, dtype=torch.float64)[pos].to(r_l2.device)
        out_radii = {to: convert_radius(r_l2, from_norm="l2", to_norm=to, dim=dim) for to in NORMS}
        out_radii[norm] = in_norm
        return Certificate(labels=out, radii=out_radii, bound=BOUND, extra={"draws": draws})

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
