"""The one validator of user-facing values. A config field is declared once, with its type (the annotation)
and its range (a ``Rule`` in the field's metadata, most easily through ``option``); ``validate`` checks
every field of a dataclass instance against both. The single functions (``check_int``, ``check_float``,
...) check one loose value (a function argument) by the same rules. Every error is a ValueError (a value
out of range or not among the choices) or a TypeError (a value of the wrong type) that names the field,
the value received and what is allowed. The single home of these rules; nothing else restates them.

A bool is never taken for an int or a number; NaN and infinities are never numbers; a whole float (a UI
slider's 3.0) is taken as its int.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Sequence
from typing import Any

from omnigen.util.typecheck import describe_type, matches

RULE = "rule"  # the metadata key of a field's Rule
KINDS = ("int", "float", "bool", "str", "choice", "sizes")


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a field allows beyond its annotation. ``kind`` (one of ``KINDS``; "sizes" is a list of positive
    ints) defaults to the annotation's (``int``, ``float``, ``bool``, ``str``; "choice" with ``choices``);
    other annotations (lists, mappings, dataclasses) are checked by their structure alone."""

    kind: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False  # high itself is not allowed
    optional: bool = False  # None is allowed (also when the annotation says ``X | None``)
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.kind and self.kind not in KINDS:
            raise ValueError(f"Rule kind must be one of {KINDS}, got {self.kind!r}")

    def check(self, name: str, value: Any, annotation: Any = Any) -> Any:
        """``value`` (an int for a whole float of an int field, a float for an int of a float field, a
        tuple for a list of sizes), or a TypeError/ValueError naming ``name``, the value and what is
        allowed."""
        optional = self.optional or _allows_none(annotation)
        if value is None and optional:
            return None
        kind = self.kind or _kind_of(annotation, self.choices)
        allowed = self.describe(kind) + (" or None" if optional else "")
        if kind == "int":
            return _int(name, value, allowed, self)
        if kind == "float":
            return _float(name, value, allowed, self)
        if kind == "bool":
            return value if isinstance(value, bool) else _wrong_type(name, allowed, value)
        if kind == "str":
            return value if isinstance(value, str) else _wrong_type(name, allowed, value)
        if kind == "choice":
            return value if value in self.choices else _out_of_range(name, allowed, value)
        if kind == "sizes":
            if not isinstance(value, (list, tuple)):
                return _wrong_type(name, allowed, value)
            return tuple(check_int(f"{name}[{k}]", v, 1) for k, v in enumerate(value))
        if not matches(value, annotation):
            _wrong_type(name, describe_type(annotation), value, structure=True)
        return value

    def describe(self, kind: str | None = None) -> str:
        """The allowed values in words (for help texts and errors), e.g. "an int >= 1"."""
        kind = kind or self.kind
        if self.choices:
            return "one of " + ", ".join(map(repr, self.choices))
        what = {
            "int": "an int",
            "float": "a finite number",
            "bool": "true or false",
            "str": "a string",
            "sizes": "a list of positive ints",
        }.get(kind, kind)
        low = None if self.low is None else f"{'>' if self.low_open else '>='} {self.low}"
        high = None if self.high is None else f"{'<' if self.high_open else '<='} {self.high}"
        if low and high and not (self.low_open or self.high_open):
            bounds = [f"between {self.low} and {self.high}"]
        else:
            bounds = [b for b in (low, high) if b]
        return " ".join([what, " and ".join(bounds)]).strip()


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, **rule: Any) -> Any:
    """A dataclass field with its help text and its ``Rule`` (``low=1``, ``choices=(...)``, ...)."""
    metadata = {"help": help, RULE: Rule(**rule)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def validate(instance: Any, prefix: str = "") -> None:
    """Check every field of dataclass ``instance`` against its annotation and ``Rule``, in declaration
    order, and store the checked value (``Rule.check``); ``prefix`` names the object (``"lora."``).
    Config dataclasses call this first thing in ``__post_init__``, before the rules that relate fields."""
    hints = _hints(type(instance))
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        rule = f.metadata.get(RULE) or Rule()
        checked = rule.check(prefix + f.name, value, hints[f.name])
        if checked is not value:
            object.__setattr__(instance, f.name, checked)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _allows_none(annotation: Any) -> bool:
    return annotation is not Any and matches(None, annotation)


def _kind_of(annotation: Any, choices: Sequence[Any]) -> str:
    """The scalar kind of ``annotation`` (``X | None`` counts as ``X``); "" for any other annotation."""
    if choices:
        return "choice"
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, _UnionType) and len(args) == 1:
        annotation = args[0]
    return {int: "int", float: "float", bool: "bool", str: "str"}.get(annotation, "")


_UnionType = type(int | None)


def _wrong_type(name: str, allowed: str, value: Any, structure: bool = False) -> Any:
    """A TypeError; the value's repr says a scalar's type, a structure's type is named before it."""
    got = f"{type(value).__name__} {value!r:.60}" if structure else f"{value!r:.60}"
    raise TypeError(f"{name} must be {allowed}, got {got}")


def _out_of_range(name: str, allowed: str, value: Any) -> Any:
    """A ValueError; the value has the right type, so None (of an optional field) is beside the point."""
    raise ValueError(f"{name} must be {allowed.removesuffix(' or None')}, got {value!r:.60}")


def _in_range(value: float, rule: Rule) -> bool:
    if rule.low is not None and (value <= rule.low if rule.low_open else value < rule.low):
        return False
    return rule.high is None or (value < rule.high if rule.high_open else value <= rule.high)


def _int(name: str, value: Any, allowed: str, rule: Rule) -> int:
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return _wrong_type(name, allowed, value)
    return value if _in_range(value, rule) else _out_of_range(name, allowed, value)


def _float(name: str, value: Any, allowed: str, rule: Rule) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _wrong_type(name, allowed, value)
    if not math.isfinite(value) or not _in_range(value, rule):
        return _out_of_range(name, allowed, value)
    return float(value)


# ---------------------------------------------------------------------- one loose value (an argument)
def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """An int (not a bool) in [low, high]; a whole float is taken as its int."""
    return Rule("int", low, high).check(name, value)


def check_float(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite number (not a bool) in [low, high] (open ends with ``low_open``/``high_open``), as a float."""
    return Rule("float", low, high, low_open, high_open).check(name, value)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    return Rule("choice", choices=tuple(choices)).check(name, value)


def check_bool(name: str, value: Any) -> bool:
    return Rule("bool").check(name, value)


def check_str(name: str, value: Any) -> str:
    return Rule("str").check(name, value)
