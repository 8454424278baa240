"""JSON from untrusted input (a service request body, a batch line): one parse that turns every way
``json.loads`` can fail or let through text a later stage chokes on into a ``ValueError`` naming it.

``json.loads`` raises ``RecursionError`` on deeply nested arrays, a plain ``ValueError`` on an integer of
more than ``sys.get_int_max_str_digits()`` digits, and accepts ``"\\ud800"`` (a lone surrogate that no
UTF-8 encoder, tokenizer or file write accepts). ``parse_json`` refuses all three, and nesting deeper than
``MAX_DEPTH``.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 32  # no request or batch line nests deeper than a few levels


def parse_json(data: bytes | str) -> Any:
    """The JSON value of ``data`` (UTF-8, a BOM allowed); ValueError for anything else."""
    try:
        text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
        value = json.loads(text)
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8: {err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON: {err}") from None
    except RecursionError:
        raise ValueError(f"invalid JSON: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as err:  # an integer of too many digits
        raise ValueError(f"invalid JSON: {err}") from None
    try:
        check_json_value(value)
    except ValueError as err:
        raise ValueError(f"invalid JSON: {err}") from None
    return value


def check_json_value(value: Any, where: str = "") -> None:
    """Refuse nesting deeper than ``MAX_DEPTH`` and strings (keys included) that are not valid Unicode."""
    stack = [(value, where, 0)]
    while stack:
        item, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, str):
            check_text(item, path or "a string")
        elif isinstance(item, dict):
            for key, child in item.items():
                check_text(key, f"a key in {path or 'the object'}")
                stack.append((child, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{k}]", depth + 1) for k, child in enumerate(item))


def check_text(text: str, where: str) -> str:
    """``text`` if it encodes as UTF-8 (no lone surrogate such as ``"\\ud800"``); else a ValueError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start : err.end]
        raise ValueError(
            f"{where} holds {bad!r} at character {err.start}: a lone surrogate, not valid Unicode text"
        ) from None
    return text
