"""Contract checks for defenses: ``check_defense(cls)`` (as sklearn's ``check_estimator``).

certbench runs these over every registered defense; plugin authors run the same checks on
theirs::

    from bench.testing import check_defense
    check_defense(MyDefense)                      # raises AssertionError on a violation

    # or one pytest test per check:
    @pytest.mark.parametrize("check", defense_checks(MyDefense), ids=lambda c: c.__name__)
    def test_contract(check):
        check()

The checks use a small CNN on random 1×8×8 inputs in [0, 1] and the class's
``check_params`` (small sample counts), so they take seconds. A randomized defense must take
its randomness from the sampling engine (noise in :class:`bench.noise.NoiseLayer`, drawn and
seeded by ``seed`` and ``indices``): :func:`check_seeded_noise` fails one whose ``predict`` or
``certify`` draws from torch's global generator, and says how to fix it.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.checkpoint import load_tensors, save_checkpoint
from bench.models import create_model
from bench.noise import is_randomized
from bench.pipeline import takes_labels
from bench.threat import NORMS
from defenses.base import Certificate, Citation, Defense, DefenseRecord, TrainProgress

INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 4
N = 6


def _make(cls: type[Defense], params: dict[str, Any] | None, seed: int = 0) -> Defense:
    torch.manual_seed(seed)
    d = cls(**{**cls.check_params, **(params or {})})
    model = create_model("cnn", input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES, width=4)
    d.setup(model, input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES)
    return d


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((N, *INPUT_SHAPE), generator=g)
    y = torch.randint(0, NUM_CLASSES, (N,), generator=g)
    return x, y


def check_capabilities(cls: type[Defense], params: dict[str, Any] | None = None) -> None:
    """Class attributes are well-formed: kebab-case name, known norms, bool flags."""
    assert cls.name, f"{cls.__name__} has no registry name (use @register_defense)"
    assert isinstance(cls.randomized, bool), "randomized must be a bool"
    for attr in ("certifies", "norms"):
        vals = getattr(cls, attr)
        assert isinstance(vals, tuple), f"{attr} must be a tuple"
        unknown = set(vals) - set(NORMS)
        assert not unknown, f"{attr} has unknown norms {unknown}; allowed {NORMS}"
    cite = getattr(cls, "citation", None)
    if cite is not None:
        assert isinstance(cite, Citation), (
            "citation must be a defenses.base.Citation(title, authors, venue, year, url)"
        )
        assert cite.title and cite.authors and cite.year, "a citation needs title, authors, year"


def check_params_round_trip(cls: type[Defense], params: dict[str, Any] | None = None) -> None:
    """``__init__`` stores keyword-only parameters unchanged; ``get_params`` reads them back."""
    p = {**cls.check_params, **(params or {})}
    d = cls(**p)
    got = d.get_params()
    assert set(got) == set(cls.param_names()), "get_params() must return every __init__ parameter"
    for k, v in p.items():
        assert got[k] == v, f"parameter {k!r} was not stored unchanged ({got[k]!r} != {v!r})"
    clone = cls(**got)
    assert clone.get_params() == got, "cls(**d.get_params()) must reproduce the parameters"


def check_shapes_and_training(cls: type[Defense], params: dict[str, Any] | None = None) -> None:
    """logits (N, K); a finite scalar training loss with gradients; after_step runs."""
    d = _make(cls, params)
    x, y = _data()
    logits = d.logits(x)
    assert logits.shape == (N, NUM_CLASSES), f"logits shape {tuple(logits.shape)}"
    d.model_.train()
    prog = TrainProgress(step=0, total_steps=10, epoch=0, epochs=1)
    loss = d.training_loss(x, y, prog)
    assert loss.dim() == 0 and torch.isfinite(loss), (
        f"training loss must be a finite scalar: {loss}"
    )
    loss.backward()
    grads = [p.grad for p in d.model_.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "the loss has no gradient"
    d.after_step(prog)
    d.model_.eval()


def check_randomness(cls: type[Defense], params: dict[str, Any] | None = None) -> None:
    """A randomized defense varies across draws; a deterministic one does not."""
    d = _make(cls, params)
    x, _ = _data()
    with torch.no_grad():
        a, b = d.logits(x), d.logits(x)
    if cls.randomized:
        assert is_randomized(d.model_) or not torch.equal(a, b), (
            "randomized=True but two forward passes are identical"
        )
        assert not torch.equal(a, b), "randomized defense: logits do not vary across draws"
    else:
        assert torch.allclose(a, b), "deterministic defense: logits vary across calls"


def check_predict_deterministic(cls: type[Defense], params: dict[str, Any] | None = None) -> None:
    """predict: (N,) int64 labels in [-1, K); identical for a fixed seed whatever the batch size."""
    d = _make(cls, params)
    x, _ = _data()
    p1 = d.predict(x, seed=3)
    assert p1.shape == (N,) and p1.dtype == torch.int64, f"predict -> {p1.shape} {p1.dtype}"
    assert int(p1.min()) >= -1 and int(p1.max()) < NUM_CLASSES, "labels out of range"
    p2 = d.predict(x, seed=3)
    assert torch.equal(p1, p2), "predict is not deterministic for a fixed seed"
    parts = torch.cat(
        [
            d.predict(x[:2], seed=3, indices=torch.arange(0, 2)),
            d.predict(x[2:], seed=3, indices=torch.arange(2, N)),
        ]
    )
    assert torch.equal(p1, parts), "predict depends on how the inputs are split into batches"


_SEEDING_HINT = (
    "draw the noise in a bench.noise.NoiseLayer (a new distribution: bench.noise."
    "register_noise) and keep the default predict, which runs the sampling engine seeded by "
    "seed and indices; or sample with bench.sampling.sample(..., seed=seed, indices=indices)"
)


def check_seeded_noise(cls: type[Defense], params: dict[str, Any] | None = None) -> None:
    """A randomized defense's predict and certify are fixed by ``seed``: they never draw from
    torch's global generator, and give the same result whatever its state.

    Comparing two calls alone is not enough: with little noise, unseeded predictions often
    agree by chance; a call that advances the global generator is caught whatever the noise.
    """
    if not cls.randomized:
        return
    d = _make(cls, params)
    x, _ = _data()
    saved = torch.get_rng_state()
    try:
        for what, call in (
            ("predict", lambda: d.predict(x, seed=3)),
            *(
                (f"certify(norm={n!r})", lambda n=n: d.certify(x, norm=n, seed=3).labels)
                for n in cls.certifies
            ),
        ):
            results = []
            for global_seed in (11, 12):
                torch.manual_seed(global_seed)
                before = torch.get_rng_state()
                results.append(call())
                assert torch.equal(before, torch.get_rng_state()), (
                    f"{what} draws from torch's global random generator, so two calls with the "
                    f"same seed can disagree; {_SEEDING_HINT}"
                )
            assert torch.equal(results[0], results[1]), (
                f"{what} is not reproducible for a fixed seed; {_SEEDING_HINT}"
            )
    finally:
        torch.set_rng_state(saved)


def check_certificates(cls: type[Defense], params: dict[str, Any] | None = None) -> None:
    """certify: labels (N,), radii (N,) float64, finite, >= 0, and 0 where abstaining."""
    d = _make(cls, params)
    x, _ = _data()
    for norm in cls.certifies or ("l2",):
        c = d.certify(x, norm=norm, seed=5)
        assert isinstance(c, Certificate), "certify must return a Certificate"
        assert c.labels.shape == (N,) and c.labels.dtype == torch.int64
        r = c.radius(norm)
        assert r.shape == (N,) and r.dtype == torch.float64, f"radius {r.shape} {r.dtype}"
        assert torch.isfinite(r).all() and (r >= 0).all(), f"radii must be finite and >= 0: {r}"
        assert (r[c.labels == -1] == 0).all(), "an abstention must have radius 0"
        again = d.certify(x, norm=norm, seed=5)
        assert torch.equal(c.labels, again.labels) and torch.equal(r, again.radius(norm)), (
            "certify is not deterministic for a fixed seed"
        )
        if norm not in cls.certifies:
            assert (r == 0).all(), "a non-certifying defense must report radius 0"
        grid = [0.0, 0.01, 0.1]
        g = d.certify(x, norm=norm, seed=5, radii=grid)
        rg = g.radius(norm)
        assert g.labels.shape == (N,) and rg.shape == (N,) and (rg >= 0).all(), (
            "certify(..., radii=grid) must return the same shapes (radii: the caller's grid)"
        )


def check_shared_certificate(cls: type[Defense], params: dict[str, Any] | None = None) -> None:
    """shared_certificate_norms(): norms the defense certifies, and one certify call reports
    the same labels and radii for all of them whatever norm and radii it is asked for."""
    d = _make(cls, params)
    shared = tuple(d.shared_certificate_norms())
    assert set(shared) <= set(cls.certifies), (
        f"shared_certificate_norms() {shared} lists norms the defense does not certify "
        f"({cls.certifies})"
    )
    if len(shared) < 2:
        return
    x, y = _data()
    # the true labels too, where certify takes them (the runner passes them on clean inputs)
    given = {"labels": y} if takes_labels(d) else {}
    first = d.certify(x, norm=shared[0], seed=5)
    for norm in shared[1:]:
        other = d.certify(x, norm=norm, seed=5, radii=[0.0, 0.01, 0.1], **given)
        assert torch.equal(first.labels, other.labels), (
            f"certify(norm={norm!r}) gives other labels than certify(norm={shared[0]!r}), "
            "yet shared_certificate_norms() says one call serves both"
        )
        for n in shared:
            assert torch.equal(first.radius(n), other.radius(n)), (
                f"certify(norm={norm!r}) reports another {n} radius than "
                f"certify(norm={shared[0]!r}), yet shared_certificate_norms() lists both"
            )


def check_record(cls: type[Defense], params: dict[str, Any] | None = None) -> None:
    """record() declares what the board row needs: draws and confidence of a randomized
    defense, the bound of a certifying one (never guessed from parameter names)."""
    d = _make(cls, params)
    rec = d.record()
    assert isinstance(rec, DefenseRecord), "record() must return a defenses.base.DefenseRecord"
    if rec.n_draws is not None:
        assert isinstance(rec.n_draws, int) and rec.n_draws >= 1, f"n_draws {rec.n_draws!r}"
    if rec.alpha is not None:
        assert 0 < rec.alpha < 1, f"alpha must be in (0, 1), got {rec.alpha!r}"
    if cls.randomized:
        assert rec.n_draws is not None, "a randomized defense must declare n_draws in record()"
    if cls.certifies:
        assert rec.bound, "a certifying defense must name its bound in record()"
        if cls.randomized:
            assert rec.alpha is not None, (
                "a Monte Carlo certificate must declare its alpha in record()"
            )


def check_save_load(cls: type[Defense], params: dict[str, Any] | None = None) -> None:
    """state_dict → safetensors → a fresh instance gives identical predictions."""
    d = _make(cls, params, seed=0)
    x, _ = _data()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ck"
        save_checkpoint(path, d.state_dict(), {"defense": cls.name})
        d2 = _make(cls, params, seed=123)
        d2.load_state_dict(load_tensors(path.with_suffix(".safetensors")))
    assert torch.equal(d.predict(x, seed=9), d2.predict(x, seed=9)), (
        "predictions differ after a save/load round trip"
    )


CHECKS: tuple[Callable[..., None], ...] = (
    check_capabilities,
    check_params_round_trip,
    check_shapes_and_training,
    check_randomness,
    check_predict_deterministic,
    check_seeded_noise,
    check_certificates,
    check_shared_certificate,
    check_record,
    check_save_load,
)


def defense_checks(
    cls: type[Defense], params: dict[str, Any] | None = None
) -> list[Callable[[], None]]:
    """One zero-argument callable per check (named after it), for ``pytest.mark.parametrize``."""
    out = []
    for chk in CHECKS:
        f = functools.partial(chk, cls, params)
        functools.update_wrapper(f, chk)
        out.append(f)
    return out


def check_defense(cls: type[Defense], params: dict[str, Any] | None = None) -> None:
    """Run every contract check on ``cls``; raises AssertionError naming the first violation."""
    for chk in CHECKS:
        try:
            chk(cls, params)
        except AssertionError as exc:
            raise AssertionError(f"{cls.__name__} fails {chk.__name__}: {exc}") from exc
