"""The Python API: benchmark a model you bring, in one call (``bench.evaluate``).

::

    import bench

    rows = bench.evaluate(net, dataset="digits", defense="randomized-smoothing",
                          params={"sigma": 0.25, "n": 1000}, norms="l2",
                          radii=[0.25, 0.5], eps=[0.5], limit=200)
    board = pandas.read_csv("leaderboards/digits-l2.csv")
    pandas.concat([board, rows])            # the same columns, the same numbers' meaning

``evaluate`` is ``certbench run`` for one model object: the arguments become a one-row spec
(validated by :func:`bench.spec.parse_spec`, so a mistake is reported as in a spec file,
e.g. ``bench.evaluate: field 'threat.eps[0]' must be a positive number, got -1``: the
argument ``eps`` is the spec's ``threat.eps``, ``params`` is ``defenses[0].params``, ``limit``
is ``data.limit_test``), each of its cells (one per norm) runs through the pipeline
(:func:`bench.pipeline.evaluate_cell`: predict or certify, attack, re-score, metrics), and the
rows are written and read back by :func:`bench.leaderboard.publish`, exactly as a published
board. Nothing is trained: the model is scored as given (a pretrained cell), under the
defense, which wraps it (a noise layer, smoothing) or refuses it with one line saying why.
A spec row naming the same class by import path with the same weights
(``model = "pkg.mod:Class"``, ``checkpoint = "weights.safetensors"``) gives the same numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.errors import CertbenchError, ConfigError

if TYPE_CHECKING:
    import pandas as pd
    from torch import nn

__all__ = ["evaluate"]

SOURCE = "bench.evaluate"
"""How argument errors name their source (as a spec file's path would)."""

Numbers = Sequence[float] | Mapping[str, Sequence[float]]
AttackSpec = str | Mapping[str, Any]


def model_name(model: nn.Module) -> str:
    """The import path of ``model``'s class, ``"module:QualifiedName"`` (how a spec names it)."""
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 of ``model``'s state dict serialised as safetensors: the hash of the file
    ``safetensors.torch.save_file(model.state_dict(), path)`` writes."""
    from safetensors.torch import save

    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    return hashlib.sha256(save(state)).hexdigest()


def _attack_table(attack: AttackSpec) -> dict[str, Any]:
    """``"library:name"`` or a spec attack table -> a spec attack table."""
    if isinstance(attack, str):
        library, sep, name = attack.partition(":")
        if not sep or not library or not name:
            raise ConfigError(
                f"{SOURCE}: attack {attack!r} must be 'library:name' (e.g. 'certbench:pgd', "
                "'autoattack:rand') or a table {'library', 'name', 'params', 'limit'}"
            )
        return {"library": library, "name": name}
    if isinstance(attack, Mapping):
        return dict(attack)
    raise ConfigError(
        f"{SOURCE}: each attack must be 'library:name' or a table of attack fields, got {attack!r}"
    )


def _plain(value: Any) -> Any:
    """Sequences and mappings of arguments as the lists and dicts a TOML spec holds."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _spec_data(
    name: str,
    *,
    dataset: str,
    data_dir: str | Path | None,
    limit: int | None,
    defense: str,
    params: Mapping[str, Any] | None,
    norms: str | Sequence[str],
    radii: Numbers,
    thresholds: Numbers,
    eps: Numbers,
    headline: float | Mapping[str, float] | None,
    attacks: AttackSpec | Sequence[AttackSpec] | None,
    seed: int,
    device: str,
    alpha: float | None,
    batch_size: int | None,
) -> dict[str, Any]:
    """The one-row spec the arguments describe (module docstring)."""
    data: dict[str, Any] = {"dataset": dataset, "model": name}
    if data_dir is not None:
        data["data_dir"] = str(data_dir)
    if limit is not None:
        data["limit_test"] = limit
    threat: dict[str, Any] = {
        "norm" if isinstance(norms, str) else "norms": _plain(norms),
        "radii": _plain(radii),
        "thresholds": _plain(thresholds),
        "eps": _plain(eps),
    }
    if headline is not None:
        threat["headline"] = _plain(headline)
    eval_t: dict[str, Any] = {}
    if alpha is not None:
        eval_t["alpha"] = alpha
    if batch_size is not None:
        eval_t["batch_size"] = batch_size
    spec: dict[str, Any] = {
        "name": "evaluate",
        "seeds": [seed],
        "device": device,
        "data": data,
        "eval": eval_t,
        "threat": threat,
        "defenses": [{"name": defense, "params": _plain(dict(params or {}))}],
    }
    budgets = eps.values() if isinstance(eps, Mapping) else [eps]
    if attacks and any(len(b) for b in budgets):
        items = [attacks] if isinstance(attacks, (str, Mapping)) else list(attacks)
        tables = [_plain(_attack_table(a)) for a in items]
        if len(tables) == 1:
            spec["attack"] = tables[0]
        elif tables:
            spec["attacks"] = tables
    return spec


