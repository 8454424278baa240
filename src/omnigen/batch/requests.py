"""The batch request format: one JSON object per line -> validated `Request`s and `BadLine`s.

Owns the JSONL schema of ``omnigen batch`` and its validation. Does not load the model, open images
beyond an existence check, or write anything.

A line (blank lines are not requests):
    required  "prompt" (str; input images referenced as <img><|image_k|></img>)
    optional  "id" (str of [A-Za-z0-9._-], default: the line number), "input_images" (list of paths,
              relative to the JSONL's folder), "mask" (a path like the images': regenerate the first
              input image where it is white, keep it exactly where black), "n" (samples, default 1), "seed" (int; image k uses
              seed + k; default: the run's base seed plus the number of images of the requests before
              it, so seeds are consecutive across a file), "meta" (any JSON, copied to the results),
              and every generation parameter of `PARAMETERS`.
Every other line is a `BadLine` with its line number, never nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omnigen import generation
from omnigen.text.tags import validate_image_tags
from omnigen.util.strict_json import parse_json

# Generation parameters a line may set: every request- and operator-scope field of GenerationConfig but
# the two the format has its own keys for ("seed", and "n" for num_images_per_prompt).
PARAMETERS: tuple[str, ...] = tuple(
    name
    for name in generation.names("request") + generation.names("operator")
    if name not in ("seed", "num_images_per_prompt")
)
KEYS = ("id", "prompt", "input_images", "mask", "n", "seed", "meta", *PARAMETERS)
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Request:
    """One validated line. `input_images` are resolved paths; `params` holds only what the line set."""

    id: str
    prompt: str
    input_images: tuple[str, ...]
    n: int
    seed: int
    params: dict[str, Any] = field(default_factory=dict)
    meta: Any = None
    line: int = 0
    mask: str | None = None  # resolved path of the first input image's mask


@dataclass(frozen=True)
class BadLine:
    line: int
    reason: str
    text: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "error": self.reason, "text": self.text}


class RequestError(ValueError):
    """A bad request line when errors are fatal; the message starts with "line N"."""


class _LineError(Exception):
    pass


def check_id(value: Any) -> str:
    """A request id is also a folder name: letters, digits, '.', '_', '-'; not starting with '.'."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value) or value.endswith(".jsonl"):
        raise ValueError(
            f"'id' must be 1-128 characters of [A-Za-z0-9._-] starting with a letter or digit "
            f"(and not ending in .jsonl), got {value!r}"
        )
    return value


def check_seed(name: str, seed: Any, images: int = 1) -> int:
    """A seed in GenerationConfig's range whose ``images`` images (seed + k) all stay in it."""
    seed = generation.param("seed").check(name, seed)
    last = generation.param("seed").high
    if seed + images - 1 > last:
        raise ValueError(f"{name}={seed} with {images} images needs seeds up to {seed + images - 1} > {last}")
    return seed


def read_requests(
    path: str | Path, base_seed: int = 0, check_files: bool = True
) -> tuple[list[Request], list[BadLine]]:
    """Parse a request JSONL. Returns (requests in file order, bad lines); raises only for I/O errors.

    Relative image paths resolve against the JSONL's folder and are stored absolute, so results compare
    equal whatever the working directory of a rerun.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"request file not found: {path}")
    check_seed("base_seed", base_seed)
    requests: list[Request] = []
    bad: list[BadLine] = []
    seen: dict[str, int] = {}
    next_seed = base_seed
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                request = _parse_line(raw, number, path.parent, next_seed, check_files)
                if request.id in seen:
                    raise _LineError(f"duplicate id {request.id!r} (first used on line {seen[request.id]})")
            except _LineError as err:
                bad.append(BadLine(number, str(err), raw.decode("utf-8", "replace").strip()[:200]))
                continue
            seen[request.id] = number
            requests.append(request)
            next_seed += request.n
    return requests, bad


def _parse_line(raw: bytes, number: int, base: Path, default_seed: int, check_files: bool) -> Request:
    try:
        row = parse_json(raw)  # deep nesting, huge integers and lone surrogates are bad lines too
    except ValueError as err:
        raise _LineError(str(err)) from None
    if not isinstance(row, dict):
        raise _LineError(f"expected a JSON object, got {type(row).__name__}")
    unknown = sorted(set(row) - set(KEYS))
    if unknown:
        raise _LineError(f"unknown key(s) {unknown}; allowed: {list(KEYS)}")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _LineError(f"'prompt' must be a non-empty string, got {prompt!r:.60}")
    try:
        request_id = check_id(row.get("id", f"{number:06d}"))
    except ValueError as err:
        raise _LineError(str(err)) from None
    images = _images(row.get("input_images"), base, check_files)
    try:
        validate_image_tags(prompt, len(images))
    except ValueError as err:
        raise _LineError(f"'prompt': {err}") from None
    try:
        n = generation.param("num_images_per_prompt").check("'n'", row.get("n", 1))
        seed = check_seed("'seed'", row.get("seed", default_seed), n)
        params = {key: generation.param(key).check(repr(key), row[key]) for key in PARAMETERS if key in row}
    except (TypeError, ValueError) as err:
        raise _LineError(str(err)) from None
    mask = _mask(row.get("mask"), images, base, check_files)
    return Request(request_id, prompt, images, n, seed, params, row.get("meta"), number, mask)


def _mask(value: Any, images: tuple[str, ...], base: Path, check_files: bool) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _LineError(f"'mask' must be a path (a non-empty string) or null, got {value!r:.80}")
    if not images:
        raise _LineError("'mask' needs 'input_images': it applies to the first input image, the canvas")
    path = str((base / value).resolve())
    if check_files and not Path(path).is_file():
        raise _LineError(f"mask not found: {path}")
    return path


def _images(value: Any, base: Path, check_files: bool) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _LineError(f"'input_images' must be a list of non-empty strings or null, got {value!r:.80}")
    paths = tuple(str((base / v).resolve()) for v in value)  # an absolute v stays itself
    missing = [p for p in paths if check_files and not Path(p).is_file()]
    if missing:
        raise _LineError(f"input image(s) not found: {missing}")
    return paths
