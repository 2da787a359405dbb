"""The results store: one embedded SQLite file (default ``runs/certbench.sqlite``).

Each finished cell is written once, in one transaction, under its
:meth:`~bench.spec.CellConfig.cell_id`; a re-run skips cells the store already :meth:`has`,
so a killed run resumes where it stopped. SQLite's journal makes every :meth:`Store.put`
all-or-nothing: a process killed mid-write leaves the previous state, never half a cell.
The database runs in WAL mode with a busy timeout, so several processes may read and write
the same store at once (writes are serialised; a second writer waits instead of failing).

Schema (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`):

* ``cells`` — one row per cell: the config columns (``dataset``, ``model``, ``defense``,
  ``params`` as canonical JSON, ``norm``, ``seed`` …, the full config as JSON), the result's
  scalars (``n_test`` INTEGER, ``n_draws`` INTEGER, ``alpha`` REAL, ``attack`` TEXT,
  ``train_seconds`` REAL, ``eval_seconds`` REAL), provenance columns and the full
  provenance as JSON.
* ``metrics`` — long table ``(cell_id, metric, value REAL NULL, count INTEGER NULL, total
  INTEGER NULL)``; ``NULL`` value = not defined (e.g. guaranteed accuracy of a defense that
  does not certify); ``value = count / total`` where the metric is a fraction of counted
  test examples (``total`` = the examples it rests on), which is what confidence intervals
  are computed from. Schema 1 stores (no counts) are upgraded in place.
* ``spec_cells`` — which spec (and display label) a cell belongs to. A cell is identified
  without its spec name, so one stored cell may belong to several specs; :meth:`Store.put`
  and :meth:`Store.link` record membership.

Checkpoints live next to the database: ``<db_dir>/checkpoints/<train_key>/``
(:meth:`Store.checkpoint_dir`).
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.errors import ConfigError, NumericalError
from bench.spec import CellConfig

SCHEMA_VERSION = 2
DEFAULT_STORE = "runs/certbench.sqlite"
BUSY_TIMEOUT_S = 60.0
PROVENANCE_FIELDS = ("certbench_version", "torch_version", "git_commit", "created_at")

_KEY_RE = re.compile(r"^[0-9a-f]{8,64}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    cell_id           TEXT PRIMARY KEY,
    train_key         TEXT NOT NULL,
    spec_name         TEXT,
    dataset           TEXT NOT NULL,
    data_dir          TEXT,
    limit_train       INTEGER,
    limit_test        INTEGER,
    model             TEXT NOT NULL,
    defense           TEXT NOT NULL,
    label             TEXT,
    params            TEXT NOT NULL,
    norm              TEXT NOT NULL,
    seed              INTEGER NOT NULL,
    device            TEXT,
    config            TEXT NOT NULL,
    n_test            INTEGER NOT NULL,
    n_draws           INTEGER,
    alpha             REAL,
    attack            TEXT,
    train_seconds     REAL,
    eval_seconds      REAL,
    certbench_version TEXT,
    torch_version     TEXT,
    git_commit        TEXT,
    created_at        TEXT,
    provenance        TEXT NOT NULL,
    stored_at         TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS cells_board ON cells (dataset, norm);
CREATE TABLE IF NOT EXISTS metrics (
    cell_id TEXT NOT NULL REFERENCES cells (cell_id) ON DELETE CASCADE,
    metric  TEXT NOT NULL,
    value   REAL,
    count   INTEGER,
    total   INTEGER,
    PRIMARY KEY (cell_id, metric)
);
CREATE TABLE IF NOT EXISTS spec_cells (
    spec_name TEXT NOT NULL,
    cell_id   TEXT NOT NULL,
    label     TEXT,
    PRIMARY KEY (spec_name, cell_id)
);
"""

_CONFIG_COLUMNS = (
    "spec_name",
    "dataset",
    "data_dir",
    "limit_train",
    "limit_test",
    "model",
    "defense",
    "label",
    "norm",
    "seed",
    "device",
)


def canonical_params(params: Mapping[str, Any]) -> str:
    """Compact JSON of hyper-parameters with sorted keys (how ``params`` is stored and shown)."""
    return json.dumps(dict(params), sort_keys=True, separators=(",", ":"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _as_cell(cell: CellConfig | Mapping[str, Any]) -> CellConfig:
    if isinstance(cell, CellConfig):
        return cell
    return CellConfig.from_dict(cell)


def _opt_int(result: Mapping[str, Any], key: str, *, required: bool = False) -> int | None:
    value = result.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"result field '{key}' must be an integer >= 0, got {value!r}")
    return int(value)


def _opt_float(result: Mapping[str, Any], key: str) -> float | None:
    value = result.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"result field '{key}' must be a finite number, got {value!r}")
    return float(value)


