"""Benchmark specs: validation messages name the field; expansion counts; stable cell hashes."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from bench.errors import ConfigError
from bench.spec import CellConfig, Known, load_spec, parse_spec


class FakeUndefended:
    """Stands in for a registered defense without importing torch."""

    @classmethod
    def param_names(cls) -> list[str]:
        return []


class FakePixelDP:
    def __init__(self, *, epsilon=1.0, delta=0.05, construction_bound=1.0, n_draws=100):
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or epsilon <= 0:
            raise ValueError(f"epsilon must be a positive number, got {epsilon!r}")
        self.epsilon, self.delta = epsilon, delta
        self.construction_bound, self.n_draws = construction_bound, n_draws

    @classmethod
    def param_names(cls) -> list[str]:
        return ["epsilon", "delta", "construction_bound", "n_draws"]


KNOWN = Known(
    datasets=("digits", "mnist", "fashion-mnist"),
    models=("cnn", "mlp"),
    defenses={"undefended": FakeUndefended, "pixeldp": FakePixelDP},
    attack_libraries=("art", "autoattack", "certbench", "torchattacks"),
)

GOOD = """
name = "quick"
seeds = [0]

[data]
dataset = "digits"
limit_test = 200

[threat]
norms = ["l2"]
radii = [0.0, 0.1]
thresholds = [0.05]
eps = [0.1, 0.3]

[attack]
name = "pgd"
params = { steps = 20 }

[[defenses]]
name = "undefended"

