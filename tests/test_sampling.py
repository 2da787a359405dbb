"""Tests of the noise-sampling engine (the bench/sampling package).

Oracles: the documented seeding contract recomputed by hand (splitmix64 reference values,
one generator per (example, block)), torch's own RNG for the distribution of noisy outputs,
scipy's Laplace/normal laws, ART's PyTorchRandomizedSmoothing.certify, and the exact
binomial law of the Clopper-Pearson failure event.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import Tensor, nn

from bench.errors import ConfigError
from bench.noise import NoiseLayer, sample_standard
from bench.sampling import (
    ESTIMATION,
    PREDICTION,
    RESCORE,
    SELECTION,
    Samples,
    block_seed,
    sample,
    smoothed_certify,
    smoothed_predict,
)
from bench.sampling.seeding import seed_generator

K = 10


def _base_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 16, K),
    )


def _inputs(n: int = 10, seed: int = 1) -> Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


class _Recorder(nn.Module):
    """Identity-ish head that records every row it sees (the noisy input) and returns K scores."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[Tensor] = []

    def forward(self, h: Tensor) -> Tensor:
        self.rows.append(h.clone())
        return h.flatten(1)[:, :K]

    def recorded(self, num_examples: int, n: int) -> Tensor:
        """(N, n, *row_shape): rows are processed example-major, then draw by draw.

        Only the last N * n rows count: before them may come the engine's one-row dry run.
        """
        rows = torch.cat(self.rows)[-num_examples * n :]
        return rows.view(num_examples, n, *rows.shape[1:])