def _metric_counts(counts: Any, metrics: Mapping[str, float | None]) -> dict[str, tuple[int, int]]:
    """``{metric: (count, total)}`` checked against the values they produce."""
    if counts is None:
        return {}
    if not isinstance(counts, Mapping):
        raise ConfigError(f"result field 'counts' must be a dict name -> (k, n), got {counts!r}")
    out: dict[str, tuple[int, int]] = {}
    for name, pair in counts.items():
        try:
            k, n = (int(v) for v in pair)
        except (TypeError, ValueError):
            raise ConfigError(f"counts of metric {name!r} must be (k, n), got {pair!r}") from None
        value = metrics.get(name)
        if not (0 <= k <= n and n > 0) or value is None or not math.isclose(value, k / n):
            raise ConfigError(
                f"counts of metric {name!r} must be 0 <= k <= n with n > 0 and k / n equal to "
                f"its value {value!r}, got ({k}, {n})"
            )
        out[name] = (k, n)
    return out


def _metric_values(metrics: Any) -> dict[str, float | None]:
    if not isinstance(metrics, Mapping):
        raise ConfigError(f"result field 'metrics' must be a dict name -> number, got {metrics!r}")
    out: dict[str, float | None] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"metric names must be non-empty strings, got {name!r}")
        if value is None:
            out[name] = None
            continue
        if isinstance(value, bool | str | bytes) or not hasattr(value, "__float__"):
            raise ConfigError(f"metric '{name}' must be a number or None, got {value!r}")
        if not isinstance(value, int | float):  # numpy / torch scalars
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"metric '{name}' must be a number or None, got {value!r}"
                ) from None
        if not math.isfinite(value):
            raise NumericalError(
                f"metric '{name}' is {value}; refusing to store a non-finite result"
            )
        out[name] = float(value)
    return out


