"""The ``certbench`` command line.

Commands: ``run`` (a benchmark spec), ``train``, ``eval``, ``certify``, ``attack``,
``defenses list|show``, ``attacks list``, ``leaderboard publish|site``, ``plot``. Shared
options have one spelling everywhere (``--dataset``, ``--data-dir``, ``--model``,
``--checkpoint``, ``--defense``, ``--norm``, ``--eps``, ``--limit``, ``--seed``, ``--device``,
``--batch-size``). Results print as a short table and, with ``--output FILE``, are written as
JSON. Every error is one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from bench.allocator import tune_malloc
from bench.errors import CertbenchError, ConfigError
from bench.interrupts import deferred, forget_handled_interrupt
from bench.metrics import metric_key

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
_TORCH_COMMANDS = frozenset({"run", "train", "eval", "certify", "attack", "defenses", "attacks"})
"""Commands that import torch and the defense plugins (done up front, interrupts held)."""
DEFAULT_STORE = "runs/certbench.sqlite"


# --------------------------------------------------------------------------- helpers


def _parse_param(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE a TOML literal (numbers, booleans, strings, lists)."""
    if "=" not in text:
        raise ConfigError(f"--param {text!r} must look like KEY=VALUE (e.g. sigma=0.25)")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string: --param mechanism=laplace
    return key, value


def _params(items: Sequence[str] | None) -> dict[str, Any]:
    return dict(_parse_param(t) for t in (items or []))


