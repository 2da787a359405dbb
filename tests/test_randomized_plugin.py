"""Randomized defenses written as plugins: registered noise distributions, the seeded default
``predict``, the reproducibility check of ``check_defense``, and the uniform-noise example
package (examples/randomized-plugin), installed and run through `certbench run`."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bench import registry
from bench.noise import NoiseLayer, noise_kinds, sample_standard
from bench.registry import register_defense
from bench.sampling import sample
from bench.sampling.cohen import smoothed_predict
from bench.testing import check_defense
from defenses.base import Defense, DefenseRecord

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "randomized-plugin"
PACKAGE = "certbench_uniform_example"


@pytest.fixture
def isolated(monkeypatch):
    """Registrations made in the test are forgotten afterwards (the real registries and the
    example's modules are restored), so other tests still see 'uniform' as unknown."""
    for reg in registry.REGISTRIES.values():
        reg.load()
        monkeypatch.setattr(reg, "_entries", dict(reg._entries))
    yield
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]


@pytest.fixture
def uniform_example(isolated, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    return importlib.import_module(f"{PACKAGE}.uniform_smoothing")


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


# ----------------------------------------------------------------------------- noise registry


def test_uniform_is_unknown_until_its_plugin_registers_it(uniform_example):
    assert "uniform" in noise_kinds() and {"gaussian", "laplace"} <= set(noise_kinds())
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    z = sample_standard("uniform", (2000,), generator=g1)
    assert torch.equal(z, sample_standard("uniform", (2000,), generator=g2))
    assert float(z.min()) >= -1.0 and float(z.max()) < 1.0 and abs(float(z.mean())) < 0.05


def test_the_engine_seeds_a_registered_distribution(uniform_example):
    """Draws of a plugin's noise depend on (seed, example index) only: not on batch size, not
    on how the inputs are split, not on torch's global generator."""
    model = nn.Sequential(NoiseLayer("uniform", 0.8), _net())
    x = torch.rand(5, 1, 4, 4)
    kw = dict(num_classes=3, seed=7)
    whole = sample(model, x, 300, batch_size=64, **kw).counts
    torch.manual_seed(123)
    parts = torch.cat(
        [
            sample(model, x[:2], 300, batch_size=1000, indices=torch.arange(2), **kw).counts,
            sample(model, x[2:], 300, batch_size=17, indices=torch.arange(2, 5), **kw).counts,
        ]
    )
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, sample(model, x, 300, num_classes=3, seed=8).counts)


def test_unknown_noise_kind_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown noise kind 'cauchy'; allowed: .*gaussian"):
        NoiseLayer("cauchy", 1.0)


# ----------------------------------------------------------------------------- default predict


class _GaussianNoise(Defense):
    """A randomized defense that writes only build() and record(): the default predict."""

    randomized = True
    check_params = {"n": 300}

    def __init__(self, *, sigma: float = 0.5, n: int = 1000, alpha: float = 0.001) -> None:
        self.sigma, self.n, self.alpha = sigma, n, alpha

    def record(self) -> DefenseRecord:
        return DefenseRecord(n_draws=self.n, alpha=self.alpha)

    def build(self, model: nn.Module) -> nn.Module:
        return nn.Sequential(NoiseLayer("gaussian", self.sigma), model)


class _Unseeded(_GaussianNoise):
    """The issue's plugin: predict runs its noisy network once per draw, unseeded."""

    def predict(self, x, *, seed=0, indices=None, batch_size=None):
        with torch.no_grad():
            votes = torch.stack([self.model_(x).argmax(1) for _ in range(20)])
        return votes.mode(dim=0).values


def test_default_predict_is_cohens_predict_seeded_by_example(isolated):
    d = register_defense("gaussian-noise-test")(_GaussianNoise)(sigma=0.5, n=500)
    base = _net()
    d.setup(base, input_shape=(1, 4, 4), num_classes=3)
    x = torch.rand(40, 1, 4, 4)
    p1 = d.predict(x, seed=3)
    torch.manual_seed(99)  # the global generator plays no part
    assert torch.equal(p1, d.predict(x, seed=3))  # 100% agreement, not 93.5%
    split = torch.cat(
        [d.predict(x[:15], seed=3, indices=torch.arange(15)),
         d.predict(x[15:], seed=3, indices=torch.arange(15, 40), batch_size=7)]
    )  # fmt: skip
    assert torch.equal(p1, split)
    # exactly Cohen's PREDICT on the base classifier (same draws, same abstention test)
    expected = smoothed_predict(base, x, sigma=0.5, n=500, alpha=0.001, seed=3, num_classes=3)
    assert torch.equal(p1, expected)
    check_defense(type(d))


