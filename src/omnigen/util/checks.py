"""Shared validators for user-facing values: each returns the checked value or raises a ValueError/TypeError
that names the value, what was received and what is allowed. The single home of these rules; nothing else
restates them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def _range(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"between {low} and {high}"
    if low is not None:
        return f">= {low}"
    if high is not None:
        return f"<= {high}"
    return ""


def _space(text: str) -> str:
    return f" {text}" if text else ""


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """An int (not a bool) in [low, high]; a whole float (a UI slider's 3.0) is accepted as its int."""
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{_space(_range(low, high))}, got {value!r:.60}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an int{_space(_range(low, high))}, got {value}")
    return value


def check_float(
    name: str, value: Any, low: float | None = None, high: float | None = None, low_open: bool = False
) -> float:
    """A finite number (not a bool) in [low, high] (or (low, high] with ``low_open``), as a float."""
    allowed = (
        _range(low, high) if not low_open else f"> {low}" + (f" and <= {high}" if high is not None else "")
    )
    allowed = _space(allowed)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a finite number{allowed}, got {value!r:.60}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number{allowed}, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        raise ValueError(f"{name} must be a finite number{allowed}, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r:.60}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {value!r:.60}")
    return value


def check_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    return value
