"""Sequential certification (issue #16): confidence sequences, the round loop, sequential
CERTIFY / PREDICT for randomized smoothing and PixelDP's sequential robustness test.

Soundness is checked against independent oracles whose answer is known in closed form: a
base classifier whose smoothed probability ``p`` is set exactly (linear classifiers:
``p = Phi(margin / sigma)``, exact radius ``|margin|``), exact binomial / multinomial counts
for thousands of seeded trials, and PixelDP's ``L_max`` at the known expected scores. Each
failure-rate check allows the count a ``Binomial(trials, alpha)`` exceeds with probability
``1e-6`` (``binom.ppf(1 - 1e-6, trials, alpha)``); the trials are set on the boundary of the
null (the hardest case), at levels large enough (0.05-0.1) for the failures to be counted.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import special, stats
from statsmodels.stats.proportion import proportion_confint
from torch import nn

from bench.certificates import PixelDPSequentialTest, pixeldp_robust_size_from_bounds
from bench.confseq import (
    SEQUENCES,
    BettingMixture,
    ClopperPearsonUnion,
    confidence_sequence,
)
from bench.errors import ConfigError
from bench.noise import NoiseLayer
from bench.pipeline import (
    DefenseFacts,
    ShardResult,
    cell_result,
    certify_all,
    merge_shards,
    takes_labels,
)
from bench.registry import create_defense
from bench.sampling import (
    ESTIMATION,
    sample,
    smoothed_certify,
    smoothed_certify_sequential,
    smoothed_predict_sequential,
)
from bench.sampling.engine import sample_streams
from bench.sampling.sequential import (
    certify_rounds,
    engine_draw,
    look_schedule,
    predict_rounds,
    run_rounds,
)
from bench.testing import check_defense
from defenses.base import ABSTAIN, Certificate, Defense
from defenses.pixeldp import PixelDP
from defenses.smoothing import RandomizedSmoothing

SIGMA = 0.25
TOL = 1e-6  # probability that a sound method fails a failure-rate check


def _allowed(trials: int, level: float) -> int:
    return int(stats.binom.ppf(1 - TOL, trials, level))


class Line(nn.Module):
    """Two classes split by the hyperplane ``x_0 = 0`` (inputs ``(N, 1, 1, 4)``): under
    Gaussian noise of std ``sigma``, ``P(class 0) = Phi(x_0 / sigma)`` and the smoothed
    classifier's exact l2 radius is ``|x_0|``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1)[:, :1]
        return torch.cat([s, -s], dim=1)


def _line_inputs(margins: np.ndarray) -> torch.Tensor:
    x = torch.zeros(len(margins), 1, 1, 4)
    x[:, 0, 0, 0] = torch.as_tensor(margins, dtype=torch.float32)
    return x


def _binomial_draw(p: np.ndarray, seed: int):
    """Exact two-class counts: class 0 with probability ``p[i]``."""
    rng = np.random.default_rng(seed)

    def draw(positions: np.ndarray, start: int, count: int) -> np.ndarray:
        k = rng.binomial(count, p[positions])
        return np.stack([k, count - k], axis=1)

    return draw


def _multinomial_draw(p: np.ndarray, seed: int):
    """Exact K-class counts with class probabilities ``p[i]`` (rows sum to 1)."""
    rng = np.random.default_rng(seed)

    def draw(positions: np.ndarray, start: int, count: int) -> np.ndarray:
        return rng.multinomial(count, p[positions])

    return draw


# --------------------------------------------------------------------------- confseq
def test_clopper_pearson_union_is_clopper_pearson_at_alpha_over_looks():
    cs = ClopperPearsonUnion(0.01, 8)
    k, n = np.array([0, 3, 50, 99, 100]), 100
    lo, hi = proportion_confint(k, n, alpha=2 * 0.01 / 8, method="beta")
    np.testing.assert_allclose(cs.lower(k, n), np.nan_to_num(lo), atol=1e-12)
    np.testing.assert_allclose(cs.upper(k, n), np.nan_to_num(hi, nan=1.0), atol=1e-12)


