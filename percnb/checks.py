"""Argument checks shared by the whole package: each raises a ValueError or TypeError that names the
argument, what was expected and what came, so that bad input fails at the public boundary with a
message that says how to fix it (never deep inside torch, never as a silent wrong answer)."""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence, Tuple, Union

import torch


def int_at_least(name: str, value: Any, minimum: int = 1) -> int:
    """`value` as an int >= minimum (numpy ints too). bool is an int subclass, but True as a size is
    always a bug."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def positive_int(name: str, value: Any) -> int:
    """`value` as an int >= 1 (a size, a count)."""
    return int_at_least(name, value, 1)


def positive_float(name: str, value: Any) -> float:
    """`value` as a finite number > 0 (a scale, a standard deviation, a learning rate)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    return float(value)


def real(name: str, value: Any, *, minimum: float, strict: bool, maximum: float = math.inf,
         hint: str = "") -> float:
    """`value` as a finite real number in (minimum, maximum) (strict) or [minimum, maximum). NaN fails
    every comparison and inf is below no maximum, so both are refused. `hint` (appended to the
    message) says what the setting means or what to do."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not ((value > minimum if strict else value >= minimum) and value < maximum):
        if maximum == math.inf:
            bounds = f"{'>' if strict else '>='} {minimum:g}"
        else:
            bounds = f"in {'(' if strict else '['}{minimum:g}, {maximum:g})"
        raise ValueError(f"{name} must be a finite number {bounds}, got {value!r}{hint}")
    return float(value)


def callable_or_none(name: str, value: Any) -> Any:
    """`value` as None or a callable (a hook, a step function)."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a callable or None, got {type(value).__name__}")
    return value


def fraction(name: str, value: Any) -> float:
    """`value` as a number in [0, 1) (a dropout rate)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)


def boolean(name: str, value: Any) -> bool:
    """`value` as a real bool (1, "yes" or None are refused: a switch is True or False)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    """`value` as one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def int_tuple(name: str, value: Any) -> Tuple[int, ...]:
    """`value` as a non-empty tuple of positive ints (a grid shape)."""
    if not isinstance(value, tuple) or not value or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in value):
        raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {value!r}")
    return value


def describe(value: Any) -> str:
    """How a tensor (or anything else) looks, for error messages: its shape and dtype, or its type."""
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


def shape(name: str, value: Any, expected: Sequence[Union[str, Tuple[str, int]]]) -> torch.Tensor:
    """`value` as a tensor of the `expected` shape, one entry per axis: a name (any size) or a
    (name, size) pair (that size), e.g. shape("q", q, ("batch", "q_len", ("q_dim", 8)))."""
    sizes = [e[1] if isinstance(e, tuple) else None for e in expected]
    wanted = "(" + ", ".join(f"{e[0]}={e[1]}" if isinstance(e, tuple) else e for e in expected) + ")"
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {wanted}, got {describe(value)}")
    if value.dim() != len(expected) or any(n is not None and s != n for s, n in zip(value.shape, sizes)):
        raise ValueError(f"{name} must have shape {wanted}, got {describe(value)}")
    return value


def attention_mask(mask: Any, batch: int, length: int, name: str = "attention_mask") -> torch.Tensor:
    """A (batch, length) key mask of bools or 0/1 numbers, returned as bool (True = attend)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({batch}, {length}), got {describe(mask)}")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{name} must have shape (batch, input_len) = ({batch}, {length}), got {describe(mask)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise TypeError(f"{name} must be bool or 0/1 numbers, got dtype {mask.dtype}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        bad = mask[(mask != 0) & (mask != 1)].flatten()[:3].tolist()
        raise ValueError(f"{name} must hold only 0/1 (or bools; 1 = attend), found values such as {bad}")
    return mask != 0


def optional(check):
    """A check that lets None through and applies `check` to anything else."""
    def check_optional(name: str, value: Any) -> Optional[Any]:
        return None if value is None else check(name, value)
    check_optional.__doc__ = f"None, or {check.__doc__ or check.__name__}"
    return check_optional