[[defenses]]
name = "pixeldp"
params = { epsilon = 1.0 }
"""


TRAIN = {"epochs": 2, "batch_size": 64, "optimizer": "adam", "lr": 1e-3}


def write(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp_path: Path, text: str):
    return load_spec(write(tmp_path, text), known=KNOWN)


def test_good_spec_loads(tmp_path):
    spec = load(tmp_path, GOOD)
    cells = spec.cells()
    assert [c.defense for c in cells] == ["undefended", "pixeldp"]
    c = cells[1]
    assert c.spec_name == "quick" and c.dataset == "digits" and c.model == "cnn"
    assert c.params == {"epsilon": 1.0}
    assert c.threat == {"radii": [0.0, 0.1], "thresholds": [0.05], "eps": [0.1, 0.3]}
    assert c.attack == {
        "library": "certbench",
        "name": "pgd",
        "params": {"steps": 20},
        "limit": None,
    }
    assert c.eval == {"batch_size": 1000, "alpha": 0.05}
    assert c.device == "auto" and c.limit_test == 200 and c.limit_train is None
    json.dumps(c.to_dict())  # plain data


# Each bad spec: (description, replacement of part of GOOD or full text, expected fragments)
def variant(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new, 1)


BAD = [
    ("missing name", variant('name = "quick"\n', ""), ["field 'name' is required"]),
    ("bad name", variant('name = "quick"', 'name = "my spec!"'), ["field 'name'", "'my spec!'"]),
    ("negative seed", variant("seeds = [0]", "seeds = [-1]"), ["field 'seeds[0]'", "-1"]),
    ("duplicate seeds", variant("seeds = [0]", "seeds = [0, 0]"), ["field 'seeds'", "duplicates"]),
    ("seeds string", variant("seeds = [0]", 'seeds = "0"'), ["field 'seeds'"]),
    (
        "bad device",
        variant("seeds = [0]", 'seeds = [0]\ndevice = "gpu"'),
        ["field 'device'", "auto, cpu, cuda, cuda:N", "'gpu'"],
    ),
    (
        "unknown top field",
        variant("seeds = [0]", "seed = 0"),
        ["unknown field 'seed'", "did you mean 'seeds'", "allowed fields at the top level"],
    ),
    (
        "missing data",
        variant('[data]\ndataset = "digits"\nlimit_test = 200\n', ""),
        ["field 'data' is required"],
    ),
    ("missing dataset", variant('dataset = "digits"\n', ""), ["field 'data.dataset' is required"]),
    (
        "unknown dataset",
        variant('dataset = "digits"', 'dataset = "imagenet21k"'),
        ["field 'data.dataset'", "digits, mnist, fashion-mnist", "'imagenet21k'"],
    ),
    (
        "dataset typo",
        variant('dataset = "digits"', 'datset = "digits"'),
        ["unknown field 'data.datset'", "did you mean 'dataset'", "allowed fields in [data]"],
    ),
    (
        "zero limit",
        variant("limit_test = 200", "limit_test = 0"),
        ["field 'data.limit_test' must be a positive integer", "got 0"],
    ),
    ("bool limit", variant("limit_test = 200", "limit_train = true"), ["field 'data.limit_train'"]),
    (
        "data_dir table unknown dataset",
        variant("limit_test = 200", 'data_dir = { mnist = "/x" }'),
        ["unknown field 'data.data_dir.mnist'"],
    ),
    (
        "unknown model",
        variant("limit_test = 200", 'model = "vit"'),
        ["field 'data.model'", "cnn, mlp", "'vit'"],
    ),
    (
        "lr string",
        variant("[threat]", '[train]\nlr = "abc"\n[threat]'),
        ["spec.toml: field 'train.lr' must be a positive number, got 'abc'"],
    ),
    ("lr negative", variant("[threat]", "[train]\nlr = -1\n[threat]"), ["field 'train.lr'"]),
    (
        "optimizer",
        variant("[threat]", '[train]\noptimizer = "rmsprop"\n[threat]'),
        ["field 'train.optimizer' must be one of adam, sgd", "'rmsprop'"],
    ),
    (
        "momentum 1",
        variant("[threat]", "[train]\nmomentum = 1.0\n[threat]"),
        ["field 'train.momentum' must be a number in [0, 1)"],
    ),
    (
        "epochs float",
        variant("[threat]", "[train]\nepochs = 1.5\n[threat]"),
        ["field 'train.epochs'", "1.5"],
    ),
    (
        "unknown train field",
        variant("[threat]", "[train]\nepoch = 3\n[threat]"),
        ["unknown field 'train.epoch'", "did you mean 'epochs'", "batch_size"],
    ),
    (
        "alpha",
        variant("[threat]", "[eval]\nalpha = 1.5\n[threat]"),
        ["field 'eval.alpha' must be a number in (0, 1)", "1.5"],
    ),
    (
        "eval batch",
        variant("[threat]", "[eval]\nbatch_size = 0\n[threat]"),
        ["field 'eval.batch_size'"],
    ),
    (
        "bad norm",
        variant('norms = ["l2"]', 'norms = ["l3"]'),
        ["field 'threat.norms[0]' must be one of l1, l2, linf", "'l3'"],
    ),
    (
        "norm and norms",
        variant('norms = ["l2"]', 'norms = ["l2"]\nnorm = "l2"'),
        ["'threat.norm' and 'threat.norms'"],
    ),
    (
        "negative radius",
        variant("radii = [0.0, 0.1]", "radii = [0.0, -0.1]"),
        ["field 'threat.radii[1]' must be a number >= 0", "-0.1"],
    ),
    (
        "zero threshold",
        variant("thresholds = [0.05]", "thresholds = [0]"),
        ["field 'threat.thresholds[0]' must be a positive number"],
    ),
    ("eps string", variant("eps = [0.1, 0.3]", 'eps = "0.1"'), ["field 'threat.eps'"]),
    (
        "eps unknown norm",
        variant("eps = [0.1, 0.3]", "eps = { l2 = [0.1], l3 = [0.2] }"),
        ["unknown field 'threat.eps.l3'", "l2"],
    ),
    (
        "attack without eps",
        variant("eps = [0.1, 0.3]", "eps = []"),
        ["field 'threat.eps' must list at least one attack budget", "[attack]"],
    ),
    (
        "attack library",
        variant('name = "pgd"', 'name = "pgd"\nlibrary = "foolbox"'),
        ["field 'attack.library'", "art, autoattack, certbench, torchattacks", "'foolbox'"],
    ),
    ("attack name", variant('name = "pgd"\n', ""), ["field 'attack.name' is required"]),
    ("attack limit", variant('name = "pgd"', 'name = "pgd"\nlimit = 0'), ["field 'attack.limit'"]),
    ("attack params", variant("params = { steps = 20 }", "params = 3"), ["field 'attack.params'"]),
    ("no defenses", GOOD.split("[[defenses]]")[0], ["field 'defenses' is required"]),
    (
        "unknown defense",
        variant('name = "pixeldp"', 'name = "pixel-dp"'),
        [
            "field 'defenses[1].name' must be a registered defense",
            "pixeldp, undefended",
            "'pixel-dp'",
        ],
    ),
    (
        "unknown param",
        variant("params = { epsilon = 1.0 }", "params = { epsilon = 1.0, eta = 2 }"),
        [
            "field 'defenses[1].params.eta' is not a parameter of defense 'pixeldp'",
            "epsilon, delta, construction_bound, n_draws",
        ],
    ),
    (
        "invalid param value",
        variant("epsilon = 1.0", 'epsilon = "abc"'),
        ["field 'defenses[1].params'", "epsilon must be a positive number, got 'abc'"],
    ),
    (
        "nan param",
        variant("epsilon = 1.0", "epsilon = nan"),
        ["field 'defenses[1].params.epsilon' must be a finite number"],
    ),
    (
        "grid repeats param",
        variant(
            "params = { epsilon = 1.0 }",
            "params = { epsilon = 1.0 }\ngrid = { epsilon = [1.0, 2.0] }",
        ),
        ["field 'defenses[1].grid.epsilon' is also set in 'defenses[1].params'"],
    ),
    (
        "grid not list",
        variant("params = { epsilon = 1.0 }", "params = { epsilon = 1.0 }\ngrid = { delta = 0.1 }"),
        ["field 'defenses[1].grid.delta' must be a non-empty list"],
    ),
    (
        "grid empty",
        variant("params = { epsilon = 1.0 }", "params = { epsilon = 1.0 }\ngrid = { delta = [] }"),
        ["field 'defenses[1].grid.delta'"],
    ),
    (
        "grid duplicate",
        variant(
            "params = { epsilon = 1.0 }",
            "params = { epsilon = 1.0 }\ngrid = { delta = [0.1, 0.1] }",
        ),
        ["field 'defenses[1].grid.delta' must be a list without duplicates"],
    ),
    (
        "grid unknown param",
        variant(
            "params = { epsilon = 1.0 }", "params = { epsilon = 1.0 }\ngrid = { eta = [1, 2] }"
        ),
        ["field 'defenses[1].grid.eta' is not a parameter"],
    ),
    (
        "defense model",
        variant('name = "undefended"', 'name = "undefended"\nmodel = "vit"'),
        ["field 'defenses[0].model'", "'vit'"],
    ),
    (
        "defense train",
        GOOD + "[defenses.train]\nbatch_size = 0\n",
        ["field 'defenses[1].train.batch_size' must be a positive integer"],
    ),
    (
        "defense unknown field",
        variant('name = "undefended"', 'name = "undefended"\ncolour = 1'),
        ["unknown field 'defenses[0].colour'", "name, model, label, params, grid, train"],
    ),
    (
        "defenses not array",
        'defenses = "undefended"\n' + GOOD.split("[[defenses]]")[0],
        ["field 'defenses' must be a non-empty array of tables"],
    ),
    (
        "duplicate experiment",
        GOOD + '[[defenses]]\nname = "undefended"\nlabel = "again"\n',
        ["defenses[0] and defenses[2] describe the same experiment"],
    ),
]


@pytest.mark.parametrize(("text", "fragments"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_spec_names_the_field(tmp_path, text, fragments):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    message = str(info.value)
    assert message.startswith(str(tmp_path / "spec.toml") + ": "), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_toml_syntax_error_names_file_and_line(tmp_path):
    text = 'name = "quick"\n[data]\ndataset = "digits\n'
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    msg = str(info.value)
    assert "spec.toml: invalid TOML" in msg and "line 3" in msg


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.toml: spec file not found"):
        load_spec(tmp_path / "nope.toml", known=KNOWN)
    with pytest.raises(ConfigError, match="is a directory"):
        load_spec(tmp_path, known=KNOWN)


def test_parse_spec_names_source_in_errors():
    with pytest.raises(ConfigError, match=r"^configs/x\.toml: field 'data' is required"):
        parse_spec(
            {"name": "x", "defenses": [{"name": "undefended"}]}, "configs/x.toml", known=KNOWN
        )


EXPAND = """
name = "grid"
seeds = [0, 1, 2]
[data]
dataset = ["digits", "mnist"]
data_dir = { mnist = "/data/mnist" }
model = ["cnn", "mlp"]
[threat]
norms = ["l2", "linf"]
radii = { l2 = [0.5, 0.0, 0.25], linf = [0.01] }
eps = { l2 = [0.5], linf = [0.03, 0.01] }
[attack]
library = "torchattacks"
name = "pgd"
[[defenses]]
name = "undefended"
model = "cnn"
[[defenses]]
name = "pixeldp"
params = { epsilon = 1.0 }
grid = { construction_bound = [0.1, 0.3, 1.0] }
"""


def test_expansion_counts_and_unique_ids(tmp_path):
    spec = load(tmp_path, EXPAND)
    cells = spec.cells()
    # datasets 2 x (undefended: 1 model + pixeldp: 2 models x 3 grid points) x norms 2 x seeds 3
    assert len(cells) == 2 * (1 + 2 * 3) * 2 * 3 == 84
    assert len({c.cell_id() for c in cells}) == 84
    # checkpoints are shared across norms (threat lists differ, training does not)
    assert len({c.train_key() for c in cells}) == 84 // 2
    pix = [c for c in cells if c.defense == "pixeldp" and c.dataset == "digits"]
    assert sorted({c.params["construction_bound"] for c in pix}) == [0.1, 0.3, 1.0]
    assert all(c.params["epsilon"] == 1.0 for c in pix)
    by_norm = {c.norm: c.threat for c in cells}
    assert by_norm["l2"] == {"radii": [0.0, 0.25, 0.5], "thresholds": [], "eps": [0.5]}
    assert by_norm["linf"] == {"radii": [0.01], "thresholds": [], "eps": [0.01, 0.03]}
    assert {c.data_dir for c in cells if c.dataset == "mnist"} == {"/data/mnist"}
    assert {c.data_dir for c in cells if c.dataset == "digits"} == {None}
    assert {c.model for c in cells if c.defense == "undefended"} == {"cnn"}


def test_same_config_same_id_across_loads(tmp_path):
    a = [c.cell_id() for c in load(tmp_path, EXPAND).cells()]
    b = [c.cell_id() for c in load(tmp_path, EXPAND).cells()]
    assert a == b
    # ...and regardless of the order radii are written in
    c = [
        x.cell_id()
        for x in load(tmp_path, EXPAND.replace("[0.5, 0.0, 0.25]", "[0, 0.25, 0.5]")).cells()
    ]
    assert a == c


def _cell(**kw: Any) -> CellConfig:
    base = dict(
        spec_name="quick",
        dataset="digits",
        data_dir=None,
        limit_train=None,
        limit_test=200,
        model="cnn",
        defense="pixeldp",
        label=None,
        params={"epsilon": 1.0},
        norm="l2",
        seed=0,
        train=dict(TRAIN),
        eval={"batch_size": 1000, "alpha": 0.05},
        threat={"radii": [0.0, 0.1], "thresholds": [0.05], "eps": [0.1]},
        attack=None,
        device="auto",
    )
    base.update(kw)
    return CellConfig(**base)


def test_cell_id_golden_value():
    # Pinned so that an accidental change of the hash scheme (which would orphan every stored
    # result) fails loudly. The oracle is spelled out: sha256 of the sorted-key compact JSON
    # of the config minus spec_name/label/device/eval.batch_size, plus a schema tag.
    train = {
        "epochs": 5,
        "batch_size": 64,
        "optimizer": "adam",
        "lr": 1e-3,
        "momentum": 0.9,
        "weight_decay": 0.0,
    }
    cell = _cell(train=train)
    payload = {
        "dataset": "digits",
        "data_dir": None,
        "limit_train": None,
        "limit_test": 200,
        "model": "cnn",
        "defense": "pixeldp",
        "params": {"epsilon": 1.0},
        "norm": "l2",
        "seed": 0,
        "train": train,
        "eval": {"alpha": 0.05},
        "threat": {"radii": [0.0, 0.1], "thresholds": [0.05], "eps": [0.1]},
        "attack": None,
        "_schema": 1,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    assert cell.cell_id() == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert cell.cell_id() == "f5f6e485c1622caf"


@pytest.mark.parametrize(
    "change",
    [
        {"spec_name": "other"},
        {"label": "PixelDP"},
        {"device": "cuda:1"},
        {"eval": {"batch_size": 17, "alpha": 0.05}},
    ],
    ids=["spec_name", "label", "device", "eval.batch_size"],
)
def test_execution_details_do_not_change_id(change):
    assert _cell(**change).cell_id() == _cell().cell_id()
    assert _cell(**change).train_key() == _cell().train_key()


@pytest.mark.parametrize(
    ("change", "same_train"),
    [
        ({"params": {"epsilon": 2.0}}, False),
        ({"params": {"epsilon": 1.0, "delta": 0.1}}, False),
        ({"seed": 1}, False),
        ({"model": "mlp"}, False),
        ({"dataset": "mnist"}, False),
        ({"train": {**TRAIN, "epochs": 6}}, False),
        ({"limit_train": 100}, False),
        ({"norm": "linf"}, True),
        ({"limit_test": 100}, True),
        ({"threat": {"radii": [0.0], "thresholds": [0.05], "eps": [0.1]}}, True),
        ({"eval": {"batch_size": 1000, "alpha": 0.01}}, True),
        ({"attack": {"library": "certbench", "name": "pgd", "params": {}, "limit": None}}, True),
    ],
)
def test_different_config_different_id(change, same_train):
    assert _cell(**change).cell_id() != _cell().cell_id()
    assert (_cell(**change).train_key() == _cell().train_key()) is same_train


def test_cell_round_trip_and_hashable():
    cell = _cell(label="x")
    again = CellConfig.from_dict(json.loads(json.dumps(cell.to_dict())))
    assert again == cell and again.cell_id() == cell.cell_id()
    assert len({cell, again}) == 1
    with pytest.raises(ConfigError, match="unknown field"):
        CellConfig.from_dict({**cell.to_dict(), "colour": 1})


def test_train_precedence(tmp_path):
    text = GOOD.replace("[threat]", "[train]\nbatch_size = 32\nlr = 0.5\n[threat]") + (
        "[defenses.train]\nlr = 0.25\n"
    )
    undef, pix = load(tmp_path, text).cells()
    # [train] < [defenses.train]; what the spec leaves out is not filled in (the runner merges
    # its own defaults and the defense's train_defaults() for the dataset's input shape)
    assert undef.train == {"batch_size": 32, "lr": 0.5}
    assert pix.train == {"batch_size": 32, "lr": 0.25}
    assert all(c.train == {} for c in load(tmp_path, GOOD).cells())


def test_shorthands(tmp_path):
    text = GOOD.replace("seeds = [0]", "seeds = 3").replace('norms = ["l2"]', 'norm = "linf"')
    cells = load(tmp_path, text).cells()
    assert {(c.seed, c.norm) for c in cells} == {(3, "linf")}


def test_validation_skipped_when_catalogue_unknown(tmp_path):
    text = GOOD.replace('name = "pixeldp"', 'name = "my-plugin"').replace(
        "epsilon = 1.0", "whatever = 1"
    )
    cells = load_spec(write(tmp_path, text), known=Known()).cells()
    assert cells[1].defense == "my-plugin" and cells[1].params == {"whatever": 1}
    assert cells[1].train == {}


def test_discover_reads_live_registries():
    from bench.data import DATASETS

    known = Known.discover()
    assert known.datasets == tuple(DATASETS)
    assert "wk-small" in known.models and "undefended" in known.defenses


def test_live_registry(tmp_path):
    """With the real registries: built-in names pass, unknown ones list the known defenses."""
    pytest.importorskip("torch")
    from bench.registry import list_defenses

    if "undefended" not in list_defenses():
        pytest.skip("the built-in 'undefended' defense is not available")
    text = GOOD.split("[[defenses]]")[0] + '[[defenses]]\nname = "undefended"\n'
    cells = load_spec(write(tmp_path, text)).cells()
    assert [c.defense for c in cells] == ["undefended"]
    with pytest.raises(ConfigError, match=r"defenses\[0\]\.name.*known defenses: .*undefended"):
        load_spec(write(tmp_path, text.replace('"undefended"', '"no-such-defense"')))


def test_a_defense_config_error_keeps_the_file_and_field(tmp_path):
    """A defense's __init__ raising a plain ConfigError (not a ValueError) still gets the
    file and field prefix (review finding (f))."""
    from bench.errors import ConfigError as CE

    class Picky(FakeUndefended):
        def __init__(self, *, k: int = 1) -> None:
            if k > 1:
                raise CE(f"k must be 1, got {k}")
            self.k = k

        @classmethod
        def param_names(cls) -> list[str]:
            return ["k"]

    known = Known(datasets=("digits",), models=("cnn",), defenses={"picky": Picky})
    text = '[data]\ndataset = "digits"\n[[defenses]]\nname = "picky"\nparams = { k = 2 }\n'
    with pytest.raises(ConfigError) as info:
        load_spec(write(tmp_path, 'name = "x"\n' + text), known=known)
    message = str(info.value)
    assert message.startswith(str(tmp_path / "spec.toml") + ": field 'defenses[0].params'")
    assert "k must be 1, got 2" in message


BY_DEFENSE = variant(
    '[attack]\nname = "pgd"\nparams = { steps = 20 }\n',
    '[[attacks]]\nname = "pgd"\nparams = { steps = 20 }\n'
    '[[attacks]]\nname = "pgd"\nparams = { steps = 40 }\neps = [0.1]\ndefenses = ["pixeldp"]\n',
)


def test_an_attack_may_run_on_named_defenses_only(tmp_path):
    """``defenses`` restricts an ensemble member to the named entries; the other entries'
    cells are exactly the cells of the spec without that member (same identity, so a board
    that adds an attack for some defenses recomputes only theirs)."""
    undefended, pixeldp = load(tmp_path, BY_DEFENSE).cells()
    first = {"library": "certbench", "name": "pgd", "params": {"steps": 20}, "limit": None}
    assert undefended.attack == [{**first, "eps": None}]
    assert pixeldp.attack == [
        {**first, "eps": None},
        {**first, "params": {"steps": 40}, "eps": [0.1]},
    ]
    without = BY_DEFENSE.split("[[attacks]]")
    tail = without[2].split("[[defenses]]", 1)[1]
    alone = "[[attacks]]".join(without[:2]) + "[[defenses]]" + tail
    plain_undefended, plain_pixeldp = load(tmp_path, alone).cells()
    assert undefended.cell_id() == plain_undefended.cell_id()
    assert pixeldp.cell_id() != plain_pixeldp.cell_id()


def test_an_attack_names_defenses_by_label_and_unknown_names_are_refused(tmp_path):
    labelled = BY_DEFENSE.replace(
        'name = "pixeldp"\n', 'name = "pixeldp"\nlabel = "PixelDP (L = 1)"\n'
    )
    by_label = labelled.replace('defenses = ["pixeldp"]', 'defenses = ["PixelDP (L = 1)"]')
    cells = load(tmp_path, by_label).cells()
    assert [len(c.attack) for c in cells] == [1, 2]
    with pytest.raises(ConfigError) as info:
        load(tmp_path, labelled.replace('defenses = ["pixeldp"]', 'defenses = ["madry"]'))
    message = str(info.value)
    assert "field 'attacks[1].defenses[0]'" in message
    assert "PixelDP (L = 1), pixeldp, undefended" in message and "'madry'" in message
    with pytest.raises(ConfigError, match=r"attacks\[1\]\.defenses.*non-empty list"):
        load(tmp_path, BY_DEFENSE.replace('defenses = ["pixeldp"]', "defenses = []"))
