"""Argument checks shared by every room of the package, with one message style.

Each check returns the value in its canonical Python type (so ``numpy.float32(0.9)`` becomes
``0.9`` and ``numpy.int64(2)`` becomes ``2``) or raises with a message that names the
argument, shows the value and says what is allowed::

    sparsity must be a real number in [0, 1), got 1.0
    method must be one of 'set', 'rigl', 'dsr', ...; got 'rigl2'

``TypeError`` for a value of the wrong kind, ``ValueError`` for one out of range.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any


def _is_real(value: Any) -> bool:
    # numbers.Real covers int, float and numpy's floating and integer scalars; bool is an
    # int to Python but never a meaningful fraction or count here.
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not (
        type(value).__name__ == "bool_"
    )


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and _is_real(value)


def _as_float(value: Any) -> float:
    """``float(value)``, except that a numpy float narrower than 64 bits becomes the decimal
    it prints as: ``numpy.float32(0.9)`` is ``0.9``, not ``0.8999999761581421`` (which would
    make a run summary's sparsity differ from the one the user wrote)."""
    number = float(value)
    itemsize = getattr(getattr(value, "dtype", None), "itemsize", 8)
    if not isinstance(value, float) and itemsize < 8 and math.isfinite(number):
        number = float(str(value))
    return number


def _interval(low: float, high: float, closed_low: bool, closed_high: bool) -> str:
    return f"{'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"


def check_fraction(
    name: str,
    value: Any,
    low: float = 0.0,
    high: float = 1.0,
    *,
    closed_low: bool = True,
    closed_high: bool = True,
) -> float:
    """A real number inside an interval, returned as ``float``.

    Raises:
        TypeError: ``value`` is not a real number (a bool is not).
        ValueError: ``value`` is NaN or outside the interval.
    """
    allowed = f"a real number in {_interval(low, high, closed_low, closed_high)}"
    if not _is_real(value):
        raise TypeError(f"{name} must be {allowed}, got {value!r}")
    number = _as_float(value)
    ok_low = number >= low if closed_low else number > low
    ok_high = number <= high if closed_high else number < high
    if math.isnan(number) or not (ok_low and ok_high):
        hint = ""
        if high == 1.0 and 2.0 <= number <= 100.0:
            hint = f" (a fraction, not a percentage: did you mean {number / 100:g}?)"
        raise ValueError(f"{name} must be {allowed}, got {value!r}{hint}")
    return number


def check_sparsity(value: Any, name: str = "sparsity") -> float:
    """Fraction of zero weights over the sparse layers: a real number in ``[0, 1)``."""
    return check_fraction(name, value, 0.0, 1.0, closed_low=True, closed_high=False)


def check_finite(name: str, value: Any) -> float:
    """Any finite real number, returned as ``float``."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    number = _as_float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return number


def check_positive_or_none(name: str, value: Any) -> float | None:
    """``None``, or a finite real number ``> 0`` returned as ``float``."""
    if value is None:
        return None
    allowed = "a finite real number > 0, or None"
    if not _is_real(value):
        raise TypeError(f"{name} must be {allowed}, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return number


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None,
              maximum_text: str | None = None) -> int:
    """An integer ``>= minimum`` (and ``< maximum`` when given), returned as ``int``.

    ``maximum_text`` spells the bound in the message (``"2**64"`` reads better than its
    twenty digits).
    """
    allowed = f"an int >= {minimum}" if maximum is None else (
        f"an int in [{minimum}, {maximum_text or maximum})")
    if not _is_integer(value):
        raise TypeError(f"{name} must be {allowed}, got {value!r}")
    number = int(value)
    if number < minimum or (maximum is not None and number >= maximum):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return number


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    """One of the ``allowed`` strings (case-sensitive)."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(
            f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}"
        )
    return value


def check_bool(name: str, value: Any) -> bool:
    """``True`` or ``False`` (numpy's bool too)."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def check_patterns(name: str, value: Any) -> list[str] | None:
    """``None`` or a non-empty list of name patterns (strings)."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(
        isinstance(p, str) for p in value
    ):
        raise TypeError(f"{name} must be a list of name patterns (strings), got {value!r}")
    if not value:
        raise ValueError(
            f"{name} must be a non-empty list of name patterns (None for the default), "
            f"got {value!r}"
        )
    return list(value)
