"""PixelDP's noise calibration, sensitivity bounds and weight projections (REFERENCE.md §1).

The heavy math behind :class:`defenses.pixeldp.PixelDP`, kept apart from the defense class:

* :func:`noise_scale` — the noise layer's scale for a pre-noise sensitivity ``Delta``;
* :func:`operator_norm_bound` — a *provable* upper bound on ``Delta_{p,q}``, the operator
  norm of the pre-noise ``Linear`` / ``Conv2d`` from the attack norm ``p`` (l1 or l2, input
  units with pixels in [0, 1]) to the mechanism's norm ``q`` (l2 for Gaussian, l1 for
  Laplace); the soundness rule certifies with this bound, never with a nominal ``Delta``;
* :func:`project_sensitivity` and its parts :func:`parseval_step`, :func:`project_spectral`,
  :func:`project_columns` — the *bound* option's weight projections that keep ``Delta`` near
  (Parseval) or at most (SVD clip, column normalisation) 1;
* :class:`SensitivityScale` — the *optimise* option's noise scale ``Delta(W)``, in the
  autograd graph.

Every function takes the layer as it is (weights of any dtype and device) and works on the
linear part only: the bias shifts every output equally and does not change sensitivity.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bench.certificates import MECHANISMS
from bench.errors import ConfigError
from bench.validation import check_choice

__all__ = [
    "PixelDPConfigError",
    "SensitivityScale",
    "check_zero_padding",
    "conv_overlap_factor",
    "noise_scale",
    "operator_norm_bound",
    "parseval_step",
    "project_columns",
    "project_sensitivity",
    "project_spectral",
    "sensitivity_bound",
]

#: (attack norm p, output norm q) pairs with a provable bound on ``Delta_{p,q}``.
NORM_PAIRS = (("l2", "l2"), ("l1", "l2"), ("l1", "l1"))


class PixelDPConfigError(ConfigError, ValueError):
    """An invalid PixelDP hyper-parameter or model (a ``ValueError`` and a ``ConfigError``)."""


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
    check_choice(mechanism, "mechanism", MECHANISMS)
    if mechanism == "gaussian":
        return sensitivity * construction_bound * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon
    return sensitivity * construction_bound / epsilon


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


def check_zero_padding(layer: nn.Conv2d) -> None:
    """Raise unless ``layer`` pads with zeros, which every bound here assumes."""
    if layer.padding_mode != "zeros":
        raise PixelDPConfigError(
            f"the first Conv2d has padding_mode={layer.padding_mode!r}; PixelDP's sensitivity "
            "bound needs padding_mode='zeros' (reflect/circular padding reads pixels twice)"
        )


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
    if pair not in NORM_PAIRS:
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
        check_zero_padding(layer)
        if pair == ("l2", "l2"):
            mat = w.reshape(w.shape[0], -1)
            return conv_overlap_factor(layer) * torch.linalg.matrix_norm(mat, ord=2)
        return _column_class_norms(layer, w, output_norm).max()
    raise PixelDPConfigError(
        f"PixelDP bounds the sensitivity of Conv2d and Linear layers only, got "
        f"{type(layer).__name__}"
    )


@torch.no_grad()
def sensitivity_bound(layer: nn.Module, *, attack_norm: str, output_norm: str) -> float:
    """:func:`operator_norm_bound` of ``layer``'s current weights, computed in float64.

    The value the soundness rule certifies with: float64 keeps rounding from pushing the
    bound below the true norm of the float32 weights.
    """
    weight = layer.weight.detach().to(torch.float64)
    bound = operator_norm_bound(
        layer, attack_norm=attack_norm, output_norm=output_norm, weight=weight
    )
    return float(bound)


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


def project_sensitivity(
    layer: nn.Module,
    *,
    attack_norm: str,
    output_norm: str,
    spectral: str = "exact",
    beta: float = 3e-4,
    iterations: int = 10,
) -> None:
    """The *bound* option's projection of the pre-noise layer towards ``Delta_{p,q} <= 1``.

    l2 attacks (``Delta_{2,2}``): ``spectral="exact"`` clips the singular values
    (:func:`project_spectral`), ``"parseval"`` takes the reference's approximate steps
    (:func:`parseval_step` with ``beta``, ``iterations``). l1 attacks: column normalisation
    in the mechanism's norm (:func:`project_columns`), which is exact.
    """
    if (attack_norm, output_norm) != ("l2", "l2"):
        project_columns(layer, output_norm=output_norm)
    elif spectral == "exact":
        project_spectral(layer)
    else:
        parseval_step(layer, beta=beta, iterations=iterations)


class SensitivityScale:
    """``scale_fn`` of the optimise option: the pre-noise layer's current ``Delta(W)``.

    A plain object (not a closure) so that ``copy.deepcopy`` of the network rebinds it to the
    copied layer, and so that the network stays picklable. Returns a scalar tensor in the
    autograd graph of ``layer.weight`` (:func:`operator_norm_bound`).
    """

    def __init__(self, layer: nn.Module, attack_norm: str, output_norm: str) -> None:
        self.layer = layer
        self.attack_norm = attack_norm
        self.output_norm = output_norm

    def __call__(self) -> Tensor:
        return operator_norm_bound(
            self.layer, attack_norm=self.attack_norm, output_norm=self.output_norm
        )
