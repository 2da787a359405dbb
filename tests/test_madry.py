"""Tests of defenses/madry.py: the PGD inner maximisation and Madry adversarial training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from bench.errors import ConfigError
from bench.registry import create_defense
from defenses.base import TrainProgress
from defenses.madry import Madry, pgd, reference_setting

PROGRESS = TrainProgress(step=0, total_steps=1, epoch=0, epochs=1)


def _tiny_mlp(d_in: int, seed: int = 0, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    return x, torch.tensor(y, dtype=torch.int64)


@pytest.fixture(scope="module")
def digits_split():
    """scikit-learn digits in [0, 1], shape (N, 1, 8, 8); a fixed 1200 / 597 split."""
    torch.set_num_threads(1)
    x, y = _digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1200], perm[1200:]
    return x[tr], y[tr], x[te], y[te]


def _fit(defense: Madry, x, y, *, adversarial: bool, epochs: int, seed: int) -> nn.Module:
    """A minimal stand-in for the runner's loop (Adam 1e-2, batch 50)."""
    torch.manual_seed(seed)
    model = defense.model_
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for b in range(0, len(x), 50):
            idx = perm[b : b + 50]
            xb, yb = x[idx], y[idx]
            if adversarial:
                loss = defense.training_loss(xb, yb, PROGRESS)
            else:
                loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def standard_model(digits_split):
    """An MLP with plain cross-entropy training on digits (clean test accuracy ~0.95)."""
    xtr, ytr, _, _ = digits_split
    d = Madry().setup(_tiny_mlp(64, seed=1, hidden=64), input_shape=(1, 8, 8), num_classes=10)
    return _fit(d, xtr, ytr, adversarial=False, epochs=8, seed=1)


# --------------------------------------------------------------------------- PGD feasibility
# Float tolerance: x_adv = clamp(x + delta) is rounded to float32 (ulp <= 1.2e-7 in [0, 1]) and
# delta itself is a float32 value; the ball constraint holds exactly in real arithmetic, so
# allow a few ulps absolute (linf) and relative 1e-5 of the radius plus the same (l2, whose
# norm sums d rounded terms).
LINF_TOL = 1e-6


def _check_feasible(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str) -> None:
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad
    assert torch.isfinite(x_adv).all()
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    diff = (x_adv.double() - x.double()).flatten(1)
    if norm == "linf":
        assert float(diff.abs().max()) <= eps + LINF_TOL
    else:
        assert float(diff.norm(dim=1).max()) <= eps * (1 + 1e-5) + LINF_TOL


@settings(max_examples=60, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 4), st.just(1), st.just(3), st.just(3)),
        elements=st.floats(0.0, 1.0, width=32),
    ),
    eps=st.one_of(st.sampled_from([0.0, 1.0, 2.5, 10.0]), st.floats(0.0, 5.0)),
    norm=st.sampled_from(["linf", "l2"]),
    steps=st.integers(0, 5),
    step_ratio=st.floats(0.0, 3.0),
    random_start=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_pgd_never_leaves_ball_or_box(x, eps, norm, steps, step_ratio, random_start, seed):
    # Inputs include exact 0s and 1s (hypothesis favours the bounds), radii above 1 (the box
    # binds before the ball) and step sizes up to 3 eps (overshooting steps get projected).
    xt = torch.from_numpy(x)
    y = torch.randint(0, 10, (xt.shape[0],), generator=torch.Generator().manual_seed(seed))
    model = _tiny_mlp(9, seed=seed % 7)
    x_adv = pgd(
        model,
        xt,
        y,
        eps=eps,
        norm=norm,
        steps=steps,
        step_size=step_ratio * eps,
        random_start=random_start,
        generator=torch.Generator().manual_seed(seed),
    )
    _check_feasible(xt, x_adv, eps, norm)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_pgd_saturated_inputs_large_eps(norm, fill):
    x = torch.full((3, 1, 4, 4), fill)
    y = torch.tensor([0, 1, 2])
    x_adv = pgd(_tiny_mlp(16), x, y, eps=3.0, norm=norm, steps=5, step_size=1.0)
    _check_feasible(x, x_adv, 3.0, norm)
    assert (x_adv != x).any()  # the box allows moving away from a saturated pixel


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_per_example_radii(norm):
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(4, 1, 4, 4, generator=gen)
    y = torch.tensor([0, 1, 2, 3])
    eps = torch.tensor([0.0, 0.05, 0.5, 2.0])
    x_adv = pgd(_tiny_mlp(16), x, y, eps=eps, norm=norm, steps=4, step_size=eps / 2, generator=gen)
    for i in range(4):
        _check_feasible(x[i : i + 1], x_adv[i : i + 1], float(eps[i]), norm)
    assert torch.equal(x_adv[0], x[0])
    with pytest.raises(ValueError, match="eps"):
        pgd(_tiny_mlp(16), x, y, eps=eps[:3], norm=norm, steps=1, step_size=0.1)


