"""Benchmark specs: a TOML file that names what to run, validated and expanded into cells.

A spec names one or more datasets, models, defenses with hyper-parameters (optionally a
grid), threat models (norms with radii, thresholds and attack budgets), an optional attack
and seeds. :func:`load_spec` reads and validates it; :meth:`Spec.cells` expands it into
:class:`CellConfig` objects, one per dataset × defense entry × model × grid point × norm ×
seed, each resolved (spec-level defaults such as seeds, model, eval and threat lists filled
in; training settings as below), so that a cell's identity is a hash of its config::

    name = "quick"                  # required, [A-Za-z0-9_-]+
    seeds = [0]                     # default [0]; a single integer is accepted too
    device = "auto"                 # auto | cpu | cuda | cuda:N
    store = "runs/certbench.sqlite" # optional default results store

    [data]
    dataset = "digits"              # required; a string or a list of names
    data_dir = "/path"              # optional; a string, or a table {dataset = dir}
    limit_train = 1000              # optional positive integers
    limit_test = 200
    model = "cnn"                   # default model (or list) for every defense; default "cnn"

    [train]                         # settings for every defense (all optional)
    epochs = 5                      # >= 0 (0 = no training, e.g. a loaded checkpoint)
    batch_size = 64                 # >= 1
    optimizer = "adam"              # adam | sgd
    lr = 1e-3                       # > 0
    momentum = 0.9                  # in [0, 1)
    weight_decay = 0.0              # >= 0

    [eval]
    batch_size = 1000               # forward-pass batch for Monte Carlo
    alpha = 0.05                    # in (0, 1), recorded with the results

    [threat]
    norms = ["l2"]                  # subset of l1, l2, linf (or norm = "l2")
    radii = [0.0, 0.1, 0.25]        # guaranteed-accuracy radii, >= 0, input (pixel) units
    thresholds = [0.05, 0.1]        # PixelDP robustness thresholds T, > 0
    eps = [0.1, 0.3]                # attack budgets, > 0

    headline = { l2 = 0.5, linf = 0.1 }  # optional: the board's headline budget per norm
                                    # (or one number); must be an attack budget; it is
                                    # added to the radii (the interval's certified end)

    [attack]                        # optional; absent = no attack stage
    library = "certbench"           # a registered attack library (certbench, torchattacks,
    name = "pgd"                    #   art, autoattack, plugins)
    params = { steps = 20 }
    limit = 100                     # attack only the first N test examples

    # ... or an ensemble: accuracy under attack is then the per-example worst case over
    # every attack that ran on an example (each re-scored with the defense's prediction)
    [[attacks]]
    library = "certbench"
    name = "pgd"
    [[attacks]]
    library = "autoattack"
    name = "autoattack"             # standard for deterministic, rand for randomized defenses
    limit = 1000                    # on the first 1000 test examples only
    eps = { linf = [0.1], l2 = [0.5] }  # at these budgets only (default: every budget)
    norms = ["linf", "l2"]          # the norms it runs for (default: every norm); each attack
                                    # must support its norms (checked before anything runs)
    defenses = ["madry", "wong-kolter"]  # the defenses it runs on, by name or label (default:
                                    # every defense); a cell's ensemble is the attacks that apply

    [[defenses]]
    name = "pixeldp"                # a registered defense
    model = "cnn"                   # optional override (string or list); a model of your
                                    # own by import path: "mypkg.nets:SmallCNN" (bench.models)
    label = "PixelDP"               # optional display name
    params = { epsilon = 1.0 }      # keyword hyper-parameters of the defense
    grid = { construction_bound = [0.1, 0.3, 1.0] }  # cartesian product over these params
    [defenses.train]                # optional overrides of [train]
    epochs = 10

    [[defenses]]                    # a pretrained row: no training, the model's weights
    name = "wong-kolter"            # come from a file
    model = "wk-small"
    checkpoint = "../weights/wong_kolter_fashion_mnist.pth"  # .safetensors or a plain
    params = { eps = 0.1 }          # state dict (.pth/.pt, weights_only), relative to the
                                    # spec file's directory

A pretrained row (``checkpoint``) is never trained: ``[train]`` does not apply to it (a
``[defenses.train]`` table is an error), its cells record no training time, and the weights'
SHA-256 is part of their identity (two weight files never share a stored cell). A row without
``checkpoint`` is trained; ``epochs = 0`` there is an error (it would score a randomly
initialised network).

``radii``, ``thresholds`` and ``eps`` may also be per-norm tables, e.g.
``eps = { l2 = [0.5], linf = [0.03] }``; a norm missing from the table gets an empty list.

Every mistake raises :class:`bench.errors.ConfigError` naming the file and the field, with
0-based indices into arrays of tables (``defenses[2].params.epsilon``), e.g.
``quick.toml: field 'train.lr' must be a positive number, got 'abc'``. Unknown fields are
errors too, listing the allowed ones.

Training settings: ``CellConfig.train`` holds only what the spec sets, ``[train]`` updated by
the entry's ``[defenses.train]``. The training loop fills the rest when it trains, in this order
(later wins): its own defaults (:class:`bench.training.TrainSettings`), the defense's
:meth:`~defenses.base.Defense.train_defaults` (which may depend on the dataset's input
shape, known only then), ``CellConfig.train``. So a setting the spec leaves out follows the
defense's and the training loop's code, and is not part of the cell's hash.

Cell identity (:meth:`CellConfig.cell_id`) hashes the resolved config *excluding*
``spec_name``, ``label``, ``device``, ``eval.batch_size`` and ``checkpoint`` (the weights'
path; their SHA-256 ``weights_sha256`` is included): those name or execute an
experiment without changing its result (results are seeded per example, so they do not
depend on batch size or on which device or executor ran them). The same experiment written
in two specs, or run on CPU and on a GPU, is therefore the same cell and is computed once.
:meth:`CellConfig.train_key` hashes only what affects training, so certification and attack
stages of cells that differ only in threat model or attack share one checkpoint.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from bench.errors import CertbenchError, ConfigError

NORMS = ("l1", "l2", "linf")
DEVICES = "auto, cpu, cuda, cuda:N"
OPTIMIZERS = ("adam", "sgd")
DEFAULT_MODEL = "cnn"
TRAIN_FIELDS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay")
DEFAULT_EVAL: dict[str, Any] = {"batch_size": 1000, "alpha": 0.05}

# Fields of the resolved config that do not change a cell's result (see the module docstring).
_NOT_IN_CELL_ID = ("spec_name", "label", "device", "checkpoint")
# Present in the identity only when set, so cells of trained rows keep the ids they had before
# pretrained rows existed.
_ONLY_WHEN_SET = ("weights_sha256",)
_CELL_ID_SCHEMA = 1

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
_HEX_KEY_LEN = 16

_TOP_FIELDS = (
    "attacks",
    "name",
    "seeds",
    "device",
    "store",
    "data",
    "train",
    "eval",
    "threat",
    "attack",
    "defenses",
)
_DATA_FIELDS = ("dataset", "data_dir", "limit_train", "limit_test", "model")
_EVAL_FIELDS = tuple(DEFAULT_EVAL)
_THREAT_FIELDS = ("norms", "norm", "radii", "thresholds", "eps", "headline")
_ATTACK_FIELDS = ("library", "name", "params", "limit", "eps", "norms", "defenses")
_DEFENSE_FIELDS = ("name", "model", "label", "params", "grid", "train", "checkpoint")


# ---------------------------------------------------------------------------- cells


def _canonical_hash(payload: Mapping[str, Any]) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:_HEX_KEY_LEN]


@dataclass(frozen=True)
class CellConfig:
    """One resolved experiment: a defense on a dataset, for one norm and one seed.

    ``params`` are the defense's keyword hyper-parameters exactly as given; ``train`` holds
    the training settings the spec sets (a subset of epochs, batch_size, optimizer, lr,
    momentum, weight_decay; the training loop fills the rest, see the module docstring); ``eval``
    holds ``batch_size`` and ``alpha``; ``threat`` holds the sorted ``radii``,
    ``thresholds`` and ``eps`` lists (input units of ``norm``, pixels in [0, 1]) and, when
    the spec declares one, the ``headline`` budget; ``attack`` is ``{"library", "name",
    "params", "limit"}`` (one ``[attack]`` table), a list of such tables with their ``eps``
    (an ensemble, ``[[attacks]]``), or ``None``. A pretrained cell has ``weights_sha256``
    (the SHA-256 of its model's weights) and, when they come from a file, ``checkpoint``
    (its absolute path); it is never trained (:attr:`pretrained`).
    Treat the dicts as read-only: the hash of a cell is computed from them.
    """

    spec_name: str
    dataset: str
    data_dir: str | None
    limit_train: int | None
    limit_test: int | None
    model: str
    defense: str
    label: str | None
    params: dict[str, Any]
    norm: str
    seed: int
    train: dict[str, Any]
    eval: dict[str, Any]
    threat: dict[str, list[float]]
    attack: dict[str, Any] | list[dict[str, Any]] | None
    device: str = "auto"
    checkpoint: str | None = None
    weights_sha256: str | None = None

    @property
    def pretrained(self) -> bool:
        """Whether the model comes with its weights (no training stage)."""
        return self.weights_sha256 is not None

    def __hash__(self) -> int:
        return hash(self.cell_id())

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of every field as plain JSON-serialisable data."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CellConfig:
        """Inverse of :meth:`to_dict` (unknown keys raise ``ConfigError``)."""
        names = [f for f in cls.__dataclass_fields__]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(
                f"cell config has unknown field(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(names)}"
            )
        try:
            return cls(**json.loads(json.dumps(dict(data))))
        except TypeError as exc:
            raise ConfigError(f"cell config is incomplete: {exc}") from exc

    def identity(self) -> dict[str, Any]:
        """The part of the config that :meth:`cell_id` hashes."""
        d = self.to_dict()
        for key in _NOT_IN_CELL_ID:
            d.pop(key)
        for key in _ONLY_WHEN_SET:
            if d[key] is None:
                d.pop(key)
        d["eval"] = {k: v for k, v in d["eval"].items() if k != "batch_size"}
        d["_schema"] = _CELL_ID_SCHEMA
        return d

    def cell_id(self) -> str:
        """16 hex digits of the SHA-256 of the canonical JSON of :meth:`identity`."""
        return _canonical_hash(self.identity())

    def train_key(self) -> str:
        """16 hex digits identifying the trained model: equal keys can share a checkpoint.

        Hashes dataset, data_dir, limit_train, model, defense, params, seed, train and, for a
        pretrained cell, the weights' SHA-256. All defense params are included, because the
        harness cannot tell which only matter at prediction time.
        """
        d = self.to_dict()
        keys = ("dataset", "data_dir", "limit_train", "model", "defense", "params", "seed", "train")
        payload = {k: d[k] for k in keys}
        for key in _ONLY_WHEN_SET:
            if d[key] is not None:
                payload[key] = d[key]
        payload["_schema"] = _CELL_ID_SCHEMA
        return _canonical_hash(payload)


@dataclass(frozen=True)
class DefenseEntry:
    """One ``[[defenses]]`` table after validation (before grid expansion)."""

    index: int
    name: str
    models: tuple[str, ...]
    label: str | None
    params: dict[str, Any]
    grid: dict[str, list[Any]]
    points: tuple[tuple[dict[str, Any], dict[str, Any]], ...]  # (params, train settings)
    checkpoint: str | None = None  # absolute path of a pretrained row's weights
    weights_sha256: str | None = None


@dataclass(frozen=True)
class Spec:
    """A validated benchmark spec. Build it with :func:`load_spec` or :func:`parse_spec`."""

    name: str
    source: str
    seeds: tuple[int, ...]
    device: str
    store: str | None
    datasets: tuple[str, ...]
    data_dirs: dict[str, str | None]
    limit_train: int | None
    limit_test: int | None
    norms: tuple[str, ...]
    eval: dict[str, Any]
    threat: dict[str, dict[str, Any]]  # norm -> {"radii", "thresholds", "eps"[, "headline"]}
    attack: dict[str, Any] | None  # norm -> the cells' attack config (None: no attack stage)
    defenses: tuple[DefenseEntry, ...] = field(default_factory=tuple)

    def cells(self) -> list[CellConfig]:
        """Every cell: dataset × defense entry × model × grid point × norm × seed, in that order."""
        out: list[CellConfig] = []
        for dataset in self.datasets:
            for entry in self.defenses:
                for model in entry.models:
                    for params, train in entry.points:
                        for norm in self.norms:
                            for seed in self.seeds:
                                out.append(
                                    CellConfig(
                                        spec_name=self.name,
                                        dataset=dataset,
                                        data_dir=self.data_dirs.get(dataset),
                                        limit_train=self.limit_train,
                                        limit_test=self.limit_test,
                                        model=model,
                                        defense=entry.name,
                                        label=entry.label,
                                        params=json.loads(json.dumps(params)),
                                        norm=norm,
                                        seed=seed,
                                        train=dict(train),
                                        eval=dict(self.eval),
                                        threat=json.loads(json.dumps(self.threat[norm])),
                                        attack=json.loads(
                                            json.dumps(
                                                _entry_attack((self.attack or {}).get(norm), entry)
                                            )
                                        ),
                                        device=self.device,
                                        checkpoint=entry.checkpoint,
                                        weights_sha256=entry.weights_sha256,
                                    )
                                )
        return out


# ---------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class Known:
    """Names a spec is validated against; ``None`` skips that check.

    ``defenses`` maps a name to its class (anything with ``param_names()`` whose keyword
    constructor raises ``ValueError``/``TypeError`` on bad values). :meth:`discover` reads
    the live registries lazily.
    """

    datasets: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    defenses: Mapping[str, type] | None = None
    attack_libraries: tuple[str, ...] | None = None
    #: checks a model named by import path (raises ConfigError); ``None``: not checked
    resolve_model: Callable[[str], Any] | None = None

    @classmethod
    def discover(cls) -> Known:
        """Datasets from ``bench.registry.DATASETS``, models from ``bench.models.list_models()``,
        defenses from ``bench.registry`` (imported lazily: specs parse without torch loaded
        until validation needs it)."""
        from bench.models import list_models, resolve_model
        from bench.registry import ATTACKS, DATASETS, get_defense_class, list_defenses

        return cls(
            datasets=tuple(DATASETS.names()),
            models=tuple(list_models()),
            defenses={n: get_defense_class(n) for n in list_defenses()},
            attack_libraries=tuple(sorted({k.split(":")[0] for k in ATTACKS.names()})),
            resolve_model=resolve_model,
        )


# ---------------------------------------------------------------------------- validation


class _Checker:
    """Field validators that raise ``ConfigError('<source>: field ...')``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, what: str, value: Any) -> ConfigError:
        return ConfigError(f"{self.source}: field '{path}' must be {what}, got {value!r}")

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {message}")

    def table(self, value: Any, path: str, allowed: Iterable[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, "a table", value)
        allowed = tuple(allowed)
        for key in value:
            if key not in allowed:
                where = f"in [{path}]" if path else "at the top level"
                full = f"{path}.{key}" if path else key
                hint = difflib.get_close_matches(key, allowed, n=1)
                suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise self.error(
                    f"unknown field {full!r}{suggestion}; allowed fields {where}: "
                    f"{', '.join(allowed)}"
                )
        return value

    def required(self, table: Mapping[str, Any], key: str, path: str) -> Any:
        if key not in table:
            raise self.error(f"field '{path}' is required")
        return table[key]

    def string(
        self,
        value: Any,
        path: str,
        *,
        pattern: re.Pattern[str] | None = None,
        what: str = "a non-empty string",
    ) -> str:
        if not isinstance(value, str) or not value or (pattern and not pattern.match(value)):
            raise self.fail(path, what, value)
        return value

    def choice(self, value: Any, path: str, choices: Collection[str]) -> str:
        if not isinstance(value, str) or value not in choices:
            raise self.fail(path, f"one of {', '.join(choices)}", value)
        return value

    def integer(self, value: Any, path: str, *, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise self.fail(path, what, value)
        return value

    def number(
        self,
        value: Any,
        path: str,
        *,
        low: float | None = None,
        low_open: bool = False,
        high: float | None = None,
        high_open: bool = False,
        what: str = "a number",
    ) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value_f = float(value)
            ok = math.isfinite(value_f)
            if ok and low is not None:
                ok = value_f > low if low_open else value_f >= low
            if ok and high is not None:
                ok = value_f < high if high_open else value_f <= high
        if not ok:
            raise self.fail(path, what, value)
        return float(value)

    def string_list(self, value: Any, path: str) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise self.fail(path, "a string or a non-empty list of strings", value)
        out = []
        for i, item in enumerate(items):
            out.append(self.string(item, f"{path}[{i}]" if isinstance(value, list) else path))
        if len(set(out)) != len(out):
            raise self.fail(path, "a list without duplicates", value)
        return tuple(out)

    def json_value(self, value: Any, path: str) -> Any:
        """A hyper-parameter value: string, boolean, finite number, or lists/tables of them."""
        if isinstance(value, bool | str | int):
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                raise self.fail(path, "a finite number", value)
            return value
        if isinstance(value, list):
            return [self.json_value(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {k: self.json_value(v, f"{path}.{k}") for k, v in value.items()}
        raise self.fail(path, "a string, boolean, number, or a list or table of them", value)


def _number_lists(
    chk: _Checker,
    threat: Mapping[str, Any],
    key: str,
    norms: tuple[str, ...],
    *,
    positive: bool,
    path: str | None = None,
) -> dict[str, list[float]]:
    """``radii``/``thresholds``/``eps`` (a list or a per-norm table) -> norm -> sorted list."""
    what = "a positive number" if positive else "a number >= 0"
    value = threat.get(key, [])
    path = path or f"threat.{key}"
    if isinstance(value, dict):
        chk.table(value, path, norms)
        per_norm = {n: (value.get(n, []), f"{path}.{n}") for n in norms}
    else:
        per_norm = {n: (value, path) for n in norms}
    out: dict[str, list[float]] = {}
    for norm, (items, p) in per_norm.items():
        if not isinstance(items, list):
            raise chk.fail(
                p,
                f"a list of numbers (each {what})"
                + ("" if isinstance(value, dict) else ", or a table per norm"),
                items,
            )
        nums = [
            chk.number(v, f"{p}[{i}]", low=0.0, low_open=positive, what=what)
            for i, v in enumerate(items)
        ]
        out[norm] = sorted(set(nums))
    return out


def _check_attack(
    chk: _Checker, path: str, library: str, name: str, params: dict[str, Any], norms: Iterable[str]
) -> None:
    """Validate the attack name, its parameters and its norms now, not after hours of
    training."""
    reserved = sorted(
        set(params) & {"defense", "library", "name", "norm", "eps", "seed", "batch_size"}
    )
    if reserved:
        raise chk.error(
            f"field '{path}.params' may not set {', '.join(reserved)}: the attack's library and "
            "name are fields of the attack table, and the norm, budgets and seed come from "
            "[threat] and seeds"
        )
    try:
        from attacks import describe_attack, get_attack
    except ImportError:  # attack libraries not installed: checked when the stage runs
        return
    try:
        describe_attack(library, name, **params)
        supported = get_attack(library, name).norms
    except ConfigError as exc:
        raise chk.error(f"[{path}]: {exc}") from None
    for norm in norms:
        if norm not in supported:
            raise chk.error(
                f"[{path}]: attack {library}:{name} does not support norm '{norm}' (it supports "
                f"{', '.join(supported)}); restrict it with norms = [...] or drop that norm"
            )


def _parse_attack(
    chk: _Checker,
    raw: Any,
    path: str,
    *,
    known: Known,
    norms: tuple[str, ...],
    eps: dict[str, list[float]],
) -> tuple[dict[str, Any], dict[str, list[float] | None], tuple[str, ...]]:
    """One attack table -> (its config, its budgets per norm (None = all), its norms)."""
    at = chk.table(raw, path, _ATTACK_FIELDS)
    library = at.get("library", "certbench")
    if known.attack_libraries is not None:
        library = chk.choice(library, f"{path}.library", known.attack_libraries)
    else:
        library = chk.string(library, f"{path}.library")
    aname = chk.string(chk.required(at, "name", f"{path}.name"), f"{path}.name")
    aparams_raw = at.get("params", {})
    if not isinstance(aparams_raw, dict):
        raise chk.fail(f"{path}.params", "a table of attack parameters", aparams_raw)
    aparams = {k: chk.json_value(v, f"{path}.params.{k}") for k, v in aparams_raw.items()}
    alimit = at.get("limit")
    if alimit is not None:
        alimit = chk.integer(alimit, f"{path}.limit", minimum=1)
    anorms = norms
    if "norms" in at:
        anorms = chk.string_list(at["norms"], f"{path}.norms")
        for i, n in enumerate(anorms):
            if n not in norms:
                raise chk.fail(
                    f"{path}.norms[{i}]", f"one of the threat norms ({', '.join(norms)})", n
                )
    budgets: dict[str, list[float] | None] = dict.fromkeys(anorms)
    if "eps" in at:
        own = _number_lists(
            chk, {"eps": at["eps"]}, "eps", anorms, positive=True, path=f"{path}.eps"
        )
        for n in anorms:
            extra = sorted(set(own[n]) - set(eps[n]))
            if extra:
                raise chk.error(
                    f"field '{path}.eps' has budget(s) {extra} for norm '{n}' that are not in "
                    f"threat.eps ({eps[n]}); an attack runs at a subset of the board's budgets"
                )
            budgets[n] = own[n]
    _check_attack(chk, path, library, aname, aparams, anorms)
    config = {"library": library, "name": aname, "params": aparams, "limit": alimit}
    if "defenses" in at:  # checked against the [[defenses]] entries once they are parsed
        config["defenses"] = list(chk.string_list(at["defenses"], f"{path}.defenses"))
    return config, budgets, anorms


def _resolve_train(chk: _Checker, table: Any, path: str) -> dict[str, Any]:
    """Validate a ``[train]`` table; returns only the keys it sets."""
    if table is None:
        return {}
    chk.table(table, path, TRAIN_FIELDS)
    out: dict[str, Any] = {}
    for key, value in table.items():
        p = f"{path}.{key}"
        if key == "epochs":
            out[key] = chk.integer(value, p, minimum=0)
        elif key == "batch_size":
            out[key] = chk.integer(value, p, minimum=1)
        elif key == "optimizer":
            out[key] = chk.choice(value, p, OPTIMIZERS)
        elif key == "lr":
            out[key] = chk.number(value, p, low=0.0, low_open=True, what="a positive number")
        elif key == "momentum":
            out[key] = chk.number(
                value, p, low=0.0, high=1.0, high_open=True, what="a number in [0, 1)"
            )
        elif key == "weight_decay":
            out[key] = chk.number(value, p, low=0.0, what="a number >= 0")
    return out


def _check_defense_params(
    chk: _Checker, cls: type, params: dict[str, Any], path: str, name: str
) -> None:
    """Instantiate the defense (``__init__`` only stores and checks its keyword
    hyper-parameters) so that invalid values fail when the spec is loaded."""
    try:
        cls(**params)
    except (ValueError, TypeError, ConfigError) as exc:
        shown = json.dumps(params, sort_keys=True)
        raise chk.error(f"field '{path}' is invalid for defense '{name}' ({shown}): {exc}") from exc


def _parse_defense(
    chk: _Checker,
    raw: Any,
    index: int,
    *,
    default_models: tuple[str, ...],
    global_train: dict[str, Any],
    known: Known,
    base_dir: Path | None = None,
) -> DefenseEntry:
    path = f"defenses[{index}]"
    table = chk.table(raw, path, _DEFENSE_FIELDS)
    name = chk.string(chk.required(table, "name", f"{path}.name"), f"{path}.name")
    cls = None
    if known.defenses is not None:
        if name not in known.defenses:
            names = ", ".join(sorted(known.defenses)) or "none"
            raise chk.fail(f"{path}.name", f"a registered defense (known defenses: {names})", name)
        cls = known.defenses[name]

    models = default_models
    if "model" in table:
        models = chk.string_list(table["model"], f"{path}.model")
    if known.models is not None:
        for i, m in enumerate(models):
            p = f"{path}.model" if "model" in table else "data.model"
            p = p if len(models) == 1 else f"{p}[{i}]"
            if m in known.models:
                continue
            if ":" not in m:
                raise chk.fail(
                    p,
                    f"a known model ({', '.join(known.models)}) or an import path "
                    "'package.module:Class'",
                    m,
                )
            if known.resolve_model is not None:
                try:
                    known.resolve_model(m)
                except ConfigError as exc:
                    raise chk.error(f"field '{p}': {exc}") from None

    label = None
    if "label" in table:
        label = chk.string(table["label"], f"{path}.label")

    params_raw = table.get("params", {})
    if not isinstance(params_raw, dict):
        raise chk.fail(f"{path}.params", "a table of hyper-parameters", params_raw)
    params = {k: chk.json_value(v, f"{path}.params.{k}") for k, v in params_raw.items()}

    grid_raw = table.get("grid", {})
    if not isinstance(grid_raw, dict):
        raise chk.fail(f"{path}.grid", "a table of parameter lists", grid_raw)
    grid: dict[str, list[Any]] = {}
    for key, values in grid_raw.items():
        p = f"{path}.grid.{key}"
        if key in params:
            raise chk.error(f"field '{p}' is also set in '{path}.params'; set it in one place")
        if not isinstance(values, list) or not values:
            raise chk.fail(p, "a non-empty list of values", values)
        vals = [chk.json_value(v, f"{p}[{i}]") for i, v in enumerate(values)]
        canon = [json.dumps(v, sort_keys=True) for v in vals]
        if len(set(canon)) != len(canon):
            raise chk.fail(p, "a list without duplicates", values)
        grid[key] = vals

    if cls is not None:
        allowed = list(cls.param_names())
        for section, keys in (("params", params), ("grid", grid)):
            for key in keys:
                if key not in allowed:
                    raise chk.error(
                        f"field '{path}.{section}.{key}' is not a parameter of defense "
                        f"'{name}'; allowed: {', '.join(allowed) or '(none)'}"
                    )

    overrides = _resolve_train(chk, table.get("train"), f"{path}.train")
    checkpoint = sha = None
    if "checkpoint" in table:
        from bench.weights import find_weights, sha256_file

        if "train" in table:
            raise chk.error(
                f"fields '{path}.checkpoint' and '{path}.train' are both set: a row with "
                "pretrained weights is not trained; remove one"
            )
        given = chk.string(table["checkpoint"], f"{path}.checkpoint")
        try:
            found = find_weights(given, base=base_dir, what=f"field '{path}.checkpoint'")
            sha = sha256_file(found)
        except CertbenchError as exc:
            raise chk.error(str(exc)) from None
        checkpoint = str(found)
        train: dict[str, Any] = {}  # [train] does not apply: nothing is trained
    else:
        train = {**global_train, **overrides}
        if train.get("epochs") == 0:
            where = f"{path}.train.epochs" if "epochs" in overrides else "train.epochs"
            raise chk.error(
                f"field '{where}' is 0 but defenses[{index}] ('{name}') has no checkpoint: it "
                "would score an untrained network; set epochs >= 1, or give its weights with "
                'checkpoint = "path.safetensors" (or a .pth state dict)'
            )
    points = []
    keys = list(grid)
    for combo in itertools.product(*(grid[k] for k in keys)):
        point = dict(params)
        point.update(zip(keys, combo, strict=True))
        if cls is not None:
            where = f"{path}.params" if not keys else f"{path}.params/grid"
            _check_defense_params(chk, cls, point, where, name)
        points.append((point, dict(train)))
    return DefenseEntry(
        index=index,
        name=name,
        models=models,
        label=label,
        params=params,
        grid=grid,
        points=tuple(points),
        checkpoint=checkpoint,
        weights_sha256=sha,
    )


def parse_spec(
    data: Mapping[str, Any],
    source: str = "<spec>",
    *,
    known: Known | None = None,
    base_dir: str | Path | None = None,
) -> Spec:
    """Validate a spec already parsed from TOML (``source`` names it in error messages).

    ``known`` lists valid dataset, model and defense names; by default the live registries
    (:meth:`Known.discover`). ``base_dir``: what a relative ``checkpoint`` is relative to
    (the spec file's directory; default: the current directory). Raises
    :class:`ConfigError` on the first mistake.
    """
    chk = _Checker(source)
    top = chk.table(dict(data), "", _TOP_FIELDS)
    if known is None:
        known = Known.discover()

    name = chk.string(
        chk.required(top, "name", "name"),
        "name",
        pattern=_NAME_RE,
        what="a name of letters, digits, '_' and '-'",
    )

    seeds_raw = top.get("seeds", [0])
    seeds_list = (
        [seeds_raw] if isinstance(seeds_raw, int) and not isinstance(seeds_raw, bool) else seeds_raw
    )
    if not isinstance(seeds_list, list) or not seeds_list:
        raise chk.fail("seeds", "a non-empty list of integers >= 0", seeds_raw)
    seeds = tuple(chk.integer(s, f"seeds[{i}]", minimum=0) for i, s in enumerate(seeds_list))
    if len(set(seeds)) != len(seeds):
        raise chk.fail("seeds", "a list without duplicates", seeds_raw)

    device = top.get("device", "auto")
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise chk.fail("device", f"one of {DEVICES}", device)

    store = top.get("store")
    if store is not None:
        store = chk.string(store, "store")

    # [data]
    data_t = chk.table(chk.required(top, "data", "data"), "data", _DATA_FIELDS)
    datasets = chk.string_list(chk.required(data_t, "dataset", "data.dataset"), "data.dataset")
    if known.datasets is not None:
        for i, ds in enumerate(datasets):
            if ds not in known.datasets:
                p = "data.dataset" if isinstance(data_t["dataset"], str) else f"data.dataset[{i}]"
                raise chk.fail(p, f"one of {', '.join(known.datasets)}", ds)
    data_dirs: dict[str, str | None] = dict.fromkeys(datasets)
    if "data_dir" in data_t:
        dd = data_t["data_dir"]
        if isinstance(dd, dict):
            chk.table(dd, "data.data_dir", datasets)
            for ds, d in dd.items():
                data_dirs[ds] = chk.string(d, f"data.data_dir.{ds}")
        elif len(datasets) == 1:
            data_dirs[datasets[0]] = chk.string(dd, "data.data_dir")
        else:
            raise chk.fail(
                "data.data_dir", "a table {dataset = dir} when several datasets are listed", dd
            )
    limit_train = data_t.get("limit_train")
    if limit_train is not None:
        limit_train = chk.integer(limit_train, "data.limit_train", minimum=1)
    limit_test = data_t.get("limit_test")
    if limit_test is not None:
        limit_test = chk.integer(limit_test, "data.limit_test", minimum=1)
    default_models = (DEFAULT_MODEL,)
    if "model" in data_t:
        default_models = chk.string_list(data_t["model"], "data.model")

    # [train], [eval]
    global_train = _resolve_train(chk, top.get("train"), "train")
    eval_t = chk.table(top.get("eval", {}), "eval", _EVAL_FIELDS)
    eval_cfg = dict(DEFAULT_EVAL)
    if "batch_size" in eval_t:
        eval_cfg["batch_size"] = chk.integer(eval_t["batch_size"], "eval.batch_size", minimum=1)
    if "alpha" in eval_t:
        eval_cfg["alpha"] = chk.number(
            eval_t["alpha"],
            "eval.alpha",
            low=0.0,
            low_open=True,
            high=1.0,
            high_open=True,
            what="a number in (0, 1)",
        )

    # [threat]
    threat_t = chk.table(top.get("threat", {}), "threat", _THREAT_FIELDS)
    if "norm" in threat_t and "norms" in threat_t:
        raise chk.error("fields 'threat.norm' and 'threat.norms' are both set; use one")
    if "norm" in threat_t:
        norms = (chk.choice(threat_t["norm"], "threat.norm", NORMS),)
    else:
        norms_raw = threat_t.get("norms", ["l2"])
        if not isinstance(norms_raw, list) or not norms_raw:
            raise chk.fail("threat.norms", f"a non-empty list of {', '.join(NORMS)}", norms_raw)
        norms = tuple(chk.choice(n, f"threat.norms[{i}]", NORMS) for i, n in enumerate(norms_raw))
        if len(set(norms)) != len(norms):
            raise chk.fail("threat.norms", "a list without duplicates", norms_raw)
    radii = _number_lists(chk, threat_t, "radii", norms, positive=False)
    thresholds = _number_lists(chk, threat_t, "thresholds", norms, positive=True)
    eps = _number_lists(chk, threat_t, "eps", norms, positive=True)
    threat = {n: {"radii": radii[n], "thresholds": thresholds[n], "eps": eps[n]} for n in norms}

    # [attack] or [[attacks]] (an ensemble)
    attack: dict[str, Any] | None = None
    attack_tables: list[tuple[dict[str, Any], str]] = []  # (config, path), to check later
    if "attack" in top and "attacks" in top:
        raise chk.error("fields 'attack' and 'attacks' are both set; use [attack] or [[attacks]]")
    if "attack" in top or "attacks" in top:
        if "attack" in top:
            tables, paths = [top["attack"]], ["attack"]
        else:
            raw = top["attacks"]
            if not isinstance(raw, list) or not raw:
                raise chk.fail("attacks", "a non-empty array of tables ([[attacks]])", raw)
            tables, paths = raw, [f"attacks[{i}]" for i in range(len(raw))]
        parsed = [
            _parse_attack(chk, t, p, known=known, norms=norms, eps=eps)
            for t, p in zip(tables, paths, strict=True)
        ]
        attack_tables = [(cfg, p) for (cfg, _, _), p in zip(parsed, paths, strict=True)]
        plain = "attack" in top and all(
            k not in top["attack"] for k in ("eps", "norms", "defenses")
        )  # one [attack] table as before: its cells keep the config (and identity) of old
        attack = {}
        for n in norms:
            applies = [(cfg, b[n]) for cfg, b, an in parsed if n in an]
            if not applies:
                continue
            if not eps[n]:
                p = "threat.eps" if not isinstance(threat_t.get("eps"), dict) else f"threat.eps.{n}"
                raise chk.error(
                    f"field '{p}' must list at least one attack budget for norm '{n}' "
                    "when [attack] or [[attacks]] is given"
                )
            if plain:
                attack[n] = applies[0][0]
            else:
                attack[n] = [{**cfg, "eps": budgets} for cfg, budgets in applies]
        attack = attack or None

    # headline budgets: where the board shows its robust-accuracy interval
    if "headline" in threat_t:
        hv = threat_t["headline"]
        if isinstance(hv, dict):
            chk.table(hv, "threat.headline", norms)
            heads = {n: (hv[n], f"threat.headline.{n}") for n in norms if n in hv}
        else:
            heads = {n: (hv, "threat.headline") for n in norms}
        for n, (value, p) in heads.items():
            h = chk.number(value, p, low=0.0, low_open=True, what="a positive number")
            if attack and n in attack and h not in eps[n]:
                raise chk.error(
                    f"field '{p}' = {h:g} must be one of the attack budgets threat.eps for "
                    f"norm '{n}' ({eps[n]})"
                )
            threat[n]["headline"] = h
            if h not in threat[n]["radii"]:  # the certified end of the interval
                threat[n]["radii"] = sorted([*threat[n]["radii"], h])

    # [[defenses]]
    defenses_raw = chk.required(top, "defenses", "defenses")
    if not isinstance(defenses_raw, list) or not defenses_raw:
        raise chk.fail("defenses", "a non-empty array of tables ([[defenses]])", defenses_raw)
    entries = tuple(
        _parse_defense(
            chk,
            raw,
            i,
            default_models=default_models,
            global_train=global_train,
            known=known,
            base_dir=None if base_dir is None else Path(base_dir),
        )
        for i, raw in enumerate(defenses_raw)
    )
    _check_attack_defenses(chk, attack_tables, entries)

    spec = Spec(
        name=name,
        source=source,
        seeds=seeds,
        device=device,
        store=store,
        datasets=datasets,
        data_dirs=data_dirs,
        limit_train=limit_train,
        limit_test=limit_test,
        norms=norms,
        eval=eval_cfg,
        threat=threat,
        attack=attack,
        defenses=entries,
    )
    _check_duplicates(chk, spec)
    return spec


def _check_attack_defenses(
    chk: _Checker,
    tables: list[tuple[dict[str, Any], str]],
    entries: tuple[DefenseEntry, ...],
) -> None:
    """Every name in an attack's ``defenses`` must name or label a ``[[defenses]]`` entry."""
    allowed = sorted(set().union(*(_entry_names(e) for e in entries)))
    for cfg, path in tables:
        for j, name in enumerate(cfg.get("defenses") or []):
            if name not in allowed:
                raise chk.fail(
                    f"{path}.defenses[{j}]",
                    f"the name or label of a [[defenses]] entry ({', '.join(allowed)})",
                    name,
                )


def _entry_names(entry: DefenseEntry) -> set[str]:
    """What an attack's ``defenses`` list may call ``entry`` by: its name and its label."""
    return {entry.name} | ({entry.label} if entry.label else set())


def _entry_attack(attack: Any, entry: DefenseEntry) -> Any:
    """A norm's attack config as one entry's cells see it: the ensemble's attacks whose
    ``defenses`` list (when given) names or labels the entry, without that list (so a cell's
    identity depends only on the attacks it runs); ``None`` when none applies."""
    if not isinstance(attack, list):
        return attack
    kept = [
        {k: v for k, v in t.items() if k != "defenses"}
        for t in attack
        if t.get("defenses") is None or _entry_names(entry) & set(t["defenses"])
    ]
    return kept or None


def _check_duplicates(chk: _Checker, spec: Spec) -> None:
    seen: dict[str, int] = {}
    per_entry = len(spec.norms) * len(spec.seeds)
    cells = spec.cells()
    # Recover which [[defenses]] entry produced each cell from the expansion order.
    owners: list[int] = []
    for _ in spec.datasets:
        for entry in spec.defenses:
            owners.extend([entry.index] * (len(entry.models) * len(entry.points) * per_entry))
    for cell, owner in zip(cells, owners, strict=True):
        cid = cell.cell_id()
        if cid in seen:
            first = seen[cid]
            where = (
                f"defenses[{first}] and defenses[{owner}]"
                if first != owner
                else f"defenses[{owner}]"
            )
            raise chk.error(
                f"{where} describe the same experiment twice (defense '{cell.defense}', model "
                f"'{cell.model}', params {json.dumps(cell.params, sort_keys=True)}); "
                "remove one or change its params"
            )
        seen[cid] = owner


def load_spec(path: str | Path, *, known: Known | None = None) -> Spec:
    """Read and validate the TOML spec at ``path`` (errors name the file and line/field)."""
    p = Path(path)
    return parse_spec(read_spec(p), str(p), known=known, base_dir=p.parent)


def read_spec(path: str | Path) -> dict[str, Any]:
    """The TOML of the spec file at ``path``, not yet validated (a missing file, non-UTF-8
    text or a TOML syntax error raises :class:`ConfigError` naming the file)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: spec file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a directory, expected a TOML spec file") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read spec: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: spec is not UTF-8 text (byte {exc.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    return data
