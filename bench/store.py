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
* ``claims`` — cells that a running ``certbench run`` is computing (:meth:`Store.claim`), so
  that several runs on one store compute and store each cell once. A claim names its
  process (host, pid, start time) and carries a heartbeat; the claim of a process that has
  died, or whose heartbeat is older than :data:`CLAIM_LEASE_S`, may be taken over. A stored
  cell's claim is removed in the transaction that stores it. (Created on first use; older
  certbench versions ignore it, so the schema version stays 2.)

A store that cannot be written (disk full, read-only file system, I/O error) raises
:class:`~bench.errors.StoreError` naming the file; the failed transaction leaves nothing
behind.

Checkpoints live next to the database: ``<db_dir>/checkpoints/<train_key>/``
(:meth:`Store.checkpoint_dir`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import sqlite3
import time
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.errors import ConfigError, NumericalError, StoreError
from bench.spec import CellConfig

SCHEMA_VERSION = 2
DEFAULT_STORE = "runs/certbench.sqlite"
BUSY_TIMEOUT_S = 60.0
CLAIM_LEASE_S = 120.0
"""A claim whose heartbeat is older than this is stale (its process is presumed dead)."""
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

_CLAIMS_SCHEMA = """
CREATE TABLE IF NOT EXISTS claims (
    cell_id   TEXT PRIMARY KEY,
    owner     TEXT NOT NULL,
    host      TEXT NOT NULL,
    pid       INTEGER NOT NULL,
    started   TEXT NOT NULL,
    heartbeat REAL NOT NULL
)
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


_BATCH = 500
"""Ids per ``IN (...)`` list (SQLite allows 999 parameters in older builds)."""


def _batches(ids: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(ids), _BATCH):
        yield ids[i : i + _BATCH]


def _stored_among(conn: sqlite3.Connection, ids: list[str]) -> Iterator[str]:
    for part in _batches(ids):
        for (cid,) in conn.execute(
            f"SELECT cell_id FROM cells WHERE cell_id IN ({', '.join('?' * len(part))})", part
        ):
            yield cid


def _has_claims(conn: sqlite3.Connection) -> bool:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'claims'")
    return row.fetchone() is not None


def _corrupt(exc: BaseException | None) -> bool:
    """Whether an SQLite error says the file is not a (sound) database."""
    text = str(exc).lower()
    return "not a database" in text or "malformed" in text or "encrypted" in text


def _process_start(pid: int) -> str:
    """The start time of process ``pid`` (clock ticks since boot, from ``/proc``), ``""``
    when unknown. With the pid it identifies a process: pids are reused, start times not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat[stat.rfind(")") + 2 :].split()
    return "" if fields[0] == "Z" else fields[19]  # a zombie has ended


def _process_alive(pid: int, started: str) -> bool:
    if Path("/proc/self/stat").exists():
        now = _process_start(pid)
        return bool(now) and (not started or now == started)
    try:  # pragma: no cover - non-Linux
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _live(row: sqlite3.Row | tuple, now: float) -> bool:
    """Whether a claim row ``(cell_id, owner, host, pid, started, heartbeat)`` belongs to a
    process that may still be computing the cell."""
    _, _, host, pid, started, heartbeat = tuple(row)
    if now - float(heartbeat) > CLAIM_LEASE_S:
        return False
    if host != socket.gethostname():
        return True
    # an earlier run in this very process that could not release its claims is over
    return int(pid) != os.getpid() and _process_alive(int(pid), started)


@dataclass(frozen=True)
class Claimant:
    """Who claims cells: this process (host, pid, start time) and a token unique to the run."""

    host: str
    pid: int
    started: str
    token: str

    @classmethod
    def current(cls) -> Claimant:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, _process_start(pid), uuid.uuid4().hex)


