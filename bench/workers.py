"""Worker processes of the local executor: one torch thread each, one task at a time.

A :class:`WorkerPool` runs :class:`TrainTask` (train a cell's defense, or find its
checkpoint) and :class:`ShardTask` (:func:`bench.pipeline.evaluate_shard` on a slice of the
test set) in ``jobs`` processes and hands back picklable results
(:class:`~bench.pipeline.DefenseFacts`, :class:`~bench.pipeline.ShardResult`); only the
parent merges them and writes the store. Coarse-grained parallelism of this kind degrades by
the fair share of the cores on a busy machine, where torch's intra-op threads collapse
(README, "Threads and parallel jobs").

Processes come from a fork server (``multiprocessing``'s ``forkserver`` start method) that
imports torch, the pipeline and the plugins once (:mod:`bench.worker_preload`), so a
worker starts in milliseconds; forking the parent itself would copy a process that already
runs threads (torch's pools, tqdm's monitor), which is unsafe. :func:`prestart` launches the
fork server early, so its imports overlap with the parent's. (This module is not in
:mod:`bench.executors`: executors never import one another or their package, and the command
line starts the fork server before it imports torch.)

Each worker:

* runs with :data:`~bench.environment.THREADS_ENV` torch threads, default 1, and the
  parent's ``CERTBENCH_*`` environment and ``sys.path`` as they are when the pool starts;
  it imports the modules of components the parent registered outside entry points;
* ignores SIGINT (the parent handles Ctrl-C, then stops the workers with SIGTERM, which a
  worker turns into ``KeyboardInterrupt`` so that a checkpoint being written is cleaned up);
* exits when the parent dies (a watchdog thread waits on a pipe only the parent holds), so
  a killed ``certbench run`` leaves no worker computing.

The parent sees a worker that died (SIGKILL, out of memory) as ``("died", exit code)``; the
executor decides whether to retry its task.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from bench.errors import ValidationError

__all__ = [
    "JOBS_ENV",
    "ShardTask",
    "TrainTask",
    "WorkerDied",
    "WorkerPool",
    "default_jobs",
    "main_components",
    "prestart",
    "resolve_jobs",
]

JOBS_ENV = "CERTBENCH_JOBS"
"""Environment variable giving the default number of worker processes (``--jobs``)."""

_PRELOAD = "bench.worker_preload"
_ENV_PREFIX = "CERTBENCH_"
_STOP_GRACE_S = 10.0
"""How long stopped workers may take to clean up before they are killed."""
_MAX_START_FAILURES = 3
"""Workers in a row that may die before they are ready (then the pool gives up)."""


def default_jobs() -> int:
    """:data:`JOBS_ENV` when set, else the usable cores
    (:func:`bench.environment.usable_cores`)."""
    from bench.environment import usable_cores

    value = os.environ.get(JOBS_ENV, "").strip()
    if not value:
        return usable_cores()
    try:
        return resolve_jobs(int(value))
    except ValueError:
        raise ValidationError(f"{JOBS_ENV} must be an integer >= 1, got {value!r}") from None


def resolve_jobs(jobs: int | None) -> int:
    """``jobs`` checked (an integer >= 1), or :func:`default_jobs` when ``None``."""
    if jobs is None:
        return default_jobs()
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValidationError(f"--jobs must be an integer >= 1, got {jobs!r}")
    return jobs


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TrainTask:
    """Train (or load) the defense that ``cells`` share (one ``train_key``).

    Returns ``{cell_id: (DefenseFacts, n_test)}`` and the training time in seconds.
    """

    cells: tuple[Any, ...]
    checkpoint_root: str
    device: str | None

    @property
    def label(self) -> str:
        c = self.cells[0]
        return f"train {c.label or c.defense}/{c.model}"

    def run(self) -> tuple[dict[str, tuple[Any, int]], float]:
        from bench.pipeline import DefenseFacts, dataset_for, prepare_defense

        first = self.cells[0]
        d, seconds = prepare_defense(
            first, self.checkpoint_root, device=_device(self.device, first), progress=False
        )
        facts = {
            c.cell_id(): (DefenseFacts.of(d, c.norm), int(dataset_for(c).y_test.numel()))
            for c in self.cells
        }
        return facts, None if seconds is None else float(seconds)  # None: pretrained


@dataclass(frozen=True)
class ShardTask:
    """Evaluate test examples ``[start, stop)`` of ``cells`` (one cell, or cells of one
    trained defense that share their clean certificate: :func:`bench.pipeline.
    shares_certificate`), each with its own defense loaded from the checkpoint.

    Returns a :class:`~bench.pipeline.ShardResult` per cell (in order) and the evaluation
    time in seconds (:func:`bench.pipeline.evaluate_shards`).
    """

    cells: tuple[Any, ...]
    checkpoint_root: str
    device: str | None
    start: int
    stop: int

    @property
    def label(self) -> str:
        c = self.cells[0]
        norms = "+".join(cell.norm for cell in self.cells)
        return f"eval {c.label or c.defense}/{c.model}/{norms} [{self.start}:{self.stop})"

    def run(self) -> tuple[list[Any], float]:
        from bench.pipeline import evaluate_shards

        pairs = [(_defense(c, self.checkpoint_root, self.device), c) for c in self.cells]
        t0 = time.perf_counter()
        results = evaluate_shards(pairs, self.start, self.stop)
        return results, time.perf_counter() - t0


def _device(device: str | None, cell: Any):
    from bench.environment import resolve_device

    return resolve_device(device or cell.device)


_DEFENSES: OrderedDict[str, Any] = OrderedDict()
_DEFENSE_CACHE_SIZE = 4
"""Defenses kept per worker: consecutive shards of a cell (or of the cells of one task) load
its checkpoint once."""


def _defense(cell: Any, checkpoint_root: str, device: str | None) -> Any:
    """The defense of ``cell`` loaded from its checkpoint (cached per cell: every cell is
    evaluated by a defense fresh from the checkpoint, as in a single-process run)."""
    from bench.pipeline import prepare_defense

    key = cell.cell_id()
    if key in _DEFENSES:
        _DEFENSES.move_to_end(key)
        return _DEFENSES[key]
    d, _ = prepare_defense(cell, checkpoint_root, device=_device(device, cell), progress=False)
    _DEFENSES[key] = d
    while len(_DEFENSES) > _DEFENSE_CACHE_SIZE:
        _DEFENSES.popitem(last=False)
    return d


# --------------------------------------------------------------------------- worker side


class _RemoteTraceback(Exception):
    """The traceback of an error raised in a worker, attached as the ``__cause__``."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _watch_parent(lifeline: Connection) -> None:
    """Exit as soon as the parent is gone (its end of ``lifeline`` closes)."""
    with contextlib.suppress(EOFError, OSError):
        lifeline.recv_bytes()
    os._exit(1)


