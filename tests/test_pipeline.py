"""The cell pipeline's scoring: the attack ensemble's per-example worst case, per-attack
values, counts behind every fraction."""

from __future__ import annotations

import math

import pytest
import torch

from bench.pipeline import (
    ShardResult,
    attack_label,
    attack_list,
    attack_metric_key,
    ensemble,
    score,
    split_attack_metric_key,
    worst_case,
)

Y = torch.tensor([0, 1, 2, 3])
CLEAN = torch.tensor([0, 1, 2, 0])  # example 3 is already wrong


def _shard(adv, radius=None) -> ShardResult:
    return ShardResult(y=Y.clone(), pred=CLEAN.clone(), radius=radius, adv=adv)


def test_two_attacks_breaking_different_examples():
    """A breaks example 0, B breaks example 1: each alone leaves 3 of 4 (one of them already
    wrong) standing at 0.5; the ensemble leaves only example 2: 0.25."""
    a = torch.tensor([9, 1, 2, 0])
    b = torch.tensor([0, 9, 2, 0])
    shard = _shard({"A": {0.1: (a, None)}, "B": {0.1: (b, None)}})
    metrics, counts = score(shard, certifies=False)
    assert metrics["accuracy"] == 0.75
    assert metrics["accuracy_under_attack@0.1"] == 0.25
    assert counts["accuracy_under_attack@0.1"] == (1, 4)
    assert metrics[attack_metric_key("accuracy_under_attack@0.1", "A")] == 0.5
    assert metrics[attack_metric_key("accuracy_under_attack@0.1", "B")] == 0.5
    # the worst case is never better than any single attack
    assert metrics["accuracy_under_attack@0.1"] <= min(
        metrics["accuracy_under_attack@0.1[A]"], metrics["accuracy_under_attack@0.1[B]"]
    )


def test_a_single_attack_has_no_per_attack_copies():
    shard = _shard({"A": {0.1: (torch.tensor([9, 1, 2, 0]), None)}})
    metrics, _ = score(shard, certifies=False)
    assert metrics["accuracy_under_attack@0.1"] == 0.5
    assert not [k for k in metrics if split_attack_metric_key(k)[1] is not None]


def test_an_attack_on_a_prefix_only_judges_what_it_attacked():
    """B ran on the first 2 examples only (its limit): examples 2 and 3 are judged by A."""
    a = torch.tensor([0, 1, 9, 0])
    b = torch.tensor([9, 1])
    shard = _shard({"A": {0.1: (a, None)}, "B": {0.1: (b, None)}})
    pred, _ = ensemble(shard, 0.1)
    assert pred.tolist() == [9, 1, 9, 0]
    _, counts = score(shard, certifies=False)
    assert counts["accuracy_under_attack@0.1"] == (1, 4)
    assert counts["accuracy_under_attack@0.1[B]"] == (1, 2)


def test_budgets_run_by_one_attack_only():
    a = {0.1: (torch.tensor([9, 1, 2, 0]), None)}
    b = {0.1: (torch.tensor([0, 9, 2, 0]), None), 0.3: (torch.tensor([9, 9, 9, 9]), None)}
    metrics, _ = score(_shard({"A": a, "B": b}), certifies=False)
    assert metrics["accuracy_under_attack@0.1"] == 0.25
    assert metrics["accuracy_under_attack@0.3"] == 0.0


def test_worst_case_radius_for_robust_precision_under_attack():
    """Per example: a successful attack with the largest radius, else the failed attack with
    the smallest radius; the worst case at every threshold at once."""
    y = torch.tensor([0, 1, 2])
    r1 = (torch.tensor([5, 1, 2]), torch.tensor([0.2, 0.9, 0.4], dtype=torch.float64))
    r2 = (torch.tensor([6, 1, 2]), torch.tensor([0.7, 0.3, 0.8], dtype=torch.float64))
    pred, radius = worst_case(y, [r1, r2])
    assert pred.tolist() == [6, 1, 2]
    assert radius.tolist() == [0.7, 0.3, 0.4]
    # exhaustive check: for each threshold, no choice of attack per example does worse
    for t in (0.1, 0.35, 0.5, 0.75):

        def prec(p, r, t=t):
            cert = r >= t
            return math.nan if not cert.any() else float(((p == y) & cert).sum() / cert.sum())

        worst = prec(pred, radius)
        for c0 in (r1, r2):
            for c1 in (r1, r2):
                for c2 in (r1, r2):
                    p = torch.stack([c0[0][0], c1[0][1], c2[0][2]])
                    r = torch.stack([c0[1][0], c1[1][1], c2[1][2]])
                    other = prec(p, r)
                    if not math.isnan(other) and not math.isnan(worst):
                        assert worst <= other + 1e-12


def test_attack_list_and_labels():
    one = {"library": "certbench", "name": "pgd", "params": {"steps": 3}, "limit": 50}
    assert attack_list(None) == []
    (a,) = attack_list(one)
    assert a["eps"] is None and a["limit"] == 50
    assert attack_label(one) == "certbench:pgd(steps=3)"
    two = [one, {"library": "autoattack", "name": "standard", "params": {}, "eps": [0.1]}]
    assert attack_label(two) == "certbench:pgd(steps=3) + autoattack:standard"
    assert [x["eps"] for x in attack_list(two)] == [None, [0.1]]
    assert split_attack_metric_key("accuracy_under_attack@0.1[autoattack:standard]") == (
        "accuracy_under_attack@0.1",
        "autoattack:standard",
    )


ENSEMBLE_SPEC = """
name = "ensemble"
[data]
dataset = "digits"
model = "mlp"
limit_test = 60
[train]
epochs = 2
lr = 0.003
[threat]
norms = ["linf"]
eps = [0.05, 0.1]
headline = 0.1
[[attacks]]
library = "certbench"
name = "pgd"
params = { steps = 2 }
[[attacks]]
library = "torchattacks"
name = "fgsm"
eps = [0.1]
limit = 30
[[defenses]]
name = "undefended"
"""


@pytest.mark.slow
def test_ensemble_spec_runs_end_to_end(tmp_path):
    import tomllib

    from bench.executors import run_spec
    from bench.leaderboard import build_boards
    from bench.spec import parse_spec
    from bench.store import Store

    pytest.importorskip("torchattacks")
    spec = parse_spec(tomllib.loads(ENSEMBLE_SPEC), "ensemble.toml")
    assert run_spec(spec, tmp_path / "s.sqlite", progress=False)["ran"] == 1
    (c,) = Store(tmp_path / "s.sqlite").cells()
    m = c["metrics"]
    pgd = "certbench:pgd(steps=2)"
    assert m["accuracy_under_attack@0.1"] <= m[f"accuracy_under_attack@0.1[{pgd}]"]
    assert "accuracy_under_attack@0.05[torchattacks:fgsm]" not in m  # not run at 0.05
    assert c["counts"]["accuracy_under_attack@0.1[torchattacks:fgsm]"][1] == 30
    assert c["counts"]["accuracy_under_attack@0.1"][1] == 60
    assert c["attack"] == f"{pgd} + torchattacks:fgsm"
    (board,) = build_boards(Store(tmp_path / "s.sqlite"))
    row = board.rows[0]
    assert row.values["robust_accuracy_upper"] == m["accuracy_under_attack@0.1"]
    assert row.values["robust_accuracy_lower"] is None  # undefended certifies nothing