def _expected_noise(
    kind: str,
    shape: tuple[int, ...],
    *,
    seed: int,
    index: int,
    stream: int,
    n: int,
    block_size: int,
) -> Tensor:
    """The contract: block b of example `index` is one draw of a generator seeded block_seed."""
    blocks = []
    for b in range(-(-n // block_size)):
        rows = min(block_size, n - b * block_size)
        blocks.append(
            sample_standard(
                kind, (rows, *shape), generator=_block_generator(seed, index, stream, b)
            )
        )
    return torch.cat(blocks)


def _block_generator(seed: int, index: int, stream: int, block: int) -> torch.Generator:
    g = torch.Generator()
    seed_generator(g, block_seed(seed, index, stream, block))
    return g


# --------------------------------------------------------------------------- seeding contract
def test_splitmix64_reference_values() -> None:
    # Vigna's splitmix64 started at state 0 outputs 0xE220A8397B1DCDAF first; block_seed
    # chains it, so block_seed(0, 0, 0, 0) is splitmix64 applied four times to that chain.
    from bench.sampling.seeding import splitmix64

    assert splitmix64(0) == 0xE220A8397B1DCDAF
    seeds = {
        block_seed(s, i, t, b)
        for s in range(3)
        for i in range(3)
        for t in range(4)
        for b in range(3)
    }
    assert len(seeds) == 3 * 3 * 4 * 3  # distinct fields give distinct seeds
    assert all(0 <= s < 2**64 for s in seeds)


def _mt19937_init_genrand(seed32: int) -> np.ndarray:
    """Matsumoto & Nishimura's init_genrand: the 624 state words MT19937 seeds from 32 bits."""
    mt = [seed32]
    for i in range(1, 624):
        mt.append((1812433253 * (mt[-1] ^ (mt[-1] >> 30)) + i) & 0xFFFFFFFF)
    return np.array(mt, dtype=np.uint32)


def test_cpu_generator_state_layout_is_the_one_seed_generator_writes() -> None:
    # Oracle: torch's own manual_seed on a 32-bit seed. The state bytes built from the
    # reference init_genrand words must equal get_state() after manual_seed, and draw alike.
    from bench.sampling.seeding import mt19937_state

    for seed32 in (0, 1, 0x082EDC29, 2**32 - 1):
        reference = torch.Generator().manual_seed(seed32)
        built = mt19937_state(_mt19937_init_genrand(seed32), seed32)
        assert torch.equal(built, reference.get_state()), seed32
        g = torch.Generator()
        g.set_state(built)
        for dtype in (torch.float32, torch.float64):  # small (< 16) and vectorised paths
            for size in (5, 1000):
                a = torch.randn(size, generator=g, dtype=dtype)
                assert torch.equal(a, torch.randn(size, generator=reference, dtype=dtype))


def test_seed_generator_fills_the_twister_with_the_splitmix64_stream() -> None:
    from bench.sampling.seeding import splitmix64

    golden, mask = 0x9E3779B97F4A7C15, 2**64 - 1
    for seed in (0, 2**64 - 1, block_seed(0, 173139, ESTIMATION, 0)):
        g = torch.Generator()
        seed_generator(g, seed)
        state = g.get_state().numpy()
        words = state[24 : 24 + 8 * 624].view(np.uint64)
        outputs = [splitmix64((seed + i * golden) & mask) for i in range(312)]
        want = [w for z in outputs for w in (z & 0xFFFFFFFF, z >> 32)]  # low half first
        assert words.tolist() == want
        assert g.initial_seed() == seed


@pytest.mark.parametrize(
    ("first", "second"),
    [((173139, ESTIMATION), (384763, ESTIMATION)), ((292422, SELECTION), (256274, ESTIMATION))],
)
def test_block_seeds_equal_in_their_low_32_bits_get_different_noise(first, second) -> None:
    # With run seed 0 these (example, stream) pairs have block seeds that differ but share
    # their low 32 bits: torch's CPU manual_seed keeps only those, so seeding with it gave
    # the two examples identical noise. seed_generator uses all 64 bits.
    seeds = [block_seed(0, index, stream, 0) for index, stream in (first, second)]
    assert seeds[0] != seeds[1] and seeds[0] % 2**32 == seeds[1] % 2**32
    truncated = [torch.randn(64, generator=torch.Generator().manual_seed(s)) for s in seeds]
    assert torch.equal(truncated[0], truncated[1])  # the scenario this test guards against
    draws = []
    for index, stream in (first, second):
        rec = _Recorder()
        model = nn.Sequential(NoiseLayer("gaussian", 1.0), rec)
        sample(
            model,
            torch.zeros(1, 1, 4, 4),
            50,
            num_classes=K,
            seed=0,
            stream=stream,
            indices=torch.tensor([index]),
            workers=1,
        )
        draws.append(rec.recorded(1, 50))
    assert not torch.isclose(draws[0], draws[1]).any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generator_keeps_all_64_bits_of_the_seed() -> None:
    seeds = [block_seed(0, 173139, ESTIMATION, 0), block_seed(0, 384763, ESTIMATION, 0)]
    draws = []
    for seed in seeds:
        g = torch.Generator(device="cuda")
        seed_generator(g, seed)
        draws.append(torch.randn(64, generator=g, device="cuda"))
    assert not torch.isclose(draws[0], draws[1]).any()


@pytest.mark.parametrize("kind", ["gaussian", "laplace"])
def test_draws_follow_the_per_example_block_contract(kind: str) -> None:
    rec = _Recorder()
    model = nn.Sequential(NoiseLayer(kind, 1.0), rec)
    x = torch.zeros(3, 1, 4, 4)
    n, block = 25, 10
    sample(
        model,
        x,
        n,
        num_classes=K,
        seed=7,
        stream=RESCORE,
        indices=torch.tensor([5, 0, 9]),
        batch_size=12,
        block_size=block,
        workers=1,  # one pipeline: the recorder sees the rows in plan order
    )
    got = rec.recorded(3, n)
    for row, index in enumerate([5, 0, 9]):
        want = _expected_noise(
            kind, (1, 4, 4), seed=7, index=index, stream=RESCORE, n=n, block_size=block
        )
        assert torch.equal(got[row], want)


def test_streams_and_seeds_give_different_draws() -> None:
    x = torch.zeros(2, 1, 4, 4)
    draws = {}
    for key in [(0, SELECTION), (0, ESTIMATION), (0, PREDICTION), (0, RESCORE), (1, SELECTION)]:
        rec = _Recorder()
        sample(
            nn.Sequential(NoiseLayer("gaussian", 1.0), rec),
            x,
            50,
            num_classes=K,
            seed=key[0],
            stream=key[1],
            workers=1,
        )
        draws[key] = rec.recorded(2, 50)
    keys = list(draws)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            # Independent N(0,1) draws: equal only with probability 0.
            assert not torch.isclose(draws[a], draws[b]).any(), (a, b)
    # and the two examples of one call differ from each other too
    assert not torch.isclose(draws[keys[0]][0], draws[keys[0]][1]).any()


# --------------------------------------------------------------------------- invariance
def test_counts_independent_of_batch_size() -> None:
    model = nn.Sequential(NoiseLayer("gaussian", 0.5), _base_cnn())
    x = _inputs(5)
    n = 2500  # blocks of 1000, 1000, 500: whole, split and partial blocks all occur
    ref = sample(model, x, n, num_classes=K, seed=3, softmax=True)
    assert ref.counts.dtype == torch.int64 and ref.counts.shape == (5, K)
    assert torch.equal(ref.counts.sum(1), torch.full((5,), n))
    assert ref.counts.max() < n  # noise really changes the predictions
    for bs in (7, 64, 1000, 1500, 30000):
        s = sample(model, x, n, num_classes=K, seed=3, batch_size=bs, softmax=True)
        assert torch.equal(s.counts, ref.counts), bs
        assert s.softmax_sum is not None and ref.softmax_sum is not None
        # float64 sums of float32 softmaxes: grouping may change rounding only (n * 1e-6).
        torch.testing.assert_close(s.softmax_sum, ref.softmax_sum, rtol=0, atol=n * 1e-6)
    # a different block_size is a different (recorded) set of draws
    other = sample(model, x, n, num_classes=K, seed=3, block_size=300)
    assert not torch.equal(other.counts, ref.counts)


def test_certify_independent_of_sharding_and_order() -> None:
    base = _base_cnn()
    x = _inputs()
    kw = dict(sigma=0.25, n0=50, n=400, alpha=0.01, num_classes=K, seed=11)
    labels, radii = smoothed_certify(base, x, **kw)
    assert labels.dtype == torch.int64 and radii.dtype == torch.float64
    assert (labels >= 0).any() and (radii > 0).any()
    l1, r1 = smoothed_certify(base, x[:4], indices=torch.arange(4), batch_size=33, **kw)
    l2, r2 = smoothed_certify(base, x[4:], indices=torch.arange(4, 10), batch_size=1000, **kw)
    assert torch.equal(torch.cat([l1, l2]), labels)
    assert torch.equal(torch.cat([r1, r2]), radii)
    perm = torch.tensor([9, 3, 0, 7, 1, 8, 2, 6, 5, 4])
    lp, rp = smoothed_certify(base, x[perm], indices=perm, **kw)
    assert torch.equal(lp, labels[perm]) and torch.equal(rp, radii[perm])


def test_noise_inside_the_network() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        NoiseLayer("gaussian", 0.3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 64, K),
    )
    x = _inputs(4)
    n = 3000
    ref = sample(model, x, n, num_classes=K, seed=5)
    assert torch.equal(ref.counts.sum(1), torch.full((4,), n))
    assert torch.equal(sample(model, x, n, num_classes=K, seed=5, batch_size=77).counts, ref.counts)
    # Oracle: the same network with torch's global RNG as noise. Per class, the two
    # frequencies are independent Binomial(n, p)/n estimates; their difference has sd
    # sqrt(2 p (1-p) / n) <= sqrt(0.5 / 3000) = 0.013, so 5 sd (with p estimated) bounds it.
    torch.manual_seed(123)
    with torch.no_grad():
        direct = torch.stack(
            [
                torch.bincount(model(xi[None].expand(n, -1, -1, -1)).argmax(1), minlength=K)
                for xi in x
            ]
        )
    p1, p2 = ref.counts / n, direct / n
    pbar = (p1 + p2) / 2
    sd = torch.sqrt(2 * pbar * (1 - pbar) / n).clamp_min(1e-3)
    assert ((p1 - p2).abs() <= 5 * sd).all()


def test_laplace_noise_distribution() -> None:
    rec = _Recorder()
    model = nn.Sequential(NoiseLayer("laplace", 2.0), rec)
    sample(model, torch.zeros(2, 1, 4, 4), 1500, num_classes=K, seed=1)
    z = rec.recorded(2, 1500).flatten().double().numpy() / 2.0  # standard Laplace draws
    # Seeded Kolmogorov-Smirnov test against Laplace(0, 1) on 48 000 draws.
    assert stats.kstest(z, stats.laplace.cdf).pvalue > 1e-3
    # and a Gaussian would be rejected by the same test (the test has power)
    assert stats.kstest(z, stats.norm(scale=math.sqrt(2)).cdf).pvalue < 1e-6


def test_softmax_sums_match_direct_computation() -> None:
    rec = _Recorder()
    model = nn.Sequential(NoiseLayer("gaussian", 1.0), rec)
    x = _inputs(3)[:, :, :4, :4]
    s = sample(
        model, x, 120, num_classes=K, seed=2, softmax=True, batch_size=50, block_size=40, workers=1
    )
    logits = rec.recorded(3, 120).flatten(2)[:, :, :K].double()
    p = torch.softmax(logits, dim=2)
    torch.testing.assert_close(s.softmax_sum, p.sum(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.softmax_sq_sum, (p * p).sum(1), rtol=1e-6, atol=1e-6)
    assert torch.equal(
        s.counts, torch.stack([torch.bincount(r.argmax(1), minlength=K) for r in logits])
    )


# --------------------------------------------------------------------------- errors and state
def test_rejects_models_without_noise() -> None:
    with pytest.raises(ValueError, match="randomized"):
        sample(_base_cnn(), _inputs(2), 10, num_classes=K)
    with pytest.raises(ConfigError, match="num_classes"):
        sample(
            nn.Sequential(NoiseLayer("gaussian", 0.1), _base_cnn()), _inputs(2), 10, num_classes=3
        )
    with pytest.raises(ConfigError, match="n must be"):
        sample(
            nn.Sequential(NoiseLayer("gaussian", 0.1), _base_cnn()), _inputs(2), 0, num_classes=K
        )
    with pytest.raises(ConfigError, match="indices"):
        sample(
            nn.Sequential(NoiseLayer("gaussian", 0.1), _base_cnn()),
            _inputs(2),
            5,
            num_classes=K,
            indices=torch.arange(3),
        )


def test_restores_training_mode_and_multiplier() -> None:
    layer = NoiseLayer("gaussian", 0.5)
    layer.multiplier = 0.1
    rec = _Recorder()
    model = nn.Sequential(layer, rec).train()
    sample(model, torch.zeros(1, 1, 4, 4), 2000, num_classes=K)
    assert model.training and layer.multiplier == 0.1
    # the draws used multiplier 1: the sample sd is 0.5 (+- 3.5 sd of the estimate, 32 000 draws)
    sd = rec.recorded(1, 2000).std().item()
    assert abs(sd - 0.5) < 3.5 * 0.5 / math.sqrt(2 * 32000)


def test_empty_input() -> None:
    s = sample(
        nn.Sequential(NoiseLayer("gaussian", 0.1), _base_cnn()),
        torch.zeros(0, 1, 8, 8),
        10,
        num_classes=K,
    )
    assert isinstance(s, Samples) and s.counts.shape == (0, K)


# --------------------------------------------------------------------------- Cohen PREDICT
class _Fixed(nn.Module):
    """Base classifier whose argmax is class 0 iff pixel 0 is below a threshold t."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = t

    def forward(self, z: Tensor) -> Tensor:
        d = self.t - z.flatten(1)[:, :1]
        return torch.cat([d, -d], dim=1)


def test_smoothed_predict() -> None:
    x = torch.zeros(4, 1, 2, 2)
    # p(class 0) = Phi(2) = 0.977: binomtest p-value is astronomically small -> predict 0
    assert torch.equal(
        smoothed_predict(_Fixed(0.5), x, sigma=0.25, n=500, alpha=0.001),
        torch.zeros(4, dtype=torch.int64),
    )
    # p = 1/2 exactly: the test rejects with probability <= alpha, here seeded -> abstain
    labels = smoothed_predict(_Fixed(0.0), x, sigma=0.25, n=500, alpha=0.001, seed=4)
    assert torch.equal(labels, torch.full((4,), -1))
    g = torch.Generator().manual_seed(0)
    a = smoothed_predict(_base_cnn(), _inputs(3), sigma=0.2, n=300, alpha=0.01, generator=g)
    assert a.shape == (3,) and a.dtype == torch.int64


# --------------------------------------------------------------------------- vs ART
def test_certify_agrees_with_art_in_distribution() -> None:
    art_rs = pytest.importorskip("art.estimators.certification.randomized_smoothing")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with torch.no_grad():
        base[1].weight.mul_(4.0)
    m = 80
    x = _inputs(m, seed=9)
    sigma, n0, n, alpha = 0.25, 50, 500, 0.01
    labels, radii = smoothed_certify(base, x, sigma=sigma, n0=n0, n=n, alpha=alpha, seed=2)
    art = art_rs.PyTorchRandomizedSmoothing(
        model=base,
        loss=nn.CrossEntropyLoss(),
        input_shape=(1, 8, 8),
        nb_classes=3,
        device_type="cpu",
        sample_size=n0,
        scale=sigma,
        alpha=alpha,
    )
    np.random.seed(0)  # ART draws its noise with numpy's global RNG
    art_labels, art_radii = art.certify(x.numpy(), n=n, batch_size=256)
    ours_r, art_r = radii.numpy(), np.asarray(art_radii, dtype=np.float64)
    ours_abstain, art_abstain = labels.numpy() < 0, np.asarray(art_labels) < 0
    # Spread of p_A over the inputs (otherwise the comparison says little).
    assert 0.05 < ours_abstain.mean() < 0.95 and ours_r.max() > 0.1
    # Paired comparison on the same m inputs: d_i = ours_i - art_i has mean 0 if both draw
    # from the same law; |mean d| <= 4 * sd(d) / sqrt(m) fails by chance w.p. ~6e-5.
    for a, b in ((ours_r, art_r), (ours_abstain.astype(float), art_abstain.astype(float))):
        d = a - b
        assert abs(d.mean()) <= 4 * d.std(ddof=1) / math.sqrt(m) + 1e-12
    # Where both certify they agree on the class (c_hat has p_A > 1/2 there).
    both = ~ours_abstain & ~art_abstain
    assert both.any() and (labels.numpy()[both] == np.asarray(art_labels)[both]).all()
    # Radii never exceed the bound attainable with n draws: sigma * Phi^-1(alpha^(1/n)).
    r_max = sigma * stats.norm.ppf(alpha ** (1 / n))
    assert ours_r.max() <= r_max + 1e-12


# --------------------------------------------------------------------------- coverage
@pytest.mark.statistical
def test_certified_bound_covers_known_p_a() -> None:
    # Base classifier: class 0 iff noise on pixel 0 < t (x = 0), so p_A = Phi(t / sigma) and the
    # true smoothed radius is sigma * Phi^-1(p_A) = t. The certificate over-claims (p_lower >
    # p_A, i.e. radius > t) with probability q = P(LCB(N_A) > p_A), N_A ~ Binomial(n, p_A),
    # which Clopper-Pearson keeps <= alpha. We compute q exactly and check that the observed
    # failure rate over m independent examples is within 3 sd of q (and q <= alpha).
    sigma, p_a, n, alpha, m = 0.5, 0.9, 400, 0.05, 1000
    t = sigma * stats.norm.ppf(p_a)
    from bench.stats import lower_confidence_bound

    k = np.arange(n + 1)
    fails = np.asarray(lower_confidence_bound(k, n, alpha)) > p_a
    q = float(stats.binom.pmf(k[fails], n, p_a).sum())
    assert q <= alpha
    labels, radii = smoothed_certify(
        _Fixed(t),
        torch.zeros(m, 1, 1, 1),
        sigma=sigma,
        n0=20,
        n=n,
        alpha=alpha,
        num_classes=2,
        seed=2024,
    )
    assert (labels == 0).all()
    rate = (radii.numpy() > t + 1e-12).mean()
    sd = math.sqrt(q * (1 - q) / m)
    assert abs(rate - q) <= 3 * sd, (rate, q, sd)
    assert rate <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / m)


def test_certify_uses_fresh_estimation_draws() -> None:
    # CERTIFY = argmax of the SELECTION-stream counts, bound from the ESTIMATION-stream counts.
    # (Seed 3 gives certified and abstaining examples, so both branches are compared.)
    base = _base_cnn()
    x = _inputs(6)
    sigma, n0, n, alpha = 0.5, 30, 200, 0.05
    labels, radii = smoothed_certify(base, x, sigma=sigma, n0=n0, n=n, alpha=alpha, seed=3)
    noisy = nn.Sequential(NoiseLayer("gaussian", sigma), base)
    sel = sample(noisy, x, n0, num_classes=K, seed=3, stream=SELECTION).counts
    est = sample(noisy, x, n, num_classes=K, seed=3, stream=ESTIMATION).counts
    c_hat = sel.argmax(1)
    n_a = est.gather(1, c_hat[:, None])[:, 0].numpy()
    # statsmodels' Clopper-Pearson interval, as Cohen et al. and ART use it
    from statsmodels.stats.proportion import proportion_confint

    p_lower = proportion_confint(n_a, n, alpha=2 * alpha, method="beta")[0]
    want_r = np.where(p_lower >= 0.5, sigma * stats.norm.ppf(p_lower), 0.0)
    want_l = np.where(p_lower >= 0.5, c_hat.numpy(), -1)
    assert (want_l >= 0).any() and (want_l < 0).any()
    np.testing.assert_array_equal(labels.numpy(), want_l)
    np.testing.assert_allclose(radii.numpy(), want_r, rtol=1e-9, atol=0)


def test_two_noise_sites_and_progress_bar() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        NoiseLayer("gaussian", 0.2),
        nn.Conv2d(1, 4, 3, padding=1),
        NoiseLayer("laplace", 0.3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 64, K),
    )
    x = _inputs(3)
    ref = sample(model, x, 700, num_classes=K, seed=1, block_size=250, progress=True)
    assert torch.equal(ref.counts.sum(1), torch.full((3,), 700))
    for bs in (13, 250, 2100):
        s = sample(model, x, 700, num_classes=K, seed=1, block_size=250, batch_size=bs)
        assert torch.equal(s.counts, ref.counts), bs


class _Tap(nn.Module):
    """Records its input and passes it on unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[Tensor] = []

    def forward(self, h: Tensor) -> Tensor:
        self.rows.append(h.clone())
        return h


def test_sites_of_equal_shape_get_different_noise() -> None:
    tap1, tap2 = _Tap(), _Tap()
    model = nn.Sequential(
        NoiseLayer("gaussian", 1.0), tap1, NoiseLayer("gaussian", 1.0), tap2, _Recorder()
    )
    sample(
        model, torch.zeros(2, 1, 4, 4), 30, num_classes=K, block_size=10, batch_size=25, workers=1
    )
    z1 = torch.cat(tap1.rows)[-60:]
    z2 = torch.cat(tap2.rows)[-60:] - z1
    assert z1.shape == (60, 1, 4, 4)
    assert not torch.isclose(z1, z2).any()
    # The first site's noise is the block generator's first draw (the documented contract).
    want = _expected_noise(
        "gaussian", (1, 4, 4), seed=0, index=1, stream=ESTIMATION, n=30, block_size=10
    )
    assert torch.equal(z1[30:], want)


def test_packed_streams_equal_separate_calls() -> None:
    # CERTIFY packs selection and estimation rows into shared passes (request-major order,
    # so one pass can hold the last examples of one stream and the first of the next).
    from bench.sampling.engine import sample_streams

    model = nn.Sequential(NoiseLayer("gaussian", 0.5), _base_cnn())
    x = _inputs(5)
    kw = dict(num_classes=K, seed=9, indices=torch.arange(10, 15), block_size=40)
    for bs in (35, 100, 1000):
        sel, est = sample_streams(
            model, x, [(SELECTION, 30), (ESTIMATION, 90)], batch_size=bs, softmax=True, **kw
        )
        for got, stream, n in ((sel, SELECTION, 30), (est, ESTIMATION, 90)):
            want = sample(model, x, n, stream=stream, softmax=True, **kw)
            assert torch.equal(got.counts, want.counts), (bs, stream)
            assert got.softmax_sum is not None and want.softmax_sum is not None
            torch.testing.assert_close(got.softmax_sum, want.softmax_sum, rtol=0, atol=1e-4)


class _OOMAbove(torch.nn.Module):
    """A randomized model that fails like an out-of-memory GPU for passes above ``limit`` rows."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        from bench.noise import NoiseLayer

        self.limit = limit
        self.noise = NoiseLayer("gaussian", 0.5)
        self.fc = torch.nn.Linear(64, 5)
        self.passes: list[int] = []

    def forward(self, x):
        self.passes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.fc(self.noise(x).flatten(1))


def test_out_of_memory_backs_off_and_keeps_results_identical():
    from bench.sampling import sample

    torch.manual_seed(0)
    x = torch.rand(3, 1, 8, 8)
    oom = _OOMAbove(limit=100)
    with pytest.warns(RuntimeWarning, match="out of memory in a forward pass of 700 rows"):
        got = sample(oom, x, 700, num_classes=5, seed=4, batch_size=1000, block_size=500, workers=1)
    # 700 -> 350 -> 175 -> 87 rows: three failed passes, then every pass fits
    assert sum(p > 100 for p in oom.passes) == 3
    assert all(p <= 100 for p in oom.passes[4:])
    ok = _OOMAbove(limit=10**9)
    ok.load_state_dict(oom.state_dict())
    ref = sample(ok, x, 700, num_classes=5, seed=4, batch_size=64, block_size=500)
    assert torch.equal(got.counts, ref.counts)


def test_other_errors_are_not_retried():
    from bench.sampling import sample

    class Broken(_OOMAbove):
        def forward(self, x):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        sample(Broken(1), torch.rand(2, 1, 8, 8), 10, num_classes=5)


class _WritesIntoItsInput(nn.Module):
    """Noise inside the network; the forward zeroes its input after reading it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            NoiseLayer("gaussian", 0.3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 64, K),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x.clone())
        x.mul_(0.0)
        return out


def test_a_model_writing_into_its_input_does_not_change_later_passes() -> None:
    # Passes of one example reuse one contiguous copy of it; a model that writes into its
    # input must not leak the write into the next pass (the copy is made again).
    honest = _WritesIntoItsInput()
    honest.forward = honest.net.forward  # same weights, no write
    writer = _WritesIntoItsInput()
    writer.net = honest.net
    x = _inputs(2)
    ref = sample(honest, x, 2500, num_classes=K, seed=4, batch_size=500)
    got = sample(writer, x, 2500, num_classes=K, seed=4, batch_size=500)
    assert torch.equal(got.counts, ref.counts)
    zeros = sample(honest, torch.zeros_like(x), 2500, num_classes=K, seed=4, batch_size=500)
    assert not torch.equal(zeros.counts, ref.counts)  # the write would have shown


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 4, 4), (3,)], ids=["16-per-row", "3-per-row"])
def test_noisy_inputs_are_x_plus_scale_times_z_bit_for_bit(dtype, shape) -> None:
    """Whatever the pass layout (a block alone in a pass, where the engine lets the sampler
    scale the noise; blocks packed together; a block split across passes), every noisy row
    is exactly ``x + scale * z`` with ``z`` the contract's draw, never rounded differently."""
    scale, n, block = 0.37, 23, 5  # blocks of 5 rows: 80 or 15 (< 16) elements
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    width = min(K, math.prod(shape))
    for bs in (5, 2, 3, 12, 1000):  # alone / split / split / packed / all in one pass
        rec = _Recorder()
        model = nn.Sequential(NoiseLayer("gaussian", scale), rec).to(dtype)
        sample(model, x, n, num_classes=width, seed=4, batch_size=bs, block_size=block, workers=1)
        got = rec.recorded(2, n)
        for i in range(2):
            z = []
            for b in range(-(-n // block)):
                g = _block_generator(4, i, ESTIMATION, b)
                rows = min(block, n - b * block)
                z.append(sample_standard("gaussian", (rows, *shape), dtype=dtype, generator=g))
            want = x[i] + model[0].scale * torch.cat(z)  # the layer's scale, in dtype
            assert torch.equal(got[i], want), (bs, i)


@pytest.mark.parametrize("rows", [1, 1000, 7000])  # 7000 x 10: more than one inline piece
def test_argmax_rows_is_argmax_with_ties_and_nan(rows: int) -> None:
    from bench.sampling.runner import argmax_rows

    g = torch.Generator().manual_seed(rows)
    scores = torch.randint(0, 3, (rows, 10), generator=g).float()  # many ties
    scores[torch.rand(rows, 10, generator=g) < 0.02] = float("nan")
    scores[torch.rand(rows, 10, generator=g) < 0.02] = float("inf")
    assert torch.equal(argmax_rows(scores), scores.argmax(dim=1))


# --------------------------------------------------------------------------- CPU pipelines
class _SlowRecorder(_Recorder):
    """A :class:`_Recorder` that also notes, per pass, the thread and its intra-op threads.

    With ``meet=m`` a pass does not return before passes of ``m`` different threads have
    started (10 s at most), so a test sees ``m`` pipelines at work whatever the scheduling.
    """

    def __init__(self, meet: int = 1) -> None:
        import threading

        super().__init__()
        self.meet = meet
        self.calls: list[tuple[str, int]] = []
        self.arrived = threading.Condition()

    def forward(self, h: Tensor) -> Tensor:
        import threading

        with self.arrived:
            self.calls.append((threading.current_thread().name, torch.get_num_threads()))
            self.arrived.notify_all()
            self.arrived.wait_for(lambda: len({n for n, _ in self.calls}) >= self.meet, 10)
        return super().forward(h)


def _row_multiset(rows: Tensor) -> list[tuple[float, ...]]:
    return sorted(map(tuple, rows.flatten(1).tolist()))


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("batch_size", [7, 12, 40])
def test_pipelines_draw_exactly_the_contract_rows(workers: int, batch_size: int) -> None:
    # Oracle: the per-(example, block) seeding contract. Whichever pipeline runs a pass, the
    # noisy rows seen by the model are exactly the contract's rows, each once (the order of
    # the passes is free); batch 7 splits blocks of 10 across passes, 40 packs them.
    import threading

    rec = _SlowRecorder(meet=2)
    model = nn.Sequential(NoiseLayer("gaussian", 1.0), rec)
    ids = [5, 0, 9]
    threads_before, alive_before = torch.get_num_threads(), threading.active_count()
    s = sample(
        model,
        torch.zeros(3, 1, 4, 4),
        25,
        num_classes=K,
        seed=7,
        indices=torch.tensor(ids),
        batch_size=batch_size,
        block_size=10,
        workers=workers,
    )
    want = torch.cat(
        [
            _expected_noise(
                "gaussian", (1, 4, 4), seed=7, index=i, stream=ESTIMATION, n=25, block_size=10
            )
            for i in ids
        ]
    )
    got = torch.cat(rec.rows)
    assert got.shape == want.shape  # every row once: no pass run twice, none skipped
    assert _row_multiset(got) == _row_multiset(want)
    assert torch.equal(s.counts.sum(1), torch.full((3,), 25))
    # the passes ran in the pipelines' threads, each with its share of the intra-op threads
    names = {name for name, _ in rec.calls}
    assert names <= {f"certbench-sampler-{w}" for w in range(workers)} and len(names) >= 2
    assert min(t for _, t in rec.calls) == max(1, threads_before // workers)
    assert max(t for _, t in rec.calls) <= threads_before
    assert torch.get_num_threads() == threads_before  # the caller's setting is restored
    assert threading.active_count() == alive_before  # no thread left behind


def test_one_worker_runs_in_the_calling_thread() -> None:
    import threading

    rec = _SlowRecorder()
    model = nn.Sequential(NoiseLayer("gaussian", 1.0), rec)
    sample(model, torch.zeros(2, 1, 4, 4), 30, num_classes=K, batch_size=10, workers=1)
    assert {name for name, _ in rec.calls} == {threading.current_thread().name}
    assert {t for _, t in rec.calls} == {torch.get_num_threads()}


def test_certify_and_sample_do_not_depend_on_workers() -> None:
    base = _base_cnn()
    x = _inputs(6)
    kw = dict(sigma=0.5, n0=100, n=2500, alpha=0.001, num_classes=K, seed=21)
    ref_l, ref_r = smoothed_certify(base, x, workers=1, **kw)
    assert (ref_l >= 0).any() and (ref_r > 0).any()
    for workers, bs in ((2, None), (3, 700), (2, 400), (4, 2600)):  # 400: blocks split
        labels, radii = smoothed_certify(base, x, workers=workers, batch_size=bs, **kw)
        assert torch.equal(labels, ref_l) and torch.equal(radii, ref_r), (workers, bs)
    model = nn.Sequential(NoiseLayer("gaussian", 0.5), base)
    one = sample(model, x, 2500, num_classes=K, seed=3, softmax=True, workers=1, batch_size=400)
    two = sample(model, x, 2500, num_classes=K, seed=3, softmax=True, workers=2, batch_size=400)
    again = sample(model, x, 2500, num_classes=K, seed=3, softmax=True, workers=2, batch_size=400)
    assert torch.equal(two.counts, one.counts)
    assert one.softmax_sum is not None and two.softmax_sum is not None
    assert two.softmax_sq_sum is not None and again.softmax_sq_sum is not None
    # float sums: each pipeline adds its own passes, in a fixed order (run to run identical)
    assert torch.equal(two.softmax_sum, again.softmax_sum)
    assert torch.equal(two.softmax_sq_sum, again.softmax_sq_sum)
    torch.testing.assert_close(two.softmax_sum, one.softmax_sum, rtol=0, atol=2500 * 1e-6)


def test_a_pipeline_error_is_raised_after_all_threads_stop() -> None:
    import threading

    class FailsOnThirdPass(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.noise = NoiseLayer("gaussian", 0.5)
            self.fc = nn.Linear(16, K)
            self.lock = threading.Lock()
            self.passes = 0

        def forward(self, h: Tensor) -> Tensor:
            with self.lock:
                self.passes += 1
                if self.passes == 3:
                    raise ValueError("boom in pass 3")
            return self.fc(self.noise(h).flatten(1))

    threads_before, alive_before = torch.get_num_threads(), threading.active_count()
    model = FailsOnThirdPass()
    with pytest.raises(ValueError, match="boom in pass 3"):
        sample(model, torch.rand(4, 1, 4, 4), 500, num_classes=K, batch_size=50, workers=2)
    assert model.passes < 40  # the other pipeline stopped after its pass in flight
    assert torch.get_num_threads() == threads_before
    assert threading.active_count() == alive_before


def test_ctrl_c_stops_the_pipelines_after_their_passes_in_flight() -> None:
    # SIGINT sent to the process from a pipeline thread (as a terminal's Ctrl-C may land on
    # any thread): the main thread, waiting for the pipelines, must raise within a pass or two,
    # not after the 200 passes of the call (blocks of 1000 split in 100 passes: one unit).
    import os
    import signal
    import threading
    import time

    class Stop(Exception):
        pass

    def handler(_signum: int, _frame: object) -> None:
        raise Stop

    class Slow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.noise = NoiseLayer("gaussian", 0.5)
            self.fc = nn.Linear(16, K)
            self.passes = 0

        def forward(self, h: Tensor) -> Tensor:
            self.passes += 1
            if self.passes == 5:
                os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            return self.fc(self.noise(h).flatten(1))

    threads_before, alive_before = torch.get_num_threads(), threading.active_count()
    model = Slow()
    old = signal.signal(signal.SIGINT, handler)
    try:
        with pytest.raises(Stop):
            sample(model, torch.rand(2, 1, 4, 4), 1000, num_classes=K, batch_size=10, workers=2)
    finally:
        signal.signal(signal.SIGINT, old)
    assert model.passes < 50
    assert torch.get_num_threads() == threads_before
    assert threading.active_count() == alive_before, [t.name for t in threading.enumerate()]


def test_out_of_memory_in_pipelines_keeps_results_identical() -> None:
    torch.manual_seed(0)
    x = torch.rand(3, 1, 8, 8)
    oom = _OOMAbove(limit=100)
    with pytest.warns(RuntimeWarning, match="out of memory in a forward pass"):
        got = sample(oom, x, 2100, num_classes=5, seed=4, batch_size=1000, block_size=500)
    assert all(p <= 100 for p in oom.passes[-5:])
    ok = _OOMAbove(limit=10**9)
    ok.load_state_dict(oom.state_dict())
    ref = sample(ok, x, 2100, num_classes=5, seed=4, batch_size=64, block_size=500, workers=1)
    assert torch.equal(got.counts, ref.counts)


def test_units_keep_the_passes_of_a_split_block_together() -> None:
    from bench.sampling.plan import plan_passes, work_units

    # 2 examples x 25 draws, blocks of 10 (10, 10, 5), passes of at most 4 rows: each
    # 10-row block is split in 3 passes (one unit), a 5-row block in 2 (one unit).
    units = list(work_units(plan_passes(2, [(ESTIMATION, 25)], 10, 4)))
    assert [len(u) for u in units] == [3, 3, 2, 3, 3, 2]
    for unit in units:
        assert len({(seg[0], seg[1], seg[2]) for chunk in unit for seg in chunk}) == 1
    # passes of whole blocks are units of their own
    units = list(work_units(plan_passes(3, [(SELECTION, 5), (ESTIMATION, 20)], 10, 12)))
    assert all(len(u) == 1 for u in units)
    rows = sum(seg[5] - seg[4] for u in units for chunk in u for seg in chunk)
    assert rows == 3 * 25


def test_number_of_pipelines() -> None:
    from bench.sampling import MAX_CPU_WORKERS
    from bench.sampling.pipelines import pipeline_count

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert pipeline_count(None, cpu, 2) == 2  # default: one per intra-op thread
    assert pipeline_count(None, cpu, 1) == 1
    assert pipeline_count(None, cpu, 64) == MAX_CPU_WORKERS
    assert pipeline_count(3, cpu, 2) == 3  # asked for: as many, sharing the threads
    assert pipeline_count(4, cuda, 8) == 1  # accelerators: the calling thread
    # and never more pipelines than units of work (one unit: the calling thread)
    rec = _SlowRecorder()
    model = nn.Sequential(NoiseLayer("gaussian", 1.0), rec)
    sample(model, torch.zeros(1, 1, 4, 4), 30, num_classes=K, batch_size=40, workers=4)
    assert len({name for name, _ in rec.calls}) == 1


def test_pipelines_share_the_memory_budget() -> None:
    # The default pass size divides the budget among the pipelines (then fills passes with
    # whole blocks, or equal pieces of one): each pass of two pipelines holds half the rows.
    from bench.sampling import MEMORY_BUDGET_BYTES, default_batch_size
    from bench.sampling.memory import row_bytes

    torch.manual_seed(0)
    wide = nn.Sequential(nn.Conv2d(1, 256, 3, padding=1), nn.Flatten(), nn.Linear(256 * 64, K))
    model = nn.Sequential(NoiseLayer("gaussian", 0.5), wide)
    x = _inputs(1)  # ~130 KB per row: a 1000-row block needs several passes
    with torch.inference_mode():
        per_row = row_bytes(model, x)
    one = default_batch_size(model, x, workers=1)
    two = default_batch_size(model, x, workers=2)
    budget_rows = MEMORY_BUDGET_BYTES["cpu"] // per_row
    assert 1 < budget_rows < 1000
    assert one == -(-1000 // -(-1000 // budget_rows))
    assert two == -(-1000 // -(-1000 // (MEMORY_BUDGET_BYTES["cpu"] // 2 // per_row)))
    assert two < one and two * per_row <= MEMORY_BUDGET_BYTES["cpu"] // 2 * 1.01


def test_workers_default_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.sampling import WORKERS_ENV
    from bench.sampling.pipelines import pipeline_count

    cpu = torch.device("cpu")
    monkeypatch.setenv(WORKERS_ENV, "1")
    assert pipeline_count(None, cpu, 2) == 1
    assert pipeline_count(2, cpu, 2) == 2  # an explicit argument wins
    for bad in ("0", "two", "1.5"):
        monkeypatch.setenv(WORKERS_ENV, bad)
        with pytest.raises(
            ConfigError, match=f"{WORKERS_ENV} must be an integer >= 1, got '{bad}'"
        ):
            pipeline_count(None, cpu, 2)


@pytest.mark.parametrize("workers", [0, -1, 1.5, True, "2"])
def test_rejects_bad_workers(workers: object) -> None:
    model = nn.Sequential(NoiseLayer("gaussian", 0.5), _Recorder())
    with pytest.raises(ConfigError, match="workers must be a positive integer"):
        sample(model, torch.zeros(1, 1, 4, 4), 10, num_classes=K, workers=workers)  # type: ignore[arg-type]
