"""Argument checks shared by the whole package: one place, one wording.

Each returns the checked value, so a caller writes `r = check_int("r", r, minimum=1)`,
and raises a `ValueError` (a `TypeError` for the wrong type) that names the argument,
shows what it got and says what would do.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["is_int", "is_number", "check_int", "check_positive", "check_fraction", "check_choice"]


def is_int(value) -> bool:
    """True for an integer (Python or NumPy), never for a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """True for a finite real number (int or float), never for a bool or NaN."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None, hint: str = "") -> int:
    """`value` as an int in [minimum, maximum]; TypeError for a non-int, ValueError out of range."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}" + (f"; {hint}" if hint else ""))
    value = int(value)
    if minimum is not None and value < minimum:
        wanted = "a positive int (at least 1)" if minimum == 1 else f"an int of at least {minimum}"
        raise ValueError(f"{name} must be {wanted}, got {name}={value}" + (f"; {hint}" if hint else ""))
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {name}={value}" + (f"; {hint}" if hint else ""))
    return value


def check_positive(name: str, value, hint: str = "") -> float:
    """`value` as a finite number > 0 (a learning rate, alpha, a scale)."""
    if not is_number(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {name}={value!r}" + (f"; {hint}" if hint else ""))
    return value


def check_fraction(name: str, value, upper_inclusive: bool = True, hint: str = "") -> float:
    """`value` as a number in [0, 1] (or [0, 1) with `upper_inclusive=False`)."""
    ok = is_number(value) and 0.0 <= value and (value <= 1.0 if upper_inclusive else value < 1.0)
    if not ok:
        interval = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {name}={value!r}" + (f"; {hint}" if hint else ""))
    return value


def check_choice(name: str, value, choices):
    """`value` if it is one of `choices` (a tuple, or a dict's keys; not a str); otherwise ValueError naming them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value
