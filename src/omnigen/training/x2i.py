"""X2I training data: JSONL rows -> validated, path-resolved `X2ISample`s.

This module owns the X2I file format (one JSON object per line), the image-tag rule shared with the
inference processor (`validate_image_tags`), and few-shot composition (`compose_instruction`). It
does not decode pixels, tokenise or batch: that is the collator's job. Images are only opened with
PIL's cheap `verify()` so that a corrupt file fails at load time rather than mid-epoch.

Format (reference: the fine-tuning JSONL described in the original OmniGen repository):
    required  "instruction" (str, tags `<img><|image_k|></img>`), "input_images" (list of str or null),
              "output_image" (str)
    optional  "task_type" (str), "id" (str), "weight" (positive number, default 1),
              "few_shot" ({"instruction", "input_images", "output_image"}), "meta" (object, ignored)
Rows of the original OmniGen files (task_type, instruction, input_images, output_image) are valid as
they are. Blank lines are not rows and are passed over; every other line becomes a sample or a bad
row, never nothing.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from omnigen.text.tags import compose_few_shot, validate_image_tags

logger = logging.getLogger(__name__)


REQUIRED_KEYS = ("instruction", "input_images", "output_image")
OPTIONAL_KEYS = ("task_type", "id", "weight", "few_shot", "meta")
ALLOWED_KEYS = REQUIRED_KEYS + OPTIONAL_KEYS
FEW_SHOT_KEYS = ("instruction", "input_images", "output_image")

# Few-shot prompt (paper: an in-context example is prepended to the query). The example keeps its tags
# 1..m, its output image is tag m+1 and the query's tags are shifted by m+1.

_GLOB_CHARS = re.compile(r"[*?\[]")


# --------------------------------------------------------------------------------------------------
# Image tags
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FewShot:
    """A worked example shown before the query."""

    instruction: str
    input_images: tuple[Path, ...]
    output_image: Path


@dataclass(frozen=True)
class X2ISample:
    """One validated row; paths are resolved, `source` is "file:line"."""

    instruction: str
    input_images: tuple[Path, ...]
    output_image: Path
    task_type: str | None
    id: str
    weight: float
    few_shot: FewShot | None
    source: str


@dataclass(frozen=True)
class BadRow:
    source: str
    reason: str


@dataclass(frozen=True)
class X2IReadResult:
    samples: list[X2ISample]
    skipped: list[BadRow]


class X2IFormatError(ValueError):
    """A bad X2I row; the message starts with "file:line"."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class _RowError(Exception):
    """Internal: the reason one row is bad."""


