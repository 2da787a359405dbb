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
where ``Delta`` is the operator norm of that layer (:func:`operator_norm_bound`).

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
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.errors import ConfigError
from bench.models import first_layer_index
from bench.noise import NoiseLayer
from bench.registry import register_defense
from defenses.base import NORMS, Certificate, Defense, TrainProgress

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

MECHANISMS = ("gaussian", "laplace")
ATTACK_NORMS = ("l1", "l2")
PLACEMENTS = ("first-layer", "image")
SENSITIVITY_CONTROLS = ("bound", "optimise")
ESTIMATORS = ("argmax", "softmax")
SPECTRAL_PROJECTIONS = ("parseval", "exact")
# (mechanism, attack norm) -> the norm the mechanism measures the pre-noise output in.
_OUTPUT_NORM = {("gaussian", "l2"): "l2", ("gaussian", "l1"): "l2", ("laplace", "l1"): "l1"}


class PixelDPConfigError(ConfigError, ValueError):
    """An invalid PixelDP hyper-parameter or model (a ``ValueError`` and a ``ConfigError``)."""


# --------------------------------------------------------------------------- pure helpers
def noise_scale(
    *,
    mechanism: str,
    epsilon: float,
    delta: float,
    construction_bound: float,
    sensitivity: float = 1.0,
) -> float:
    """Noise scale of the PixelDP noise layer.

    Gaussian: standard deviation ``sigma = Delta L sqrt(2 ln(1.25 / delta)) / epsilon``;
    Laplace: scale ``b = Delta L / epsilon`` (``delta`` unused). Units: those of the noise
    layer's input (pixels in [0, 1] for image placement).
    """
    if mechanism == "gaussian":
        return sensitivity * construction_bound * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon
    if mechanism == "laplace":
        return sensitivity * construction_bound / epsilon
    raise PixelDPConfigError(f"mechanism must be one of {', '.join(MECHANISMS)}, got {mechanism!r}")


def warmup_multiplier(step: int) -> float:
    """The reference's training noise ramp: ``s = 1 - min(0.99975^step, 0.9)``, 1 once ``> 0.9``.

    ``s`` starts at 0.1, stays there for ~420 steps, reaches 0.9 after ~9200 steps and then
    jumps to 1. Training only; predictions always use the full noise.
    """
    s = 1.0 - min(0.99975 ** max(0, int(step)), 0.9)
    return 1.0 if s > 0.9 else s


