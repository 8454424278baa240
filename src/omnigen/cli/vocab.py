"""``omnigen vocab``: the words the shipped miniature model knows, grouped (shapes, colours, backgrounds,
sizes, positions, relations, maps; then the phrasings of every task and the sentence frames around them).

Everything is read from ``omnigen.miniworld.scene`` (the names) and ``omnigen.miniworld.text`` (their
synonyms, the command variants and the frames), the modules the training data was written with; this
module only groups and formats them. A name's synonyms follow it in brackets: ``purple (violet)``.
"""

from __future__ import annotations

import argparse
import textwrap

WIDTH = 110  # output lines are wrapped here; continuation lines start with INDENT
INDENT = "    "
PLACEHOLDERS = (
    "{ref}: 'red circle'; {object(s)}: 'a small red circle in the top left'; {at}: 'in the top left'; "
    "{img1}: <img><|image_1|></img>; the others: a name above"
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "vocab", help="list the words and phrasings the shipped miniature model was trained on"
    )
    p.add_argument(
        "--short", action="store_true", help="one phrasing per task and no frames (the README's listing)"
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    print(render(short=args.short), flush=True)  # the command's output
    return 0


def _named(names, note: str = "") -> str:
    from omnigen.miniworld.text import SYNONYMS

    items = []
    for name in names:
        others = [word for word in SYNONYMS.get(name, (name,)) if word != name]
        items.append(f"{name} ({', '.join(others)})" if others else name)
    return ", ".join(items) + note


def name_groups() -> dict[str, str]:
    """The names, one line each: group -> "name (synonym, ...), name, ..."."""
    from omnigen.miniworld import scene as ms
    from omnigen.miniworld import text as mt

    relations = [name for name in mt.SYNONYMS if name.endswith(" of") or name in ("above", "below")]
    maps = [name for name in mt.SYNONYMS if name.endswith(" map")]
    return {
        "shapes": _named(ms.SHAPES),
        "colours": _named(ms.OBJECT_COLOURS),
        "backgrounds": _named(ms.BACKGROUND_COLOURS),
        "sizes": _named(ms.SIZES, f"; no size word: {mt.DEFAULT_SIZE}"),
        "positions": _named(ms.CELL_NAMES, f"; after {' / '.join(repr(p) for p in mt.CELL_PREPOSITIONS)}"),
        "relations": _named(relations),
        "maps": _named(maps),
    }


def phrasing_groups() -> dict[str, tuple[str, ...]]:
    """Every task's command variants, then every family's sentence frames ("frames/<family>"); tasks or
    families with the same list share one key ("condition/edges, condition/depth")."""
    from omnigen.miniworld import text as mt

    merged: dict[tuple[str, ...], list[str]] = {}
    for key, texts in [*mt.COMMANDS.items(), *((f"frames/{f}", t) for f, t in mt.FRAMES.items())]:
        merged.setdefault(tuple(texts), []).append(key)
    return {", ".join(keys): texts for texts, keys in merged.items()}


def short_phrasings() -> dict[str, tuple[str, ...]]:
    """Each family's tasks by their first command variant (duplicates once): family -> variants."""
    from omnigen.miniworld import text as mt

    families: dict[str, list[str]] = {}
    for key, texts in mt.COMMANDS.items():
        first = families.setdefault(mt.family_of(key), [])
        if texts[0] not in first:
            first.append(texts[0])
    return {family: tuple(texts) for family, texts in families.items()}


def render(short: bool = False) -> str:
    lines = ["names (synonyms in brackets):"]
    lines += [_wrap(f"{group}: {text}") for group, text in name_groups().items()]
    if short:
        lines += ["", _wrap(f"one phrasing per task (`omnigen vocab` lists them all; {PLACEHOLDERS}):", "")]
        groups = short_phrasings()
    else:
        lines += ["", _wrap(f"phrasings (one of them per instruction; {PLACEHOLDERS}):", "")]
        groups = phrasing_groups()
    lines += [_wrap(f"{key}: {' | '.join(texts)}") for key, texts in groups.items()]
    return "\n".join(lines)


def _wrap(line: str, indent: str = "  ") -> str:
    return "\n".join(
        textwrap.wrap(
            line,
            WIDTH,
            initial_indent=indent,
            subsequent_indent=INDENT,
            break_long_words=False,
            break_on_hyphens=False,
        )
    )
