"""Wong–Kolter dual bounds (defenses/convex_relaxation, used by defenses/wong_kolter.py)
against independent oracles.

Oracles: the exact worst-case margin of tiny ReLU nets by mixed-integer programming
(scipy.optimize.milp, big-M encoding with interval-arithmetic big-M constants computed here),
the LP (triangle) relaxation with the same pre-activation bounds (the same program without
integrality),
sampling and projected-gradient attacks (upper bounds on the worst case), the authors'
``convex_adversarial`` 0.4.4 package, and the published Fashion-MNIST numbers of the
released model (REFERENCE.md §3).
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import nn

from bench.errors import ConfigError
from bench.registry import create_defense
from bench.threat import NORMS
from defenses.base import DefenseRecord, TrainProgress
from defenses.wong_kolter import (
    BALL_NORMS,
    WongKolter,
    certified_radius,
    certified_radius_on_grid,
    dual_lower_bound,
    interval_margin_lower_bounds,
    margin_lower_bounds,
    pre_activation_bounds,
    robust_loss,
)

# Float32 bounds vs float64 LP/MILP optima on values of order 1: a few ulps of float32 per
# layer, far below 1e-4; the solvers' own feasibility tolerances are ~1e-7.
TOL = 1e-4


# ---------------------------------------------------------------------------- tiny networks
def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def tiny_conv(seed: int) -> nn.Sequential:
    """1×5×5 input; conv(3×3, stride 2, pad 1) → 2×3×3; conv output size needs output_padding."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(18, 6),
        nn.ReLU(),
        nn.Linear(6, 3),
    )


def odd_conv(seed: int) -> nn.Sequential:
    """Dilation, rectangular kernels and strides, two convs, two consecutive affine layers."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 1)),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 5, 7),
        nn.Linear(7, 5),
        nn.ReLU(),
        nn.Linear(5, 4),
    )


def dense_layers(
    model: nn.Sequential, in_shape: tuple[int, ...]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The network as affine maps between ReLUs (float64), composed by probing with the identity."""
    maps: list[tuple[np.ndarray, np.ndarray]] = []
    block: list[nn.Module] = []
    shape = in_shape

    def close(block: list[nn.Module], shape: tuple[int, ...]) -> tuple[int, ...]:
        seq = copy.deepcopy(nn.Sequential(*block)).double()
        n = math.prod(shape)
        with torch.no_grad():
            zero = seq(torch.zeros(1, *shape, dtype=torch.float64)).reshape(1, -1)
            cols = seq(torch.eye(n, dtype=torch.float64).reshape(n, *shape)).reshape(n, -1) - zero
            out_shape = tuple(seq(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:])
        maps.append((cols.T.numpy(), zero[0].numpy()))
        return out_shape

    for layer in model:
        if isinstance(layer, nn.ReLU):
            shape = close(block, shape)
            block = []
        else:
            block.append(layer)
    close(block, shape)
    return maps


