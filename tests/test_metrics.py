"""bench.metrics: hand-made cases, sklearn cross-checks, sharding invariance of MetricSet."""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score

from bench.errors import ConfigError
from bench.metrics import (
    MetricSet,
    accuracy,
    accuracy_under_attack,
    coverage,
    guaranteed_accuracy,
    metric_key,
    robust_precision,
    robust_precision_under_attack,
)

# Hand-made batch: 6 examples, one abstention (-1), radii in input units.
Y = np.array([0, 1, 1, 2, 2, 3])
PRED = np.array([0, 1, 2, 2, -1, 3])  # correct: 0, 1, 3, 5 (4 of 6)
RADIUS = np.array([0.5, 0.05, 1.0, 0.0, -0.3, 0.2])
PRED_ADV = np.array([0, 2, 2, 2, -1, 1])  # correct: 0, 3 (2 of 6)
RADIUS_ADV = np.array([0.3, 0.4, 0.0, 0.0, -1.0, 0.25])


def test_hand_made_functional_values() -> None:
    assert accuracy(PRED, Y) == 4 / 6
    # correct and radius >= r: r=0 -> {0,1,3,5}; r=0.1 -> {0,5}; r=0.5 -> {0}; r=2 -> {}
    assert guaranteed_accuracy(PRED, Y, RADIUS, 0.0) == 4 / 6
    assert guaranteed_accuracy(PRED, Y, RADIUS, 0.1) == 2 / 6
    assert guaranteed_accuracy(PRED, Y, RADIUS, 0.5) == 1 / 6
    assert guaranteed_accuracy(PRED, Y, RADIUS, 2.0) == 0.0
    # certified at T=0.1: {0, 2, 5}, of which correct {0, 5}
    assert robust_precision(PRED, Y, RADIUS, 0.1) == 2 / 3
    assert coverage(RADIUS, 0.1) == 3 / 6
    assert robust_precision(PRED, Y, RADIUS, 2.0) is None  # nothing certified: empty cell
    assert coverage(RADIUS, 2.0) == 0.0
    assert accuracy_under_attack(PRED_ADV, Y) == 2 / 6
    # attacked inputs certified at T=0.2: {0, 1, 5}; correct among them: {0}
    assert robust_precision_under_attack(PRED_ADV, Y, RADIUS_ADV, 0.2) == 1 / 3
    assert robust_precision_under_attack(PRED_ADV, Y, RADIUS_ADV, 1.0) is None


def test_empty_inputs_give_none() -> None:
    empty = np.array([], dtype=np.int64)
    assert accuracy(empty, empty) is None
    assert guaranteed_accuracy(empty, empty, empty.astype(float), 0.1) is None
    assert coverage(empty.astype(float), 0.1) is None


def test_nan_radius_is_not_certified_and_abstain_is_wrong() -> None:
    y = np.array([1, 1, 1])
    assert guaranteed_accuracy(np.array([1, 1, -1]), y, np.array([np.nan, 1.0, 5.0]), 0.5) == (
        1 / 3
    )
    assert accuracy(np.array([-1, -1, 2]), np.array([0, 1, 2])) == 1 / 3


def test_tensor_inputs_and_shape_errors() -> None:
    assert accuracy(torch.tensor(PRED), torch.tensor(Y)) == 4 / 6
    assert robust_precision(torch.tensor(PRED), Y, torch.tensor(RADIUS), 0.1) == 2 / 3
    with pytest.raises(ValueError, match="shape"):
        accuracy(PRED[:3], Y)
    with pytest.raises(ValueError, match="radius"):
        guaranteed_accuracy(PRED, Y, RADIUS[:2], 0.1)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_functional_matches_sklearn(data) -> None:
    n = data.draw(st.integers(1, 60))
    seed = data.draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    pred = rng.integers(-1, 3, n)
    radius = rng.choice([-1.0, 0.0, 0.1, 0.25, 0.5], n)
    thr = data.draw(st.sampled_from([0.0, 0.1, 0.3]))
    cert = radius >= thr
    assert accuracy(pred, y) == pytest.approx(accuracy_score(y, pred))
    # an uncertified prediction counts as a wrong label (-2 never occurs in y)
    assert guaranteed_accuracy(pred, y, radius, thr) == pytest.approx(
        accuracy_score(y, np.where(cert, pred, -2))
    )
    expected = accuracy_score(y[cert], pred[cert]) if cert.any() else None
    assert robust_precision(pred, y, radius, thr) == pytest.approx(expected)
    assert coverage(radius, thr) == pytest.approx(cert.mean())