def test_pgd_eps_zero_is_identity():
    x = torch.rand(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(4, dtype=torch.int64)
    for norm in ("linf", "l2"):
        assert torch.equal(pgd(_tiny_mlp(9), x, y, eps=0.0, norm=norm, steps=3, step_size=0.1), x)


# --------------------------------------------------------------------------- PGD vs an oracle
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_matches_torchattacks_without_random_start(norm, digits_split, standard_model):
    # Independent implementation: torchattacks PGD / PGDL2 (sign steps, resp. steps along
    # grad / (||grad|| + 1e-10), projection, clipping) with the same settings. From the same
    # (deterministic) start both follow the same iterates. Batch size 64 is a power of two, so
    # torchattacks' mean-reduced loss scales each gradient exactly by 1/64: the signs agree
    # bit for bit; the l2 normalisation differs only through the 1e-10 in the denominator.
    torchattacks = pytest.importorskip("torchattacks")
    _, _, xte, yte = digits_split
    x, y = xte[:64], yte[:64]
    model = standard_model
    if norm == "linf":
        eps, steps, step = 0.1, 10, 0.025
        oracle = torchattacks.PGD(model, eps=eps, alpha=step, steps=steps, random_start=False)
    else:
        eps, steps, step = 0.5, 10, 0.125
        oracle = torchattacks.PGDL2(model, eps=eps, alpha=step, steps=steps, random_start=False)
    expected = oracle(x, y)
    model.eval()
    got = pgd(model, x, y, eps=eps, norm=norm, steps=steps, step_size=step, random_start=False)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- PGD is an attack
def test_pgd_increases_loss_on_trained_model(digits_split, standard_model):
    _, _, xte, yte = digits_split
    model = standard_model
    eps = 0.1
    gen = torch.Generator().manual_seed(5)
    x_adv = pgd(model, xte, yte, eps=eps, norm="linf", steps=20, step_size=0.0125, generator=gen)
    # Baseline: a random corner of the same linf ball (the strongest "blind" perturbation).
    signs = torch.randint(0, 2, xte.shape, generator=gen).float() * 2 - 1
    x_rand = (xte + eps * signs).clamp(0, 1)
    with torch.no_grad():
        clean = F.cross_entropy(model(xte), yte, reduction="none")
        adv = F.cross_entropy(model(x_adv), yte, reduction="none")
        rand = F.cross_entropy(model(x_rand), yte, reduction="none")
        acc_clean = (model(xte).argmax(1) == yte).float().mean().item()
        acc_adv = (model(x_adv).argmax(1) == yte).float().mean().item()
    # Ascent from the random start must beat the start for almost every example and the blind
    # corner on average (the observed losses: benchmarks/RESULTS.md, "attacks + threat").
    assert adv.mean() > 3 * clean.mean()
    assert adv.mean() > 2 * rand.mean()
    assert (adv >= clean).float().mean() > 0.95
    assert acc_clean > 0.9 and acc_adv < acc_clean - 0.2


def test_pgd_under_no_grad_and_generator_determinism(standard_model):
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8)
    kw = dict(eps=0.2, norm="l2", steps=3, step_size=0.1, random_start=True)
    with torch.no_grad():
        a = pgd(standard_model, x, y, generator=torch.Generator().manual_seed(3), **kw)
    b = pgd(standard_model, x, y, generator=torch.Generator().manual_seed(3), **kw)
    c = pgd(standard_model, x, y, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_pgd_rejects_bad_arguments():
    model, y = _tiny_mlp(9), torch.zeros(2, dtype=torch.int64)
    x = torch.rand(2, 1, 3, 3)
    with pytest.raises(ValueError, match="norm"):
        pgd(model, x, y, eps=0.1, norm="l1", steps=1, step_size=0.1)
    with pytest.raises(ValueError, match="eps"):
        pgd(model, x, y, eps=-0.1, steps=1, step_size=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pgd(model, x * 255, y, eps=0.1, steps=1, step_size=0.1)


# --------------------------------------------------------------------------- the defense
@pytest.mark.parametrize(
    ("shape", "norm", "expected"),
    [
        ((1, 28, 28), "linf", (0.3, 40, 0.01)),
        ((3, 32, 32), "linf", (8 / 255, 7, 2 / 255)),
        ((1, 8, 8), "linf", (0.1, 10, 0.025)),
        ((1, 28, 28), "l2", (1.5, 40, 2.5 * 1.5 / 40)),
        ((3, 32, 32), "l2", (0.5, 7, 2.5 * 0.5 / 7)),
        ((1, 8, 8), "l2", (0.5, 10, 0.125)),
    ],
)
def test_reference_settings_resolved_in_setup(shape, norm, expected):
    d = create_defense("madry", norm=norm)
    model = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), 10))
    d.setup(model, input_shape=shape, num_classes=10)
    r = d.resolved_params_
    assert (r["eps"], r["steps"]) == expected[:2]
    assert r["step_size"] == pytest.approx(expected[2], rel=1e-12)
    assert r["norm"] == norm and r["random_start"] is True
    assert reference_setting(shape, norm) == pytest.approx(expected)
    # The parameters themselves stay as passed (they are the run record).
    assert d.get_params() == dict(
        eps=None, norm=norm, steps=None, step_size=None, random_start=True
    )


