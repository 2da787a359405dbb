"""The one set of value checks: integers, numbers, choices and booleans.

Every check returns the value (normalised: ``int``/``float``/``bool``) or raises
:class:`bench.errors.ValidationError` (a ``ConfigError`` and a ``ValueError``) whose message
names the field, what is allowed and what was given, e.g. ``n0 must be an integer >= 1, got
0``. ``where`` prefixes the message with the component (``"wong-kolter: eps must be ..."``).
Booleans are never accepted as numbers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any

from bench.errors import ValidationError

__all__ = ["check_bool", "check_choice", "check_int", "check_number"]


def _fail(where: str, name: str, what: str, value: Any) -> ValidationError:
    prefix = f"{where}: " if where else ""
    return ValidationError(f"{prefix}{name} must be {what}, got {value!r}")


def _int_rule(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"an integer in [{minimum}, {maximum}]"
    if minimum == 1:
        return "a positive integer"
    if minimum is not None:
        return f"an integer >= {minimum}"
    if maximum is not None:
        return f"an integer <= {maximum}"
    return "an integer"


def check_int(
    value: Any,
    name: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    where: str = "",
) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (either bound optional).

    Accepts Python and NumPy integers (and 0-d integer tensors); rejects ``bool`` and floats,
    even integral ones, so a typo such as ``n = 1e5`` is reported rather than truncated.
    """
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok and hasattr(value, "dtype") and getattr(value, "ndim", None) == 0:
        ok = not value.dtype.is_floating_point and not value.dtype.is_complex  # torch scalar
    if ok:
        v = int(value)
        ok = (minimum is None or v >= minimum) and (maximum is None or v <= maximum)
    if not ok:
        raise _fail(where, name, _int_rule(minimum, maximum), value)
    return int(value)


def _number_rule(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        if low == 0 and low_open:
            return "a positive number"
        return f"a number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"a number {'<' if high_open else '<='} {high:g}"
    return "a finite number"


def check_number(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    where: str = "",
    what: str | None = None,
) -> float:
    """``value`` as a finite ``float`` within the given (open or closed) bounds.

    ``what`` replaces the generated description of the allowed values in the message.
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = math.isfinite(v)
        if ok and low is not None:
            ok = v > low if low_open else v >= low
        if ok and high is not None:
            ok = v < high if high_open else v <= high
    if not ok:
        raise _fail(where, name, what or _number_rule(low, high, low_open, high_open), value)
    return float(value)


def check_choice(value: Any, name: str, allowed: Collection[str], *, where: str = "") -> str:
    """``value`` if it is one of the strings ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise _fail(where, name, f"one of {', '.join(allowed)}", value)
    return value


def check_bool(value: Any, name: str, *, where: str = "") -> bool:
    """``value`` if it is a ``bool`` (not 0/1 or a string)."""
    if not isinstance(value, bool):
        raise _fail(where, name, "true or false", value)
    return value
