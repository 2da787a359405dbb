"""Ctrl-C and SIGTERM at safe points.

The ``certbench`` command turns SIGINT and SIGTERM into one ``KeyboardInterrupt`` that
``bench.cli.main`` reports as "interrupted" with exit status 130 (finished cells stay stored).
An interrupt that lands in the middle of an import does worse than stop the command: the
module is left half-initialised. Seen with ``certbench run`` and a SIGINT in its first
seconds: a plugin import failing with ``RecursionError`` and then reported as an unknown
defense (exit 2), a C++ ``std::terminate`` inside torch's import (exit -SIGABRT), and exit
status -SIGINT instead of 130 (CPython 3.11 sets a process-wide "unhandled
KeyboardInterrupt" flag when the exception leaves code that a C extension ran through
``PyRun_String``, and never clears it, even when the exception is caught later).

:func:`deferred` holds both signals while a block of imports runs and raises the interrupt
after it; :func:`forget_handled_interrupt` clears CPython's flag once the command has handled
the interrupt.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import threading
from collections.abc import Iterator

__all__ = ["deferred", "forget_handled_interrupt"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the block runs; raise ``KeyboardInterrupt`` after it.

    The handlers in place before the block are restored at its end. If a signal arrived, the
    interrupt is raised once the block has finished normally (an exception from the block
    itself propagates unchanged). Outside the main thread (where Python cannot change signal
    handlers) the block simply runs.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []

    def hold(signum: int, frame: object) -> None:
        arrived.append(signum)

    previous = {s: signal.signal(s, hold) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if arrived:
        raise KeyboardInterrupt


def forget_handled_interrupt() -> None:
    """Clear CPython's "unhandled KeyboardInterrupt" flag after the interrupt was handled.

    Without it the interpreter may end the process with SIGINT (status -2) although
    ``main`` caught the interrupt and returned 130 (module docstring). A no-op on
    interpreters that do not export the flag.
    """
    with contextlib.suppress(ValueError, AttributeError, OSError):
        ctypes.c_int.in_dll(ctypes.pythonapi, "_Py_UnhandledKeyboardInterrupt").value = 0