# --------------------------------------------------------------------------- keys
def test_metric_key_format() -> None:
    assert metric_key("guaranteed_accuracy", 0.1) == "guaranteed_accuracy@0.1"
    assert metric_key("coverage", 1.0) == "coverage@1"
    assert metric_key("coverage", 0) == "coverage@0"
    assert metric_key("accuracy_under_attack", 8 / 255) == "accuracy_under_attack@0.0313725"
    assert metric_key("robust_precision_under_attack", 0.5, 0.05) == (
        "robust_precision_under_attack@0.5@0.05"
    )


def test_metricset_keys_exact() -> None:
    ms = MetricSet(radii=[0.0, 0.25], thresholds=[0.1], eps_list=[0.5, 1.0], certifies=True)
    expected = [
        "accuracy",
        "guaranteed_accuracy@0",
        "guaranteed_accuracy@0.25",
        "robust_precision@0.1",
        "coverage@0.1",
        "accuracy_under_attack@0.5",
        "accuracy_under_attack@1",
        "robust_precision_under_attack@0.5@0.1",
        "robust_precision_under_attack@1@0.1",
    ]
    assert ms.keys() == expected
    assert list(ms.compute()) == expected
    assert all(v is None for v in ms.compute().values())  # nothing seen yet


def test_metricset_duplicate_keys_rejected() -> None:
    with pytest.raises(ConfigError, match="radii"):
        MetricSet(radii=[0.1, 0.1000000001])
    with pytest.raises(ConfigError, match="eps_list"):
        MetricSet(eps_list=[float("nan")])


# --------------------------------------------------------------------------- MetricSet
def _full_update(ms: MetricSet, sl: slice = slice(None)) -> None:
    ms.update(
        y=Y[sl],
        pred=PRED[sl],
        radius=RADIUS[sl],
        pred_adv={0.5: PRED_ADV[sl]},
        radius_adv={0.5: RADIUS_ADV[sl]},
    )


def test_metricset_certifying_hand_made() -> None:
    ms = MetricSet(radii=[0.1], thresholds=[0.1, 0.2], eps_list=[0.5], certifies=True)
    _full_update(ms)
    out = ms.compute()
    assert out["accuracy"] == 4 / 6
    assert out["guaranteed_accuracy@0.1"] == 2 / 6
    assert out["robust_precision@0.1"] == 2 / 3
    assert out["coverage@0.1"] == 3 / 6
    assert out["accuracy_under_attack@0.5"] == 2 / 6
    assert out["robust_precision_under_attack@0.5@0.2"] == 1 / 3
    assert out["robust_precision_under_attack@0.5@0.1"] == 1 / 3
    assert all(isinstance(v, float) for v in out.values())


def test_metricset_non_certifying() -> None:
    ms = MetricSet(radii=[0.1], thresholds=[0.1], eps_list=[0.5], certifies=False)
    ms.update(y=Y, pred=PRED, pred_adv={0.5: PRED_ADV})  # no radius needed
    out = ms.compute()
    assert out["guaranteed_accuracy@0.1"] is None  # empty cell, not 0
    assert out["robust_precision@0.1"] == out["accuracy"] == 4 / 6
    assert out["coverage@0.1"] is None  # nothing is certified: undefined, not 1.0
    assert out["robust_precision_under_attack@0.5@0.1"] == out["accuracy_under_attack@0.5"]


def test_metricset_missing_pieces() -> None:
    ms = MetricSet(radii=[0.1], thresholds=[0.1], eps_list=[0.5, 1.0], certifies=True)
    with pytest.raises(ValueError, match="radius is required"):
        ms.update(y=Y, pred=PRED)
    with pytest.raises(ValueError, match="not in eps_list"):
        ms.update(y=Y, pred=PRED, radius=RADIUS, pred_adv={0.3: PRED_ADV})
    with pytest.raises(ValueError, match="without pred_adv"):
        ms.update(y=Y, pred=PRED, radius=RADIUS, radius_adv={0.5: RADIUS_ADV})
    assert ms.n == 0  # rejected batches change nothing
    # attacked at 0.5 without radii on one batch -> robust precision under attack undefined
    ms.update(y=Y, pred=PRED, radius=RADIUS, pred_adv={0.5: PRED_ADV})
    ms.update(y=Y, pred=PRED, radius=RADIUS, pred_adv={0.5: PRED_ADV}, radius_adv={0.5: RADIUS_ADV})
    out = ms.compute()
    assert out["accuracy_under_attack@0.5"] == 2 / 6
    assert out["robust_precision_under_attack@0.5@0.1"] is None
    assert out["accuracy_under_attack@1"] is None  # never attacked at eps = 1