def interval_bounds(maps, lo: np.ndarray, hi: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Independent interval arithmetic (float64) for the big-M constants."""
    out = []
    for w, b in maps[:-1]:
        mid, rad = (hi + lo) / 2, (hi - lo) / 2
        pl, pu = w @ mid + b - np.abs(w) @ rad, w @ mid + b + np.abs(w) @ rad
        out.append((pl, pu))
        lo, hi = np.maximum(pl, 0), np.maximum(pu, 0)
    return out


def relu_program(maps, lo, hi, pre_bounds, c: np.ndarray, integral: bool) -> float:
    """min cᵀ f(x) over the box [lo, hi] with ReLUs encoded by big-M (MILP) or relaxed (LP).

    Variables per hidden layer: pre-activation ẑ, activation z, indicator a ∈ {0,1}
    (a ∈ [0,1] for the LP, which then equals the triangle relaxation).
    """
    sizes = [len(lo)]
    for w, _ in maps[:-1]:
        sizes += [w.shape[0]] * 3
    nvar = sum(sizes)
    offs = np.cumsum([0, *sizes])
    rows, lbs, ubs = [], [], []
    var_lo = np.full(nvar, -np.inf)
    var_hi = np.full(nvar, np.inf)
    var_lo[: len(lo)], var_hi[: len(lo)] = lo, hi
    integrality = np.zeros(nvar)
    prev = (0, len(lo))
    for k, (w, b) in enumerate(maps[:-1]):
        zh, z, a = offs[1 + 3 * k], offs[2 + 3 * k], offs[3 + 3 * k]
        m = w.shape[0]
        pl, pu = pre_bounds[k]
        var_lo[zh : zh + m], var_hi[zh : zh + m] = pl, pu
        var_lo[z : z + m], var_hi[z : z + m] = 0, np.maximum(pu, 0)
        var_lo[a : a + m], var_hi[a : a + m] = 0, 1
        if integral:
            integrality[a : a + m] = 1
        for i in range(m):
            r = np.zeros(nvar)  # ẑ_i - W_i z_prev = b_i
            r[zh + i] = 1
            r[prev[0] : prev[0] + prev[1]] = -w[i]
            rows.append(r), lbs.append(b[i]), ubs.append(b[i])
            r = np.zeros(nvar)  # z - ẑ >= 0
            r[z + i], r[zh + i] = 1, -1
            rows.append(r), lbs.append(0), ubs.append(np.inf)
            r = np.zeros(nvar)  # z - ẑ - l a <= -l
            r[z + i], r[zh + i], r[a + i] = 1, -1, -pl[i]
            rows.append(r), lbs.append(-np.inf), ubs.append(-pl[i])
            r = np.zeros(nvar)  # z - u a <= 0
            r[z + i], r[a + i] = 1, -max(pu[i], 0)
            rows.append(r), lbs.append(-np.inf), ubs.append(0)
        prev = (z, m)
    w, b = maps[-1]
    obj = np.zeros(nvar)
    obj[prev[0] : prev[0] + prev[1]] = c @ w
    cons = LinearConstraint(np.array(rows), np.array(lbs), np.array(ubs))
    res = milp(
        obj,
        constraints=cons,
        integrality=integrality,
        bounds=Bounds(var_lo, var_hi),
        options={"mip_rel_gap": 1e-9},
    )
    assert res.status == 0, res.message
    return float(res.fun + c @ b)


def box_of(x: torch.Tensor, eps: float, clip: bool) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = x.double() - eps, x.double() + eps
    if clip:
        lo, hi = lo.clamp(min=0), hi.clamp(max=1)
    return lo.flatten().numpy(), hi.flatten().numpy()


def margin_specs(y: int, k: int) -> list[np.ndarray]:
    return [np.eye(k)[y] - np.eye(k)[j] for j in range(k)]


# ---------------------------------------------------------------------------- soundness: MILP
CASES = [
    (mlp, (4,), 0.3),
    (tiny_conv, (1, 5, 5), 0.15),
]


@pytest.mark.parametrize(("make", "shape", "eps"), CASES, ids=["mlp", "conv"])
@pytest.mark.parametrize("clip", [False, True], ids=["ball", "ball-and-box"])
def test_linf_bound_sound_and_below_lp_relaxation(make, shape, eps, clip):
    """IBP, WK <= exact (MILP); WK <= LP(triangle, WK's own l,u) <= exact, over seeds."""
    gaps = []
    for seed in range(4):
        net = make(seed)
        maps = dense_layers(net, shape)
        g = torch.Generator().manual_seed(100 + seed)
        x = torch.rand(1, *shape, generator=g)
        y = int(net(x).argmax())
        with torch.no_grad():
            label = torch.tensor([y])
            wk = margin_lower_bounds(net, x, label, eps=eps, clip_box=clip)[0].double()
            ibp = interval_margin_lower_bounds(net, x, label, eps=eps, clip_box=clip)[0]
            pre = pre_activation_bounds(net, x, eps=eps, clip_box=clip)
        lo, hi = box_of(x, eps, clip)
        big_m = interval_bounds(maps, lo, hi)
        wk_pre = [
            (a[0].double().flatten().numpy(), b[0].double().flatten().numpy()) for a, b in pre
        ]
        for j, c in enumerate(margin_specs(y, 3)):
            if j == y:
                assert wk[j] == 0 and ibp[j] == 0
                continue
            exact = relu_program(maps, lo, hi, big_m, c, integral=True)
            lp = relu_program(maps, lo, hi, wk_pre, c, integral=False)
            assert wk[j] <= lp + TOL, (seed, j, float(wk[j]), lp)
            assert lp <= exact + TOL, (seed, j, lp, exact)
            assert float(ibp[j]) <= exact + TOL, (seed, j, float(ibp[j]), exact)
            gaps.append(exact - float(wk[j]))
    assert min(gaps) >= -TOL
    assert max(gaps) > 1e-3, "the relaxation should not be exact on every spec (test too easy)"


def test_intermediate_bounds_sound_against_milp():
    """Each hidden unit's WK bounds contain its exact range (MILP on the truncated network)."""
    for seed in range(2):
        net = mlp(seed)
        maps = dense_layers(net, (4,))
        x = torch.rand(1, 4, generator=torch.Generator().manual_seed(seed))
        lo, hi = box_of(x, 0.3, False)
        big_m = interval_bounds(maps, lo, hi)
        with torch.no_grad():
            wk_pre = pre_activation_bounds(net, x, eps=0.3)
        # second hidden layer: truncated network = first block + ReLU + second block
        trunc = [maps[0], maps[1]]
        for i in range(8):
            e = np.eye(8)[i]
            low = relu_program(trunc, lo, hi, big_m[:1], e, integral=True)
            high = -relu_program(trunc, lo, hi, big_m[:1], -e, integral=True)
            assert float(wk_pre[1][0][0, i]) <= low + TOL
            assert float(wk_pre[1][1][0, i]) >= high - TOL


@pytest.mark.slow
@pytest.mark.parametrize(
    "make,shape,eps", [*CASES, (odd_conv, (2, 6, 8), 0.05)], ids=["mlp", "conv", "odd-conv"]
)
def test_linf_bound_sound_fuzz(make, shape, eps):
    for seed in range(4, 40):
        net = make(seed)
        maps = dense_layers(net, shape)
        x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(seed))
        y = int(net(x).argmax())
        k = maps[-1][0].shape[0]
        wk = margin_lower_bounds(net, x, torch.tensor([y]), eps=eps)[0].double()
        lo, hi = box_of(x, eps, False)
        big_m = interval_bounds(maps, lo, hi)
        for j, c in enumerate(margin_specs(y, k)):
            if j != y:
                assert wk[j] <= relu_program(maps, lo, hi, big_m, c, integral=True) + TOL


# ---------------------------------------------------------------------------- l2: attacks
def l2_attack_min(net, x, c, eps, clip, steps=40, restarts=4, seed=0) -> float:
    """Upper bound on min cᵀf over the ℓ2 ball (∩ box): random points and projected gradient."""
    g = torch.Generator().manual_seed(seed)
    best = math.inf
    n = x[0].numel()
    for _ in range(restarts):
        d = torch.randn(1, n, generator=g)
        delta = (d / d.norm() * eps * torch.rand(1, generator=g)).reshape(x.shape)
        for _ in range(steps):
            delta.requires_grad_(True)
            val = (net(x + delta) * c).sum()
            (grad,) = torch.autograd.grad(val, delta)
            with torch.no_grad():
                best = min(best, float(val))
                delta = delta - eps / 10 * grad / (grad.norm() + 1e-12)
                delta = delta * min(1.0, eps / (float(delta.norm()) + 1e-12))
                if clip:
                    delta = (x + delta).clamp(0, 1) - x
        with torch.no_grad():
            best = min(best, float((net(x + delta) * c).sum()))
    return best


@pytest.mark.parametrize("clip", [False, True], ids=["ball", "ball-and-box"])
def test_l2_bound_below_attacks(clip):
    for seed in range(3):
        net = mlp(seed)
        x = torch.rand(1, 4, generator=torch.Generator().manual_seed(seed))
        y = int(net(x).argmax())
        with torch.no_grad():
            wk = margin_lower_bounds(net, x, torch.tensor([y]), eps=0.4, norm="l2", clip_box=clip)[
                0
            ]
            ibp = interval_margin_lower_bounds(
                net, x, torch.tensor([y]), eps=0.4, norm="l2", clip_box=clip
            )[0]
        for j in range(3):
            if j == y:
                continue
            c = torch.eye(3)[y] - torch.eye(3)[j]
            attack = l2_attack_min(net, x, c, 0.4, clip)
            assert float(wk[j]) <= attack + 1e-5
            assert float(ibp[j]) <= attack + 1e-5


def test_l2_box_intersection_no_looser_than_either_set():
    """With clip_box, the l2 bound takes the better of the ball's and the box's input terms."""
    net = mlp(3)
    x = torch.rand(5, 4, generator=torch.Generator().manual_seed(3)) * 0.2  # near the box edge
    y = net(x).argmax(1)
    with torch.no_grad():
        both = margin_lower_bounds(net, x, y, eps=0.3, norm="l2", clip_box=True)
        ball = margin_lower_bounds(net, x, y, eps=0.3, norm="l2")
        # the l2 ball of radius eps lies in the linf box of radius eps
        box = margin_lower_bounds(net, x, y, eps=0.3, norm="linf", clip_box=True)
    # intermediate bounds differ, so compare only the soundness ordering against attacks
    for i in range(5):
        for j in range(3):
            if j != int(y[i]):
                c = torch.eye(3)[y[i]] - torch.eye(3)[j]
                attack = l2_attack_min(net, x[i : i + 1], c, 0.3, True, steps=30, restarts=3)
                assert float(both[i, j]) <= attack + 1e-5
    assert bool((both >= torch.minimum(ball, box) - 1e-5).all())


# ---------------------------------------------------------------------------- IBP ordering
def test_ibp_can_beat_wong_kolter():
    """REFERENCE.md's "IBP ≤ Wong–Kolter" is not a theorem: WK fixes the lower ReLU slope to
    u/(u-l), so for logit_0 = relu(x), logit_1 = 0, x ∈ [-1, 1] it gives l·u/(u-l) = -0.5 where
    the exact minimum and IBP are 0."""
    net = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 2))
    with torch.no_grad():
        net[0].weight.fill_(1.0), net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0], [0.0]])), net[2].bias.zero_()
    x, y = torch.zeros(1, 1), torch.tensor([0])
    with torch.no_grad():
        wk = margin_lower_bounds(net, x, y, eps=1.0)
        ibp = interval_margin_lower_bounds(net, x, y, eps=1.0)
        lone = dual_lower_bound(net, x, torch.tensor([[1.0, 0.0]]), eps=1.0)  # min relu(x)
    assert float(wk[0, 1]) == pytest.approx(-0.5)
    assert float(ibp[0, 1]) == pytest.approx(0.0)
    assert float(lone[0, 0]) == pytest.approx(-0.5)