@pytest.mark.parametrize("s,n", [(0, 7), (7, 7), (3, 10), (480, 1000), (99_990, 100_000)])
def test_betting_interval_is_the_set_where_the_mixture_stays_below_one_over_alpha(s, n):
    """The ends equal a brute-force scan of ``log M(m) < log(1/alpha)`` (KT mixture)."""
    alpha = 0.001
    cs = BettingMixture(alpha)
    m = np.linspace(1e-9, 1 - 1e-9, 400_001)
    with np.errstate(divide="ignore"):
        log_m = (
            special.betaln(s + 0.5, n - s + 0.5)
            - special.betaln(0.5, 0.5)
            - s * np.log(m)
            - (n - s) * np.log1p(-m)
        )
    inside = m[log_m < math.log(1 / alpha)]
    step = m[1] - m[0]
    assert cs.lower(s, n) <= inside.min() + 1e-12 and cs.lower(s, n) >= inside.min() - step
    assert cs.upper(s, n) >= inside.max() - 1e-12 and cs.upper(s, n) <= inside.max() + step


def test_sequences_reject_bad_arguments_naming_the_field():
    with pytest.raises(ValueError, match="sequence"):
        confidence_sequence("hoeffding", 0.01, 3)
    with pytest.raises(ValueError, match="looks"):
        confidence_sequence("clopper-pearson-union", 0.01, 0)
    with pytest.raises(ValueError, match="alpha"):
        BettingMixture(1.5)


@pytest.mark.statistical
@pytest.mark.parametrize("name", SEQUENCES)
def test_sequences_cover_p_at_every_look(name):
    """10 000 Bernoulli paths on the looks of a schedule (for the anytime-valid betting
    sequence, 125 looks: every 10 draws up to 1000, then the schedule's): a lower (upper)
    bound ever above (below) ``p`` happens in at most an ``alpha`` fraction of paths."""
    alpha, trials = 0.05, 10_000
    looks = look_schedule(20_000, 100)
    if name == "betting":
        looks = list(range(10, 1000, 10)) + [n for n in looks if n >= 1000]
    cs = confidence_sequence(name, alpha, len(looks))
    rng = np.random.default_rng(1)
    p = rng.choice([0.01, 0.3, 0.5, 0.9, 0.999], trials)
    s = np.zeros(trials, dtype=np.int64)
    low_bad = np.zeros(trials, dtype=bool)
    high_bad = np.zeros(trials, dtype=bool)
    prev = 0
    for n in looks:
        s += rng.binomial(n - prev, p)
        prev = n
        low_bad |= cs.lower(s, n) > p
        high_bad |= cs.upper(s, n) < p
    assert low_bad.sum() <= _allowed(trials, alpha)
    assert high_bad.sum() <= _allowed(trials, alpha)


# --------------------------------------------------------------------------- schedule, rounds
def test_look_schedule_ends_on_blocks_and_at_max_n():
    looks = look_schedule(100_000, 1000)
    assert looks[:6] == [1000, 2000, 3000, 4000, 5000, 7000]
    assert looks[-1] == 100_000 and all(np.diff(looks) > 0)
    assert all(n % 1000 == 0 for n in looks)
    assert len(looks) == 18
    assert look_schedule(2500, 1000) == [1000, 2000, 2500]
    assert look_schedule(300, 1000) == [300]
    with pytest.raises(ValueError, match="growth"):
        look_schedule(100, 10, growth=0.5)


def test_first_block_takes_the_later_draws_of_the_stream():
    """Counts of (stream, m) from block b = counts of (b * bs + m) - counts of (b * bs)."""
    model = nn.Sequential(NoiseLayer("gaussian", 0.5), Line())
    x = _line_inputs(np.array([0.1, -0.2, 0.0]))
    kw = dict(num_classes=2, seed=4, indices=None, batch_size=37, block_size=50)
    (full,) = sample_streams(model, x, [(ESTIMATION, 230)], **kw)
    (head,) = sample_streams(model, x, [(ESTIMATION, 100)], **kw)
    (tail,) = sample_streams(model, x, [(ESTIMATION, 130)], first_block=2, **kw)
    assert torch.equal(head.counts + tail.counts, full.counts)


def test_run_rounds_stops_examples_and_counts_their_draws():
    seen = []

    def draw(positions, start, count):
        seen.append((positions.tolist(), start, count))
        return np.ones((positions.size, 2), dtype=np.int64) * np.array([count, 0])

    def decide(positions, counts, n):
        return positions != 1  # example 1 stops at the first look

    counts, spent = run_rounds(3, 2, [10, 20, 40], draw, decide)
    assert seen == [([0, 1, 2], 0, 10), ([0, 2], 10, 10), ([0, 2], 20, 20)]
    assert spent.tolist() == [40, 10, 40] and counts[:, 0].tolist() == [40, 10, 40]


