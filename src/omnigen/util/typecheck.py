"""Types of config values: ``load_yaml`` (YAML that reads ``1e-5`` as a number) and ``matches`` /
``describe_type`` (does a value fit a type annotation; the annotation in words). The one home of both
rules; ``omnigen.util.checks.validate`` checks config fields with them.

Supported annotations: ``int``, ``float`` (an int is accepted), ``str``, ``bool``, ``None``, ``Any``,
unions (``X | None``), ``list[X]``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``dict`` / ``dict[K, V]`` and
nested dataclasses. A bool is never taken for an int or a float.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

# YAML 1.1 (PyYAML) only reads a float with a dot ("1.0e-5"); YAML 1.2 also reads "1e-5" and "1E5".
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load``, except that numbers in scientific notation without a dot are floats."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    # replace the float resolver (resolvers are kept per first character)
    Loader.yaml_implicit_resolvers = {
        key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
        for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    return yaml.load(text, Loader=Loader)  # a SafeLoader subclass: no arbitrary objects


def matches(value: Any, expected: Any) -> bool:
    if expected is Any:
        return True
    if expected is None or expected is type(None):
        return value is None
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in args)
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and (not args or all(matches(v, args[0]) for v in value))
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            return False
        return not args or all(matches(k, args[0]) and matches(v, args[1]) for k, v in value.items())
    if isinstance(expected, type):
        return isinstance(value, expected)
    return True  # an annotation this checker does not know: not checked


def describe_type(expected: Any) -> str:
    if expected is type(None) or expected is None:
        return "None"
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {describe_type(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)} ({', '.join(describe_type(a) for a in args)})"
    if origin is list:
        return f"a list of {describe_type(args[0])}" if args else "a list"
    if origin is dict or expected is dict:
        return "a mapping"
    if dataclasses.is_dataclass(expected):
        return f"a mapping ({expected.__name__})"
    return getattr(expected, "__name__", str(expected))
