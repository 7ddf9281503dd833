"""Argument checks shared by percnb's public functions: each raises a ValueError or TypeError that names
the argument, what came and what was expected, so that a bad setting fails at the call, not steps later."""
from __future__ import annotations

import math
import numbers
from typing import Any


def check_int(name: str, value: Any, minimum: int = 1, allow_none: bool = False) -> None:
    """`value` is an int >= `minimum` (bool refused: True as a count is always a bug), or None if allowed."""
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if allow_none else ''}, got {value!r}")


def check_real(name: str, value: Any, *, minimum: float, strict: bool, maximum: float = math.inf,
               hint: str = "") -> None:
    """`value` is a real number in (minimum, maximum) (strict) or [minimum, maximum): finite, since
    NaN fails every comparison and inf is not below any maximum. `hint` (appended) says what to do."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not ((value > minimum if strict else value >= minimum) and value < maximum):
        if maximum == math.inf:
            bounds = f"{'>' if strict else '>='} {minimum:g}"
        else:
            bounds = f"in {'(' if strict else '['}{minimum:g}, {maximum:g})"
        raise ValueError(f"{name} must be a finite number {bounds}, got {value!r}{hint}")


def check_callable(name: str, value: Any) -> None:
    """`value` is None or callable."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a callable or None, got {type(value).__name__}")
