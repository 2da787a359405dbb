"""Atomic file replacement, and cleanup of what a killed writer left behind.

Every file certbench writes (checkpoints, their JSON records, leaderboard CSV/PNG, command
output) goes through :func:`atomic_write_bytes`: the bytes go to a hidden temporary file in
the same directory, are fsync'ed, and ``os.replace`` puts them in place, so a reader sees the
old file or the new one, never a partial one. A process killed with SIGKILL between the two
steps cannot delete its temporary file; the temporary's name therefore records the host and
process id of its writer, and the next successful write to the same target removes the
temporaries of writers on this host that are no longer running.

:func:`exclusive_lock` serialises processes that would write the same files (two workers
needing the same checkpoint): an advisory ``flock`` that the kernel releases when its holder
dies, so a killed process never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_write_bytes", "exclusive_lock", "remove_stale_temporaries"]

_SUFFIX = ".tmp"


def _host() -> str:
    name = socket.gethostname() or "host"
    return "".join(c if c.isalnum() or c == "-" else "-" for c in name)


def _prefix(path: Path, host: str) -> str:
    return f".{path.name}.{host}."


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete temporaries of ``path`` left by dead writers on this host; returns them.

    A temporary is ``.<name>.<host>.<pid>.<random>.tmp`` in ``path``'s directory. Only those
    of this host whose process no longer exists are removed (writers on other hosts sharing
    the directory, and live writers here, are left alone).
    """
    path = Path(path)
    prefix = _prefix(path, _host())
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            name = entry.name
            if not (name.startswith(prefix) and name.endswith(_SUFFIX)):
                continue
            pid_text = name[len(prefix) :].split(".", 1)[0]
            if not pid_text.isdigit() or _pid_alive(int(pid_text)):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int = 0o644) -> Path:
    """Replace ``path`` with ``data`` atomically and durably; returns ``path``.

    Temporary file in the same directory (named after this host and process), fsync,
    ``os.replace``, fsync of the directory. On any error, including KeyboardInterrupt, the
    temporary file is removed and ``path`` is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f"{_prefix(path, _host())}{os.getpid()}.", suffix=_SUFFIX
    )
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    remove_stale_temporaries(path)
    return path


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on the file ``path`` (created if missing) while the
    block runs; waits while another process holds it. A no-op where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
