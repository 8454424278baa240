"""``omnigen vocab``: its listing is the miniworld modules' word lists, and the shipped tokenizer knows
every word it lists. The output is parsed back here and compared with the source modules directly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from omnigen.cli.main import main
from omnigen.miniworld import scene as ms
from omnigen.miniworld import text as mt

NAME_GROUPS = ("shapes", "colours", "backgrounds", "sizes", "positions", "relations", "maps")
SHIPPED = Path(__file__).resolve().parents[1] / "src" / "omnigen" / "assets" / "miniworld"


def parse(output: str) -> dict[str, str]:
    """Listing lines ("  key: text", continuation lines joined) -> {key: text}; headers dropped."""
    joined: list[str] = []
    for line in output.splitlines():
        if line.startswith("    ") and joined:
            joined[-1] += " " + line.strip()
        else:
            joined.append(line)
    entries = {}
    for line in joined:
        if line.startswith("  "):
            key, _, text = line.strip().partition(": ")
            entries[key] = text
    return entries


def split_top(text: str) -> list[str]:
    """ "a (b, c), d" -> ["a (b, c)", "d"]: commas inside brackets do not split."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    return [*items, current.strip()] if current.strip() else items


def names_of(text: str) -> dict[str, tuple[str, ...]]:
    """ "purple (violet), red; a note" -> {"purple": ("violet",), "red": ()}."""
    found = {}
    for item in split_top(text.split("; ")[0]):
        name, _, rest = item.partition(" (")
        found[name] = tuple(w.strip() for w in rest.removesuffix(")").split(",")) if rest else ()
    return found


def synonyms(name: str) -> tuple[str, ...]:
    return tuple(w for w in mt.SYNONYMS.get(name, ()) if w != name)


def vocab_output(capsys, *args: str) -> str:
    assert main(["vocab", *args]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(
    "group, names",
    [
        ("shapes", ms.SHAPES),
        ("colours", tuple(ms.OBJECT_COLOURS)),
        ("backgrounds", tuple(ms.BACKGROUND_COLOURS)),
        ("sizes", ms.SIZES),
        ("positions", ms.CELL_NAMES),
        ("relations", ("left of", "right of", "above", "below")),
        ("maps", ("edge map", "segmentation map", "depth map")),
    ],
)
def test_names_and_their_synonyms_are_the_modules(capsys, group, names):
    for short in ((), ("--short",)):
        listed = names_of(parse(vocab_output(capsys, *short))[group])
        assert listed == {name: synonyms(name) for name in names}, (group, listed)


def test_the_notes_name_the_default_size_and_the_prepositions(capsys):
    entries = parse(vocab_output(capsys))
    assert entries["sizes"].endswith(f"; no size word: {mt.DEFAULT_SIZE}")
    assert all(f"'{p}'" in entries["positions"] for p in mt.CELL_PREPOSITIONS)


def test_every_command_variant_and_frame_is_listed_under_its_task(capsys):
    entries = parse(vocab_output(capsys))
    by_key = {key: text.split(" | ") for keys, text in entries.items() for key in keys.split(", ")}
    expected = {**mt.COMMANDS, **{f"frames/{f}": frames for f, frames in mt.FRAMES.items()}}
    for key, texts in expected.items():
        assert by_key.get(key) == list(texts), key
    assert not set(by_key) - set(expected) - set(NAME_GROUPS), "a listed task the module does not have"


def test_the_short_listing_has_each_tasks_first_variant(capsys):
    entries = parse(vocab_output(capsys, "--short"))
    for key, texts in mt.COMMANDS.items():
        assert texts[0] in entries[mt.family_of(key)].split(" | "), key
    assert not any(key.startswith("frames/") for key in entries)


def test_the_shipped_tokenizer_knows_every_listed_word(capsys):
    from omnigen.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(SHIPPED)
    entries = parse(vocab_output(capsys))
    texts = [
        t for group in NAME_GROUPS for name, syns in names_of(entries[group]).items() for t in (name, *syns)
    ]
    texts += [t for key, text in entries.items() if "/" in key for t in text.split(" | ")]
    texts += list(mt.CELL_PREPOSITIONS)
    assert len(texts) > 150
    unknown = []
    for text in texts:
        words = re.sub(r"\{\w+\}", " ", text).split()
        unknown += [w for w in words if tokenizer.unk_token_id in tokenizer.encode(w)]
    assert not unknown, f"the shipped tokenizer does not know {sorted(set(unknown))}"
    assert tokenizer.unk_token_id in tokenizer.encode("zebra")  # the check can fail