def test_eps_zero_gives_exact_margins():
    net = tiny_conv(0)
    x = torch.rand(6, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    y = torch.arange(6) % 3
    logits = net(x).detach()
    exact = logits.gather(1, y[:, None]) - logits
    for fn in (margin_lower_bounds, interval_margin_lower_bounds):
        assert torch.allclose(fn(net, x, y, eps=0.0).detach(), exact, atol=1e-5)


# ---------------------------------------------------------------------------- implementation
@pytest.mark.parametrize(
    ("make", "shape"),
    [(mlp, (4,)), (tiny_conv, (1, 5, 5)), (odd_conv, (2, 6, 8))],
    ids=["mlp", "conv", "odd"],
)
@pytest.mark.parametrize(
    ("norm", "clip"), [("linf", False), ("linf", True), ("l2", False), ("l2", True)]
)
def test_forward_form_equals_backward_definition(make, shape, norm, clip):
    """(inputs + unstable) forward columns give the same l, u as c = ±I backward passes."""
    net = make(1)
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(2))
    eps = torch.tensor([0.05, 0.1, 0.2])
    fwd = pre_activation_bounds(net, x, eps=eps, norm=norm, clip_box=clip)
    bwd = pre_activation_bounds(net, x, eps=eps, norm=norm, clip_box=clip, method="backward")
    for (lf, uf), (lb, ub) in zip(fwd, bwd, strict=True):
        assert torch.allclose(lf, lb, atol=1e-5) and torch.allclose(uf, ub, atol=1e-5)