@dataclass
class ClaimRound:
    """What :meth:`Store.claim` found: cells now claimed by the caller, cells already stored,
    and cells another live process is computing."""

    mine: list[str] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)


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
            try:
                conn.row_factory = sqlite3.Row
                conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
                conn.execute("PRAGMA foreign_keys = ON")
                conn.execute("PRAGMA synchronous = FULL")
                yield conn
            except sqlite3.OperationalError as exc:
                # disk full, read-only file or file system, I/O error, a lock held too long
                raise StoreError(f"{self.path}: cannot use the results store: {exc}") from exc

    @contextmanager
    def held_open(self) -> Iterator[None]:
        """Keep a connection open while the block runs (e.g. a run storing many cells).

        SQLite copies the write-ahead log into the database file, with its fsyncs, whenever
        the last connection to a database closes; per-operation connections would pay that
        on every write. An idle connection held here makes the others not the last one.
        """
        with self._connect() as conn:
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # opens the WAL
            yield

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """An immediate (write-locked) transaction, committed on success, rolled back on error."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLite may have rolled back already (disk full)
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

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
            except (sqlite3.DatabaseError, StoreError) as exc:
                cause = exc.__cause__ if isinstance(exc, StoreError) else exc
                locked = "locked" in str(cause) or "busy" in str(cause)
                if locked and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                if isinstance(exc, StoreError) and not _corrupt(cause):
                    raise
                raise ConfigError(f"{self.path}: not a usable certbench store: {cause}") from exc

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
            if _has_claims(conn):  # a stored cell needs no claim
                conn.execute("DELETE FROM claims WHERE cell_id = ?", (cid,))
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

    def detach_stale(self, spec_name: str, keep: Iterable[str]) -> int:
        """Remove from spec ``spec_name`` every member cell not in ``keep`` (the cell ids of
        the spec as it now reads), so its boards show the spec's current cells only. The
        cells themselves stay stored (and in any other spec). Returns how many were
        detached."""
        keep_ids = set(keep)

        def stale_ids(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute("SELECT cell_id FROM spec_cells WHERE spec_name = ?", (spec_name,))
            return [r[0] for r in rows if r[0] not in keep_ids]

        with self._connect() as conn:  # a read: most runs have nothing to detach
            if not stale_ids(conn):
                return 0
        with self._write() as conn:  # again inside the transaction: another run may have linked
            stale = stale_ids(conn)
            for part in _batches(stale):
                conn.execute(
                    f"DELETE FROM spec_cells WHERE spec_name = ? "
                    f"AND cell_id IN ({', '.join('?' * len(part))})",
                    (spec_name, *part),
                )
        return len(stale)

    def link_many(self, cells: Iterable[CellConfig | Mapping[str, Any]]) -> None:
        """:meth:`link` for many cells, in one transaction."""
        cfgs = [_as_cell(c) for c in cells]
        if not cfgs:
            return
        with self._write() as conn:
            for cfg in cfgs:
                self._link(conn, cfg)

    # ------------------------------------------------------------------ claims
    def claim(
        self, cell_ids: Iterable[str], claimant: Claimant, *, redo: Collection[str] = ()
    ) -> ClaimRound:
        """Claim, in one write transaction, every cell of ``cell_ids`` that is not stored
        (or is in ``redo``: a forced re-run) and not claimed by another live process.

        A claim of a dead process, or one whose heartbeat is older than
        :data:`CLAIM_LEASE_S`, is taken over. Returns which cells are now ``mine``, which
        are ``stored`` and which are ``elsewhere`` (claimed by a live process).
        """
        ids = list(dict.fromkeys(cell_ids))
        out = ClaimRound()
        now = time.time()
        with self._write() as conn:
            conn.execute(_CLAIMS_SCHEMA)
            stored = set(_stored_among(conn, ids))
            held = {
                r[0]: r
                for part in _batches(ids)
                for r in conn.execute(
                    "SELECT cell_id, owner, host, pid, started, heartbeat FROM claims "
                    f"WHERE cell_id IN ({', '.join('?' * len(part))})",
                    part,
                )
            }
            for cid in ids:
                if cid in stored and cid not in redo:
                    out.stored.append(cid)
                    continue
                other = held.get(cid)
                if other is not None and other[1] != claimant.token and _live(other, now):
                    out.elsewhere.append(cid)
                    continue
                conn.execute(
                    "INSERT OR REPLACE INTO claims (cell_id, owner, host, pid, started, "
                    "heartbeat) VALUES (?, ?, ?, ?, ?, ?)",
                    (cid, claimant.token, claimant.host, claimant.pid, claimant.started, now),
                )
                out.mine.append(cid)
        return out

    def release(self, cell_ids: Iterable[str], claimant: Claimant) -> None:
        """Drop ``claimant``'s claims on ``cell_ids`` (cells it gives up)."""
        ids = list(cell_ids)
        if not ids:
            return
        with self._write() as conn:
            if _has_claims(conn):
                for part in _batches(ids):
                    conn.execute(
                        f"DELETE FROM claims WHERE owner = ? AND cell_id IN "
                        f"({', '.join('?' * len(part))})",
                        (claimant.token, *part),
                    )

    def heartbeat(self, claimant: Claimant) -> None:
        """Renew the lease of every claim ``claimant`` holds."""
        with self._write() as conn:
            if _has_claims(conn):
                conn.execute(
                    "UPDATE claims SET heartbeat = ? WHERE owner = ?", (time.time(), claimant.token)
                )

    # ------------------------------------------------------------------ reading
    def stored_ids(self, cell_ids: Iterable[str]) -> set[str]:
        """The cells of ``cell_ids`` that have a stored result (one query per 500 ids)."""
        with self._connect() as conn:
            return set(_stored_among(conn, list(cell_ids)))

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
            # a few cells (get()): look them up; many: one pass over each table
            few = len(ids) <= _BATCH
            where = f" WHERE cell_id IN ({', '.join('?' * len(ids))})" if few else ""
            args_ids = tuple(ids) if few else ()
            for r in conn.execute(
                f"SELECT cell_id, metric, value, count, total FROM metrics{where} ORDER BY rowid",
                args_ids,
            ):
                if r[0] in metrics:
                    metrics[r[0]][r[1]] = r[2]
                    if r[3] is not None and r[4] is not None:
                        counts[r[0]][r[1]] = (int(r[3]), int(r[4]))
            for r in conn.execute(
                f"SELECT spec_name, cell_id, label FROM spec_cells{where}", args_ids
            ):
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