def conv_overlap_factor(layer: nn.Conv2d) -> float:
    """``sqrt(m_h m_w)``, where ``m`` bounds how many output positions read one input pixel.

    Per spatial dimension with kernel ``k``, stride ``s`` and dilation ``d``, an input
    coordinate is read by tap ``j`` from at most one output position, and the positions
    reading it have ``p s`` in a window of length ``d (k - 1)``, so
    ``m = min(k, floor(d (k - 1) / s) + 1)``; for ``d = 1`` this is ``ceil(k / s)``.
    """
    factors = []
    for k, s, d in zip(layer.kernel_size, layer.stride, layer.dilation, strict=True):
        factors.append(min(k, (d * (k - 1)) // s + 1))
    return math.sqrt(factors[0] * factors[1])


def operator_norm_bound(
    layer: nn.Module, *, attack_norm: str, output_norm: str, weight: Tensor | None = None
) -> Tensor:
    """Provable upper bound on ``sup ||T u||_q / ||u||_p`` of the linear part ``T`` of ``layer``.

    ``p = attack_norm``, ``q = output_norm``; pairs (l2, l2), (l1, l2) and (l1, l1). The bias
    shifts every output equally and does not enter. Differentiable in ``layer.weight`` (the
    ``"optimise"`` option puts it in the autograd graph); computed in the weight's dtype.

    * ``Linear`` ``W`` (out, in): exact. ``Delta_{2,2} = ||W||_2`` (largest singular value),
      ``Delta_{1,2}`` = largest column 2-norm, ``Delta_{1,1}`` = largest column 1-norm (the
      l1 unit ball is the convex hull of ``±e_i``).
    * ``Conv2d`` ``W`` (out, in/g, kh, kw), zero padding. With ``patch_p(u)`` the
      ``in/g * kh * kw`` input values read by output position ``p`` and ``W_mat`` the kernel
      reshaped to ``(out, in/g * kh * kw)``::

          ||T u||_2^2 = sum_p ||W_mat patch_p(u)||_2^2 <= ||W_mat||_2^2 sum_p ||patch_p(u)||_2^2
                      <= ||W_mat||_2^2 * m_h m_w * ||u||_2^2,

      because every input pixel lies in at most ``m_h m_w`` patches
      (:func:`conv_overlap_factor`; ``ceil(k/s)^2`` for a square undilated kernel). Hence
      ``Delta_{2,2} <= sqrt(m_h m_w) ||W_mat||_2``. For the l1 input norm,
      ``||T||_{1->q} = max_i ||T e_i||_q`` over input pixels. Tap ``(a, b)`` reads input row
      ``p s + a d - pad`` from output row ``p``, so it reads pixel ``(c, i, j)`` from at most
      one output position, and only if ``a d = i + pad (mod s_h)`` and likewise for ``b``:
      the taps reading a pixel lie in one *stride class* ``A(r_h) x B(r_w)``,
      ``A(r) = {a : a d_h mod s_h = r}``. Hence (:func:`_column_class_norms`)
      ``Delta_{1,1} <= max_{c, r_h, r_w} sum_{o, a in A, b in B} |W[o, c, a, b]|`` and
      ``Delta_{1,2} <= max_{c, r_h, r_w} sqrt(sum_{o, a in A, b in B} W[o, c, a, b]^2)``
      (for stride 1 the class is the whole kernel: ``max_c`` of the channel's norm; equality
      when some pixel is read by every tap of its class, e.g. interior pixels). Grouped
      convolutions: the sums run over all output channels (a superset of the group's), so
      the bounds still hold.

    Args:
        layer: the ``nn.Linear`` or ``nn.Conv2d``.
        attack_norm, output_norm: ``p`` and ``q``.
        weight: evaluate the bound for this weight instead of ``layer.weight`` (same shape;
            e.g. a float64 copy).

    Returns:
        A scalar tensor ``>= 0``.
    """
    pair = (attack_norm, output_norm)
    if pair not in (("l2", "l2"), ("l1", "l2"), ("l1", "l1")):
        raise PixelDPConfigError(
            f"no operator-norm bound for attack norm {attack_norm!r} -> output norm "
            f"{output_norm!r}; supported: (l2, l2), (l1, l2), (l1, l1)"
        )
    w = layer.weight if weight is None else weight
    if isinstance(layer, nn.Linear):
        if pair == ("l2", "l2"):
            return torch.linalg.matrix_norm(w, ord=2)
        if pair == ("l1", "l2"):
            return w.pow(2).sum(dim=0).sqrt().max()
        return w.abs().sum(dim=0).max()
    if isinstance(layer, nn.Conv2d):
        _check_conv(layer)
        if pair == ("l2", "l2"):
            mat = w.reshape(w.shape[0], -1)
            return conv_overlap_factor(layer) * torch.linalg.matrix_norm(mat, ord=2)
        return _column_class_norms(layer, w, output_norm).max()
    raise PixelDPConfigError(
        f"PixelDP bounds the sensitivity of Conv2d and Linear layers only, got "
        f"{type(layer).__name__}"
    )


def _check_conv(layer: nn.Conv2d) -> None:
    if layer.padding_mode != "zeros":
        raise PixelDPConfigError(
            f"the first Conv2d has padding_mode={layer.padding_mode!r}; PixelDP's sensitivity "
            "bound needs padding_mode='zeros' (reflect/circular padding reads pixels twice)"
        )


def _stride_classes(kernel: int, stride: int, dilation: int, device: torch.device) -> Tensor:
    """``(stride, kernel)`` 0/1 matrix: row ``r`` marks the taps ``a`` with ``a d mod s = r``."""
    taps = torch.arange(kernel, device=device)
    return ((taps * dilation) % stride)[None, :] == torch.arange(stride, device=device)[:, None]


def _column_class_norms(layer: nn.Conv2d, w: Tensor, output_norm: str) -> Tensor:
    """``(in/g, s_h, s_w)`` norms of the kernel restricted to each channel and stride class.

    Entry ``[c, r_h, r_w]`` is the q-norm (``output_norm``) of ``W[:, c, A(r_h), B(r_w)]``,
    which bounds ``||T e_i||_q`` for every input pixel ``i`` of channel ``c`` whose taps lie in
    that class (see :func:`operator_norm_bound`). Differentiable in ``w``.
    """
    mh = _stride_classes(layer.kernel_size[0], layer.stride[0], layer.dilation[0], w.device)
    mw = _stride_classes(layer.kernel_size[1], layer.stride[1], layer.dilation[1], w.device)
    mh, mw = mh.to(w.dtype), mw.to(w.dtype)
    if output_norm == "l1":
        return torch.einsum("ocab,ha,wb->chw", w.abs(), mh, mw)
    return torch.einsum("ocab,ha,wb->chw", w.pow(2), mh, mw).sqrt()


@torch.no_grad()
def parseval_step(layer: nn.Module, *, beta: float, iterations: int) -> None:
    """The reference's approximate spectral projection, in place (``Delta_{2,2}`` target 1).

    On ``M = c W_mat`` (``c`` = :func:`conv_overlap_factor` for a conv, 1 for a linear
    layer), repeat ``iterations`` times ``M <- (1 + beta) M - beta M M^T M`` (pushes every
    singular value towards 1), then ``W_mat = M / c``. Keeping ``M``, not ``W``, Parseval-tight
    is the reference's "divide the kernel by ceil(k/s)". Approximate: the certificate uses the
    true bound afterwards (soundness rule).
    """
    w = layer.weight
    c = conv_overlap_factor(layer) if isinstance(layer, nn.Conv2d) else 1.0
    m = w.reshape(w.shape[0], -1) * c
    for _ in range(iterations):
        # Multiply in the cheaper order (the Gram matrix of the smaller side).
        mmm = (m @ m.T) @ m if m.shape[0] <= m.shape[1] else m @ (m.T @ m)
        m = (1.0 + beta) * m - beta * mmm
    w.copy_((m / c).reshape(w.shape))


@torch.no_grad()
def project_spectral(layer: nn.Module) -> None:
    """Exact projection onto ``{sqrt(m_h m_w) ||W_mat||_2 <= 1}``: clip singular values at 1."""
    w = layer.weight
    c = conv_overlap_factor(layer) if isinstance(layer, nn.Conv2d) else 1.0
    m = w.reshape(w.shape[0], -1).double() * c
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    m = (u * s.clamp(max=1.0)) @ vh
    w.copy_((m / c).reshape(w.shape).to(w.dtype))


@torch.no_grad()
def project_columns(layer: nn.Module, *, output_norm: str) -> None:
    """Column normalisation: scale each input column down to norm ``<= 1`` (l1 attacks).

    Linear: column ``W[:, j]``. Conv2d: the kernel entries of input channel ``c`` in each
    stride class (all entries when the stride is 1), i.e. exactly the groups whose norms
    :func:`operator_norm_bound` maximises. The norm is the 1-norm for ``Delta_{1,1}``
    (Laplace) and the 2-norm for ``Delta_{1,2}`` (Gaussian); groups already inside the unit
    ball are left unchanged (a Euclidean projection per group for the 2-norm, a rescaling
    for the 1-norm). Afterwards the bound is ``<= 1`` up to rounding.
    """
    w = layer.weight
    if isinstance(layer, nn.Linear):
        if output_norm == "l1":
            norms = w.abs().sum(dim=0, keepdim=True)
        else:
            norms = w.pow(2).sum(dim=0, keepdim=True).sqrt()
        w.div_(norms.clamp(min=1.0))
        return
    norms = _column_class_norms(layer, w, output_norm)  # (c, s_h, s_w)
    cls_h = (
        torch.arange(layer.kernel_size[0], device=w.device) * layer.dilation[0]
    ) % layer.stride[0]
    cls_w = (
        torch.arange(layer.kernel_size[1], device=w.device) * layer.dilation[1]
    ) % layer.stride[1]
    per_tap = norms[:, cls_h][:, :, cls_w]  # (c, kh, kw): the norm of each tap's class
    w.div_(per_tap.clamp(min=1.0)[None])


class _SensitivityScale:
    """``scale_fn`` of the optimise option: the pre-noise layer's current ``Delta(W)``.

    A plain object (not a closure) so that ``copy.deepcopy`` of the network rebinds it to the
    copied layer, and so that the network stays picklable.
    """

    def __init__(self, layer: nn.Module, attack_norm: str, output_norm: str) -> None:
        self.layer = layer
        self.attack_norm = attack_norm
        self.output_norm = output_norm

    def __call__(self) -> Tensor:
        return operator_norm_bound(
            self.layer, attack_norm=self.attack_norm, output_norm=self.output_norm
        )


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise PixelDPConfigError(
            f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}"
        )


def _number(
    name: str, value: Any, *, low: float, high: float, low_open: bool, high_open: bool
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise PixelDPConfigError(
            f"{name} must be a number in {lo}{low:g}, {high:g}{hi}, got {value!r}"
        )


def _integer(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PixelDPConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


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
    """

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
        self._validate()

    def _validate(self) -> None:
        _choice("mechanism", self.mechanism, MECHANISMS)
        _choice("attack_norm", self.attack_norm, ATTACK_NORMS)
        if (self.mechanism, self.attack_norm) not in _OUTPUT_NORM:
            raise PixelDPConfigError(
                f"mechanism={self.mechanism!r} cannot certify attack_norm={self.attack_norm!r}; "
                "allowed pairs: gaussian+l2, gaussian+l1, laplace+l1"
            )
        _choice("placement", self.placement, PLACEMENTS)
        _choice("sensitivity_control", self.sensitivity_control, SENSITIVITY_CONTROLS)
        _choice("estimator", self.estimator, ESTIMATORS)
        _choice("spectral_projection", self.spectral_projection, SPECTRAL_PROJECTIONS)
        if self.mechanism == "gaussian":
            # The Gaussian mechanism's (epsilon, delta) analysis needs epsilon <= 1.
            _number("epsilon", self.epsilon, low=0.0, high=1.0, low_open=True, high_open=False)
            _number("delta", self.delta, low=0.0, high=1.0, low_open=True, high_open=True)
        else:
            _number("epsilon", self.epsilon, low=0.0, high=math.inf, low_open=True, high_open=True)
            _number("delta", self.delta, low=0.0, high=1.0, low_open=False, high_open=True)
        _number(
            "construction_bound",
            self.construction_bound,
            low=0.0,
            high=math.inf,
            low_open=True,
            high_open=True,
        )
        _number("eta", self.eta, low=0.0, high=1.0, low_open=True, high_open=True)
        _integer("n_draws", self.n_draws, 1)
        if not isinstance(self.noise_warmup, bool):
            raise PixelDPConfigError(
                f"noise_warmup must be true or false, got {self.noise_warmup!r}"
            )
        _number(
            "parseval_beta", self.parseval_beta, low=0.0, high=1.0, low_open=False, high_open=True
        )
        _integer("parseval_iters", self.parseval_iters, 0)
        _integer("block_size", self.block_size, 1)

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
            _check_conv(layer)
        scale_fn = None
        if self.sensitivity_control == "optimise":
            scale_fn = _SensitivityScale(layer, self.attack_norm, self.output_norm)
        noise = NoiseLayer(kind, unit, scale_fn=scale_fn).to(layer.weight.device)
        self.pre_noise_ = layer
        self.noise_layer_ = noise
        if self.sensitivity_control == "bound":
            if self.output_norm == "l2" and self.attack_norm == "l2":
                project_spectral(layer)
            else:
                project_columns(layer, output_norm=self.output_norm)
        modules = list(model)
        return nn.Sequential(*modules[: idx + 1], noise, *modules[idx + 1 :])

    # ------------------------------------------------------------------ sensitivity
    @torch.no_grad()
    def sensitivity(self) -> float:
        """Provable upper bound ``Delta_true`` on the pre-noise layer's operator norm, now.

        ``Delta_{p,q}`` for ``p = attack_norm``, ``q`` the mechanism's norm, computed in
        float64 from the current weights with :func:`operator_norm_bound` (exact for Linear,
        the documented bound for Conv2d); 1 for image placement (identity).
        """
        if self.pre_noise_ is None:
            return 1.0
        layer = self.pre_noise_
        bound = operator_norm_bound(
            layer,
            attack_norm=self.attack_norm,
            output_norm=self.output_norm,
            weight=layer.weight.detach().to(torch.float64),
        )
        return float(bound)

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
        if self.output_norm == "l2" and self.attack_norm == "l2":
            if self.spectral_projection == "exact":
                project_spectral(self.pre_noise_)
            else:
                parseval_step(
                    self.pre_noise_, beta=self.parseval_beta, iterations=self.parseval_iters
                )
        else:
            project_columns(self.pre_noise_, output_norm=self.output_norm)

    def logits(self, x: Tensor) -> Tensor:
        """One differentiable noisy forward pass at full noise, ``(N, K)`` logits."""
        self.noise_layer_.multiplier = 1.0
        return self.model_(x)

    # ------------------------------------------------------------------ prediction
    def _sample(self, x: Tensor, seed: int, indices: Tensor | None, batch_size: int | None):
        from bench.sampling import ESTIMATION, sample

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
    ) -> Certificate:
        """Certified predictions from ``n_draws`` noisy passes.

        See :meth:`certificate_from_samples` for the bounds and the guarantee.

        Args:
            x: ``(N, C, H, W)`` inputs, pixels in ``[0, 1]``.
            norm: the norm the caller asks for; ``radii`` holds all of l1/l2/linf anyway.
            seed, indices: fix the draws (global example ids); batch_size: rows per forward.
        """
        if norm not in NORMS:
            raise ConfigError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        with torch.no_grad():
            samples = self._sample(x, seed, indices, batch_size)
        return self.certificate_from_samples(samples, norm=norm)

    def certificate_from_samples(self, samples: Any, *, norm: str | None = None) -> Certificate:
        """The PixelDP certificate from Monte Carlo statistics (:class:`bench.sampling.Samples`).

        argmax estimator: top label ``t`` = most frequent, ``c1`` its count, ``c2`` the largest
        other count; ``L_max = pixeldp_robust_size(c1, c2, n, ...)`` (Clopper–Pearson at
        ``eta / K``). softmax estimator: :func:`bench.stats.softmax_bounds`; ``t`` = largest
        mean softmax, ``p_lower`` its lower bound, ``p_upper`` the largest upper bound of any
        other label; ``L_max = pixeldp_robust_size_from_bounds(...)``. Both use the construction
        bound ``L_eff`` of :meth:`certified_construction_bound` (soundness rule).

        Returns:
            :class:`Certificate` with ``labels`` ``(N,)`` int64, ``radii`` for l1, l2 and linf
            (float64, input units; ``attack_norm`` directly, the others by
            :func:`bench.certificates.convert_radius` with ``d = C*H*W``), ``bound``
            ``"pixeldp-argmax"`` / ``"pixeldp-softmax"`` and ``extra``: ``p_lower``,
            ``p_upper`` and, for the Gaussian mechanism, ``gaussian_tight``: the tight
            Gaussian (Cohen et al. Thm 1 / Salman et al. Lemma 2) radius on the same draws and
            bounds, ``max(sigma Phi^-1(p_lower), sigma (Phi^-1(p_lower) - Phi^-1(p_upper)) / 2)
            / Delta_true`` (``sigma`` the applied noise, clipped at 0), converted to ``norm``
            (default ``attack_norm``). All hold with probability ``>= 1 -``
            :attr:`failure_probability`.
        """
        from bench.certificates import (
            convert_radius,
            gaussian_radius_from_bound,
            pixeldp_robust_size,
            pixeldp_robust_size_from_bounds,
        )
        from bench.stats import lower_confidence_bound, softmax_bounds, upper_confidence_bound

        k = self.num_classes_
        n = int(samples.n)
        counts = samples.counts
        device = counts.device
        if self.estimator == "argmax":
            stat = counts.to(torch.float64)
        else:
            if samples.softmax_sum is None or samples.softmax_sq_sum is None:
                raise ConfigError("the softmax estimator needs samples taken with softmax=True")
            stat = samples.softmax_sum.to(torch.float64)
        stat = stat.cpu()
        labels = stat.argmax(dim=1)
        others = torch.ones_like(stat, dtype=torch.bool)
        others[torch.arange(stat.shape[0]), labels] = False
        if self.estimator == "argmax":
            c = counts.cpu().to(torch.float64)
            c1 = c.gather(1, labels[:, None])[:, 0]
            c2 = torch.where(others, c, torch.full_like(c, -1.0)).max(dim=1).values.clamp(min=0)
            level = float(self.eta) / k
            p_lower = torch.as_tensor(lower_confidence_bound(c1.numpy(), n, level))
            # Clopper–Pearson upper bounds grow with the count, so c2's bounds every other label.
            p_upper = torch.as_tensor(upper_confidence_bound(c2.numpy(), n, level))
        else:
            lo, hi = softmax_bounds(
                samples.softmax_sum.cpu().numpy(),
                samples.softmax_sq_sum.cpu().numpy(),
                n,
                num_classes=k,
                eta=float(self.eta),
            )
            lo, hi = torch.as_tensor(lo), torch.as_tensor(hi)
            p_lower = lo.gather(1, labels[:, None])[:, 0]
            # Empirical-Bernstein bounds are not monotone in the mean: take the max over others.
            p_upper = torch.where(others, hi, torch.zeros_like(hi)).max(dim=1).values
        p_lower = p_lower.to(torch.float64)
        p_upper = p_upper.to(torch.float64)
        calibration = dict(
            mechanism=self.mechanism,
            epsilon=float(self.epsilon),
            delta=float(self.delta),
            construction_bound=self.certified_construction_bound(),
        )
        if self.estimator == "argmax":
            size = pixeldp_robust_size(
                c1.numpy(), c2.numpy(), n, num_classes=k, eta=float(self.eta), **calibration
            )
        else:
            size = pixeldp_robust_size_from_bounds(p_lower.numpy(), p_upper.numpy(), **calibration)
        size = torch.as_tensor(size, dtype=torch.float64).reshape(-1)
        dim = math.prod(self.input_shape_)
        radii = {
            to: torch.as_tensor(
                convert_radius(size.numpy(), from_norm=self.attack_norm, to_norm=to, dim=dim),
                dtype=torch.float64,
            )
            .reshape(-1)
            .to(device)
            for to in NORMS
        }
        extra = {"p_lower": p_lower.to(device), "p_upper": p_upper.to(device)}
        if self.mechanism == "gaussian":
            # Tight radius for unit sigma and Delta, then scaled: sigma / Delta_true.
            one = gaussian_radius_from_bound(p_lower.numpy(), 1.0)
            two = gaussian_radius_from_bound(p_lower.numpy(), 1.0, p_upper=p_upper.numpy())
            base = torch.as_tensor(one).maximum(torch.as_tensor(two)).clamp(min=0.0)
            delta_true = self.sensitivity()
            if delta_true > 0.0:
                tight = base * (self.current_noise_scale() / delta_true)
            else:  # constant pre-noise output: nothing an attacker does changes the scores
                tight = torch.where(base > 0, torch.full_like(base, math.inf), base)
            target = norm if norm is not None else self.attack_norm
            tight = convert_radius(
                tight.numpy(), from_norm=self.attack_norm, to_norm=target, dim=dim
            )
            extra["gaussian_tight"] = (
                torch.as_tensor(tight, dtype=torch.float64).reshape(-1).to(device)
            )
        return Certificate(
            labels=labels.to(device),
            radii=radii,
            bound=f"pixeldp-{self.estimator}",
            extra=extra,
        )
