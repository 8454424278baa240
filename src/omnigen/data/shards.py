"""X2I JSONL rows + their images -> webdataset-format tar shards (``omnigen data shards``).

Images come from a folder, a .tar / .tar.gz, or a split archive (``x.tar.gz.aa``, ``.ab``, ...: the
parts, found by suffix, are read as one stream; nothing is extracted to disk). Row paths are relative to
the source's root (an archive member ``./a/b.png`` is ``a/b.png``).

Each kept row becomes one sample, its files side by side in a shard (webdataset groups files by the name
up to the first dot)::

    KEY.json          instruction, task_type, input_sizes / output_size ([height, width]), the row's
                      other fields, its image paths and "file:line" source
    KEY.in0.png ...   the input images, in the row's order (tag k <-> in{k-1}), re-encoded as PNG
    KEY.out.EXT       the output image's bytes as they were
    KEY.shot_in0.png, KEY.shot_out.EXT   a few-shot example's images, when the row has one

Shards are ``DIR/000000.tar``, ... of ``samples_per_shard`` samples, with ``DIR/index.json`` (samples per
shard) and ``DIR/report.json`` (rows written and skipped, per reason, with examples). Nothing is lost
silently: a bad row, a missing, undecodable or oversized image, or an instruction whose image tags do not
match its input images skips the row under that reason.

Deterministic (members carry no time or owner; KEY is the row's index over all JSONL files) and
resumable: a shard appears atomically with a ``.json`` sidecar naming the rows it covered, so a rerun
keeps the finished shards and starts after the last one.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from omnigen.data.sources import ImageSource, open_images
from omnigen.text.tags import validate_image_tags
from omnigen.training.shard_latents import LatentSpec, encode_sample
from omnigen.util.atomic import atomic_write

logger = logging.getLogger(__name__)

EXAMPLES_PER_REASON = 5
REASONS = ("bad_row", "missing", "undecodable", "oversized", "tags")


class _Skip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class ShardReport:
    """What ``write_shards`` did: samples written, rows skipped per reason (with a few examples)."""

    written: int = 0
    shards: list[dict[str, Any]] = field(default_factory=list)  # {"name", "samples"} per shard
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < EXAMPLES_PER_REASON:
            self.examples[reason].append(detail)

    def to_dict(self) -> dict[str, Any]:
        return {
            "written": self.written,
            "skipped": dict(sorted(self.skipped.items())),
            "examples": self.examples,
            "shards": len(self.shards),
        }


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


def read_rows(jsonl: Sequence[str | Path]) -> Iterator[Row]:
    """Every non-blank line of the files, in order, as a ``Row`` (``error`` set when it is not a valid
    X2I row: not JSON, not an object, a required key missing or of the wrong type)."""
    index = 0
    for file in jsonl:
        with open(file, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                key, source = f"{index:09d}", f"{file}:{number}"
                index += 1
                try:
                    yield Row(key, source, _parse(line))
                except ValueError as err:
                    yield Row(key, source, {}, str(err))


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
    """(height, width) of a decodable image no larger than ``max_side``; ``_Skip`` otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = (image.height, image.width)
            if max(size) > max_side:
                raise _Skip("oversized", f"{name} is {size[1]}x{size[0]}, over --max-side {max_side}")
            image.load()
    except _Skip:
        raise
    except Exception as err:  # PIL raises many kinds for a broken file
        raise _Skip("undecodable", f"{name}: {err}") from None
    return size


