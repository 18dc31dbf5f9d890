"""Named guards for user-given parameters, shared by the whole package.

Each guard returns the value in its plain Python form or raises with a one-line message naming
the parameter, the expectation and the value received: a wrong type raises
:class:`~robustface.errors.ParameterTypeError` (a ``TypeError``), a value out of range a
``ValueError``. ``bool`` is never accepted as a number; numpy integers and floats are.
Domain-specific checks (a tensor's shape for a head, a kNN graph's ids) stay beside their code
and call these for their scalar parts.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import TypeVar

import numpy as np

from robustface.errors import ParameterTypeError

__all__ = ["check_choice", "check_int", "check_real"]

T = TypeVar("T")


def _is_bool(value: object) -> bool:
    return isinstance(value, bool | np.bool_)


def _got(value: object) -> str:
    return f"{type(value).__name__} {value!r}"


def check_int(
    name: str, value: object, minimum: int | None = None, maximum: int | None = None
) -> int:
    """``value`` as an ``int``, or raise unless an integer in ``[minimum, maximum]`` (``None``:
    unbounded on that side)."""
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise ParameterTypeError(f"{name} must be an integer, got {_got(value)}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = [f">= {minimum}"] if minimum is not None else []
        bounds += [f"<= {maximum}"] if maximum is not None else []
        raise ValueError(f"{name} must be {' and '.join(bounds)}, got {value}")
    return value


def check_real(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    open_low: bool = False,
    open_high: bool = False,
    finite: bool = True,
) -> float:
    """``value`` as a ``float``, or raise unless a real number between ``low`` and ``high``
    (``None``: unbounded; ``open_low`` / ``open_high`` exclude the bound itself) and, with
    ``finite``, neither infinite nor NaN (NaN is always rejected when a bound is given)."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise ParameterTypeError(f"{name} must be a number, got {_got(value)}")
    value = float(value)
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    below = low is not None and not (value > low if open_low else value >= low)
    above = high is not None and not (value < high if open_high else value <= high)
    if below or above:
        if low is not None and high is not None:
            expect = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        elif low is not None:
            expect = f"{'>' if open_low else '>='} {low}"
        else:
            expect = f"{'<' if open_high else '<='} {high}"
        raise ValueError(f"{name} must be {expect}, got {value}")
    return value


def check_choice(name: str, value: T, choices: Collection[object]) -> T:
    """``value`` unchanged, or ``ValueError`` unless it is one of ``choices`` (listed in the
    message in their order)."""
    try:
        ok = value in choices
    except TypeError:  # unhashable value against a set or dict
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value