class Store:
    """Results of finished cells in one SQLite file; safe for several processes at once.

    Connections are opened per operation, so a ``Store`` can be used from forked workers and
    threads. Only the driver process should normally write (see DESIGN.md, "Scale").
    """

    def __init__(self, path: str | Path = DEFAULT_STORE) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot create the store's directory: {exc}") from exc
        self._init_schema()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    # ------------------------------------------------------------------ connections
    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as exc:
            raise ConfigError(f"{self.path}: cannot open results store: {exc}") from exc
        with closing(conn):
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = FULL")
            yield conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """An immediate (write-locked) transaction, committed on success, rolled back on error."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _init_schema(self) -> None:
        # Switching to WAL needs a moment of exclusive access; when another process is
        # creating the same store at this instant, SQLite may report "locked" at once.
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                with self._connect() as conn:
                    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                    if str(mode).lower() != "wal":  # e.g. a file system without shared memory
                        conn.execute("PRAGMA journal_mode = DELETE")
                    version = conn.execute("PRAGMA user_version").fetchone()[0]
                    if version > SCHEMA_VERSION:
                        raise ConfigError(
                            f"{self.path}: store schema version {version} is newer than this "
                            f"certbench understands ({SCHEMA_VERSION}); upgrade certbench"
                        )
                    if version < SCHEMA_VERSION:
                        conn.execute("BEGIN IMMEDIATE")
                        try:
                            # re-read under the write lock: another process may have upgraded
                            version = conn.execute("PRAGMA user_version").fetchone()[0]
                            for statement in _SCHEMA.split(";"):
                                if statement.strip():
                                    conn.execute(statement)
                            if version == 1:  # schema 1 had no counts
                                for column in ("count", "total"):
                                    conn.execute(f"ALTER TABLE metrics ADD COLUMN {column} INTEGER")
                            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                        except BaseException:
                            conn.execute("ROLLBACK")
                            raise
                        conn.execute("COMMIT")
                return
            except sqlite3.DatabaseError as exc:
                locked = "locked" in str(exc) or "busy" in str(exc)
                if locked and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise ConfigError(f"{self.path}: not a usable certbench store: {exc}") from exc

    # ------------------------------------------------------------------ writing
    def put(
        self,
        cell: CellConfig | Mapping[str, Any],
        result: Mapping[str, Any],
        *,
        replace: bool = False,
    ) -> bool:
        """Store ``result`` for ``cell`` once; ``False`` (and nothing changed) if already stored.

        With ``replace=True`` (a forced re-run) an existing result is deleted and this one
        stored instead, in the same transaction; returns ``True``.

        ``result`` = ``{"metrics": {name: float | None}, "counts": {name: (k, n)} (optional:
        the counts behind fractions), "n_test": int, "n_draws": int | None,
        "alpha": float | None, "attack": str | None, "train_seconds": float,
        "eval_seconds": float, "provenance": {"certbench_version", "torch_version",
        "git_commit", "created_at", ...}}``. Metric values are fractions or radii as floats;
        ``None`` means undefined; NaN/inf raise :class:`NumericalError`. The cell's spec
        membership is recorded either way (as :meth:`link`).
        """
        cfg = _as_cell(cell)
        metrics = _metric_values(result.get("metrics"))
        counts = _metric_counts(result.get("counts"), metrics)
        n_test = _opt_int(result, "n_test", required=True)
        n_draws = _opt_int(result, "n_draws")
        alpha = _opt_float(result, "alpha")
        train_s = _opt_float(result, "train_seconds")
        eval_s = _opt_float(result, "eval_seconds")
        attack = result.get("attack")
        if attack is not None and not isinstance(attack, str):
            raise ConfigError(f"result field 'attack' must be a string or None, got {attack!r}")
        provenance = dict(result.get("provenance") or {})
        provenance.setdefault("created_at", _now())
        try:
            provenance_json = json.dumps(provenance, sort_keys=True, default=str)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"result field 'provenance' is not JSON-serialisable: {exc}") from exc

        cid = cfg.cell_id()
        d = cfg.to_dict()
        row = {k: d[k] for k in _CONFIG_COLUMNS}
        row.update(
            cell_id=cid,
            train_key=cfg.train_key(),
            params=canonical_params(cfg.params),
            config=json.dumps(d, sort_keys=True),
            n_test=n_test,
            n_draws=n_draws,
            alpha=alpha,
            attack=attack,
            train_seconds=train_s,
            eval_seconds=eval_s,
            provenance=provenance_json,
            stored_at=_now(),
        )
        for key in PROVENANCE_FIELDS:
            value = provenance.get(key)
            row[key] = None if value is None else str(value)
        columns = ", ".join(row)
        marks = ", ".join(f":{k}" for k in row)
        with self._write() as conn:
            self._link(conn, cfg)
            exists = conn.execute("SELECT 1 FROM cells WHERE cell_id = ?", (cid,)).fetchone()
            if exists and not replace:
                return False
            if exists:
                conn.execute("DELETE FROM metrics WHERE cell_id = ?", (cid,))
                conn.execute("DELETE FROM cells WHERE cell_id = ?", (cid,))
            conn.execute(f"INSERT INTO cells ({columns}) VALUES ({marks})", row)
            conn.executemany(
                "INSERT INTO metrics (cell_id, metric, value, count, total) VALUES (?, ?, ?, ?, ?)",
                [
                    (cid, name, value, *counts.get(name, (None, None)))
                    for name, value in metrics.items()
                ],
            )
        return True

    @staticmethod
    def _link(conn: sqlite3.Connection, cfg: CellConfig) -> None:
        conn.execute(
            "INSERT OR IGNORE INTO spec_cells (spec_name, cell_id, label) VALUES (?, ?, ?)",
            (cfg.spec_name, cfg.cell_id(), cfg.label),
        )

    def link(self, cell: CellConfig | Mapping[str, Any]) -> None:
        """Record that ``cell`` belongs to its spec (and its label there); idempotent.

        Call it for a cell that is skipped because it is already stored (computed under
        another spec), so that ``cells(spec_name=...)`` and ``publish(spec_name=...)`` see it.
        """
        cfg = _as_cell(cell)
        with self._write() as conn:
            self._link(conn, cfg)

    # ------------------------------------------------------------------ reading
    def has(self, cell_id: str) -> bool:
        """Whether a result for ``cell_id`` is stored."""
        with self._connect() as conn:
            row = conn.execute("SELECT 1 FROM cells WHERE cell_id = ?", (cell_id,)).fetchone()
        return row is not None

    def __contains__(self, cell_id: object) -> bool:
        return isinstance(cell_id, str) and self.has(cell_id)

    def __len__(self) -> int:
        with self._connect() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0])

    def get(self, cell_id: str) -> dict[str, Any] | None:
        """The stored cell (as :meth:`cells` rows) or ``None``."""
        rows = self._query("WHERE c.cell_id = ?", (cell_id,), spec_name=None)
        return rows[0] if rows else None

    def cells(
        self,
        *,
        spec_name: str | None = None,
        dataset: str | None = None,
        norm: str | None = None,
    ) -> list[dict[str, Any]]:
        """Stored cells, config and result merged, ordered by dataset, norm, defense, model.

        Each row: ``cell_id``, ``train_key``, the config columns (``spec_name`` of the spec
        that first stored it, ``dataset``, ``data_dir``, ``limit_train``, ``limit_test``,
        ``model``, ``defense``, ``label``, ``params`` (dict), ``norm``, ``seed``, ``device``),
        ``config`` (the full :meth:`CellConfig.to_dict`, whose ``attack`` is the attack
        config), the result (``metrics`` dict, ``n_test``, ``n_draws``, ``alpha``, ``attack``
        (the result's attack description string), ``train_seconds``, ``eval_seconds``,
        ``provenance`` dict and its ``certbench_version``, ``torch_version``,
        ``git_commit``, ``created_at``), ``stored_at`` and ``specs`` (every spec it belongs
        to). With ``spec_name``, only that spec's cells, with that spec's ``label``.
        """
        where, args = [], []
        if spec_name is not None:
            where.append("c.cell_id IN (SELECT cell_id FROM spec_cells WHERE spec_name = ?)")
            args.append(spec_name)
        if dataset is not None:
            where.append("c.dataset = ?")
            args.append(dataset)
        if norm is not None:
            where.append("c.norm = ?")
            args.append(norm)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        return self._query(clause, tuple(args), spec_name=spec_name)

    def _query(
        self, clause: str, args: tuple[Any, ...], *, spec_name: str | None
    ) -> list[dict[str, Any]]:
        with self._connect() as conn:
            rows = conn.execute(
                f"SELECT c.* FROM cells c {clause} "
                "ORDER BY c.dataset, c.norm, c.defense, c.model, c.params, c.seed, c.cell_id",
                args,
            ).fetchall()
            ids = [r["cell_id"] for r in rows]
            metrics: dict[str, dict[str, float | None]] = {i: {} for i in ids}
            counts: dict[str, dict[str, tuple[int, int]]] = {i: {} for i in ids}
            specs: dict[str, dict[str, str | None]] = {i: {} for i in ids}
            for r in conn.execute(
                "SELECT cell_id, metric, value, count, total FROM metrics ORDER BY rowid"
            ):
                if r[0] in metrics:
                    metrics[r[0]][r[1]] = r[2]
                    if r[3] is not None and r[4] is not None:
                        counts[r[0]][r[1]] = (int(r[3]), int(r[4]))
            for r in conn.execute("SELECT spec_name, cell_id, label FROM spec_cells"):
                if r[1] in specs:
                    specs[r[1]][r[0]] = r[2]
        out = []
        for r in rows:
            d = dict(r)
            cid = d["cell_id"]
            d["params"] = json.loads(d["params"])
            d["config"] = json.loads(d["config"])
            d["provenance"] = json.loads(d["provenance"])
            d["metrics"] = metrics[cid]
            d["counts"] = counts[cid]
            d["specs"] = sorted(specs[cid])
            if spec_name is not None and spec_name in specs[cid]:
                d["label"] = specs[cid][spec_name]
            out.append(d)
        return out

    def long_results(self, *, spec_name: str | None = None) -> list[dict[str, Any]]:
        """One row per stored metric value: ``cell_id, dataset, norm, defense, model, params``
        (canonical JSON), ``seed, label, metric, value`` (float or ``None``), ``count``,
        ``total`` (the counts behind a fraction, or ``None``)."""
        rows = []
        for cell in self.cells(spec_name=spec_name):
            for metric, value in cell["metrics"].items():
                rows.append(
                    {
                        "cell_id": cell["cell_id"],
                        "dataset": cell["dataset"],
                        "norm": cell["norm"],
                        "defense": cell["defense"],
                        "model": cell["model"],
                        "params": canonical_params(cell["params"]),
                        "seed": cell["seed"],
                        "label": cell["label"],
                        "metric": metric,
                        "value": value,
                        "count": cell["counts"].get(metric, (None, None))[0],
                        "total": cell["counts"].get(metric, (None, None))[1],
                    }
                )
        return rows

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_root(self) -> Path:
        """``<db_dir>/checkpoints/`` (created if missing): one subdirectory per train key."""
        path = self.path.parent / "checkpoints"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def checkpoint_dir(self, train_key: str) -> Path:
        """``<db_dir>/checkpoints/<train_key>/`` (created if missing) for one trained model."""
        if not isinstance(train_key, str) or not _KEY_RE.match(train_key):
            raise ConfigError(
                f"train key must be 8-64 lowercase hex digits (CellConfig.train_key()), "
                f"got {train_key!r}"
            )
        path = self.checkpoint_root() / train_key
        path.mkdir(parents=True, exist_ok=True)
        return path