def test_partial_overrides_use_step_rule():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    d = Madry(eps=0.1).setup(model, input_shape=(1, 28, 28), num_classes=10)
    assert d.resolved_params_["steps"] == 40
    assert d.resolved_params_["step_size"] == pytest.approx(2.5 * 0.1 / 40)
    d = Madry(steps=100, step_size=0.005).setup(model, input_shape=(1, 28, 28), num_classes=10)
    assert d.resolved_params_ == dict(
        eps=0.3, norm="linf", steps=100, step_size=0.005, random_start=True
    )
    assert d.train_defaults() == {"optimizer": "adam", "lr": 1e-4, "batch_size": 50}
    cifar = Madry().setup(nn.Flatten(), input_shape=(3, 32, 32), num_classes=10)
    assert cifar.train_defaults()["optimizer"] == "sgd"
    assert cifar.train_defaults()["weight_decay"] == 2e-4


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"norm": "l1"}, "norm"),
        ({"eps": -0.1}, "eps"),
        ({"eps": float("inf")}, "eps"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"step_size": 0.0}, "step_size"),
        ({"random_start": "yes"}, "random_start"),
    ],
)
def test_invalid_params_raise_naming_the_field(params, field):
    with pytest.raises(ValueError, match=field):
        Madry(**params)
    with pytest.raises(ConfigError, match=field):
        create_defense("madry", **params)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_training_loss_leaves_model_state_alone(mode):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)
    )
    model[1].bias.requires_grad_(False)  # a frozen parameter must stay frozen
    d = Madry().setup(model, input_shape=(1, 8, 8), num_classes=10)
    getattr(d.model_, mode)()
    flags = [p.requires_grad for p in d.model_.parameters()]
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % 10

    torch.manual_seed(7)
    loss = d.training_loss(x, y, PROGRESS)
    assert [p.requires_grad for p in d.model_.parameters()] == flags
    assert all(p.grad is None for p in d.model_.parameters())  # the attack left no grads
    assert all(m.training == (mode == "train") for m in d.model_.modules())
    assert loss.requires_grad and loss.dim() == 0
    if mode == "eval":
        # Same random start (same global seed) -> the loss is CE at the same x_adv.
        torch.manual_seed(7)
        x_adv = d.adversarial_examples(x, y)
        assert torch.equal(loss.detach(), F.cross_entropy(d.model_(x_adv), y).detach())
        _check_feasible(x, x_adv, 0.1, "linf")


# --------------------------------------------------------------------------- it defends
def test_adversarial_training_improves_pgd_accuracy_on_digits(digits_split, standard_model):
    xtr, ytr, xte, yte = digits_split
    d = Madry().setup(_tiny_mlp(64, seed=1, hidden=64), input_shape=(1, 8, 8), num_classes=10)
    assert d.resolved_params_["eps"] == 0.1  # the generic (digits) linf setting
    robust = _fit(d, xtr, ytr, adversarial=True, epochs=6, seed=1)

    def pgd_accuracy(model: nn.Module) -> float:
        # Evaluation attack stronger than training's: 20 steps of 2.5 eps / 20.
        gen = torch.Generator().manual_seed(123)
        x_adv = pgd(
            model, xte, yte, eps=0.1, norm="linf", steps=20, step_size=0.0125, generator=gen
        )
        with torch.no_grad():
            return (model(x_adv).argmax(1) == yte).float().mean().item()

    acc_std, acc_rob = pgd_accuracy(standard_model), pgd_accuracy(robust)
    with torch.no_grad():
        clean_rob = (robust(xte).argmax(1) == yte).float().mean().item()
    # Each accuracy is a mean over 597 test points, standard error <= sqrt(0.25 / 597) = 0.02,
    # so the difference has SE <= 0.03; a margin of 0.10 is > 3 SE above "no effect" (a broken
    # inner maximisation passes with probability < 0.1%) and ~5 SE below the observed gap of
    # ~0.24 (benchmarks/RESULTS.md, "attacks + threat").
    assert acc_rob > acc_std + 0.10
    assert clean_rob > 0.85  # and it still classifies clean digits