def test_per_example_eps_and_chunking():
    net = tiny_conv(2)
    x = torch.rand(7, 1, 5, 5, generator=torch.Generator().manual_seed(4))
    y = torch.arange(7) % 3
    eps = torch.linspace(0.0, 0.3, 7)
    whole = margin_lower_bounds(net, x, y, eps=eps)
    parts = margin_lower_bounds(net, x, y, eps=eps, batch_size=2)
    single = torch.cat(
        [margin_lower_bounds(net, x[i : i + 1], y[i : i + 1], eps=float(eps[i])) for i in range(7)]
    )
    assert torch.allclose(whole, parts, atol=1e-6) and torch.allclose(whole, single, atol=1e-6)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_chunking_with_clip_box(norm):
    """Chunks after the first reuse the identity cached through the first affine block; the
    box centre's offset must still go through that block (it once did not: a crash when the
    block changes the shape, silently wrong bounds when it keeps it, as here)."""
    torch.manual_seed(5)
    square = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    for net, shape in ((square, (4,)), (tiny_conv(2), (1, 5, 5))):
        x = torch.rand(5, *shape, generator=torch.Generator().manual_seed(4)) * 0.1  # box edge
        y = net(x).argmax(1)
        kw = dict(eps=0.2, norm=norm, clip_box=True)
        with torch.no_grad():
            whole = margin_lower_bounds(net, x, y, **kw)
            parts = margin_lower_bounds(net, x, y, batch_size=2, **kw)
            single = torch.cat(
                [margin_lower_bounds(net, x[i : i + 1], y[i : i + 1], **kw) for i in range(5)]
            )
        assert torch.allclose(parts, whole, atol=1e-6) and torch.allclose(single, whole, atol=1e-6)