def _setup(settings: dict[str, Any]) -> None:
    for key in [k for k in os.environ if k.startswith(_ENV_PREFIX)]:
        if key not in settings["env"]:
            del os.environ[key]
    os.environ.update(settings["env"])
    sys.path[:] = settings["sys_path"]
    from bench.allocator import tune_malloc
    from bench.environment import configure_threads
    from bench.registry import load_plugins

    tune_malloc()
    configure_threads(settings["threads"])
    load_plugins()
    for module in settings["modules"]:
        importlib.import_module(module)


def _encode_error(exc: BaseException) -> bytes:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        data = pickle.dumps(("error", exc, text))
        pickle.loads(data)  # an exception whose class cannot be rebuilt is sent as text
        return data
    except Exception:
        return pickle.dumps(("error", RuntimeError(f"{type(exc).__name__}: {exc}"), text))


def _worker_main(conn: Connection, lifeline: Connection, settings: dict[str, Any]) -> None:
    """A worker's loop: receive a pickled task, run it, send back ``("ok", result)`` or
    ``("error", exception, traceback text)``; ``None`` or a closed pipe ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _interrupt)
    threading.Thread(target=_watch_parent, args=(lifeline,), daemon=True).start()
    try:
        try:
            _setup(settings)
        except Exception as exc:
            conn.send_bytes(_encode_error(exc))
            return
        conn.send_bytes(pickle.dumps(("ready", os.getpid())))
        while True:
            try:
                task = pickle.loads(conn.recv_bytes())
            except EOFError:
                return
            if task is None:
                return
            try:
                out = pickle.dumps(("ok", task.run()))
            except Exception as exc:
                out = _encode_error(exc)
            conn.send_bytes(out)
    except (KeyboardInterrupt, BrokenPipeError, EOFError):
        return


# --------------------------------------------------------------------------- parent side


class WorkerDied(Exception):
    """A worker process ended while it ran a task (killed, out of memory)."""


def _context() -> multiprocessing.context.BaseContext:
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([_PRELOAD])
        return ctx
    return multiprocessing.get_context("spawn")  # pragma: no cover - Windows


def prestart() -> None:
    """Start the fork server now (it imports torch and the plugins while the caller does the
    same); cheap, and a no-op when it already runs or the platform has none."""
    ctx = _context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def main_components() -> list[str]:
    """Components registered from ``__main__`` (a script or notebook): a worker process
    cannot import them."""
    from bench.registry import REGISTRIES

    return [
        f"{reg.kind} {name}"
        for reg in REGISTRIES.values()
        for name in reg.names()
        if getattr(reg.get(name), "__module__", None) in ("__main__", "__mp_main__")
    ]


def _extra_modules() -> list[str]:
    """Modules of components registered in this process that a fresh process would not
    find through entry points (e.g. a test module or a script that registers a defense)."""
    from bench.registry import REGISTRIES

    modules = []
    for reg in REGISTRIES.values():
        for name in reg.names():
            module = getattr(reg.get(name), "__module__", None)
            if module and module not in ("__main__", "__mp_main__") and module not in modules:
                modules.append(module)
    return modules


@dataclass
class _Worker:
    index: int
    process: Any
    conn: Connection
    ready: bool = False
    task: Any = None
    started: float = 0.0


class WorkerPool:
    """``jobs`` worker processes; the parent gives each one task at a time.

    Use as a context manager: leaving the block stops the workers (politely when it ends
    normally, with SIGTERM and then SIGKILL when it ends by an exception or interrupt).
    """

    def __init__(self, jobs: int, *, threads: int = 1) -> None:
        self._ctx = _context()
        self._settings = {
            "env": {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIX)},
            "sys_path": list(sys.path),
            "threads": int(threads),
            "modules": _extra_modules(),
        }
        self._start_failures = 0
        self._lifeline, self._lifeline_keep = self._ctx.Pipe(duplex=False)
        self.workers: list[_Worker] = []
        try:
            for i in range(jobs):
                self.workers.append(self._start(i))
        except BaseException:
            self.terminate()
            raise

    def _start(self, index: int) -> _Worker:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_worker_main,
            args=(child, self._lifeline, self._settings),
            name=f"certbench-worker-{index + 1}",
            daemon=True,
        )
        process.start()
        child.close()
        return _Worker(index, process, parent)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.terminate()

    # ------------------------------------------------------------------ tasks
    def idle(self) -> list[_Worker]:
        """Workers ready for a task."""
        return [w for w in self.workers if w.ready and w.task is None]

    def busy(self) -> list[_Worker]:
        return [w for w in self.workers if w.task is not None]

    def submit(self, worker: _Worker, task: Any) -> None:
        worker.task, worker.started = task, time.perf_counter()
        worker.conn.send_bytes(pickle.dumps(task))

    def wait(self, timeout: float | None = None) -> list[tuple[_Worker, Any, Any]]:
        """Wait for workers to finish tasks or die; returns ``(worker, task, outcome)`` per
        finished task, where ``outcome`` is ``("ok", result)`` or an exception (the task's
        own, or :class:`WorkerDied`). A dead worker is replaced by a fresh one."""
        waiting = {w.conn: w for w in self.workers}
        waiting.update({w.process.sentinel: w for w in self.workers})
        done: list[tuple[_Worker, Any, Any]] = []
        for ready in wait(list(waiting), timeout):
            w = waiting[ready]
            if w not in self.workers:  # already replaced in this round
                continue
            message = None
            if ready is w.conn or w.conn.poll():
                with contextlib.suppress(EOFError, OSError):
                    message = pickle.loads(w.conn.recv_bytes())
            if message is None:  # the process ended without an answer
                w.process.join(timeout=5)
                code = w.process.exitcode
                how = f"signal {-code}" if code is not None and code < 0 else f"status {code}"
                died = WorkerDied(f"worker process {w.process.pid} died ({how})")
                if not w.ready:
                    self._start_failures += 1
                    if self._start_failures > _MAX_START_FAILURES:
                        raise died  # workers cannot even start: nothing to retry
                if w.task is not None:
                    done.append((w, w.task, died))
                self._replace(w)
                continue
            kind = message[0]
            if kind == "ready":
                w.ready = True
                self._start_failures = 0
            elif kind == "ok":
                done.append((w, w.task, message))
                w.task = None
            else:
                _, exc, text = message
                exc.__cause__ = _RemoteTraceback(text)
                if not w.ready:
                    raise exc  # set-up failed (e.g. a plugin module that does not import)
                done.append((w, w.task, exc))
                w.task = None
        return done

    def _replace(self, worker: _Worker) -> None:
        with contextlib.suppress(OSError):
            worker.conn.close()
        self.workers[self.workers.index(worker)] = self._start(worker.index)

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        """Ask idle workers to exit; stop the rest."""
        for w in self.workers:
            if w.task is None:
                with contextlib.suppress(OSError):
                    w.conn.send_bytes(pickle.dumps(None))
        deadline = time.monotonic() + _STOP_GRACE_S
        for w in self.workers:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
        self.terminate()

    def terminate(self) -> None:
        """SIGTERM every worker still running (a checkpoint being written is cleaned up),
        SIGKILL those still there after a grace period."""
        for w in self.workers:
            if w.process.is_alive():
                with contextlib.suppress(OSError):
                    w.process.terminate()
        deadline = time.monotonic() + _STOP_GRACE_S
        for w in self.workers:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=5)
            with contextlib.suppress(OSError):
                w.conn.close()
        with contextlib.suppress(OSError):
            self._lifeline_keep.close()
            self._lifeline.close()

    def pids(self) -> list[int]:
        """Process ids of the current workers."""
        return [int(w.process.pid) for w in self.workers if w.process.pid is not None]
