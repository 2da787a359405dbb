"""Every attack adapter runs against every registered defense through ``certbench run``.

One store is shared by all specs, so each defense is trained once (checkpoints are keyed by
the training configuration) and every adapter's attack stage runs on it. Attack parameters
are cut to a few iterations: this checks the plumbing (budgets, re-scoring, records), the
strength of each attack is tested in tests/test_attacks.py.
"""

from __future__ import annotations

import pytest
import tomllib

from bench.registry import list_defenses

ATTACKS = {
    ("certbench", "pgd"): {"steps": 2, "draws": 2},
    ("torchattacks", "fgsm"): {"draws": 2},
    ("torchattacks", "pgd"): {"steps": 2, "draws": 2},
    ("torchattacks", "cw"): {"steps": 2, "draws": 2},
    ("torchattacks", "apgd"): {"steps": 2, "draws": 2},
    ("art", "pgd"): {"steps": 2, "draws": 2},
    ("art", "cw"): {"max_iter": 2, "binary_search_steps": 1, "draws": 2},
    ("autoattack", "autoattack"): {"n_iter": 2, "eot_iter": 2, "n_queries": 10},
}

SPEC = """
name = "attack-stage-{library}-{name}"
[data]
dataset = "digits"
model = "mlp"
limit_test = 10
[train]
epochs = 1
[threat]
norms = ["{norm}"]
radii = [0.0]
thresholds = [0.1]
eps = [{eps}]
[attack]
library = "{library}"
name = "{name}"
limit = 10
params = {params}
"""

DEFENSE_PARAMS = {
    "randomized-smoothing": "{ n0 = 10, n = 50 }",
    "pixeldp": "{ n_draws = 50 }",
    "wong-kolter": '{ eps = 0.05, norm = "l2" }',
    "madry": '{ eps = 0.5, norm = "l2", steps = 2 }',
}


def _spec_text(library: str, name: str, params: dict) -> str:
    inline = "{ " + ", ".join(f"{k} = {v!r}" for k, v in params.items()) + " }"
    norm, eps = ("linf", 0.1) if (library, name) == ("torchattacks", "fgsm") else ("l2", 0.5)
    text = SPEC.format(library=library, name=name, params=inline, norm=norm, eps=eps)
    for d in list_defenses():
        text += f'\n[[defenses]]\nname = "{d}"\n'
        if d in DEFENSE_PARAMS:
            text += f"params = {DEFENSE_PARAMS[d]}\n"
    return text


@pytest.mark.slow
def test_every_adapter_against_every_defense(tmp_path):
    from bench.executors import run_spec
    from bench.spec import parse_spec
    from bench.store import Store

    store_path = tmp_path / "s.sqlite"
    for (library, name), params in ATTACKS.items():
        spec = parse_spec(tomllib.loads(_spec_text(library, name, params)), f"{library}:{name}")
        summary = run_spec(spec, store_path, progress=False)
        assert summary["ran"] == len(list_defenses()), (library, name)
    cells = Store(store_path).cells()
    assert len(cells) == len(ATTACKS) * len(list_defenses())
    for c in cells:
        (value,) = [v for k, v in c["metrics"].items() if k.startswith("accuracy_under_attack@")]
        assert isinstance(value, float) and 0.0 <= value <= 1.0, c["attack"]
        assert c["attack"].split("(")[0] in {f"{lib}:{n}" for lib, n in ATTACKS}
