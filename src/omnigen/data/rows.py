"""X2I JSONL rows and the files one row becomes in a shard (``omnigen data shards``).

``read_rows`` gives every non-blank line of the JSONL files as a ``Row`` (its key is its index over all
the files); ``sample_files`` turns a row and its images' bytes into the sample's files, or raises
``Skip`` with the reason (``REASONS``): a bad row, a missing, undecodable or oversized image, or an
instruction whose image tags do not match its input images. The shard layout is ``omnigen.data.shards``'s.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from omnigen.text.tags import validate_image_tags
from omnigen.training.shard_latents import LatentSpec, encode_sample

REASONS = ("bad_row", "missing", "undecodable", "oversized", "tags")


class Skip(Exception):
    """A row that becomes no sample, with its reason (one of ``REASONS``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Row:
    key: str  # the row's index over all JSONL files, zero padded
    source: str  # file:line
    data: dict[str, Any]  # the parsed row (empty when it did not parse)
    error: str | None = None

    def images(self) -> list[tuple[str, str]]:
        """(name, relative path) of every image the sample stores, in order."""
        names = [(f"in{k}", p) for k, p in enumerate(self.data.get("input_images") or [])]
        names.append(("out", self.data["output_image"]))
        shot = self.data.get("few_shot")
        if shot:
            names += [(f"shot_in{k}", p) for k, p in enumerate(shot.get("input_images") or [])]
            names.append(("shot_out", shot["output_image"]))
        return names


def _lines(jsonl: Sequence[str | Path]) -> Iterator[tuple[int, str, str]]:
    """(row index, "file:line", text) of every row: each non-blank line of the files, in order."""
    index = 0
    for file in jsonl:
        with open(file, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    yield index, f"{file}:{number}", line
                    index += 1


def count_rows(jsonl: Sequence[str | Path]) -> int:
    return sum(1 for _ in _lines(jsonl))


def read_rows(jsonl: Sequence[str | Path], keep: Callable[[int], bool] | None = None) -> Iterator[Row]:
    """Every row of the files, in order, as a ``Row`` (``error`` set when it is not a valid X2I row: not
    JSON, not an object, a required key missing or of the wrong type). ``keep(index)``: only the rows it
    keeps are parsed and yielded."""
    for index, source, line in _lines(jsonl):
        if keep is not None and not keep(index):
            continue
        try:
            yield Row(f"{index:09d}", source, _parse(line))
        except ValueError as err:
            yield Row(f"{index:09d}", source, {}, str(err))


def _parse(line: str) -> dict[str, Any]:
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError(f"a row must be a JSON object, got {type(data).__name__}")
    if not isinstance(data.get("instruction"), str) or not isinstance(data.get("output_image"), str):
        raise ValueError("a row needs `instruction` and `output_image` strings")
    inputs = data.get("input_images") or []
    if not isinstance(inputs, list) or not all(isinstance(p, str) for p in inputs):
        raise ValueError(f"input_images must be a list of paths or null, got {inputs!r:.80}")
    shot = data.get("few_shot")
    if shot is not None and not (isinstance(shot, dict) and isinstance(shot.get("output_image"), str)):
        raise ValueError(f"few_shot must be an object with an output_image, got {shot!r:.80}")
    return data


def check_image(data: bytes, name: str, max_side: int) -> tuple[int, int]:
    """(height, width) of a decodable image no larger than ``max_side``; ``Skip`` otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = (image.height, image.width)
            if max(size) > max_side:
                raise Skip("oversized", f"{name} is {size[1]}x{size[0]}, over --max-side {max_side}")
            image.load()
    except Skip:
        raise
    except UnidentifiedImageError:  # its message names the buffer's address: not deterministic
        raise Skip("undecodable", f"{name}: not an image format PIL reads") from None
    except Exception as err:  # PIL raises many kinds for a broken file
        raise Skip("undecodable", f"{name}: {err}") from None
    return size


def to_png(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        out = io.BytesIO()
        image.convert("RGB").save(out, format="PNG")
        return out.getvalue()


def sample_files(
    row: Row, images: dict[str, bytes], max_side: int, latents: LatentSpec | None = None
) -> dict[str, bytes]:
    """The files of one sample (name -> bytes, KEY left out), or ``Skip`` with the reason."""
    if row.error is not None:
        raise Skip("bad_row", row.error)
    data = row.data
    try:
        validate_image_tags(data["instruction"], len(data.get("input_images") or []))
        if data.get("few_shot"):
            shot = data["few_shot"]
            validate_image_tags(shot.get("instruction", ""), len(shot.get("input_images") or []))
    except (ValueError, TypeError) as err:
        raise Skip("tags", str(err)) from None
    files: dict[str, bytes] = {}
    sizes: dict[str, list[int]] = {}
    for name, path in row.images():
        if path not in images:
            raise Skip("missing", f"{path} is not in the image source")
        sizes[name] = list(check_image(images[path], path, max_side))
        if name.endswith("out"):
            files[f"{name}{Path(path).suffix.lower() or '.png'}"] = images[path]
        else:
            files[f"{name}.png"] = to_png(images[path])
    meta = {k: v for k, v in data.items() if k not in ("input_images", "output_image")}
    meta["task_type"] = data.get("task_type")
    meta["input_sizes"] = [sizes[f"in{k}"] for k in range(len(data.get("input_images") or []))]
    meta["output_size"] = sizes["out"]
    meta["images"] = {"input_images": data.get("input_images") or [], "output_image": data["output_image"]}
    meta["source"] = row.source
    if latents is not None:
        files["latents.safetensors"] = encode_sample(
            {name: images[path] for name, path in row.images()}, latents
        )
    return {"json": json.dumps(meta, sort_keys=True).encode(), **files}
