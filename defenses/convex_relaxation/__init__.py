"""Wong–Kolter convex outer adversarial polytope: dual bounds, robust loss, certified radii.

Wong & Kolter, "Provable defenses against adversarial examples via the convex outer
adversarial polytope" (ICML 2018), and its scaled version (Wong, Schmidt, Metzen & Kolter,
NeurIPS 2018). See REFERENCE.md §3. The defense that trains and certifies with these bounds
is :class:`defenses.wong_kolter.WongKolter`.

One module per concern:

* :mod:`.network` — an ``nn.Sequential`` of ``Linear``/``Conv2d``/``Flatten``/``ReLU`` as
  operators that run forwards and transposed (:func:`check_supported`);
* :mod:`.input_set` — the threat set ``S`` (ℓ∞ or ℓ2 ball, optionally ∩ ``[0, 1]^d``) and the
  dual's input term ``min_{x'∈S} aᵀx'``;
* :mod:`.relaxation` — one ReLU layer's convex relaxation given ``l, u`` (slope ``u/(u-l)``);
* :mod:`.dual` — the paper's algorithm: the dual objective ``J(c)`` and the public bounds
  (:func:`dual_lower_bound`, :func:`pre_activation_bounds`, :func:`margin_lower_bounds`,
  :func:`robust_loss`);
* :mod:`.forward_form` — all pre-activation bounds in one forward pass with exact columns
  (sound); :mod:`.projection` — its Cauchy/Gaussian random-projection estimate (training
  only, **not** sound);
* :mod:`.interval` — interval bound propagation, the baseline
  (:func:`interval_margin_lower_bounds`);
* :mod:`.radius` — certified radii: bisection (:func:`certified_radius`) and the largest
  certified radius of a grid (:func:`certified_radius_on_grid`).

Conventions everywhere: ``x`` is ``(N, C, H, W)`` or ``(N, D)`` with pixels in ``[0, 1]``, no
normalisation; ``eps`` a float or ``(N,)`` tensor in pixel units of ``norm`` (``"linf"`` or
``"l2"``); bounds in the model's dtype, on its device; sound (up to floating-point rounding)
whenever ``projection_dim`` is ``None``, the default.
"""

from __future__ import annotations

from .dual import (
    METHODS,
    dual_lower_bound,
    margin_lower_bounds,
    pre_activation_bounds,
    robust_loss,
)
from .input_set import BALL_NORMS, EpsLike
from .interval import interval_margin_lower_bounds
from .network import check_supported
from .radius import certified_radius, certified_radius_on_grid, worst_margin

__all__ = [
    "BALL_NORMS",
    "METHODS",
    "EpsLike",
    "certified_radius",
    "certified_radius_on_grid",
    "check_supported",
    "dual_lower_bound",
    "interval_margin_lower_bounds",
    "margin_lower_bounds",
    "pre_activation_bounds",
    "robust_loss",
    "worst_margin",
]
