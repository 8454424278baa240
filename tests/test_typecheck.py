"""omnigen.util.typecheck: YAML numbers and the type half of ``omnigen.util.checks.validate`` (fields
checked against their annotations)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from omnigen.util.checks import validate
from omnigen.util.typecheck import load_yaml


@dataclass
class Inner:
    size: int


@dataclass
class Example:
    rate: float = 0.5
    count: int = 1
    flag: bool = False
    name: str | None = None
    items: list[str] = field(default_factory=list)
    pair: tuple[float, float] = (0.0, 1.0)
    many: tuple[str, ...] = ()
    table: dict[str, int] = field(default_factory=dict)
    inner: Inner | None = None
    anything: Any = None


def test_yaml_scientific_notation_is_a_float_and_other_scalars_keep_their_types():
    values = load_yaml(
        "a: 1e-5\nb: 3E+2\nc: -2.5e-3\nd: 10\ne: 1.5\nf: .inf\ng: 1e5x\nh: yes\ni: '1e-5'\nj: 0x10"
    )
    assert values == {
        "a": 1e-5,
        "b": 300.0,
        "c": -2.5e-3,
        "d": 10,
        "e": 1.5,
        "f": float("inf"),
        "g": "1e5x",
        "h": True,
        "i": "1e-5",
        "j": 16,
    }
    assert all(isinstance(values[k], float) for k in "abcef")


def test_validate_accepts_values_that_match_their_annotations():
    validate(Example())
    example = Example(
        rate=2,
        name="x",
        items=["a"],
        pair=(1, 2.5),
        many=("a", "b"),
        table={"a": 1},
        inner=Inner(3),
        anything=object(),
    )
    validate(example)
    assert example.rate == 2.0 and isinstance(example.rate, float)  # an int is taken for a float field


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rate": "1e-5"}, "rate must be a finite number, got '1e-5'"),
        ({"count": 1.5}, "count must be an int, got 1.5"),
        ({"count": True}, "count must be an int, got True"),
        ({"flag": 1}, "flag must be true or false, got 1"),
        ({"name": 3}, "name must be a string or None, got 3"),
        ({"items": ["a", 2]}, "items must be a list of str"),
        ({"items": "a"}, "items must be a list of str, got str 'a'"),
        ({"pair": (1.0,)}, "pair must be a list of 2"),
        ({"many": ("a", 1)}, "many must be a list of str"),
        ({"table": {"a": "b"}}, "table must be a mapping"),
        ({"inner": {"size": 1}}, "inner must be a mapping \\(Inner\\) or None"),
    ],
)
def test_validate_names_the_field_and_the_type_expected(changes, message):
    with pytest.raises(TypeError, match=message):
        validate(Example(**changes), prefix="")
    with pytest.raises(TypeError, match="example." + message.split(" ")[0]):
        validate(Example(**changes), prefix="example.")