def compose_instruction(sample: X2ISample) -> tuple[str, list[Path]]:
    """Final instruction text and its ordered image paths (tag k <-> paths[k-1]): the sample's own
    without a few-shot example, ``tags.compose_few_shot``'s with one."""
    if sample.few_shot is None:
        return sample.instruction, list(sample.input_images)
    example = sample.few_shot
    return compose_few_shot(
        sample.instruction,
        sample.input_images,
        example.instruction,
        example.input_images,
        example.output_image,
    )


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def read_x2i(
    paths: str | Path | Sequence[str | Path],
    image_root: str | Path | None = None,
    on_bad_row: Literal["error", "skip"] = "error",
    check_images: bool | Literal["verify", "exists"] = "verify",
) -> X2IReadResult:
    """Read and validate X2I JSONL files (paths or glob strings; not directories).

    Relative image paths resolve against `image_root` if given, else the JSONL file's folder. With
    on_bad_row="error" the first bad row raises X2IFormatError; with "skip" bad rows are returned in
    `skipped` and their count is logged. check_images: "verify" (or True) opens every image with PIL's
    `verify()`; "exists" only checks that the files are there (a large generated set reads in seconds
    instead of minutes; a corrupt file then fails when it is first loaded); False skips both.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    files = _expand_paths(paths)
    root = Path(image_root) if image_root is not None else None
    if check_images not in (True, False, "verify", "exists"):
        raise ValueError(f"check_images must be 'verify', 'exists' or False, got {check_images!r}")
    checker = _ImageChecker("verify" if check_images is True else check_images)
    seen_ids: dict[str, str] = {}
    samples: list[X2ISample] = []
    skipped: list[BadRow] = []
    for file in files:
        base = root if root is not None else file.parent
        for source, raw in _iter_rows(file):
            try:
                sample = _parse_row(raw, source, base, checker)
                _check_unique_id(sample, seen_ids)
            except _RowError as err:
                if on_bad_row == "error":
                    raise X2IFormatError(source, str(err)) from None
                skipped.append(BadRow(source, str(err)))
                continue
            samples.append(sample)
    if skipped:
        logger.warning(
            "skipped %d bad X2I row(s) of %d; first: %s: %s",
            len(skipped),
            len(skipped) + len(samples),
            skipped[0].source,
            skipped[0].reason,
        )
    return X2IReadResult(samples=samples, skipped=skipped)


def _expand_paths(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    items = [paths] if isinstance(paths, (str, Path)) else paths
    if not isinstance(items, Sequence):
        raise TypeError(f"paths must be a str, Path or sequence of them, got {type(paths).__name__}")
    if len(items) == 0:
        raise ValueError("paths is empty; pass at least one JSONL file or glob")
    files: list[Path] = []
    for item in items:
        if not isinstance(item, (str, Path)):
            raise TypeError(f"paths entries must be str or Path, got {type(item).__name__}: {item!r}")
        files.extend(_expand_one(item))
    duplicates = sorted({str(f) for f in files if files.count(f) > 1})
    if duplicates:
        raise ValueError(f"JSONL file(s) listed more than once: {duplicates}; use 'weight' to upweight")
    return files


def _expand_one(item: str | Path) -> list[Path]:
    if isinstance(item, str) and _GLOB_CHARS.search(item):
        matches = [Path(m) for m in sorted(glob.glob(item, recursive=True)) if Path(m).is_file()]
        if not matches:
            raise FileNotFoundError(f"glob {item!r} matched no files")
        return matches
    path = Path(item)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass JSONL files or a glob such as '{path}/*.jsonl'")
    if not path.is_file():
        raise FileNotFoundError(f"X2I file not found: {path}")
    return [path]


def _iter_rows(file: Path) -> Iterator[tuple[str, bytes]]:
    with file.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield f"{file}:{number}", raw


def _parse_row(raw: bytes, source: str, base: Path, checker: _ImageChecker) -> X2ISample:
    row = _load_object(raw)
    _check_keys(row, ALLOWED_KEYS, REQUIRED_KEYS, where="row")
    instruction = _get_str(row, "instruction")
    inputs = _get_paths(row, "input_images", base)
    output = _resolve(_get_str(row, "output_image", non_empty=True), base)
    _check_tags(instruction, len(inputs), "instruction")
    few_shot = _get_few_shot(row, base)
    sample = X2ISample(
        instruction=instruction,
        input_images=inputs,
        output_image=output,
        task_type=_get_optional_str(row, "task_type"),
        id=_get_optional_str(row, "id") or source,
        weight=_get_weight(row),
        few_shot=few_shot,
        source=source,
    )
    meta = row.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise _RowError(f"'meta' must be an object, got {type(meta).__name__}")
    _check_sample_images(sample, checker)
    return sample


def _load_object(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError as err:
        raise _RowError(f"not valid UTF-8: {err}") from None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        raise _RowError(f"invalid JSON: {err.msg} at column {err.colno}") from None
    if not isinstance(row, dict):
        raise _RowError(f"expected a JSON object, got {_json_type(row)}")
    return row


def _check_keys(row: dict[str, Any], allowed: tuple[str, ...], required: tuple[str, ...], where: str) -> None:
    unknown = [key for key in row if key not in allowed]
    if unknown:
        raise _RowError(f"unknown key(s) {unknown} in {where}; allowed keys: {list(allowed)}")
    missing = [key for key in required if key not in row]
    if missing:
        raise _RowError(f"missing required key(s) {missing} in {where}")


def _get_str(row: dict[str, Any], key: str, non_empty: bool = False, prefix: str = "") -> str:
    value = row[key]
    if not isinstance(value, str):
        raise _RowError(f"'{prefix}{key}' must be a string, got {_json_type(value)}")
    if non_empty and not value.strip():
        raise _RowError(f"'{prefix}{key}' must be a non-empty string")
    return value


def _get_optional_str(row: dict[str, Any], key: str) -> str | None:
    if row.get(key) is None:
        return None
    return _get_str(row, key, non_empty=True)


def _get_paths(row: dict[str, Any], key: str, base: Path, prefix: str = "") -> tuple[Path, ...]:
    value = row[key]
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _RowError(f"'{prefix}{key}' must be a list of strings or null, got {_json_type(value)}")
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise _RowError(f"'{prefix}{key}[{index}]' must be a non-empty string, got {item!r}")
    return tuple(_resolve(item, base) for item in value)


def _resolve(path_text: str, base: Path) -> Path:
    path = Path(path_text)
    return path if path.is_absolute() else base / path


def _check_tags(text: str, num_images: int, key: str) -> None:
    try:
        validate_image_tags(text, num_images)
    except ValueError as err:
        raise _RowError(f"'{key}': {err}") from None


def _get_weight(row: dict[str, Any]) -> float:
    weight = row.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise _RowError(f"'weight' must be a positive number, got {_json_type(weight)} {weight!r}")
    if not math.isfinite(weight) or weight <= 0:
        raise _RowError(f"'weight' must be a positive finite number, got {weight!r}")
    return float(weight)


def _get_few_shot(row: dict[str, Any], base: Path) -> FewShot | None:
    value = row.get("few_shot")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _RowError(f"'few_shot' must be an object, got {_json_type(value)}")
    _check_keys(value, FEW_SHOT_KEYS, FEW_SHOT_KEYS, where="'few_shot'")
    instruction = _get_str(value, "instruction", prefix="few_shot.")
    inputs = _get_paths(value, "input_images", base, prefix="few_shot.")
    output = _resolve(_get_str(value, "output_image", non_empty=True, prefix="few_shot."), base)
    _check_tags(instruction, len(inputs), "few_shot.instruction")
    return FewShot(instruction=instruction, input_images=inputs, output_image=output)


def _check_unique_id(sample: X2ISample, seen_ids: dict[str, str]) -> None:
    first = seen_ids.setdefault(sample.id, sample.source)
    if first != sample.source:
        raise _RowError(f"duplicate id {sample.id!r} (first used at {first})")


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number" if isinstance(value, (int, float)) else type(value).__name__)


# --------------------------------------------------------------------------------------------------
# Image checks
# --------------------------------------------------------------------------------------------------


class _ImageChecker:
    """Existence (+ PIL `verify()` in "verify" mode) per path, cached so shared images are checked once
    per read; mode False checks nothing."""

    def __init__(self, mode: Literal["verify", "exists"] | bool) -> None:
        self.mode = mode
        self._problems: dict[Path, str | None] = {}

    def check(self, path: Path, field: str) -> None:
        if not self.mode:
            return
        if path not in self._problems:
            self._problems[path] = _image_problem(path, verify=self.mode == "verify")
        problem = self._problems[path]
        if problem is not None:
            raise _RowError(f"'{field}': {problem}")


def _image_problem(path: Path, verify: bool = True) -> str | None:
    if not path.is_file():
        return f"image file not found: {path}"
    if not verify:
        return None
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # PIL signals corrupt data with many exception types
        return f"corrupt image {path}: {type(err).__name__}: {err}"
    return None


def _check_sample_images(sample: X2ISample, checker: _ImageChecker) -> None:
    for index, path in enumerate(sample.input_images):
        checker.check(path, f"input_images[{index}]")
    checker.check(sample.output_image, "output_image")
    if sample.few_shot is not None:
        for index, path in enumerate(sample.few_shot.input_images):
            checker.check(path, f"few_shot.input_images[{index}]")
        checker.check(sample.few_shot.output_image, "few_shot.output_image")
