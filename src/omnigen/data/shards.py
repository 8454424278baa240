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

Plan. Shard k (``DIR/{k:06d}.tar``) holds the rows ``k * samples_per_shard`` up to the next shard's first
row (rows counted over all JSONL files, blank lines left out), less the rows skipped: a shard's content
depends on its own rows only. Nothing is lost silently: a bad row, a missing, undecodable or oversized
image, or an instruction whose image tags do not match its input images skips the row under that reason
(``omnigen.data.rows``); a shard whose rows are all skipped is an empty tar, so the numbering has no gaps.

Each shard appears atomically with a ``{k:06d}.json`` sidecar: its rows, samples, skips per reason and
the first examples. ``DIR/index.json`` (samples per shard) and ``DIR/report.json`` (rows written and
skipped, per reason, with examples) are summed from the sidecars in shard order. Deterministic (members
carry no time or owner; KEY is the row's index) and resumable: a rerun keeps every finished shard and
writes the others.

Processes. With ``workers`` N > 1 the shards still to write are dealt to N processes (forked from a
``forkserver`` that imported this module once), shard k to process ``k % N``; each reads the rows and
their images itself (an archive: every process reads the whole stream, keeping only its own rows'
members) and writes whole shards, so the output is the same bytes whatever N is.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omnigen.data.rows import Row, Skip, count_rows, read_rows, sample_files
from omnigen.data.sources import open_images
from omnigen.training.shard_latents import LatentSpec
from omnigen.util.atomic import atomic_write

logger = logging.getLogger(__name__)

EXAMPLES_PER_REASON = 5
PIL_FIRST_FORMATS = ("Bmp", "Gif", "Jpeg", "Ppm", "Png")  # what PIL.Image.preinit imports


@dataclass
class ShardReport:
    """Samples written and rows skipped per reason (with the first examples), of one shard or all."""

    written: int = 0
    shards: list[dict[str, Any]] = field(default_factory=list)  # {"name", "samples"} per shard
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < EXAMPLES_PER_REASON:
            self.examples[reason].append(detail)

    def add_shard(self, name: str, side: dict[str, Any]) -> None:
        """Count one finished shard, from its sidecar."""
        self.written += side["samples"]
        self.shards.append({"name": name, "samples": side["samples"]})
        self.skipped.update(side["skipped"])
        for reason, examples in side["examples"].items():
            kept = self.examples.setdefault(reason, [])
            kept += examples[: EXAMPLES_PER_REASON - len(kept)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "written": self.written,
            "skipped": dict(sorted(self.skipped.items())),
            "examples": self.examples,
            "shards": len(self.shards),
        }


@dataclass(frozen=True)
class ShardJob:
    """What one process writes: the shards ``shards`` of the plan, from these rows and images."""

    jsonl: tuple[str, ...]
    images: str
    out: str
    samples_per_shard: int
    max_side: int
    latents: LatentSpec | None
    shards: tuple[int, ...]


def shard_of(row: int, samples_per_shard: int) -> int:
    """The plan: the shard a row (its index over all JSONL files) goes to."""
    return row // samples_per_shard


def plan_shards(rows: int, samples_per_shard: int) -> list[tuple[int, int]]:
    """The plan, shard by shard: the rows [start, stop) of each (those ``shard_of`` sends to it)."""
    return [(k, min(k + samples_per_shard, rows)) for k in range(0, rows, samples_per_shard)]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_shard(out: Path, index: int, rows: list[Row], samples: list, report: ShardReport) -> None:
    """``{index}.tar`` with the samples ((key, files) pairs), then its sidecar (both atomic)."""

    def write_tar(path: Path) -> None:
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
            for key, files in samples:
                for suffix, data in files.items():
                    _add(tar, f"{key}.{suffix}", data)

    atomic_write(out / f"{index:06d}.tar", write_tar)
    side = {
        "rows": [int(rows[0].key), int(rows[-1].key) + 1],
        "samples": len(samples),
        "skipped": dict(sorted(report.skipped.items())),
        "examples": report.examples,
    }
    text = json.dumps(side, sort_keys=True)
    atomic_write(out / f"{index:06d}.json", lambda path: path.write_text(text))


def write_part(job: ShardJob) -> None:
    """Write the job's shards (one process's share; also the whole plan with one process)."""
    wanted = set(job.shards)
    rows = list(read_rows(job.jsonl, keep=lambda index: shard_of(index, job.samples_per_shard) in wanted))
    out = Path(job.out)
    with open_images(job.images) as source:
        pairs = source.rows_with_images(rows)
        for index, group in itertools.groupby(
            pairs, lambda pair: shard_of(int(pair[0].key), job.samples_per_shard)
        ):
            report, samples, covered = ShardReport(), [], []
            for row, images in group:
                covered.append(row)
                try:
                    samples.append((row.key, sample_files(row, images, job.max_side, job.latents)))
                except Skip as skip:
                    report.skip(skip.reason, f"{row.source}: {skip}")
            _write_shard(out, index, covered, samples, report)


def _finished(out: Path, index: int, rows: tuple[int, int]) -> dict[str, Any] | None:
    """Shard ``index``'s sidecar when the shard is finished (tar and sidecar present), else None."""
    tar, sidecar = out / f"{index:06d}.tar", out / f"{index:06d}.json"
    if not (tar.is_file() and sidecar.is_file()):
        return None
    side = json.loads(sidecar.read_text())
    if tuple(side.get("rows", ())) != rows:
        raise ValueError(
            f"{sidecar} covers rows {side.get('rows')}, the plan says {list(rows)}: {out} was written from "
            "other JSONL files or with another --samples-per-shard; write to a new --out"
        )
    return side


def _check(jsonl: Sequence[str | Path], samples_per_shard: int, workers: int) -> None:
    for name, value in (("samples_per_shard", samples_per_shard), ("workers", workers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for file in jsonl:
        if not Path(file).is_file():
            raise ValueError(f"--jsonl {file} is not a file")


def write_shards(
    jsonl: Sequence[str | Path],
    images: str | Path,
    out: str | Path,
    samples_per_shard: int = 1000,
    max_side: int = 4096,
    latents: LatentSpec | None = None,
    workers: int = 1,
) -> ShardReport:
    """Write the shards, ``index.json`` and ``report.json`` under ``out``; returns the report.
    ``latents``: also store each sample's latents (``omnigen.training.shard_latents``). ``workers``:
    processes writing shards (the output is the same for any number)."""
    _check(jsonl, samples_per_shard, workers)
    with open_images(images):  # a bad --images is named before any process starts
        pass
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(count_rows(jsonl), samples_per_shard)
    todo = [k for k, rows in enumerate(plan) if _finished(out, k, rows) is None]
    if len(todo) < len(plan):
        logger.info("resuming: %d of %d shard(s) finished", len(plan) - len(todo), len(plan))
    jobs = [
        ShardJob(
            tuple(map(str, jsonl)), str(images), str(out), samples_per_shard, max_side, latents, tuple(part)
        )
        for part in (todo[w::workers] for w in range(workers))
        if part
    ]
    if len(jobs) > 1:
        _run_processes(jobs)
    else:
        for job in jobs:
            write_part(job)
    report = ShardReport()
    for k, rows in enumerate(plan):
        report.add_shard(f"{k:06d}.tar", _finished(out, k, rows))
    (out / "index.json").write_text(
        json.dumps({"shards": report.shards, "samples": report.written}, indent=1)
    )
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=1))
    return report


def _run_processes(jobs: list[ShardJob]) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # a fresh server process imports this module (torch with it) and the image formats PIL's first open
    # would import, once; each writer is forked from it
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, *(f"PIL.{name}ImagePlugin" for name in PIL_FIRST_FORMATS)])
    with ProcessPoolExecutor(len(jobs), mp_context=context) as pool:
        for done in [pool.submit(write_part, job) for job in jobs]:
            done.result()  # a process's error is raised here
