"""PixelDP (Lecuyer, Atlidakis, Geambasu, Hsu, Jana; IEEE S&P 2019).

A *noise layer* makes the network's expected scores ``(epsilon, delta)``-differentially
private with respect to p-norm changes of size ``L`` (the *construction attack bound*) of the
input. By the expected output stability bound (scores in [0, 1]),
``E[A(x)] <= e^epsilon E[A(x')] + delta`` for ``||x - x'||_p <= L``, so a prediction whose
estimated expected score beats every other label by the PixelDP margin cannot be changed by an
attack of that size. Everything here follows REFERENCE.md §1.

Noise layer (pre-noise sensitivity ``Delta``, budget ``epsilon, delta``, bound ``L``):

* Gaussian mechanism (attack norm l2 with ``Delta_{2,2}``, or l1 with ``Delta_{1,2}``):
  ``sigma = Delta L sqrt(2 ln(1.25 / delta)) / epsilon`` (``0 < epsilon <= 1``);
* Laplace mechanism (attack norm l1 with ``Delta_{1,1}``): ``b = Delta L / epsilon``.
  (Laplace against l2 attacks would need ``Delta_{2,1}`` and is rejected.)

Placement: on the image (``Delta = 1``, the pre-noise function is the identity) or right after
the model's first ``Conv2d`` / ``Linear`` (a possible parameter-free ``Flatten`` before it),
where ``Delta`` is the operator norm of that layer (:func:`operator_norm_bound`). The noise
calibration, sensitivity bounds and weight projections live in
:mod:`defenses.pixeldp_sensitivity` (re-exported here); the certificate's maths (bounds on the
expected scores, the robustness test, ``L_max``, norm conversion) in :mod:`bench.certificates`.

**Certificate** (:meth:`PixelDP.certificate_from_samples`), as in the paper: ``n_draws``
noisy passes; bounds ``p_lower`` on the top label's expected score and ``p_upper`` on every
other label's (argmax counts with Clopper–Pearson, or softmax sums with Hoeffding / empirical
Bernstein, Bonferroni over ``K``); the robustness test ``p_lower > e^{2 epsilon} p_upper +
(1 + e^epsilon) delta`` at the construction bound and the largest certified size ``L_max``;
``L_max`` converted to l1, l2 and linf.

**Soundness rule.** A certificate is computed from the noise scale *actually applied* and a
*provable* upper bound ``Delta_true`` on the pre-noise layer's operator norm *as it is when
the certificate is computed* (:meth:`PixelDP.sensitivity`). The noise was scaled for a nominal
``Delta_nom`` (1 under ``sensitivity_control="bound"``, whose Parseval projection is only
approximate; ``Delta(W)`` itself under ``"optimise"``). If ``Delta_true > Delta_nom`` the same
noise only protects attacks of size ``L * Delta_nom / Delta_true``, so the construction bound
used in the certificate is shrunk by that factor (never enlarged):
``L_eff = L * min(1, applied_scale / (unit_scale * Delta_true))`` with
``unit_scale`` the scale for ``Delta = 1`` (:meth:`PixelDP.certified_construction_bound`).
Inputs are never normalised with data statistics before the noise (the model's layers before
the first parameterised layer may only be ``Flatten`` / ``Identity``).

**Sequential certification** (``sequential=True``, argmax estimator): the robustness test
at the grid of thresholds the caller scores, decided in rounds of draws up to ``max_n``
(:class:`bench.certificates.PixelDPSequentialTest` in the round loop of
:mod:`bench.sampling.sequential`): a lower confidence sequence on the top label's argmax
probability and an upper one on every other label's, Bonferroni over ``K`` as below; an
example stops once every threshold is decided. The radius is then the largest threshold
certified, and its label the most frequent one when it stopped.

**Confidence.** Following the PixelDP reference, ``eta`` is split over the ``K`` labels: every
one-sided bound (a lower bound for each label, an upper bound for each label) fails with
probability ``<= eta / K``. Because the bound is union-bounded over *all* K labels, the label
picked as the top one *from the same draws* is covered too: no separate selection draws are
needed. Strictly, the certificate needs the top label's lower bound and every other label's
upper bound at once, which by the union bound over the ``2K`` one-sided bounds holds with
probability ``>= 1 - 2 eta`` (the reference's convention calls this confidence ``1 - eta``).
The softmax estimator takes, per entry, the tighter of the Hoeffding and empirical-Bernstein
bounds, each at ``eta / K``, which doubles that again: ``>= 1 - 4 eta``.
:attr:`PixelDP.failure_probability` returns the strict figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.certificates import (
    MECHANISMS,
    PixelDPSequentialTest,
    ScoreBounds,
    convert_radius,
    gaussian_radius_from_bound,
    pixeldp_bounds_from_counts,
    pixeldp_bounds_from_softmax,
    pixeldp_is_robust,
    pixeldp_robust_size_from_bounds,
)
from bench.confseq import SEQUENCES, confidence_sequence
from bench.errors import ConfigError
from bench.models import first_layer_index
from bench.noise import NoiseLayer
from bench.registry import register_defense
from bench.sampling import ESTIMATION, Samples, sample
from bench.sampling.engine import check_indices
from bench.sampling.sequential import DEFAULT_SEQUENCE, engine_draw, look_schedule, run_rounds
from bench.threat import NORMS
from bench.validation import check_bool, check_choice, check_int, check_number
from defenses.base import Certificate, Citation, Defense, DefenseRecord, TrainProgress
from defenses.pixeldp_sensitivity import (
    PixelDPConfigError,
    SensitivityScale,
    check_zero_padding,
    conv_overlap_factor,
    noise_scale,
    operator_norm_bound,
    parseval_step,
    project_columns,
    project_sensitivity,
    project_spectral,
    sensitivity_bound,
)

# The sensitivity helpers are re-exported: tests and users import them from here.
__all__ = [
    "PixelDP",
    "PixelDPConfigError",
    "conv_overlap_factor",
    "noise_scale",
    "operator_norm_bound",
    "parseval_step",
    "project_columns",
    "project_spectral",
    "warmup_multiplier",
]

ATTACK_NORMS = ("l1", "l2")
PLACEMENTS = ("first-layer", "image")
SENSITIVITY_CONTROLS = ("bound", "optimise")
ESTIMATORS = ("argmax", "softmax")
SPECTRAL_PROJECTIONS = ("parseval", "exact")
# (mechanism, attack norm) -> the norm the mechanism measures the pre-noise output in.
_OUTPUT_NORM = {("gaussian", "l2"): "l2", ("gaussian", "l1"): "l2", ("laplace", "l1"): "l1"}


# --------------------------------------------------------------------------- training
def warmup_multiplier(step: int) -> float:
    """The reference's training noise ramp: ``s = 1 - min(0.99975^step, 0.9)``, 1 once ``> 0.9``.

    ``s`` starts at 0.1, stays there for ~420 steps, reaches 0.9 after ~9200 steps and then
    jumps to 1. Training only; predictions always use the full noise.
    """
    s = 1.0 - min(0.99975 ** max(0, int(step)), 0.9)
    return 1.0 if s > 0.9 else s


# --------------------------------------------------------------------------- the defense
@register_defense("pixeldp")
class PixelDP(Defense):
    """PixelDP: a DP noise layer, Monte Carlo expected scores, and the PixelDP robustness test.

    Hyper-parameters (stored unchanged; see the module docstring for the method):
        epsilon, delta: DP budget of the noise layer (Gaussian: ``0 < epsilon <= 1``,
            ``0 < delta < 1``; Laplace: ``epsilon > 0``, ``delta`` unused).
        construction_bound: ``L``, the attack size (input units, ``attack_norm``) the noise is
            calibrated for.
        mechanism / attack_norm: ``"gaussian"`` with ``"l2"`` (``Delta_{2,2}``) or ``"l1"``
            (``Delta_{1,2}``), or ``"laplace"`` with ``"l1"`` (``Delta_{1,1}``).
        placement: ``"first-layer"`` (after the first Conv2d/Linear) or ``"image"``.
        sensitivity_control: ``"bound"`` (noise for ``Delta = 1``; project the pre-noise
            weights after every step: Parseval for l2, column normalisation for l1) or
            ``"optimise"`` (noise scale ``unit_scale * Delta(W)`` inside the autograd graph).
        estimator: ``"argmax"`` (histogram of argmax labels, Clopper–Pearson) or
            ``"softmax"`` (mean softmax, Hoeffding / empirical Bernstein).
        n_draws: noise draws per input for predict/certify (reference: 2000).
        eta: failure probability of the bounds in the reference's convention (see
            :attr:`failure_probability`).
        noise_warmup: ramp the training noise with :func:`warmup_multiplier`.
        spectral_projection: how ``"bound"`` keeps ``Delta_{2,2}`` at 1 for l2 attacks:
            ``"parseval"`` (the reference: ``parseval_iters`` approximate steps, which leave
            ``Delta`` above 1 early in training, so the certificate's ``L`` shrinks) or
            ``"exact"`` (clip the singular values of the reshaped kernel at 1 after every
            step: ``Delta <= 1`` always, the certificate keeps the full ``L``).
        parseval_beta, parseval_iters: the Parseval projection's step and repetitions.
        block_size: draws per seeded block of the sampling engine (part of the record).
        sequential: certify sequentially over the caller's thresholds (argmax estimator
            only; see the module docstring); predict keeps ``n_draws``.
        max_n: the most draws per example of the sequential test (``None``: ``n_draws``).
        sequence: its confidence sequence (:data:`bench.confseq.SEQUENCES`).
    """

    citation = Citation(
        title="Certified Robustness to Adversarial Examples with Differential Privacy",
        authors=(
            "Mathias Lecuyer",
            "Vaggelis Atlidakis",
            "Roxana Geambasu",
            "Daniel Hsu",
            "Suman Jana",
        ),
        venue="IEEE Symposium on Security and Privacy (S&P)",
        year=2019,
        url="https://arxiv.org/abs/1802.03471",
    )

    randomized: ClassVar[bool] = True
    # The construction norm (l1 or l2) directly; the other norms by conservative conversion.
    certifies: ClassVar[tuple[str, ...]] = ("l1", "l2", "linf")
    norms: ClassVar[tuple[str, ...]] = ("l1", "l2")
    check_params: ClassVar[dict[str, Any]] = {"n_draws": 100}
    param_help: ClassVar[dict[str, str]] = {
        "epsilon": "DP epsilon of the noise layer (Gaussian: 0 < epsilon <= 1)",
        "delta": "DP delta of the Gaussian mechanism, 0 < delta < 1 (unused by Laplace)",
        "construction_bound": "L, attack size the noise is calibrated for (input units)",
        "mechanism": "'gaussian' or 'laplace'",
        "attack_norm": "'l2' (gaussian only) or 'l1'",
        "placement": "'first-layer' (after the first Conv2d/Linear) or 'image'",
        "sensitivity_control": "'bound' (project weights) or 'optimise' (noise follows Delta(W))",
        "estimator": "'argmax' (label counts) or 'softmax' (mean softmax)",
        "n_draws": "noise draws per input for predict/certify",
        "eta": "failure probability of the Monte Carlo bounds (reference convention)",
        "noise_warmup": "ramp the training noise as the reference does (1 - min(0.99975^t, 0.9))",
        "spectral_projection": "'parseval' (reference, approximate) or 'exact' (SVD clip)",
        "parseval_beta": "Parseval projection step",
        "parseval_iters": "Parseval iterations after every optimiser step",
        "block_size": "draws per seeded noise block (changes the draws)",
        "sequential": "certify in rounds, stopping once every threshold is decided (argmax)",
        "max_n": "most draws per example of the sequential test (None: n_draws)",
        "sequence": "confidence sequence of the sequential test: " + ", ".join(SEQUENCES),
    }

    def __init__(
        self,
        *,
        epsilon: float = 1.0,
        delta: float = 0.05,
        construction_bound: float = 0.1,
        mechanism: str = "gaussian",
        attack_norm: str = "l2",
        placement: str = "first-layer",
        sensitivity_control: str = "bound",
        estimator: str = "argmax",
        n_draws: int = 2000,
        eta: float = 0.05,
        noise_warmup: bool = True,
        spectral_projection: str = "parseval",
        parseval_beta: float = 3e-4,
        parseval_iters: int = 10,
        block_size: int = 1000,
        sequential: bool = False,
        max_n: int | None = None,
        sequence: str = DEFAULT_SEQUENCE,
    ) -> None:
        self.epsilon = epsilon
        self.delta = delta
        self.construction_bound = construction_bound
        self.mechanism = mechanism
        self.attack_norm = attack_norm
        self.placement = placement
        self.sensitivity_control = sensitivity_control
        self.estimator = estimator
        self.n_draws = n_draws
        self.eta = eta
        self.noise_warmup = noise_warmup
        self.spectral_projection = spectral_projection
        self.parseval_beta = parseval_beta
        self.parseval_iters = parseval_iters
        self.block_size = block_size
        self.sequential = sequential
        self.max_n = max_n
        self.sequence = sequence
        self._validate()

    def _validate(self) -> None:
        where = self.name
        for field, allowed in (
            ("mechanism", MECHANISMS),
            ("attack_norm", ATTACK_NORMS),
            ("placement", PLACEMENTS),
            ("sensitivity_control", SENSITIVITY_CONTROLS),
            ("estimator", ESTIMATORS),
            ("spectral_projection", SPECTRAL_PROJECTIONS),
        ):
            check_choice(getattr(self, field), field, allowed, where=where)
        if (self.mechanism, self.attack_norm) not in _OUTPUT_NORM:
            raise PixelDPConfigError(
                f"{where}: mechanism={self.mechanism!r} cannot certify "
                f"attack_norm={self.attack_norm!r}; allowed pairs: gaussian+l2, gaussian+l1, "
                "laplace+l1"
            )
        if self.mechanism == "gaussian":
            # The Gaussian mechanism's (epsilon, delta) analysis needs epsilon <= 1.
            check_number(self.epsilon, "epsilon", low=0.0, high=1.0, low_open=True, where=where)
            check_number(
                self.delta, "delta", low=0.0, high=1.0, low_open=True, high_open=True, where=where
            )
        else:
            check_number(self.epsilon, "epsilon", low=0.0, low_open=True, where=where)
            check_number(self.delta, "delta", low=0.0, high=1.0, high_open=True, where=where)
        check_number(
            self.construction_bound, "construction_bound", low=0.0, low_open=True, where=where
        )
        check_number(self.eta, "eta", low=0.0, high=1.0, low_open=True, high_open=True, where=where)
        check_int(self.n_draws, "n_draws", minimum=1, where=where)
        check_bool(self.noise_warmup, "noise_warmup", where=where)
        check_number(
            self.parseval_beta, "parseval_beta", low=0.0, high=1.0, high_open=True, where=where
        )
        check_int(self.parseval_iters, "parseval_iters", minimum=0, where=where)
        check_int(self.block_size, "block_size", minimum=1, where=where)
        check_bool(self.sequential, "sequential", where=where)
        if self.max_n is not None:
            check_int(self.max_n, "max_n", minimum=1, where=where)
        check_choice(self.sequence, "sequence", SEQUENCES, where=where)
        if self.sequential and self.estimator != "argmax":
            raise PixelDPConfigError(
                f"{where}: sequential=True needs estimator='argmax' (the sequential test "
                f"bounds argmax counts), got estimator={self.estimator!r}"
            )

    # ------------------------------------------------------------------ derived quantities
    @property
    def output_norm(self) -> str:
        """Norm in which the mechanism measures the pre-noise output (``"l2"`` or ``"l1"``)."""
        return _OUTPUT_NORM[(self.mechanism, self.attack_norm)]

    @property
    def unit_scale(self) -> float:
        """Noise scale for ``Delta = 1``.

        Gaussian ``L sqrt(2 ln(1.25/delta)) / epsilon``, Laplace ``L / epsilon``.
        """
        return noise_scale(
            mechanism=self.mechanism,
            epsilon=float(self.epsilon),
            delta=float(self.delta),
            construction_bound=float(self.construction_bound),
        )

    @property
    def failure_probability(self) -> float:
        """Strict probability that the Monte Carlo bounds behind a certificate fail.

        ``2 eta`` for the argmax estimator (union bound over the K lower and K upper
        Clopper–Pearson bounds at ``eta / K`` each), ``4 eta`` for the softmax estimator
        (tighter of two bounds per entry). The reference reports these as confidence
        ``1 - eta``.
        """
        return (2.0 if self.estimator == "argmax" else 4.0) * float(self.eta)

    def record(self) -> DefenseRecord:
        """Board row: ``n_draws`` draws per prediction (sequential: the cap ``max_n``; the
        pipeline records the mean spent), ``alpha = eta`` (the reference's convention, see
        :attr:`failure_probability`), bound ``"pixeldp-<estimator>"``, and for the sequential
        test its method (fixed ``n_draws`` declares none)."""
        if self.sequential:
            return DefenseRecord(
                n_draws=self._max_n,
                alpha=float(self.eta),
                bound=self._bound_name,
                method=f"sequential-{self.sequence}",
            )
        return DefenseRecord(
            n_draws=int(self.n_draws), alpha=float(self.eta), bound=self._bound_name
        )

    @property
    def _max_n(self) -> int:
        return int(self.n_draws if self.max_n is None else self.max_n)

    @property
    def _bound_name(self) -> str:
        return f"pixeldp-{self.estimator}"

    # ------------------------------------------------------------------ building
    def build(self, model: nn.Module) -> nn.Module:
        """Insert the noise layer (see the class docstring); returns an ``nn.Sequential``.

        ``"image"``: ``Sequential(NoiseLayer, *model)``. ``"first-layer"``: the model must be
        an ``nn.Sequential`` whose first Conv2d/Linear is preceded only by ``Flatten`` /
        ``Identity``; the noise layer goes right after it (before its activation). With
        ``sensitivity_control="bound"`` the layer is projected exactly once here (singular
        values clipped at 1, or columns normalised) so an untrained model already satisfies
        ``Delta <= 1``. The modules are shared with ``model`` (not copied).
        """
        kind = self.mechanism
        unit = self.unit_scale
        self.pre_noise_: nn.Module | None = None
        if self.placement == "image":
            device = next((t.device for t in model.parameters()), torch.device("cpu"))
            noise = NoiseLayer(kind, unit).to(device)
            modules = list(model) if isinstance(model, nn.Sequential) else [model]
            self.noise_layer_ = noise
            return nn.Sequential(noise, *modules)

        idx = first_layer_index(model)  # ConfigError unless an nn.Sequential with such a layer
        for i in range(idx):
            if not isinstance(model[i], (nn.Flatten, nn.Identity)):
                raise PixelDPConfigError(
                    f"layer {i} ({type(model[i]).__name__}) comes before the first Conv2d/Linear; "
                    "PixelDP's sensitivity bound allows only Flatten/Identity there (no input "
                    "normalisation before the noise)"
                )
        layer = model[idx]
        if isinstance(layer, nn.Conv2d):
            check_zero_padding(layer)
        scale_fn = None
        if self.sensitivity_control == "optimise":
            scale_fn = SensitivityScale(layer, self.attack_norm, self.output_norm)
        noise = NoiseLayer(kind, unit, scale_fn=scale_fn).to(layer.weight.device)
        self.pre_noise_ = layer
        self.noise_layer_ = noise
        if self.sensitivity_control == "bound":
            project_sensitivity(layer, attack_norm=self.attack_norm, output_norm=self.output_norm)
        modules = list(model)
        return nn.Sequential(*modules[: idx + 1], noise, *modules[idx + 1 :])

    # ------------------------------------------------------------------ sensitivity
    def sensitivity(self) -> float:
        """Provable upper bound ``Delta_true`` on the pre-noise layer's operator norm, now.

        ``Delta_{p,q}`` for ``p = attack_norm``, ``q`` the mechanism's norm, computed in
        float64 from the current weights (:func:`defenses.pixeldp_sensitivity.sensitivity_bound`;
        exact for Linear, the documented bound for Conv2d); 1 for image placement (identity).
        """
        if self.pre_noise_ is None:
            return 1.0
        return sensitivity_bound(
            self.pre_noise_, attack_norm=self.attack_norm, output_norm=self.output_norm
        )

    @torch.no_grad()
    def current_noise_scale(self) -> float:
        """The noise scale the noise layer applies now at prediction (multiplier 1)."""
        return float(self.noise_layer_.effective_scale())

    def certified_construction_bound(self) -> float:
        """``L_eff = L * min(1, applied_scale / (unit_scale * Delta_true))`` (soundness rule).

        The applied noise is ``(epsilon, delta)``-DP for attacks of size ``L_eff`` given the
        true sensitivity; it equals ``L`` when the noise covers ``Delta_true``.
        """
        delta_true = self.sensitivity()
        if delta_true <= 0.0:  # constant pre-noise output: the scores do not depend on x
            return float(self.construction_bound)
        ratio = self.current_noise_scale() / (self.unit_scale * delta_true)
        return float(self.construction_bound) * min(1.0, ratio)

    # ------------------------------------------------------------------ training
    def training_loss(self, x: Tensor, y: Tensor, progress: TrainProgress) -> Tensor:
        """Cross-entropy of one noisy forward pass (one noise draw per example).

        With ``noise_warmup`` the noise is multiplied by :func:`warmup_multiplier` of
        ``progress.step`` for this pass only; the multiplier is reset to 1 afterwards.
        """
        layer = self.noise_layer_
        layer.multiplier = warmup_multiplier(progress.step) if self.noise_warmup else 1.0
        try:
            logits = self.model_(x)
        finally:
            layer.multiplier = 1.0
        return F.cross_entropy(logits, y)

    def after_step(self, progress: TrainProgress) -> None:
        """``"bound"`` option: project the pre-noise weights (Parseval / SVD clip, or column
        norms)."""
        if self.pre_noise_ is None or self.sensitivity_control != "bound":
            return
        project_sensitivity(
            self.pre_noise_,
            attack_norm=self.attack_norm,
            output_norm=self.output_norm,
            spectral=self.spectral_projection,
            beta=self.parseval_beta,
            iterations=self.parseval_iters,
        )

    def logits(self, x: Tensor) -> Tensor:
        """One differentiable noisy forward pass at full noise, ``(N, K)`` logits."""
        self.noise_layer_.multiplier = 1.0
        return self.model_(x)

    # ------------------------------------------------------------------ prediction
    def _sample(
        self, x: Tensor, seed: int, indices: Tensor | None, batch_size: int | None
    ) -> Samples:
        self.noise_layer_.multiplier = 1.0
        return sample(
            self.model_,
            x,
            self.n_draws,
            num_classes=self.num_classes_,
            seed=seed,
            stream=ESTIMATION,
            indices=indices,
            batch_size=batch_size,
            block_size=self.block_size,
            softmax=self.estimator == "softmax",
        )

    @torch.no_grad()
    def predict(
        self,
        x: Tensor,
        *,
        seed: int = 0,
        indices: Tensor | None = None,
        batch_size: int | None = None,
    ) -> Tensor:
        """Monte Carlo prediction ``(N,)`` int64: the label with the largest estimated score.

        ``n_draws`` noisy passes (stream ESTIMATION, the same draws :meth:`certify` uses, so
        the labels agree). argmax estimator: most frequent argmax label; softmax estimator:
        largest mean softmax. PixelDP never abstains; ties go to the smallest label index
        (``torch.argmax``), and a tied prediction certifies radius 0.
        """
        samples = self._sample(x, seed, indices, batch_size)
        stats = samples.counts if self.estimator == "argmax" else samples.softmax_sum
        return stats.argmax(dim=1)

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
        """Certified predictions from ``n_draws`` noisy passes.

        See :meth:`certificate_from_samples` for the bounds and the guarantee.

        Args:
            x: ``(N, C, H, W)`` inputs, pixels in ``[0, 1]``.
            norm: the norm the caller asks for; ``radii`` holds all of l1/l2/linf anyway.
            seed, indices: fix the draws (global example ids); batch_size: rows per forward.
            radii: ignored with a fixed ``n_draws`` (PixelDP's certificate is the largest
                certified size ``L_max`` itself); the thresholds of the sequential test
                (:meth:`certify_sequential`) otherwise.
            labels: ignored (PixelDP certifies its own top label).
        """
        check_choice(norm, "norm", NORMS)
        if self.sequential:
            return self.certify_sequential(
                x, norm=norm, seed=seed, indices=indices, batch_size=batch_size, radii=radii
            )
        with torch.no_grad():
            samples = self._sample(x, seed, indices, batch_size)
        return self.certificate_from_samples(samples, norm=norm)

    def shared_certificate_norms(self) -> tuple[str, ...]:
        """With a fixed ``n_draws`` :meth:`certify` reports ``L_max`` converted to every norm
        of :attr:`certifies` from the same draws; the sequential test decides the thresholds
        of the norm asked for, so it shares nothing."""
        return () if self.sequential else tuple(self.certifies)

    @torch.no_grad()
    def certify_sequential(
        self,
        x: Tensor,
        *,
        norm: str,
        seed: int = 0,
        indices: Tensor | None = None,
        batch_size: int | None = None,
        radii: Sequence[float] | None = None,
    ) -> Certificate:
        """The robustness test at the thresholds ``radii`` (``norm`` units), sequentially.

        Draws (stream ESTIMATION, the fixed test's, in the rounds of
        :func:`bench.sampling.sequential.look_schedule`) until every positive threshold is
        decided (:class:`bench.certificates.PixelDPSequentialTest`, confidence sequence
        ``sequence`` at ``eta / K`` per label), or ``max_n``. ``L_max`` is computed as in
        :meth:`certificate_from_samples` (construction bound ``L_eff``, converted to
        ``norm``); the radius reported for ``norm`` is the largest threshold certified (0 if
        none; without positive thresholds only the label is estimated, from one round), the
        other norms get 0. Holds with probability ``>= 1 -`` :attr:`failure_probability`.

        Returns a :class:`Certificate` with ``extra``: ``draws`` (``(N,)`` int64 per
        example), ``p_lower`` and ``p_upper`` (the bounds where the example stopped).
        """
        check_choice(norm, "norm", NORMS)
        self.noise_layer_.multiplier = 1.0
        k = self.num_classes_
        max_n = self._max_n
        looks = look_schedule(max_n, self.block_size)
        sequence = confidence_sequence(self.sequence, float(self.eta) / k, len(looks))
        budget = dict(
            mechanism=self.mechanism,
            epsilon=float(self.epsilon),
            delta=float(self.delta),
            construction_bound=self.certified_construction_bound(),
        )
        dim = math.prod(self.input_shape_)

        def size(p_lower: Any, p_upper: Any) -> Any:
            l_max = pixeldp_robust_size_from_bounds(p_lower, p_upper, **budget)
            return convert_radius(l_max, from_norm=self.attack_norm, to_norm=norm, dim=dim)

        thresholds = sorted({float(r) for r in (radii or []) if float(r) > 0})
        num = x.shape[0]
        test = PixelDPSequentialTest(np.array(thresholds), size, sequence, max_n, num, k)
        draw = engine_draw(
            self.model_,
            x,
            check_indices(indices, num),
            ESTIMATION,
            num_classes=k,
            seed=seed,
            batch_size=batch_size,
            block_size=self.block_size,
            workers=None,
            owner=self.model_,
        )
        _, draws = run_rounds(num, k, looks, draw, test.update)
        dev = x.device
        zeros = torch.zeros(num, dtype=torch.float64, device=dev)
        radii_out = {to: zeros for to in NORMS}
        radii_out[norm] = torch.from_numpy(test.radii()).to(dev)
        extra = {
            "draws": torch.from_numpy(draws).to(dev),
            "p_lower": torch.from_numpy(test.p_lower).to(dev),
            "p_upper": torch.from_numpy(test.p_upper).to(dev),
        }
        return Certificate(
            labels=torch.from_numpy(test.labels).to(dev),
            radii=radii_out,
            bound=self._bound_name,
            extra=extra,
        )

    def certificate_from_samples(self, samples: Samples, *, norm: str | None = None) -> Certificate:
        """The PixelDP certificate from Monte Carlo statistics, in the paper's three steps.

        1. Bounds on the expected scores (:meth:`score_bounds`): top label ``t``, a lower
           bound ``p_lower`` on its expected score, an upper bound ``p_upper`` on every other
           label's.
        2. The robustness test (:func:`bench.certificates.pixeldp_is_robust`) at the
           construction bound ``L_eff`` of :meth:`certified_construction_bound` (soundness
           rule), and the largest certified size ``L_max``
           (:func:`bench.certificates.pixeldp_robust_size_from_bounds`) for the noise as
           applied.
        3. ``L_max`` (``attack_norm``) converted to l1, l2 and linf
           (:func:`bench.certificates.convert_radius`, ``d = C*H*W``).

        Returns:
            :class:`Certificate` with ``labels`` ``(N,)`` int64, ``radii`` for l1, l2 and linf
            (float64, input units), ``bound`` ``"pixeldp-argmax"`` / ``"pixeldp-softmax"`` and
            ``extra``: ``p_lower``, ``p_upper``; ``robust_at_construction_bound`` (bool, the
            test of step 2 at ``L_eff``; the Gaussian search tries ``(epsilon, delta)`` itself
            when ``delta`` lies on its ``delta'`` grid 0.001 … 0.299, e.g. the default 0.05,
            and then ``L_max >= L_eff`` wherever the test holds, up to the search's
            resolution in ``eps'``; ``L_max`` may exceed ``L_eff`` where it fails, through
            another ``(eps', delta')``); and, for the Gaussian mechanism,
            ``gaussian_tight`` (:meth:`gaussian_tight_radius`, converted to ``norm``, default
            ``attack_norm``). All hold with probability ``>= 1 -``
            :attr:`failure_probability`.
        """
        device = samples.counts.device
        bounds = self.score_bounds(samples)
        budget = dict(
            mechanism=self.mechanism, epsilon=float(self.epsilon), delta=float(self.delta)
        )
        robust = pixeldp_is_robust(bounds.p_lower, bounds.p_upper, **budget)
        size = pixeldp_robust_size_from_bounds(
            bounds.p_lower,
            bounds.p_upper,
            construction_bound=self.certified_construction_bound(),
            **budget,
        )
        dim = math.prod(self.input_shape_)
        radii = {
            to: convert_radius(size, from_norm=self.attack_norm, to_norm=to, dim=dim)
            for to in NORMS
        }
        extra = {
            "p_lower": bounds.p_lower,
            "p_upper": bounds.p_upper,
            "robust_at_construction_bound": robust,
        }
        if self.mechanism == "gaussian":
            target = norm if norm is not None else self.attack_norm
            tight = self.gaussian_tight_radius(bounds)
            extra["gaussian_tight"] = convert_radius(
                tight, from_norm=self.attack_norm, to_norm=target, dim=dim
            )
        return Certificate(
            labels=bounds.labels.to(device),
            radii={k: v.to(device) for k, v in radii.items()},
            bound=self._bound_name,
            extra={k: v.to(device) for k, v in extra.items()},
        )

    def score_bounds(self, samples: Samples) -> ScoreBounds:
        """Step 1: top label and bounds on the expected scores, ``(N,)`` CPU tensors.

        argmax estimator: :func:`bench.certificates.pixeldp_bounds_from_counts` (most frequent
        label; Clopper–Pearson at ``eta / K``). softmax estimator:
        :func:`bench.certificates.pixeldp_bounds_from_softmax` (largest mean softmax; tighter
        of Hoeffding and empirical Bernstein at ``eta / K``).
        """
        n, eta = int(samples.n), float(self.eta)
        if self.estimator == "argmax":
            return pixeldp_bounds_from_counts(samples.counts.cpu(), n, eta=eta)
        if samples.softmax_sum is None or samples.softmax_sq_sum is None:
            raise ConfigError("the softmax estimator needs samples taken with softmax=True")
        return pixeldp_bounds_from_softmax(
            samples.softmax_sum.cpu(), samples.softmax_sq_sum.cpu(), n, eta=eta
        )

    def gaussian_tight_radius(self, bounds: ScoreBounds) -> Tensor:
        """The tight Gaussian radius on the same bounds, ``(N,)`` float64, ``attack_norm`` units.

        Cohen et al. Thm 1 / Salman et al. Lemma 2 for the applied noise ``sigma`` and the true
        sensitivity: ``max(sigma Phi^-1(p_lower), sigma (Phi^-1(p_lower) - Phi^-1(p_upper)) / 2)
        / Delta_true``, clipped at 0; ``+inf`` where positive and ``Delta_true = 0`` (nothing
        an attacker does changes the scores). Holds when the bounds do.
        """
        # Tight radius for unit sigma and Delta, then scaled: sigma / Delta_true.
        one = gaussian_radius_from_bound(bounds.p_lower, 1.0)
        two = gaussian_radius_from_bound(bounds.p_lower, 1.0, p_upper=bounds.p_upper)
        base = one.maximum(two).clamp(min=0.0)
        delta_true = self.sensitivity()
        if delta_true > 0.0:
            return base * (self.current_noise_scale() / delta_true)
        return torch.where(base > 0, torch.full_like(base, math.inf), base)
