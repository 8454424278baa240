"""The fenced code blocks of README.md and docs/*.md, read for tests/test_readme.py: which are commands,
which are data, which the document itself marks, and the commands of a shell block one by one. Runs
nothing.

A marker is an HTML comment on the last non-blank line before a fence:
    <!-- readme-test: skip (why) -->     the block is not run; the test lists it with the reason
    <!-- readme-test: file PATH -->      a data block: the test writes it to PATH in its scratch folder
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RUN_LANGUAGES = ("bash", "sh", "console", "python")
DATA_LANGUAGES = ("json", "yaml", "toml", "text")
MARKER = re.compile(r"^<!--\s*readme-test:\s*(skip|file)\b\s*(.*?)\s*-->$")
FENCE = re.compile(r"^```(\S*)\s*$")


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    marker: str | None = None  # "skip" | "file" | None
    argument: str = ""  # the skip reason or the file path
    source: str = "README.md"  # the document, relative to the repository

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line} ({self.language})"


@dataclass(frozen=True)
class Command:
    line: int
    text: str  # continuation lines joined, as bash would read it


def read_blocks(markdown: str, source: str = "README.md") -> list[Block]:
    """Every fenced block, in order. An unclosed fence or a marker that is malformed is a ValueError."""
    lines = markdown.splitlines()
    blocks, index = [], 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if fence is None:
            if "readme-test" in lines[index] and not MARKER.match(lines[index].strip()):
                raise ValueError(f"{source}:{index + 1}: malformed readme-test marker {lines[index]!r}")
            index += 1
            continue
        start = index
        end = next((k for k in range(start + 1, len(lines)) if lines[k].startswith("```")), None)
        if end is None:
            raise ValueError(f"{source}:{start + 1}: code block never closed")
        marker, argument = _marker_before(lines, start, source)
        text = "\n".join(lines[start + 1 : end]) + "\n"
        blocks.append(Block(start + 1, fence.group(1), text, marker, argument, source))
        index = end + 1
    return blocks


def _marker_before(lines: list[str], fence: int, source: str) -> tuple[str | None, str]:
    k = fence - 1
    while k >= 0 and not lines[k].strip():
        k -= 1
    found = MARKER.match(lines[k].strip()) if k >= 0 else None
    if found is None:
        return None, ""
    kind, argument = found.group(1), found.group(2).strip()
    if kind == "skip":
        argument = argument.removeprefix("(").removesuffix(")").strip()
    if not argument:
        raise ValueError(
            f"{source}:{k + 1}: '{kind}' marker without a {'reason' if kind == 'skip' else 'path'}"
        )
    return kind, argument


def shell_commands(block: Block) -> list[Command]:
    """The commands of a bash/sh block (comment lines and blank lines dropped, backslash continuations
    joined) or of a console block (the lines after "$ "; the other lines are output)."""
    commands: list[Command] = []
    pending: list[str] = []
    first = 0
    for offset, raw in enumerate(block.text.splitlines()):
        line = raw.rstrip()
        if block.language == "console" and not pending:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if not pending:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            first = block.line + 1 + offset
        if line.endswith("\\"):
            pending.append(line[:-1].rstrip())
            continue
        pending.append(line.strip() if len(pending) else line)
        commands.append(Command(first, " ".join(part.strip() for part in pending)))
        pending = []
    if pending:
        raise ValueError(f"{block.where}: the last command ends in a backslash")
    return commands


def chain(command: str) -> list[str]:
    """The parts of an ``a && b && c`` command (README commands quote no ``&&``)."""
    return [part.strip() for part in command.split(" && ")]