def evaluate(
    model: nn.Module,
    *,
    dataset: str,
    defense: str = "undefended",
    params: Mapping[str, Any] | None = None,
    norms: str | Sequence[str] = ("l2",),
    radii: Numbers = (),
    thresholds: Numbers = (),
    eps: Numbers = (),
    attacks: AttackSpec | Sequence[AttackSpec] | None = "certbench:pgd",
    headline: float | Mapping[str, float] | None = None,
    limit: int | None = None,
    seed: int = 0,
    device: str = "auto",
    data_dir: str | Path | None = None,
    alpha: float | None = None,
    batch_size: int | None = None,
    name: str | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Benchmark ``model`` under ``defense`` on ``dataset``'s test set; one board row per norm.

    Args:
        model: any ``nn.Module`` mapping ``(N, C, H, W)`` inputs with pixels in [0, 1] (no
            normalisation applied; normalise inside the model) to ``(N, K)`` logits, with the
            dataset's input shape and class count. It is copied, never modified or trained.
        dataset: a registered dataset (``"digits"``, ``"fashion-mnist"``, ...); its test
            split only is read (``data_dir``: its directory, default the standard location).
        defense: a registered defense; it wraps ``model`` (e.g. ``randomized-smoothing``
            smooths it as its base classifier) or raises :class:`ConfigError` saying why it
            cannot (``wong-kolter`` needs an ``nn.Sequential`` of supported layers).
        params: the defense's hyper-parameters (``certbench defenses show NAME``).
        norms: ``"l1"``, ``"l2"``, ``"linf"`` or a list of them.
        radii: guaranteed-accuracy radii (input units, >= 0): a list, or a dict per norm.
        thresholds: robust-precision/coverage thresholds T (> 0), likewise.
        eps: attack budgets (> 0), likewise; empty = no attack stage.
        attacks: the attack, ``"library:name"`` (default ``"certbench:pgd"``, expectation over
            noise for randomized defenses) or a spec attack table (``{"library", "name",
            "params", "limit", ...}``), or a list of them (an ensemble: accuracy under attack
            is the per-example worst case). ``None``: no attack.
        headline: the budget of the robust-accuracy interval (a number or a dict per norm).
        limit: evaluate the first ``limit`` test examples only.
        seed: fixes every noise draw and attack start (per example, so results do not depend
            on batch size).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        alpha: the confidence parameter recorded with the results (spec ``eval.alpha``).
        batch_size: forward-pass batch for Monte Carlo (spec ``eval.batch_size``).
        name: the ``model`` column (default: the class's import path, ``"module:Class"``).
        progress: show progress bars.

    Returns:
        A ``pandas.DataFrame`` with the columns of a published board
        (``leaderboards/<dataset>-<norm>.csv``: ``rank, defense, model, params, accuracy, …,
        guaranteed_accuracy@<r>…, accuracy_under_attack@<eps>…, …, created_at``; ``rank`` is
        1, re-rank after concatenating), read back from CSV as a board is, plus ``dataset``
        and ``norm``; one row per norm. ``train_seconds`` is empty (nothing was trained).

    Raises:
        ConfigError: a bad argument (named as its spec field), a defense that cannot wrap the
            model, or a model whose output does not fit the dataset.
    """
    import pandas as pd
    from torch import nn

    from bench.assembly import build_defense
    from bench.environment import configure_threads, resolve_device, seed_everything
    from bench.leaderboard import publish
    from bench.pipeline import dataset_for, evaluate_cells
    from bench.spec import Known, parse_spec
    from bench.store import Store

    if not isinstance(model, nn.Module):
        raise ConfigError(f"{SOURCE}: model must be a torch nn.Module, got {type(model).__name__}")
    label = name or model_name(model)
    data = _spec_data(
        label,
        dataset=dataset,
        data_dir=data_dir,
        limit=limit,
        defense=defense,
        params=params,
        norms=norms,
        radii=radii,
        thresholds=thresholds,
        eps=eps,
        headline=headline,
        attacks=attacks,
        seed=seed,
        device=device,
        alpha=alpha,
        batch_size=batch_size,
    )
    known = dataclasses.replace(Known.discover(), models=None)  # the model is an object
    spec = parse_spec(data, SOURCE, known=known)
    sha = weights_sha256(model)
    cells = [dataclasses.replace(c, weights_sha256=sha) for c in spec.cells()]
    dev = resolve_device(device)
    configure_threads()  # the thread policy of in-process work: threads = cores free now
    _check_output(model, dataset_for(cells[0]), dev)  # every cell reads the same test split
    with tempfile.TemporaryDirectory(prefix="certbench-evaluate-") as tmp:
        store = Store(Path(tmp) / "evaluate.sqlite")
        pairs = []
        for cell in cells:
            ds = dataset_for(cell)
            seed_everything(cell.seed)
            try:
                d = build_defense(
                    cell.defense,
                    dict(cell.params),
                    model,
                    input_shape=ds.input_shape,
                    num_classes=ds.num_classes,
                    device=dev,
                )
            except CertbenchError as exc:
                raise ConfigError(
                    f"{SOURCE}: defense {defense!r} cannot wrap {type(model).__name__}: {exc}"
                ) from None
            pairs.append((d, cell))
        # cells whose clean certificate is one computation (e.g. PixelDP's norms) share it
        for cell, result in zip(
            cells, evaluate_cells(pairs, train_seconds=None, progress=progress), strict=True
        ):
            store.put(cell, result)
        boards = publish(store, Path(tmp) / "boards")[:-1]  # the last one is results.csv
        # publish writes one board per (dataset, norm), in that order: one cell each here
        ordered = sorted(cells, key=lambda c: (c.dataset, c.norm))
        frames = [
            pd.read_csv(path).assign(dataset=cell.dataset, norm=cell.norm)
            for path, cell in zip(boards, ordered, strict=True)
        ]
    return pd.concat(frames, ignore_index=True)


def _check_output(model: nn.Module, ds, device) -> None:
    """One line, not a shape error deep in the pipeline, when ``model`` does not fit ``ds``."""
    import copy

    import torch

    probe = copy.deepcopy(model).to(device).eval()
    x = ds.x_test[:1].to(device)
    try:
        with torch.no_grad():
            out = probe(x)
    except Exception as exc:
        msg = " ".join(str(exc).split())
        raise ConfigError(
            f"{SOURCE}: the model fails on a {tuple(x.shape)} input in [0, 1] of dataset "
            f"{ds.name!r}: {type(exc).__name__}: {msg}"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, ds.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"{SOURCE}: the model maps a {tuple(x.shape)} input to {shape}; expected logits "
            f"of shape (1, {ds.num_classes}) for this dataset's {ds.num_classes} classes"
        )
