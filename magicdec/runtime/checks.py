"""Type checks of the public settings' fields at construction (`SamplingParams`, `SpecConfig`, …): one line
naming the field, the value and the type expected, before any value reaches a tensor.

A bool is not a number here (`True` as a count or a temperature is a mistake, not a 1). Integer and real
types of other libraries (NumPy's) are accepted and stored as Python's int and float.
"""

from __future__ import annotations

import numbers
from typing import Any


def _got(value: Any) -> str:
    return f"got {value!r} ({type(value).__name__})"


def integer(owner: str, name: str, value: Any, optional: bool = False) -> int | None:
    """`value` as an int, or a TypeError naming `owner`'s field `name` (None passes when `optional`)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        extra = " or None" if optional else ""
        raise TypeError(f"{owner}: {name} must be an integer{extra}, {_got(value)}")
    return int(value)


def real(owner: str, name: str, value: Any) -> float:
    """`value` as a float (an int is fine), or a TypeError naming the field."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a number, {_got(value)}")
    return float(value)


def text(owner: str, name: str, value: Any, optional: bool = False) -> None:
    """A TypeError naming the field unless `value` is a str (or None when `optional`)."""
    if not (isinstance(value, str) or (value is None and optional)):
        raise TypeError(f"{owner}: {name} must be a string{' or None' if optional else ''}, {_got(value)}")


def flag(owner: str, name: str, value: Any) -> None:
    """A TypeError naming the field unless `value` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be True or False, {_got(value)}")


def set_fields(obj: Any, **values: Any) -> None:
    """Store normalized values on a frozen dataclass from its `__post_init__`."""
    for name, value in values.items():
        object.__setattr__(obj, name, value)