def to_png(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        out = io.BytesIO()
        image.convert("RGB").save(out, format="PNG")
        return out.getvalue()


def sample_files(
    row: Row, images: dict[str, bytes], max_side: int, latents: LatentSpec | None = None
) -> dict[str, bytes]:
    """The files of one sample (name -> bytes, KEY left out), or ``_Skip`` with the reason."""
    if row.error is not None:
        raise _Skip("bad_row", row.error)
    data = row.data
    try:
        validate_image_tags(data["instruction"], len(data.get("input_images") or []))
        if data.get("few_shot"):
            shot = data["few_shot"]
            validate_image_tags(shot.get("instruction", ""), len(shot.get("input_images") or []))
    except (ValueError, TypeError) as err:
        raise _Skip("tags", str(err)) from None
    files: dict[str, bytes] = {}
    sizes: dict[str, list[int]] = {}
    for name, path in row.images():
        if path not in images:
            raise _Skip("missing", f"{path} is not in the image source")
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


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes ``DIR/NNNNNN.tar`` shards atomically (a temp file renamed when complete), each with a
    ``NNNNNN.json`` sidecar: samples, the row keys it covers, the skips among them."""

    def __init__(self, out: Path, samples_per_shard: int) -> None:
        self.out, self.per_shard = out, samples_per_shard
        self.index, self.pending, self.skipped = 0, [], Counter()

    def resume(self, report: ShardReport) -> str | None:
        """Adopt the finished shards (in order from 0); returns the last row key they cover, or None."""
        last = None
        while (self.out / f"{self.index:06d}.tar").is_file() and (
            self.out / f"{self.index:06d}.json"
        ).is_file():
            side = json.loads((self.out / f"{self.index:06d}.json").read_text())
            report.written += side["samples"]
            report.skipped.update(side["skipped"])
            report.shards.append({"name": f"{self.index:06d}.tar", "samples": side["samples"]})
            last, self.index = side["last_row"], self.index + 1
        return last

    def add(self, key: str, files: dict[str, bytes], report: ShardReport) -> None:
        self.pending.append((key, files))
        if len(self.pending) == self.per_shard:
            self.flush(report, key)

    def _write_tar(self, path: Path) -> None:
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
            for key, files in self.pending:
                for suffix, data in files.items():
                    _add(tar, f"{key}.{suffix}", data)

    def flush(self, report: ShardReport, last_row: str) -> None:
        if not self.pending:
            return
        name = f"{self.index:06d}"
        atomic_write(self.out / f"{name}.tar", self._write_tar)
        side = {"samples": len(self.pending), "last_row": last_row, "skipped": dict(self.skipped)}
        atomic_write(
            self.out / f"{name}.json", lambda path: path.write_text(json.dumps(side, sort_keys=True))
        )
        report.written += len(self.pending)
        report.shards.append({"name": f"{name}.tar", "samples": len(self.pending)})
        self.index, self.pending, self.skipped = self.index + 1, [], Counter()


def write_shards(
    jsonl: Sequence[str | Path],
    images: str | Path,
    out: str | Path,
    samples_per_shard: int = 1000,
    max_side: int = 4096,
    latents: LatentSpec | None = None,
) -> ShardReport:
    """Write the shards, ``index.json`` and ``report.json`` under ``out``; returns the report.
    ``latents``: also store each sample's latents (``omnigen.training.shard_latents``)."""
    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be a positive int, got {samples_per_shard!r}")
    for file in jsonl:
        if not Path(file).is_file():
            raise ValueError(f"--jsonl {file} is not a file")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report, writer = ShardReport(), ShardWriter(out, samples_per_shard)
    done = writer.resume(report)
    rows = [r for r in read_rows(jsonl) if done is None or r.key > done]
    if done is not None:
        logger.info("resuming after %d finished shard(s), row %s", writer.index, done)
    with open_images(images) as source:
        _write_rows(rows, source, writer, report, max_side, latents)
    writer.flush(report, rows[-1].key if rows else "")
    (out / "index.json").write_text(
        json.dumps({"shards": report.shards, "samples": report.written}, indent=1)
    )
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=1))
    return report


def _write_rows(
    rows: list[Row],
    source: ImageSource,
    writer: ShardWriter,
    report: ShardReport,
    max_side: int,
    latents: LatentSpec | None,
) -> None:
    for row, images in source.rows_with_images(rows):
        try:
            files = sample_files(row, images, max_side, latents)
        except _Skip as skip:
            report.skip(skip.reason, f"{row.source}: {skip}")
            writer.skipped[skip.reason] += 1
            continue
        writer.add(row.key, files, report)