def test_sequential_certify_does_not_depend_on_batching_or_sharding():
    x = _line_inputs(np.array([0.0, 0.05, 0.12, 0.3, -0.2, 0.6]))
    kw = dict(sigma=SIGMA, radii=[0.05, 0.1, 0.25], alpha=0.01, max_n=5000, seed=3,
              block_size=500, num_classes=2)  # fmt: skip
    full = smoothed_certify_sequential(Line(), x, **kw)
    small = smoothed_certify_sequential(Line(), x, batch_size=61, workers=1, **kw)
    parts = [
        smoothed_certify_sequential(Line(), x[a:b], indices=torch.arange(a, b), **kw)
        for a, b in ((0, 2), (2, 6))
    ]
    for i in range(3):
        assert torch.equal(full[i], small[i])
        assert torch.equal(full[i], torch.cat([p[i] for p in parts]))


def test_sequential_draws_are_a_prefix_of_the_fixed_n_draws():
    """The counts an example ends with are those of its first ``draws`` estimation draws."""
    model = nn.Sequential(NoiseLayer("gaussian", SIGMA), Line())
    x = _line_inputs(np.array([0.0, 0.1, 0.4, -0.3]))
    ids = [0, 1, 2, 3]
    draw = engine_draw(model, x, ids, ESTIMATION, num_classes=2, seed=5, batch_size=None,
                       block_size=200, workers=None, owner=model)  # fmt: skip
    looks = look_schedule(3000, 200)
    state = {"open": np.ones(4, dtype=bool)}

    def decide(positions, counts, n):
        return positions != 2 if n >= 600 else np.ones(positions.size, dtype=bool)

    counts, spent = run_rounds(4, 2, looks, draw, decide)
    assert state["open"].all() and spent[2] == 600 and spent[0] == 3000
    for i in ids:
        fixed = sample(model, x[i : i + 1], int(spent[i]), num_classes=2, seed=5,
                       indices=torch.tensor([i]), block_size=200)  # fmt: skip
        assert fixed.counts[0].tolist() == counts[i].tolist()


def test_certify_rounds_decides_easy_examples_early_and_gives_up_out_of_reach_radii():
    """p = 1 certifies r = 0.5 (needs p >= 0.977) within a few blocks and gives up
    r = 1.0 (needs p >= Phi(4), beyond n = 100 000) at once; p = 0 abstains at once."""
    p = np.array([1.0, 0.0])
    labels, radii, spent = certify_rounds(
        _binomial_draw(p, 0), np.array([0, 0]), num_classes=2, sigma=SIGMA,
        radii=[0.25, 0.5, 1.0], alpha=0.001, max_n=100_000,
    )  # fmt: skip
    assert labels.tolist() == [0, ABSTAIN]
    assert radii.tolist() == [0.5, 0.0]
    assert spent.tolist() == [1000, 1000]


def test_certify_rounds_rejects_bad_grids():
    with pytest.raises(ConfigError, match="radii"):
        certify_rounds(_binomial_draw(np.array([0.5]), 0), np.array([0]), num_classes=2,
                       sigma=SIGMA, radii=[-0.1], alpha=0.01, max_n=10)  # fmt: skip
    with pytest.raises(ConfigError, match="labels"):
        smoothed_certify_sequential(Line(), _line_inputs(np.array([0.1])), sigma=SIGMA,
                                    radii=[0.1], alpha=0.01, max_n=10,
                                    labels=torch.tensor([2]), num_classes=2)  # fmt: skip