def test_unsupported_layers_raise_config_error():
    with pytest.raises(ConfigError, match="Tanh"):
        margin_lower_bounds(
            nn.Sequential(nn.Linear(4, 3), nn.Tanh()), torch.rand(1, 4), torch.tensor([0]), eps=0.1
        )
    with pytest.raises(ConfigError, match="Sequential"):
        margin_lower_bounds(nn.Linear(4, 3), torch.rand(1, 4), torch.tensor([0]), eps=0.1)
    with pytest.raises(ConfigError, match="norm"):
        margin_lower_bounds(mlp(0), torch.rand(1, 4), torch.tensor([0]), eps=0.1, norm="l1")
    d = WongKolter()
    with pytest.raises(ConfigError, match="MaxPool2d"):
        d.setup(
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 2)),
            input_shape=(1, 6, 6),
            num_classes=2,
        )


# ---------------------------------------------------------------------------- convex_adversarial
def _convex_adversarial():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("convex_adversarial", reason="convex-adversarial not installed")


@pytest.mark.parametrize(("norm", "clip"), [("linf", False), ("linf", True), ("l2", False)])
def test_matches_convex_adversarial(norm, clip):
    """Same bound as the authors' package (exact mode). Its conv transpose has no
    output_padding, so the conv nets use sizes where (H + 2p - k) is divisible by the stride."""
    ca = _convex_adversarial()
    torch.manual_seed(0)
    nets = [
        (mlp(5), (4,)),
        (
            nn.Sequential(
                nn.Conv2d(1, 3, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(3, 4, 3, padding=1),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(64, 10),
                nn.ReLU(),
                nn.Linear(10, 3),
            ),
            (1, 7, 7),
        ),
    ]
    for net, shape in nets:
        x = torch.rand(6, *shape)
        y = torch.randint(0, 3, (6,))
        ref_net = ca.DualNetwork(
            net, x, 0.25, norm_type={"linf": "l1", "l2": "l2"}[norm], bounded_input=clip
        )
        c = torch.eye(3)[y].unsqueeze(1) - torch.eye(3).unsqueeze(0)
        ref = ref_net(c).detach()
        ours = margin_lower_bounds(net, x, y, eps=0.25, norm=norm, clip_box=clip).detach()
        assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


# ---------------------------------------------------------------------------- radius, defense
def test_certified_radius_is_certified_and_bracketed():
    net = mlp(7)
    x = torch.rand(20, 4, generator=torch.Generator().manual_seed(7))
    y = net(x).argmax(1)
    r = certified_radius(net, x, y, norm="linf", eps_max=0.5, tol=1e-3)
    assert r.dtype == torch.float64 and bool((r >= 0).all()) and bool((r <= 0.5).all())
    pos = r > 0
    assert bool(pos.any())
    b = margin_lower_bounds(net, x[pos], y[pos], eps=r[pos].float())
    b = b.scatter(1, y[pos, None], math.inf)
    assert bool((b > 0).all()), "the returned radius must itself be certified"
    inner = pos & (r < 0.5 - 1e-3)
    above = margin_lower_bounds(net, x[inner], y[inner], eps=(r[inner] + 2e-3).float())
    above = above.scatter(1, y[inner, None], math.inf).min(1).values
    assert bool((above <= 0).all()), "2·tol above the radius should no longer certify here"
    wrong = (y + 1) % 3
    assert bool((certified_radius(net, x, wrong, norm="l2", eps_max=0.5) == 0).all())


def _certified_at(net, x, y, r: float) -> torch.Tensor:
    """Independent per-radius test: every margin bound at r is > 0."""
    b = margin_lower_bounds(net, x, y, eps=r).scatter(1, y[:, None], math.inf)
    return (b > 0).all(dim=1)


def test_grid_radius_equals_testing_each_radius_separately():
    net = mlp(7)
    x = torch.rand(40, 4, generator=torch.Generator().manual_seed(7))
    y = net(x).argmax(1)
    radii = [0.35, 0.0, 0.2, 0.25, 0.2, 0.3, 0.5]  # unsorted, repeated, with 0
    with torch.no_grad():
        got = certified_radius_on_grid(net, x, y, radii, norm="linf")
        expect = torch.zeros(40, dtype=torch.float64)
        still = torch.ones(40, dtype=torch.bool)
        for r in sorted(set(radii) - {0.0}):
            still &= _certified_at(net, x, y, r)
            expect[still] = r
    assert got.dtype == torch.float64 and torch.equal(got, expect)
    assert set(got.tolist()) == {0.0, 0.2, 0.25, 0.3, 0.35}, "test data should reach each radius"
    wrong = (y + 1) % 3
    assert bool((certified_radius_on_grid(net, x, wrong, radii) == 0).all())
    assert torch.equal(
        certified_radius_on_grid(net, x, y, []), torch.zeros(40, dtype=torch.float64)
    )
    alone = certified_radius_on_grid(net, x, y, torch.tensor([0.0, 0.25]))
    assert torch.equal(alone, torch.where(got >= 0.25, 0.25, 0.0).double())
    with pytest.raises(ConfigError, match="radii"):
        certified_radius_on_grid(net, x, y, [0.1, -0.1])


def test_grid_radius_stops_at_the_first_uncertified_radius(monkeypatch):
    """The bound is not guaranteed monotone in the radius: a certificate at 0.3 after a
    failure at 0.2 must not be reported, since "radius >= r" has to mean "certified at r"."""
    import defenses.convex_relaxation.radius as radius_mod

    pattern = {0.1: True, 0.2: False, 0.3: True}
    tested = []

    def fake_mask(model, x, y, eps, norm, clip_box, batch_size):
        tested.append(eps)
        return torch.full((x.shape[0],), pattern[eps])

    monkeypatch.setattr(radius_mod, "_certified_mask", fake_mask)
    out = certified_radius_on_grid(mlp(0), torch.rand(3, 4), torch.zeros(3), [0.3, 0.1, 0.2])
    assert out.tolist() == [0.1] * 3 and tested == [0.1, 0.2]


def _defense(**params) -> WongKolter:
    d = create_defense("wong-kolter", **params)
    assert isinstance(d, WongKolter)
    return d.setup(tiny_conv(3), input_shape=(1, 5, 5), num_classes=3)


def test_defense_certify_uses_predicted_label():
    d = _defense(eps=0.05)
    x = torch.rand(12, 1, 5, 5, generator=torch.Generator().manual_seed(1))
    cert = d.certify(x, norm="linf")
    labels = d.model_(x).argmax(1)
    assert torch.equal(cert.labels, labels) and cert.bound == "wong-kolter-dual"
    b = margin_lower_bounds(d.model_, x, labels, eps=0.05).scatter(1, labels[:, None], math.inf)
    expect = torch.where(b.min(1).values > 0, 0.05, 0.0).double()
    assert torch.equal(cert.radii["linf"], expect)
    assert 0 < int((expect > 0).sum()) < 12  # the example set exercises both outcomes
    searched = _defense(eps=0.05, certify_eps=0.2, radius_search=True).certify(x, norm="l2")
    r = searched.radii["l2"]
    assert bool((r <= 0.2).all()) and r.dtype == torch.float64
    with pytest.raises(ConfigError):
        d.certify(x, norm="l1")


def test_defense_certify_radii_precedence():
    """certify_eps, then radius_search, then the caller's radii, then eps (see certify)."""
    x = torch.rand(30, 1, 5, 5, generator=torch.Generator().manual_seed(1))
    grid = [0.0, 0.01, 0.03, 0.05, 0.1]
    d = _defense(eps=0.05)
    plain = d.certify(x, norm="linf")
    at_eps = d.certify(x, norm="linf", radii=[0.05])
    # what the CLI needs: radii=[eps] certifies at exactly eps, as certify_eps=eps did
    fixed = _defense(eps=0.05, certify_eps=0.05).certify(x, norm="linf")
    # (cases 1 and 4 report eps rounded to the model's float32; the grid reports eps itself)
    assert torch.equal(at_eps.radii["linf"] > 0, plain.radii["linf"] > 0)
    assert torch.equal(at_eps.radii["linf"] > 0, fixed.radii["linf"] > 0)
    assert set(at_eps.radii["linf"].tolist()) == {0.0, 0.05}
    assert torch.equal(at_eps.labels, plain.labels) and at_eps.bound == "wong-kolter-dual"
    on_grid = d.certify(x, norm="l2", radii=grid)
    expect = certified_radius_on_grid(d.model_, x, on_grid.labels, grid, norm="l2")
    assert torch.equal(on_grid.radii["l2"], expect)
    assert len(set(expect.tolist())) >= 3, "the grid should separate the examples"
    for params in ({"eps": 0.05, "certify_eps": 0.03}, {"eps": 0.05, "radius_search": True}):
        dd = _defense(**params)
        assert torch.equal(
            dd.certify(x, norm="linf", radii=grid).radii["linf"],
            dd.certify(x, norm="linf").radii["linf"],
        ), f"radii must not override {params}"


def test_record_and_norms():
    d = WongKolter(eps=0.2, projection_dim=5)
    assert d.record() == DefenseRecord(n_draws=None, alpha=None, bound="wong-kolter-dual")
    assert set(BALL_NORMS) <= set(NORMS) and WongKolter.certifies == BALL_NORMS
    import defenses.convex_relaxation as cr
    import defenses.wong_kolter as wk

    for name in cr.__all__:  # defenses.wong_kolter keeps serving the package's public names
        assert name in ("EpsLike", "worst_margin") or getattr(wk, name) is getattr(cr, name)


def test_defense_params_and_validation():
    d = WongKolter(eps=0.2, norm="l2", projection_dim=10)
    assert d.get_params()["projection_dim"] == 10 and d.get_params()["certify_eps"] is None
    bads = [
        ({"norm": "l1"}, "norm must be one of linf, l2, got 'l1'"),
        ({"eps": -1.0}, "eps must be a number >= 0"),
        ({"projection_dim": 0}, "projection_dim must be a positive integer, got 0"),
        ({"eps_warmup_fraction": 2.0}, "eps_warmup_fraction must be a number in"),
        ({"certify_eps": -0.1}, "certify_eps"),
        ({"radius_search": "yes"}, "radius_search must be true or false"),
    ]
    for bad, message in bads:
        with pytest.raises(ConfigError, match=f"wong-kolter: {message}"):
            WongKolter(**bad)
    p = lambda f: TrainProgress(step=int(f * 100), total_steps=100, epoch=0, epochs=1)  # noqa: E731
    d = WongKolter(eps=0.2, eps_warmup_fraction=0.5)
    assert [d.current_eps(p(f)) for f in (0, 0.25, 0.5, 1)] == pytest.approx([0, 0.1, 0.2, 0.2])


@pytest.mark.parametrize("projection_dim", [None, 3])
def test_robust_training_reduces_robust_loss(projection_dim):
    torch.manual_seed(0)
    d = _defense(eps=0.02, eps_warmup_fraction=0.0, projection_dim=projection_dim)
    x = torch.rand(24, 1, 5, 5, generator=torch.Generator().manual_seed(9))
    brightness = x.mean(dim=(1, 2, 3))
    y = (brightness > brightness.median()).long() + (brightness > brightness.quantile(0.8)).long()

    def exact_loss() -> float:
        with torch.no_grad():
            return float(robust_loss(d.model_, x, y, eps=0.02))

    before = exact_loss()
    opt = torch.optim.Adam(d.model_.parameters(), lr=0.05)
    for step in range(15):
        opt.zero_grad()
        loss = d.training_loss(x, y, TrainProgress(step=step, total_steps=15, epoch=0, epochs=1))
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    assert exact_loss() < 0.9 * before


@pytest.mark.parametrize("clip", [False, True], ids=["ball", "ball-and-box"])
def test_projected_l2_training_has_finite_gradients(clip):
    """A unit whose Gaussian columns are all zero (inactive ReLUs upstream) has an estimated
    ℓ2 half-width of 0; the gradient of sqrt at 0 must not turn the loss's gradient to NaN."""
    net = tiny_conv(0)
    x = torch.rand(5, 1, 5, 5, generator=torch.Generator().manual_seed(10))
    y = net(x).argmax(1)
    torch.manual_seed(11)
    loss = robust_loss(net, x, y, eps=0.07, norm="l2", clip_box=clip, projection_dim=2)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)