@pytest.mark.parametrize("sigma", [0.1, 0.5])
def test_check_defense_fails_an_unseeded_randomized_defense(isolated, sigma):
    cls = register_defense("unseeded-test")(_Unseeded)
    cls.check_params = {"sigma": sigma}
    with pytest.raises(AssertionError) as exc:
        check_defense(cls)
    message = str(exc.value)
    assert "check_seeded_noise" in message and "global random generator" in message
    assert "NoiseLayer" in message and "default predict" in message  # how to fix it


def test_a_randomized_defense_without_a_noise_layer_is_told_what_to_do(isolated):
    from bench.errors import ConfigError

    class NoLayer(_GaussianNoise):
        def build(self, model):
            return model

    d = register_defense("no-layer-test")(NoLayer)()
    d.setup(_net(), input_shape=(1, 4, 4), num_classes=3)
    with pytest.raises(ConfigError, match=r"no bench\.noise\.NoiseLayer runs in its network"):
        d.predict(torch.rand(2, 1, 4, 4))


# ----------------------------------------------------------------------------- the example


def test_uniform_example_passes_the_contract_checks(uniform_example):
    check_defense(uniform_example.UniformSmoothing)


def test_uniform_certificate_is_sound_on_a_constant_classifier(uniform_example):
    """A base classifier that always says class 1 is certified with p_lower = (alpha)^(1/n)
    (Clopper-Pearson at k = n), radius 2 lam (p_lower - 1/2) in l1, converted to l2/linf."""
    cls = uniform_example.UniformSmoothing

    class Constant(nn.Module):
        def forward(self, x):
            return torch.tensor([0.0, 1.0, 0.0]).expand(x.shape[0], 3)

    d = cls(lam=0.5, n0=10, n=200, alpha=0.001)
    d.setup(Constant(), input_shape=(1, 4, 4), num_classes=3)
    cert = d.certify(torch.rand(3, 1, 4, 4), norm="l1", seed=0)
    p_lower = 0.001 ** (1 / 200)
    assert cert.labels.tolist() == [1, 1, 1]
    assert torch.allclose(cert.radius("l1"), torch.full((3,), 2 * 0.5 * (p_lower - 0.5)).double())
    assert torch.allclose(cert.radius("l2"), cert.radius("l1") / 4)  # sqrt(16)
    assert torch.allclose(cert.radius("linf"), cert.radius("l1") / 16)


@pytest.fixture(scope="module")
def plugin_site(install_package) -> Path:
    return install_package(EXAMPLE)


def test_installed_example_is_listed(plugin_site, certbench_cli, tmp_path):
    out = certbench_cli(["defenses", "list"], cwd=tmp_path, paths=[plugin_site])
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("uniform-smoothing"))
    assert "certbench-uniform-example" in line and "True" in line


@pytest.mark.slow
def test_installed_example_runs_through_certbench_run(plugin_site, certbench_cli, tmp_path):
    from bench.store import Store

    store = tmp_path / "s.sqlite"
    spec = EXAMPLE / "plugin.toml"
    args = ["run", str(spec), "--store", str(store), "--quiet"]
    out = certbench_cli(args, cwd=tmp_path, paths=[plugin_site])
    assert out.returncode == 0, out.stderr[-3000:]
    cells = {(c["defense"], c["norm"]): c for c in Store(store).cells()}
    assert set(cells) == {(d, n) for d in ("undefended", "uniform-smoothing") for n in ("l1", "l2")}
    uniform = cells[("uniform-smoothing", "l1")]
    assert uniform["n_draws"] == 500 and uniform["provenance"]["bound"] == "uniform-l1"
    assert 0.5 < uniform["metrics"]["accuracy"] <= 1.0
    assert uniform["metrics"]["guaranteed_accuracy@0.1"] > 0.3
    assert cells[("uniform-smoothing", "l2")]["metrics"]["accuracy_under_attack@0.5"] is not None