# --------------------------------------------------------------------------- soundness oracles
def _boundary_trials(grid: list[float], trials: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """p just below Phi(r / sigma) for a random grid radius r: certifying r is an error."""
    r = rng.choice(np.array(grid), trials)
    p = stats.norm.cdf(r / SIGMA) - 1e-7
    return p, SIGMA * stats.norm.ppf(p)  # the exact radius, just below r


@pytest.mark.statistical
@pytest.mark.parametrize("name", SEQUENCES)
def test_sequential_certify_failure_rate_is_at_most_alpha(name):
    """6000 trials on the boundary of the null at alpha = 0.05: a certified radius beyond
    the exact one (or a wrong certified label) in at most alpha of them."""
    alpha, trials, grid = 0.05, 6000, [0.0, 0.1, 0.25, 0.5]
    rng = np.random.default_rng(7)
    p, exact = _boundary_trials(grid, trials, rng)
    labels, radii, spent = certify_rounds(
        _binomial_draw(p, 8), np.zeros(trials, dtype=np.int64), num_classes=2, sigma=SIGMA,
        radii=grid, alpha=alpha, max_n=30_000, sequence=name,
    )  # fmt: skip
    wrong = (labels == 0) & ((radii > exact) | (exact < 0))
    assert wrong.sum() <= _allowed(trials, alpha)
    assert spent.max() <= 30_000


@pytest.mark.statistical
def test_sequential_certify_through_the_engine_is_sound_on_a_linear_classifier():
    """The linear classifier's exact radius is |x_0|; 400 inputs just inside a grid radius
    (certifying it is an error), alpha = 0.1, through the sampling engine."""
    alpha, trials, grid = 0.1, 400, [0.05, 0.1, 0.2]
    rng = np.random.default_rng(3)
    margins = rng.choice(np.array(grid), trials) * (1 - 1e-6) * rng.choice([-1, 1], trials)
    x = _line_inputs(margins)
    labels, radii, _ = smoothed_certify_sequential(
        Line(), x, sigma=SIGMA, radii=grid, alpha=alpha, max_n=4000, n0=20, seed=9,
        block_size=250, num_classes=2,
    )  # fmt: skip
    truth = np.where(margins > 0, 0, 1)
    exact = np.abs(x[:, 0, 0, 0].double().numpy())  # float32 inputs: the radius they have
    lab, rad = labels.numpy(), radii.numpy()
    wrong = (lab != ABSTAIN) & ((lab != truth) | (rad > exact))
    assert wrong.sum() <= _allowed(trials, alpha)


@pytest.mark.statistical
def test_sequential_certify_agrees_with_fixed_n_certify_in_distribution():
    """On a spread of class probabilities like a trained model's, the fraction certified at
    every grid radius matches fixed-n CERTIFY (Clopper-Pearson at max_n) within 1 point, on
    far fewer draws; fixed-n's counts are exact binomials with the same p."""
    alpha, num, max_n = 0.001, 4000, 100_000
    grid = [0.0, 0.05, 0.1, 0.25, 0.5, 1.0]
    rng = np.random.default_rng(5)
    wrong = rng.random(num) < 0.1
    p = np.where(wrong, rng.uniform(0, 0.5, num), 1 - 10 ** rng.uniform(-6, math.log10(0.5), num))
    tested = np.zeros(num, dtype=np.int64)
    for name in SEQUENCES:
        labels, radii, spent = certify_rounds(
            _binomial_draw(p, 6), tested, num_classes=2, sigma=SIGMA, radii=grid,
            alpha=alpha, max_n=max_n, sequence=name,
        )  # fmt: skip
        k = rng.binomial(max_n, p)
        fixed = np.asarray(SIGMA * stats.norm.ppf(stats.beta.ppf(alpha, k, max_n - k + 1)))
        fixed = np.where(k > 0, fixed, -np.inf)
        for r in grid:
            seq_frac = np.mean((labels == 0) & (radii >= r))
            fixed_frac = np.mean(fixed >= r)
            assert abs(seq_frac - fixed_frac) <= 0.01, (name, r, seq_frac, fixed_frac)
        assert spent.mean() <= max_n / 10


def test_true_labels_are_tested_directly_and_misclassified_examples_abstain():
    x = _line_inputs(np.array([0.5, -0.5, 0.5]))
    y = torch.tensor([0, 0, 1])  # examples 1 and 2 have p_y = Phi(-2): never certified
    labels, radii, draws = smoothed_certify_sequential(
        Line(), x, sigma=SIGMA, radii=[0.1, 0.25], alpha=0.001, max_n=20_000, labels=y,
        seed=0, num_classes=2,
    )  # fmt: skip
    assert labels.tolist() == [0, ABSTAIN, ABSTAIN]
    assert radii.tolist() == [0.25, 0.0, 0.0]
    assert draws.tolist() == [1000, 1000, 1000]  # no selection draws
    sel = smoothed_certify_sequential(
        Line(), x, sigma=SIGMA, radii=[0.1, 0.25], alpha=0.001, max_n=20_000, seed=0,
        num_classes=2, n0=100,
    )  # fmt: skip
    assert sel[0].tolist() == [0, 1, 0] and sel[2].tolist() == [1100, 1100, 1100]


# --------------------------------------------------------------------------- PREDICT
@pytest.mark.statistical
@pytest.mark.parametrize("name", SEQUENCES)
def test_sequential_predict_returns_a_wrong_class_at_most_alpha_of_the_time(name):
    """Near-ties: g(x) = 0 with p = (0.4 + d, 0.4 - d, 0.2), d = 1e-4; returning 1 is an error."""
    alpha, trials = 0.1, 3000
    p = np.tile([0.4001, 0.3999, 0.2], (trials, 1))
    labels, spent = predict_rounds(
        _multinomial_draw(p, 2), trials, num_classes=3, alpha=alpha, max_n=20_000,
        block_size=200, sequence=name,
    )  # fmt: skip
    assert (labels == 1).sum() + (labels == 2).sum() <= _allowed(trials, alpha)
    assert spent.max() <= 20_000


def test_sequential_predict_decides_a_clear_majority_early_and_abstains_on_ties():
    p = np.array([[0.9, 0.05, 0.05], [0.5, 0.5, 0.0]])
    labels, spent = predict_rounds(
        _multinomial_draw(p, 0), 2, num_classes=3, alpha=0.001, max_n=50_000
    )
    assert labels.tolist() == [0, ABSTAIN]
    assert spent[0] == 1000 and spent[1] == 50_000


def test_smoothed_predict_sequential_matches_predict_on_clear_inputs():
    x = _line_inputs(np.array([0.5, -0.5, 0.0]))
    labels, draws = smoothed_predict_sequential(
        Line(), x, sigma=SIGMA, alpha=0.001, max_n=10_000, seed=1, num_classes=2
    )
    assert labels.tolist() == [0, 1, ABSTAIN]
    assert draws.tolist() == [1000, 1000, 10_000]


# --------------------------------------------------------------------------- PixelDP
PIXELDP_BUDGET = dict(mechanism="gaussian", epsilon=1.0, delta=0.05, construction_bound=0.1)


def _exact_l_max(p: np.ndarray) -> np.ndarray:
    top2 = np.sort(p, axis=1)[:, -2:]
    return np.asarray(pixeldp_robust_size_from_bounds(top2[:, 1], top2[:, 0], **PIXELDP_BUDGET))


def _pixeldp_rounds(p, thresholds, eta, max_n, name, seed):
    k = p.shape[1]
    looks = look_schedule(max_n, 500)
    test = PixelDPSequentialTest(
        np.array(thresholds),
        lambda pl, pu: np.asarray(pixeldp_robust_size_from_bounds(pl, pu, **PIXELDP_BUDGET)),
        confidence_sequence(name, eta / k, len(looks)),
        max_n,
        p.shape[0],
        k,
    )
    _, spent = run_rounds(p.shape[0], k, looks, _multinomial_draw(p, seed), test.update)
    return test, spent


def _scores_with_l_max(target: float, k: int = 4) -> np.ndarray:
    """Expected argmax scores (p1, p2, rest spread evenly) whose exact L_max is ``target``."""

    def l_max(p1):
        p2 = (1 - p1) / 2
        return float(
            _exact_l_max(
                np.array([[p1, p2, (1 - p1 - p2) / (k - 2)] + [(1 - p1 - p2) / (k - 2)] * (k - 3)])
            )[0]
        )

    lo, hi = 0.34, 0.999999
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if l_max(mid) < target else (lo, mid)
    p1 = lo  # largest found with L_max < target
    p2 = (1 - p1) / 2
    rest = (1 - p1 - p2) / (k - 2)
    return np.array([p1, p2] + [rest] * (k - 2))


@pytest.mark.statistical
@pytest.mark.parametrize("name", SEQUENCES)
def test_pixeldp_sequential_certifies_beyond_the_exact_l_max_at_most_2_eta(name):
    """Scores whose exact L_max (at the known expected scores) lies just below a threshold
    T: a certificate at T is an error; at most the strict failure probability 2 eta."""
    eta, trials = 0.05, 3000
    thresholds = [0.02, 0.05]
    rows = [_scores_with_l_max(t) for t in thresholds]
    p = np.array([rows[i % 2] for i in range(trials)])
    exact = _exact_l_max(p)
    assert (exact < np.array(thresholds)[np.arange(trials) % 2]).all()
    test, spent = _pixeldp_rounds(p, thresholds, eta, 20_000, name, seed=4)
    wrong = test.radii() > exact
    assert wrong.sum() <= _allowed(trials, 2 * eta)
    assert spent.max() <= 20_000


def test_pixeldp_sequential_recovers_the_exact_threshold_level_with_many_draws():
    """Away from the thresholds, enough draws certify exactly the thresholds below the
    exact L_max, and stop early where L_max is far above or far below."""
    p = np.array([[0.97, 0.01, 0.01, 0.01], [0.6, 0.3, 0.05, 0.05], [0.4, 0.38, 0.12, 0.1]])
    exact = _exact_l_max(p)
    thresholds = [0.01, 0.03, 0.08]
    test, spent = _pixeldp_rounds(p, thresholds, 0.05, 200_000, "clopper-pearson-union", 0)
    expected = [max([t for t in thresholds if t <= e], default=0.0) for e in exact]
    assert test.radii().tolist() == expected
    assert test.labels.tolist() == [0, 0, 0]
    assert spent.max() < 200_000


# --------------------------------------------------------------------------- defenses
def _smoothing(**params) -> RandomizedSmoothing:
    d = create_defense("randomized-smoothing", sigma=SIGMA, **params)
    return d.setup(Line(), input_shape=(1, 1, 4), num_classes=2)


def test_smoothing_sequential_certify_reports_grid_radii_draws_and_method():
    d = _smoothing(sequential=True, max_n=20_000, alpha=0.001)
    x = _line_inputs(np.array([0.3, 0.07, -0.4]))
    cert = d.certify(x, norm="l2", seed=0, radii=[0.05, 0.1, 0.25])
    assert cert.labels.tolist() == [0, 0, 1]
    assert cert.radius("l2").tolist() == [0.25, 0.05, 0.25]
    assert cert.extra["draws"].dtype == torch.int64 and (cert.extra["draws"] <= 20_100).all()
    rec = d.record()
    assert rec.method == "sequential-clopper-pearson-union" and rec.n_draws == 20_000
    # linf: a grid radius r needs the l2 radius r * sqrt(d) (d = 4 here)
    cert_inf = d.certify(x, norm="linf", seed=0, radii=[0.05, 0.15])
    assert cert_inf.radius("linf").tolist() == [0.05, 0.0, 0.15]
    assert cert_inf.radius("l2").tolist() == [0.1, 0.0, 0.3]
    # without a grid only the label is decided
    assert d.certify(x, norm="l2", seed=0).radius("l2").tolist() == [0.0, 0.0, 0.0]
    assert d.predict(x, seed=0).tolist() == [0, 0, 1]


def test_smoothing_fixed_path_is_unchanged_by_the_new_parameters():
    x = _line_inputs(np.array([0.3, 0.07, -0.4]))
    d = _smoothing(n=3000, n0=50)
    cert = d.certify(x, norm="l2", seed=2, radii=[0.1], labels=torch.tensor([0, 0, 0]))
    labels, radius = smoothed_certify(Line(), x, sigma=SIGMA, n0=50, n=3000, alpha=0.001,
                                      seed=2, num_classes=2)  # fmt: skip
    assert torch.equal(cert.labels, labels) and torch.equal(cert.radius("l2"), radius)
    assert "draws" not in cert.extra and d.record().method is None


@pytest.mark.parametrize(
    "params,field",
    [({"sequential": "yes"}, "sequential"), ({"max_n": 0}, "max_n"),
     ({"sequence": "hoeffding"}, "sequence")],
)  # fmt: skip
def test_sequential_parameters_are_validated(params, field):
    with pytest.raises(ConfigError, match=field):
        create_defense("randomized-smoothing", **params)
    with pytest.raises(ConfigError, match=field):
        create_defense("pixeldp", **params)


def test_test_labels_is_validated():
    with pytest.raises(ConfigError, match="test_labels"):
        create_defense("randomized-smoothing", test_labels=1)


def test_pixeldp_sequential_needs_the_argmax_estimator():
    with pytest.raises(ConfigError, match="argmax"):
        create_defense("pixeldp", sequential=True, estimator="softmax")


def test_sequential_defenses_pass_the_contract_checks():
    check_defense(RandomizedSmoothing, {"sequential": True, "max_n": 300, "n0": 10})
    check_defense(PixelDP, {"sequential": True, "max_n": 300})


def test_pixeldp_sequential_certify_reports_thresholds_and_draws():
    torch.manual_seed(0)
    d = create_defense("pixeldp", sequential=True, max_n=3000, placement="image",
                       noise_warmup=False, block_size=500)  # fmt: skip
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    d.setup(model, input_shape=(1, 4, 4), num_classes=3)
    x = torch.rand(5, 1, 4, 4)
    cert = d.certify(x, norm="l2", seed=1, radii=[0.0, 0.01, 0.05])
    assert cert.labels.shape == (5,) and set(cert.radius("l2").tolist()) <= {0.0, 0.01, 0.05}
    assert cert.extra["draws"].dtype == torch.int64 and (cert.extra["draws"] <= 3000).all()
    assert d.record().method == "sequential-clopper-pearson-union"
    again = d.certify(x[2:], norm="l2", seed=1, radii=[0.0, 0.01, 0.05],
                      indices=torch.arange(2, 5))  # fmt: skip
    assert torch.equal(again.labels, cert.labels[2:])
    assert torch.equal(again.extra["draws"], cert.extra["draws"][2:])


# --------------------------------------------------------------------------- pipeline
def test_cell_result_records_mean_draws_and_the_method():
    cell = SimpleNamespace(
        threat={"radii": [0.0], "thresholds": []}, attack=None, weights_sha256=None
    )
    facts = DefenseFacts(certifies=True, randomized=True, n_draws=100_000, alpha=0.001,
                         bound="cohen-gaussian", method="sequential-betting")  # fmt: skip
    parts = [
        ShardResult(y=torch.tensor([0, 1]), pred=torch.tensor([0, 1]),
                    radius=torch.zeros(2, dtype=torch.float64), draws=torch.tensor([1000, 2100])),
        ShardResult(y=torch.tensor([1]), pred=torch.tensor([-1]),
                    radius=torch.zeros(1, dtype=torch.float64), draws=torch.tensor([100_100])),
    ]  # fmt: skip
    merged = merge_shards(parts)
    assert merged.draws.tolist() == [1000, 2100, 100_100]
    rec = cell_result(cell, facts, merged, train_seconds=0.0, eval_seconds=0.0)
    assert rec["n_draws"] == round((1000 + 2100 + 100_100) / 3)
    assert rec["provenance"]["method"] == "sequential-betting"
    plain = cell_result(cell, facts, merge_shards([ShardResult(
        y=torch.tensor([0]), pred=torch.tensor([0]), radius=torch.zeros(1, dtype=torch.float64)
    )]), train_seconds=0.0, eval_seconds=0.0)  # fmt: skip
    assert plain["n_draws"] == 100_000


def test_defense_facts_record_fixed_n_for_randomized_defenses_that_do_not_say():
    d = _smoothing()
    assert DefenseFacts.of(d, "l2").method == "fixed-n"
    assert DefenseFacts.of(_smoothing(sequential=True), "l2").method == (
        "sequential-clopper-pearson-union"
    )


def test_certify_all_passes_labels_only_when_given():
    class Old(Defense):
        name = "old-signature"

        def certify(self, x, *, norm, seed=0, indices=None, batch_size=None, radii=None):
            zeros = torch.zeros(x.shape[0], dtype=torch.float64)
            return Certificate(labels=torch.zeros(x.shape[0], dtype=torch.int64),
                               radii={norm: zeros})  # fmt: skip

    old = Old().setup(nn.Flatten(), input_shape=(1, 1, 4), num_classes=2)
    assert certify_all(old, torch.zeros(3, 1, 1, 4), norm="l2").labels.tolist() == [0, 0, 0]
    assert not takes_labels(old) and takes_labels(_smoothing())
    d = _smoothing(sequential=True, max_n=5000, test_labels=True)
    x = _line_inputs(np.array([0.3, -0.3]))
    cert = certify_all(d, x, norm="l2", radii=[0.1], labels=torch.tensor([0, 0]))
    assert cert.labels.tolist() == [0, ABSTAIN] and cert.extra["draws"].tolist() == [1000, 1000]
    # without test_labels the labels are ignored: CERTIFY's selection (n0 = 100 draws)
    d = _smoothing(sequential=True, max_n=5000)
    cert = certify_all(d, x, norm="l2", radii=[0.1], labels=torch.tensor([0, 0]))
    assert cert.labels.tolist() == [0, 1] and cert.extra["draws"].tolist() == [1100, 1100]