def test_metricset_eps_keys_tolerate_float_noise() -> None:
    ms = MetricSet(eps_list=[8 / 255], certifies=False)
    ms.update(y=Y, pred=PRED, pred_adv={8.0 / 255.0 + 1e-12: PRED_ADV})
    assert ms.compute()["accuracy_under_attack@0.0313725"] == 2 / 6


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    cuts=st.lists(st.integers(0, 80), max_size=6),
    shards=st.integers(1, 4),
    certifies=st.booleans(),
)
def test_metricset_batching_and_sharding_invariant(seed, cuts, shards, certifies) -> None:
    rng = np.random.default_rng(seed)
    n = 80
    y = rng.integers(0, 4, n)
    pred = np.where(rng.random(n) < 0.7, y, rng.integers(-1, 4, n))
    radius = rng.choice([-0.5, 0.0, 0.1, 0.2, 0.5], n)
    pred_adv = np.where(rng.random(n) < 0.4, y, rng.integers(-1, 4, n))
    radius_adv = rng.choice([0.0, 0.1, 0.3], n)
    cfg = {"radii": [0.0, 0.1, 0.3], "thresholds": [0.1, 0.2], "eps_list": [0.25]}

    def fresh() -> MetricSet:
        return MetricSet(**cfg, certifies=certifies)

    whole = fresh()
    whole.update(
        y=y, pred=pred, radius=radius, pred_adv={0.25: pred_adv}, radius_adv={0.25: radius_adv}
    )
    bounds = [0, *sorted(cuts), n]
    parts = [fresh() for _ in range(shards)]
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        sl = slice(a, b)
        parts[i % shards].update(
            y=torch.tensor(y[sl]),
            pred=torch.tensor(pred[sl]),
            radius=torch.tensor(radius[sl]),
            pred_adv={0.25: torch.tensor(pred_adv[sl])},
            radius_adv={0.25: torch.tensor(radius_adv[sl])},
        )
    merged = pickle.loads(pickle.dumps(parts[0]))  # shards travel pickled (Ray)
    for p in parts[1:]:
        merged.merge(p)
    assert merged.compute() == whole.compute()  # exact, not approximate

    out = whole.compute()
    assert out["accuracy"] == accuracy(pred, y)
    assert out["accuracy_under_attack@0.25"] == accuracy_under_attack(pred_adv, y)
    if certifies:
        assert out["guaranteed_accuracy@0.1"] == guaranteed_accuracy(pred, y, radius, 0.1)
        assert out["robust_precision@0.2"] == robust_precision(pred, y, radius, 0.2)
        assert out["coverage@0.2"] == coverage(radius, 0.2)
        assert out["robust_precision_under_attack@0.25@0.1"] == robust_precision_under_attack(
            pred_adv, y, radius_adv, 0.1
        )


def test_merge_rejects_other_configs() -> None:
    with pytest.raises(ValueError, match="same radii"):
        MetricSet(radii=[0.1]).merge(MetricSet(radii=[0.2]))
    with pytest.raises(ValueError, match="same radii"):
        MetricSet(certifies=True).merge(MetricSet(certifies=False))


def test_reset() -> None:
    ms = MetricSet(radii=[0.1], thresholds=[0.1], eps_list=[0.5])
    _full_update(ms)
    ms.reset()
    assert ms.n == 0 and all(v is None for v in ms.compute().values())


def test_counts_reproduce_every_counted_value():
    """counts() gives (k, n) with k / n equal to compute()'s value, on random batches."""
    rng = np.random.default_rng(0)
    ms = MetricSet(radii=[0.0, 0.3], thresholds=[0.1, 0.5], eps_list=[0.2], certifies=True)
    for _ in range(3):
        n = 37
        y = rng.integers(0, 3, n)
        pred = np.where(rng.random(n) < 0.8, y, rng.integers(-1, 3, n))
        radius = rng.random(n)
        pa = np.where(rng.random(n) < 0.5, y, -1)
        ms.update(y=y, pred=pred, radius=radius, pred_adv={0.2: pa}, radius_adv={0.2: radius / 2})
    values, counts = ms.compute(), ms.counts()
    assert set(counts) >= {"accuracy", "guaranteed_accuracy@0.3", "coverage@0.5"}
    assert "robust_precision_under_attack@0.2@0.1" in counts
    for name, (k, n) in counts.items():
        assert values[name] == k / n, name
    assert (
        counts["accuracy"][1] == 111 and counts["robust_precision@0.5"][1] == ms.certified_at_t[1]
    )


def test_counts_leave_out_conventional_values():
    """A defense that certifies nothing: robust precision *equals* accuracy by convention, it
    is not a counted fraction, so it has no counts (and so no interval)."""
    ms = MetricSet(radii=[0.1], thresholds=[0.1], certifies=False)
    ms.update(y=np.array([0, 1]), pred=np.array([0, 0]))
    assert ms.counts() == {"accuracy": (1, 2)}