def _print_table(rows: list[dict[str, Any]], *, file=None) -> None:
    """Rows as aligned columns; the columns are the union of every row's keys, in order of
    first appearance (rows of different boards have different metric columns)."""
    file = file if file is not None else sys.stdout
    if not rows:
        print("(no rows)", file=file)
        return
    cols = list(dict.fromkeys(c for r in rows for c in r))
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)), file=file)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _write_output(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    from bench.files import atomic_write_bytes

    atomic_write_bytes(Path(path), json.dumps(payload, indent=2, sort_keys=True).encode())
    print(f"wrote {path}", file=sys.stderr)


def _dataset(args: argparse.Namespace, *, train: bool = True):
    """The dataset of ``--dataset``/``--data-dir``; ``train=False`` reads only the test files
    (evaluating a checkpoint needs no training data)."""
    from bench.data import load_dataset

    return load_dataset(
        args.dataset,
        args.data_dir,
        limit_train=getattr(args, "limit_train", None),
        limit_test=getattr(args, "limit", None),
        train=train,
    )


def _positive_int(text: str) -> int:
    from bench.validation import check_int

    try:
        return check_int(int(text), "value", minimum=1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None


def _nonneg_float(text: str) -> float:
    from bench.validation import check_number

    try:
        return check_number(float(text), "value", low=0.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None


def _load_for_eval(args: argparse.Namespace, ds):
    """A set-up defense from --checkpoint (certbench or plain .pth) or, without one, an error."""
    from bench.assembly import load_defense
    from bench.environment import configure_threads, resolve_device

    configure_threads()
    device = resolve_device(args.device)
    if not args.checkpoint:
        raise ConfigError("--checkpoint is required")
    return load_defense(
        args.checkpoint,
        device=device,
        input_shape=ds.input_shape,
        num_classes=ds.num_classes,
        defense=args.defense,
        params=_params(args.param),
        model=args.model,
    )


# --------------------------------------------------------------------------- commands


def _check_run(args: argparse.Namespace) -> None:
    """Before torch is imported: the spec file exists and is TOML (an error answers at once)."""
    from bench.spec import read_spec

    read_spec(args.spec)


def cmd_run(args: argparse.Namespace) -> int:
    import dataclasses

    from bench.executors import run_spec
    from bench.spec import load_spec

    spec = load_spec(args.spec)
    if args.limit is not None:  # the first N test examples: other cells than the full spec's
        spec = dataclasses.replace(spec, limit_test=min(args.limit, spec.limit_test or args.limit))
    store_path = args.store or spec.store or DEFAULT_STORE
    if args.executor == "ray":
        if args.jobs is not None:
            raise ConfigError("--jobs is for the local executor; Ray runs a task per free CPU")
        options: dict[str, Any] = {"address": args.address}
    else:
        options = {"jobs": args.jobs}
    summary = run_spec(
        spec,
        store_path,
        executor=args.executor,
        device=args.device,
        force=args.force,
        progress=not args.quiet,
        # the spec as written decides its board's cells; a --limit run adds others beside them
        detach_stale=args.limit is None,
        **options,
    )
    _print_table(summary["rows"])
    failed = summary.pop("failed", [])
    print(
        f"{summary['ran']} cell(s) run, {summary['skipped']} already stored; "
        f"store: {store_path} ({time.perf_counter() - args._t0:.1f} s)",
        file=sys.stderr,
    )
    if summary.get("detached"):
        print(
            f"{summary['detached']} stored cell(s) of spec '{spec.name}' are no longer in it "
            "(the spec was edited): they leave its boards and stay in the store",
            file=sys.stderr,
        )
    _write_output(args.output, summary)
    if failed:
        raise CertbenchError(
            f"{len(failed)} cell(s) failed: {'; '.join(str(f) for f in failed)}; "
            "re-run to compute them"
        )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from bench.assembly import build_defense
    from bench.environment import (
        configure_threads,
        resolve_device,
        seed_everything,
        training_threads,
    )
    from bench.metrics import accuracy
    from bench.pipeline import fit, predict_all
    from bench.training import TrainSettings

    configure_threads(training_threads())  # the checkpoint `certbench run` would train
    ds = _dataset(args)
    if args.epochs == 0:  # after the data: a bad data directory is the first thing to hear
        raise ConfigError(
            "--epochs 0 trains nothing: the checkpoint would hold a randomly initialised "
            "network; evaluate your own weights with `certbench eval --checkpoint FILE`"
        )
    seed_everything(args.seed)
    d = build_defense(
        args.defense,
        _params(args.param),
        args.model,
        input_shape=ds.input_shape,
        num_classes=ds.num_classes,
        device=resolve_device(args.device),
    )
    overrides = {
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "optimizer": args.optimizer,
    }
    settings = TrainSettings.for_defense(d, overrides)
    report = fit(
        d,
        ds.x_train,
        ds.y_train,
        settings,
        seed=args.seed,
        checkpoint=args.out,
        model=args.model,
        dataset=args.dataset,
        progress=not args.quiet,
    )
    pred = predict_all(d, ds.x_test, seed=args.seed)
    row = {
        "defense": d.name,
        "model": args.model,
        "dataset": args.dataset,
        "epochs": settings.epochs,
        "final_loss": report.final_loss,
        "test_accuracy": accuracy(pred, ds.y_test),
        "train_seconds": report.seconds,
        "checkpoint": str(args.out),
    }
    _print_table([row])
    _write_output(args.output, row)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from bench.metrics import accuracy
    from bench.pipeline import predict_all

    ds = _dataset(args, train=False)
    d, record = _load_for_eval(args, ds)
    t0 = time.perf_counter()
    pred = predict_all(
        d, ds.x_test, seed=args.seed, batch_size=args.batch_size, progress=not args.quiet
    )
    row = {
        "dataset": args.dataset,
        "model": record.get("model", args.model),
        "defense": d.name,
        "n_test": int(ds.y_test.numel()),
        "accuracy": accuracy(pred, ds.y_test),
        "eval_seconds": time.perf_counter() - t0,
    }
    _print_table([row])
    _write_output(args.output, row)
    return 0


def cmd_certify(args: argparse.Namespace) -> int:
    from bench.metrics import MetricSet
    from bench.pipeline import certify_all

    ds = _dataset(args, train=False)
    d, record = _load_for_eval(args, ds)
    if args.norm not in d.certifies:
        raise ConfigError(
            f"defense {d.name!r} certifies {list(d.certifies) or 'nothing'}, not --norm {args.norm}"
        )
    eps = args.eps if args.eps is not None else 0.0
    t0 = time.perf_counter()
    cert = certify_all(
        d,
        ds.x_test,
        norm=args.norm,
        seed=args.seed,
        radii=[eps],
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    seconds = time.perf_counter() - t0
    y = ds.y_test
    ms = MetricSet(radii=[eps], certifies=True)
    ms.update(y=y, pred=cert.labels, radius=cert.radius(args.norm))
    m = ms.compute()
    acc, certified = m["accuracy"], m[metric_key("guaranteed_accuracy", eps)]
    row = {
        "dataset": args.dataset,
        "model": record.get("model", args.model),
        "defense": d.name,
        "norm": args.norm,
        "eps": eps,
        "n_test": int(y.numel()),
        "accuracy": acc,
        "certified_accuracy": certified,
        "clean_error": None if acc is None else 1 - acc,
        "certified_error": None if certified is None else 1 - certified,
        "n_correct": ms.correct,
        "n_certified": ms.certified_correct_at_r[0],
        "bound": cert.bound,
        "seconds": seconds,
    }
    _print_table([row])
    _write_output(args.output, row)
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from bench.metrics import MetricSet
    from bench.pipeline import attack_all

    ds = _dataset(args, train=False)
    d, _ = _load_for_eval(args, ds)
    attack = {"library": args.library, "name": args.attack, "params": _params(args.attack_param)}
    rows = []
    for eps in args.eps:
        t0 = time.perf_counter()
        pred_adv, _ = attack_all(
            d, ds.x_test, ds.y_test, norm=args.norm, eps=eps, attack=attack, seed=args.seed
        )
        ms = MetricSet(eps_list=[eps], certifies=False)
        ms.update(y=ds.y_test, pred=pred_adv, pred_adv={eps: pred_adv})
        rows.append(
            {
                "defense": d.name,
                "norm": args.norm,
                "eps": eps,
                "attack": f"{args.library}:{args.attack}",
                "n": int(ds.y_test.numel()),
                "accuracy_under_attack": ms.compute()[metric_key("accuracy_under_attack", eps)],
                "seconds": time.perf_counter() - t0,
            }
        )
    _print_table(rows)
    _write_output(args.output, {"rows": rows})
    return 0


def cmd_defenses(args: argparse.Namespace) -> int:
    from bench.registry import broken_plugins, defense_package, get_defense_class, list_defenses

    if args.action == "show":
        cls = get_defense_class(args.name)
        where = f"{cls.__module__}.{cls.__qualname__}, package {defense_package(cls.name)}"
        print(f"{cls.name}  ({where})")
        doc = (cls.__doc__ or "").strip().splitlines()
        if doc:
            print(f"  {doc[0]}")
        print(
            f"  randomized: {cls.randomized}; certifies: {', '.join(cls.certifies) or '-'}; "
            f"norms: {', '.join(cls.norms)}"
        )
        defaults = cls.param_defaults()
        rows = [
            {
                "parameter": n,
                "default": repr(defaults.get(n, "(required)")),
                "meaning": cls.param_help.get(n, ""),
            }
            for n in cls.param_names()
        ]
        if rows:
            _print_table(rows)
        else:
            print("  (no parameters)")
        return 0
    rows = [
        {
            "name": n,
            "randomized": get_defense_class(n).randomized,
            "certifies": ",".join(get_defense_class(n).certifies) or "-",
            "package": defense_package(n),
        }
        for n in list_defenses(args.pattern)
    ]
    _print_table(rows)
    for name, err in broken_plugins().items():
        print(f"warning: plugin {name!r} failed to load: {err}", file=sys.stderr)
    return 0


def cmd_attacks(args: argparse.Namespace) -> int:
    from attacks import get_attack, list_attacks
    from bench.registry import ATTACKS, broken_plugins

    rows = []
    for key in list_attacks():
        if args.pattern and not fnmatch.fnmatchcase(key, args.pattern):
            continue
        entry = get_attack(*key.split(":"))
        rows.append(
            {
                "attack": key,
                "norms": ",".join(entry.norms),
                "package": ATTACKS.package(key),
                "summary": entry.summary,
            }
        )
    _print_table(rows)
    for name, err in broken_plugins().items():
        print(f"warning: plugin {name!r} failed to load: {err}", file=sys.stderr)
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from bench.leaderboard import publish
    from bench.store import Store

    if not Path(args.store).is_file():
        raise ConfigError(f"store {args.store} does not exist; run `certbench run SPEC` first")
    if args.action == "site":
        from bench.site import build_site

        title = {"title": args.title} if args.title else {}
        store = Store(args.store)
        index = build_site(store, args.out, spec_name=args.spec_name, rank_by=args.rank_by, **title)
        print(index.resolve())  # the page to open (file://, no server needed)
        return 0
    store = Store(args.store)
    specs = _publish_specs(store, Path(args.out), args.spec_name, args.all_specs)
    paths = publish(store, args.out, spec_name=args.spec_name, rank_by=args.rank_by)
    _record_specs(Path(args.out), specs)
    for p in paths:
        print(p)
    return 0


SPECS_FILE = "specs.txt"
"""Written by ``leaderboard publish`` beside the boards: the specs they come from."""


def _recorded_specs(out: Path) -> list[str] | None:
    try:
        text = (out / SPECS_FILE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return sorted(ln.strip() for ln in text.splitlines() if ln.strip() and ln[0] != "#")


def _publish_specs(store, out: Path, spec_name: str | None, all_specs: bool) -> list[str]:
    """The specs a publish writes; refuses (one line) to mix several specs, or to replace
    another spec's boards in ``out``, unless asked with ``--spec-name`` or ``--all-specs``."""
    if spec_name is not None:
        return [spec_name]
    specs = sorted({s for cell in store.cells() for s in cell["specs"]})
    if all_specs:
        return specs
    if len(specs) > 1:
        raise ConfigError(
            f"store {store.path} holds the cells of {len(specs)} specs ({', '.join(specs)}); "
            f"publishing them into {out} would mix them on one board: pass --spec-name NAME "
            "for one spec, or --all-specs to merge them"
        )
    recorded = _recorded_specs(out)
    if recorded is not None and specs and recorded != specs:
        raise ConfigError(
            f"{out} holds the boards of spec {', '.join(recorded)}, not of {', '.join(specs)}; "
            f"pass --spec-name {specs[0]} to replace them, or --out DIR to publish elsewhere"
        )
    return specs


def _record_specs(out: Path, specs: list[str]) -> None:
    from bench.files import atomic_write_bytes

    header = "# written by `certbench leaderboard publish`: the specs of the boards here\n"
    atomic_write_bytes(out / SPECS_FILE, (header + "".join(f"{s}\n" for s in specs)).encode())


def cmd_plot(args: argparse.Namespace) -> int:
    from bench.plots import plot_boards
    from bench.store import Store

    if not Path(args.store).is_file():
        raise ConfigError(f"store {args.store} does not exist; run `certbench run SPEC` first")
    for p in plot_boards(Store(args.store), args.out, spec_name=args.spec_name):
        print(p)
    return 0


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line (and exit status 2)."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message}")


def _common(p: argparse.ArgumentParser, *, dataset: bool = True) -> None:
    if dataset:
        p.add_argument("--dataset", default="digits", help="dataset name (default: digits)")
        p.add_argument(
            "--data-dir",
            default=None,
            help="directory with the dataset files (default: its standard location, "
            "e.g. /usr/share/datasets/fashion-mnist)",
        )
        p.add_argument("--limit", type=_positive_int, default=None, help="first N test examples")
    p.add_argument("--seed", type=int, default=0, help="seed for shuffling and noise draws")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--output", default=None, help="also write the results as JSON to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _model_opts(p: argparse.ArgumentParser, *, checkpoint: bool) -> None:
    p.add_argument(
        "--model",
        default=None if checkpoint else "cnn",
        help="a registered architecture (bench.models.list_models()) or your own class by "
        "import path, e.g. mypkg.nets:SmallCNN",
    )
    p.add_argument("--defense", default=None if checkpoint else "undefended", help="defense name")
    p.add_argument(
        "--param",
        action="append",
        metavar="KEY=VALUE",
        help="defense hyper-parameter (repeatable), e.g. --param sigma=0.25",
    )
    if checkpoint:
        p.add_argument(
            "--checkpoint",
            required=True,
            help="a certbench checkpoint (NAME for NAME.safetensors + NAME.json), or the "
            "model's own weights: a .safetensors file or a plain state-dict .pth/.pt",
        )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=100,  # bench.pipeline.CERTIFY_CHUNK: the chunks of `certbench run`
        help="examples per chunk (default 100, as certbench run)",
    )


def build_parser() -> argparse.ArgumentParser:
    from bench.leaderboard import RANK_BY  # light: no torch, pandas or numpy

    parser = _Parser(
        prog="certbench",
        description="Benchmark defenses against adversarial examples and publish leaderboards.",
    )
    from bench import __version__

    parser.add_argument("--version", action="version", version=f"certbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "run",
        help="run a benchmark spec (train → certify → attack → store)",
        description="Run every cell of a TOML benchmark spec; finished cells are "
        "skipped, so a killed run resumes where it stopped.",
    )
    p.add_argument("spec", help="path to a TOML spec, e.g. configs/quick.toml")
    p.add_argument("--store", default=None, help=f"SQLite results store (default: {DEFAULT_STORE})")
    p.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="where cells run (ray needs the certbench[ray] extra)",
    )
    p.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    p.add_argument(
        "--jobs",
        type=_positive_int,
        default=None,
        help="worker processes, one torch thread each (default: the usable cores, or "
        "CERTBENCH_JOBS); 1 runs the cells one after another in this process",
    )
    p.add_argument("--force", action="store_true", help="re-run cells that are already stored")
    p.add_argument(
        "--limit",
        type=_positive_int,
        default=None,
        help="first N test examples of every dataset (cells other than the full spec's)",
    )
    _common(p, dataset=False)
    p.set_defaults(func=cmd_run, precheck=_check_run)

    p = sub.add_parser(
        "train",
        help="train one model under one defense and save a checkpoint",
        description="Train with the training loop and save safetensors + JSON.",
    )
    _common(p)
    _model_opts(p, checkpoint=False)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default=None)
    p.add_argument(
        "--limit-train", type=_positive_int, default=None, help="first N training examples"
    )
    p.add_argument(
        "--out", required=True, help="checkpoint path (NAME → NAME.safetensors + NAME.json)"
    )
    p.set_defaults(func=cmd_train, batch_size=None)

    p = sub.add_parser(
        "eval",
        help="accuracy of a checkpoint on a dataset's test set",
        description="Conventional accuracy of a checkpoint (randomized defenses "
        "predict by Monte Carlo).",
    )
    _common(p)
    _model_opts(p, checkpoint=True)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "certify",
        help="certified accuracy of a checkpoint",
        description="Certify every test example; reports clean and certified "
        "accuracy/error at --eps.",
    )
    _common(p)
    _model_opts(p, checkpoint=True)
    p.add_argument("--norm", choices=("l1", "l2", "linf"), default="l2")
    p.add_argument("--eps", type=_nonneg_float, default=None, help="radius at which to report")
    p.set_defaults(func=cmd_certify)

    p = sub.add_parser(
        "attack",
        help="accuracy under attack of a checkpoint",
        description="Attack with expectation over noise and re-score with many draws.",
    )
    _common(p)
    _model_opts(p, checkpoint=True)
    p.add_argument("--norm", choices=("l1", "l2", "linf"), default="linf")
    p.add_argument("--eps", type=_nonneg_float, nargs="+", required=True, help="attack budgets")
    p.add_argument(
        "--library", default="certbench", help="certbench, torchattacks, art, autoattack"
    )
    p.add_argument("--attack", default="pgd", help="attack name within the library")
    p.add_argument("--attack-param", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("defenses", help="list registered defenses or show one's parameters")
    dsub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    q = dsub.add_parser("list", help="name, randomized, certified norms, providing package")
    q.add_argument("pattern", nargs="?", default=None, help="glob filter, e.g. '*smooth*'")
    q = dsub.add_parser("show", help="parameters with defaults and their meaning")
    q.add_argument("name")
    p.set_defaults(func=cmd_defenses)

    p = sub.add_parser("attacks", help="list registered attack adapters with their norms")
    asub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    q = asub.add_parser("list", help="library:name, supported norms, package, summary")
    q.add_argument("pattern", nargs="?", default=None, help="glob filter, e.g. 'autoattack:*'")
    p.set_defaults(func=cmd_attacks)

    p = sub.add_parser(
        "leaderboard", help="publish leaderboard CSVs (or their site) from the store"
    )
    lsub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    q = lsub.add_parser("publish", help="write leaderboards/<dataset>-<norm>.csv and results.csv")
    q.add_argument("--store", default=DEFAULT_STORE)
    q.add_argument("--out", default="leaderboards")
    q.add_argument("--spec-name", default=None, help="only cells of this spec")
    q.add_argument(
        "--all-specs",
        action="store_true",
        help="publish the cells of every spec in the store together (without it, a store "
        "holding several specs needs --spec-name)",
    )
    q.add_argument(
        "--rank-by",
        default="upper",
        choices=RANK_BY,
        help="ranking: the robust-accuracy interval's upper end (accuracy under the attack "
        "ensemble at the headline budget; default) or lower end (guaranteed accuracy there), "
        "clean accuracy, or accuracy under attack at the smallest/largest budget",
    )
    q = lsub.add_parser(
        "site",
        help="write a static HTML site of the boards (works offline from file://)",
        description="Write index.html, one page per board and one per row (sortable tables, "
        "SVG curves, provenance, citations) under --out; prints the path of index.html.",
    )
    q.add_argument("--store", default=DEFAULT_STORE)
    q.add_argument("--out", required=True, help="site directory, e.g. leaderboards/site/digits")
    q.add_argument("--spec-name", default=None, help="only cells of this spec")
    q.add_argument("--rank-by", default="upper", choices=RANK_BY, help="as for publish")
    q.add_argument(
        "--title", default=None, help="the site's title (default: certbench leaderboards)"
    )
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("plot", help="one PNG per leaderboard (curves vs radius, T and ε)")
    p.add_argument("--store", default=DEFAULT_STORE)
    p.add_argument("--out", default="leaderboards")
    p.add_argument("--spec-name", default=None)
    p.set_defaults(func=cmd_plot)
    return parser


def _terminate_as_interrupt() -> None:
    """SIGTERM ends the run like Ctrl-C: finished cells stay stored, nothing is half-written."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):  # not the main thread (e.g. a test runner thread)
        signal.signal(signal.SIGTERM, handler)


def _prestart_workers(args: argparse.Namespace) -> None:
    """``certbench run`` with worker processes: start their fork server now, so that it
    imports torch while this process does (bench/workers.py)."""
    if args.command != "run" or args.executor != "local":
        return
    from bench.workers import prestart, resolve_jobs

    with contextlib.suppress(CertbenchError):  # a bad CERTBENCH_JOBS is reported later
        if resolve_jobs(args.jobs) > 1:
            prestart()


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"certbench: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``certbench`` console script; returns the exit status."""
    t0 = time.perf_counter()
    warnings.formatwarning = _one_line_warning
    try:
        _terminate_as_interrupt()
        with deferred():  # no interrupt inside an import (bench/interrupts.py)
            tune_malloc()  # the command owns its process (bench/allocator.py)
            args = build_parser().parse_args(argv)
            precheck = getattr(args, "precheck", None)
            if precheck is not None:
                precheck(args)
            _prestart_workers(args)
            if args.command in _TORCH_COMMANDS:
                import torch  # noqa: F401

                from bench.registry import load_plugins

                load_plugins()
        args._t0 = t0
        return int(args.func(args) or 0)
    except CertbenchError as exc:
        print(f"certbench: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        forget_handled_interrupt()
        print(
            "certbench: interrupted; finished cells are stored, re-run to resume", file=sys.stderr
        )
        return EXIT_INTERRUPTED
    except Exception as exc:  # last resort: one line, no traceback (CERTBENCH_DEBUG=1 shows it)
        if os.environ.get("CERTBENCH_DEBUG"):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"certbench: internal error: {type(exc).__name__}: {msg} "
            "(set CERTBENCH_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