def test_robust_loss_reaches_the_biases():
    """Robust training updates every parameter, biases included (they were once detached by
    a shape probe under no_grad)."""
    net = mlp(0)
    x = torch.rand(5, 4, generator=torch.Generator().manual_seed(0))
    robust_loss(net, x, net(x).argmax(1), eps=0.1).backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.statistical
def test_projection_estimate_is_close_but_random():
    """Cauchy median estimate of eps·‖row‖₁ (first ReLU). The sample median of k draws of
    |Cauchy(0, s)| has asymptotic sd π s / (2 √k) (density 1/(π s) at the median s); with
    k = 2000 that is 3.5% of s. We allow 5 sd = 17.6% per unit, and a mean relative error of
    2% over the 18 units (sd of the mean ≈ 3.5%/√18 = 0.8%, so 2.4 sd)."""
    net = tiny_conv(4)
    x = torch.rand(1, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    with torch.no_grad():
        est = pre_activation_bounds(net, x, eps=0.1, projection_dim=2000)[0]
        exact = pre_activation_bounds(net, x, eps=0.1)[0]
    centre = (exact[0] + exact[1]) / 2
    rel = ((centre - est[0]) / ((exact[1] - exact[0]) / 2) - 1).flatten()
    assert float(rel.abs().max()) < 0.176
    assert abs(float(rel.mean())) < 0.02


# ---------------------------------------------------------------------------- released model
# Exact counts on the first 1000 / 100 Fashion-MNIST test images (linf eps = 0.1, no clipping),
# measured with this implementation; "certified" = all J(e_y - e_j) > 0 for the true label y
# (equivalently: correct and certified for the predicted label). Published for all 10 000:
# clean error 21.73%, certified error 34.53%; the first 1000 give 20.7% and 34.7%.
SLICE_1000 = {"correct": 793, "certified": 653}
SLICE_100 = {"correct": 75, "certified": 60}


def _released(wk_reference, fashion_dir, n):
    from bench.data import load_dataset
    from bench.models import create_model

    net = create_model("wk-small", input_shape=(1, 28, 28), num_classes=10)
    net.load_state_dict(torch.load(wk_reference, map_location="cpu", weights_only=True))
    data = load_dataset("fashion-mnist", fashion_dir, limit_train=0, limit_test=n)
    return net.eval(), data.x_test, data.y_test


def _counts(net, x, y):
    with torch.no_grad():
        pred = net(x).argmax(1)
        bound = margin_lower_bounds(net, x, y, eps=0.1)
        ibp = interval_margin_lower_bounds(net, x, y, eps=0.1)
    cert = bound.scatter(1, y[:, None], math.inf).min(1).values > 0
    return int((pred == y).sum()), int(cert.sum()), bool((cert <= (pred == y)).all()), ibp, bound


@pytest.mark.fashion
def test_released_model_first_100(wk_reference, fashion_dir):
    net, x, y = _released(wk_reference, fashion_dir, 100)
    correct, certified, implies_correct, ibp, wk = _counts(net, x, y)
    assert implies_correct, "a certified example must be classified correctly"
    assert (correct, certified) == (SLICE_100["correct"], SLICE_100["certified"])
    # Not a theorem (see test_ibp_can_beat_wong_kolter), but true for this WK-trained model:
    assert bool((ibp <= wk + 1e-5).all())
    ca = _convex_adversarial()
    c = torch.eye(10)[y[:8]].unsqueeze(1) - torch.eye(10).unsqueeze(0)
    with torch.no_grad():
        ref = ca.DualNetwork(net, x[:8], 0.1)(c)
    assert torch.allclose(wk[:8], ref, atol=1e-4), (wk[:8] - ref).abs().max()
    # the defense as the CLI calls it (certify at the caller's eps) gives the same count
    d = WongKolter(eps=0.1).setup(net, input_shape=(1, 28, 28), num_classes=10)
    cert = d.certify(x, norm="linf", radii=[0.1])
    assert int(((cert.labels == y) & (cert.radii["linf"] >= 0.1)).sum()) == SLICE_100["certified"]


@pytest.mark.slow
@pytest.mark.fashion
def test_released_model_first_1000(wk_reference, fashion_dir):
    net, x, y = _released(wk_reference, fashion_dir, 1000)
    correct, certified, implies_correct, _, _ = _counts(net, x, y)
    assert implies_correct
    assert (correct, certified) == (SLICE_1000["correct"], SLICE_1000["certified"])


@pytest.mark.parametrize(
    "params",
    [{}, {"norm": "l2", "clip_box": True, "projection_dim": 5, "radius_search": True}],
    ids=["default", "l2-projected-search"],
)
def test_defense_contract(params):
    from bench.testing import check_defense

    check_defense(WongKolter, params)
