"""Batch generation: plan -> shard -> generate -> record, resumable and safe to run on N ranks.

Owns the output layout (``DIR/<id>/<k>.png`` by default), the per-rank results files, resuming and
the merge. Does not parse request files (``requests``) or set up processes (``cli``).

Output folder:
    <layout(request, k)>     each image, written atomically (temporary file + rename)
    results.rank<r>.jsonl    append-only, one record per finished image, written after its PNG (the
                             commit marker: an image counts as done only when its record matches)
    results.jsonl            merged by rank 0 at the end: one record per finished image, request order
    errors.jsonl             bad lines and failed generations of the last run (rank 0 merges)

Resume: a record counts as done when its file exists and its prompt, images, parameters, seed and model
equal what the request asks now; everything else is (re)generated. A run killed at any point leaves at
most a stray temporary file (removed on the next run) and a torn last record line (ignored, then cut).

Sharding: every rank reads the same files and, after a barrier, plans the same pending list, sorted by
(output size and parameters, request seed, line, k). Rank r takes the r-th contiguous slice of it, so no
image is planned twice or left out, and each slice keeps runs of consecutive seeds together.
(`ShardedBucketSampler` is not reused: it pads ranks by repeating batches, which here would mean duplicate
outputs.) Batches hold images with equal parameters and consecutive seeds, because the pipeline seeds image
k of a call with seed + k.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from omnigen.batch.params import resolve_params
from omnigen.batch.requests import BadLine, Request, RequestError
from omnigen.generation import MAX_CONDITION_TOKENS
from omnigen.util.atomic import atomic_write

logger = logging.getLogger(__name__)

Layout = Callable[[Request, int], str]
OnError = Literal["skip", "fatal"]
MERGED = "results.jsonl"
ERRORS = "errors.jsonl"
_COMPARED = ("file", "seed", "prompt", "input_images", "mask", "params", "model")


def default_layout(request: Request, k: int) -> str:
    return f"{request.id}/{k}.png"


def rank_file(out_dir: Path, rank: int, kind: str = "results") -> Path:
    return out_dir / f"{kind}.rank{rank}.jsonl"


@dataclass(frozen=True)
class Job:
    """Image k of requests[request], generated with `seed` under parameter group `key`."""

    request: int
    k: int
    seed: int
    key: str


@dataclass
class BatchReport:
    total_images: int
    already_done: int
    generated: int
    failed: int
    bad_lines: list[BadLine] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1


# --------------------------------------------------------------------------------------------------
# Parameters and records
# --------------------------------------------------------------------------------------------------


def expected_record(request: Request, k: int, params: dict[str, Any], model: str | None, file: str) -> dict:
    return {
        "id": request.id,
        "k": k,
        "line": request.line,
        "file": file,
        "seed": request.seed + k,
        "prompt": request.prompt,
        "input_images": list(request.input_images),
        "mask": request.mask,
        "params": params,
        "model": model,
        "meta": request.meta,
    }


def read_records(out_dir: Path) -> list[dict]:
    """Every complete record of every rank file (a torn or foreign line is skipped)."""
    records = []
    for path in sorted(out_dir.glob("results.rank*.jsonl")):
        for raw in path.read_bytes().splitlines():
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(record, dict) and "id" in record and "k" in record:
                records.append(record)
    return records


def finished(out_dir: Path, expected: dict[tuple[str, int], dict]) -> dict[tuple[str, int], dict]:
    """(id, k) -> the record of each expected image already done with exactly these settings."""
    done = {}
    for record in read_records(out_dir):
        key = (record["id"], record["k"])
        want = expected.get(key)
        if want is not None and all(record.get(name) == want[name] for name in _COMPARED):
            if readable_at(out_dir / want["file"], want["params"]):
                done[key] = record
    return done


def readable_at(path: Path, params: dict[str, Any]) -> bool:
    """Whether ``path`` is a PNG that decodes completely at the size its record gives (``params``' width
    and height): a truncated or foreign file with a record is not done."""
    try:
        with Image.open(path, formats=("PNG",)) as image:
            image.load()
            return image.size == (params.get("width"), params.get("height"))
    except (OSError, SyntaxError, ValueError):  # missing, not a PNG, truncated
        return False


class AppendLog:
    """A JSONL file appended one fsync'ed line at a time; a torn last line is cut on open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                with path.open("r+b") as handle:
                    handle.truncate(data.rfind(b"\n") + 1)
        self._handle = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


# --------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------


def shard_bounds(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous slice: disjoint slices covering [0, count), sizes within 1."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size - 1}], got {rank}")
    return rank * count // world_size, (rank + 1) * count // world_size


def consecutive_batches(jobs: Sequence[Job], batch_size: int) -> list[list[Job]]:
    """Cut sorted jobs into batches of one parameter group with seeds s, s+1, ... (at most batch_size)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches: list[list[Job]] = []
    for job in jobs:
        last = batches[-1] if batches else None
        if (
            last is not None
            and len(last) < batch_size
            and last[-1].key == job.key
            and last[-1].seed + 1 == job.seed
        ):
            last.append(job)
        else:
            batches.append([job])
    return batches


def validate_requests(
    pipe: Any, requests: Sequence[Request], on_error: OnError, max_condition_tokens: int | None
) -> tuple[dict[int, dict[str, Any]], list[BadLine]]:
    """Each request's generation parameters, checked against ``pipe`` before anything runs: (params by
    request index, the bad lines). A bad request raises ``RequestError`` with ``on_error="fatal"``, else
    it becomes a ``BadLine`` and is skipped."""
    params, bad = {}, []
    for index, request in enumerate(requests):
        try:
            params[index] = resolve_params(pipe, request, max_condition_tokens)
        except (ValueError, TypeError, OSError) as err:
            if on_error == "fatal":
                raise RequestError(f"line {request.line} (id {request.id!r}): {err}") from err
            bad.append(BadLine(request.line, f"id {request.id!r}: {err}"))
    return params, bad


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def run_batch(
    pipe: Any,
    requests: Sequence[Request],
    out_dir: str | Path,
    *,
    batch_size: int = 4,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    on_error: OnError = "skip",
    model: str | None = None,
    layout: Layout = default_layout,
    bad_lines: Sequence[BadLine] = (),
    progress: bool = True,
    max_condition_tokens: int | None = MAX_CONDITION_TOKENS,
) -> BatchReport:
    """Generate every image of `requests` not already done into `out_dir`; this rank's share only.

    Every rank must call this with the same arguments (except `rank`); `barrier` synchronises them (None
    for one process). `bad_lines` (from reading the file) are written to errors.jsonl with the lines that
    fail here (a condition over `max_condition_tokens`, None for no budget, is one). A failing batch is
    logged and recorded (on_error="skip") or raised ("fatal").
    """
    if on_error not in ("skip", "fatal"):
        raise ValueError(f"on_error must be 'skip' or 'fatal', got {on_error!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sync = barrier or (lambda: None)
    params, invalid = validate_requests(pipe, requests, on_error, max_condition_tokens)
    bad = [*bad_lines, *invalid]
    expected = {
        (requests[i].id, k): expected_record(requests[i], k, p, model, layout(requests[i], k))
        for i, p in params.items()
        for k in range(requests[i].n)
    }
    done = finished(out_dir, expected)
    rank_file(out_dir, rank, "errors").unlink(missing_ok=True)
    sync()  # nobody writes before every rank has read the same state

    mine = plan(requests, params, done, rank, world_size)
    batches = consecutive_batches(mine, batch_size)
    logger.info(
        "rank %d/%d: %d requests, %d images (%d done); this rank: %d images in %d batches",
        rank,
        world_size,
        len(params),
        len(expected),
        len(done),
        len(mine),
        len(batches),
    )
    files = [[expected[(requests[j.request].id, j.k)] for j in batch] for batch in batches]
    remove_stale_temporaries(out_dir, [record["file"] for group in files for record in group])
    bar = tqdm(total=len(mine), unit="img", desc="batch", disable=not progress or rank != 0, smoothing=0.1)
    results, errors = AppendLog(rank_file(out_dir, rank)), AppendLog(rank_file(out_dir, rank, "errors"))
    generated = failed = 0
    try:
        for batch, records in zip(batches, files):
            ok = run_one_batch(
                pipe, requests, batch, records, params[batch[0].request], out_dir, results, errors, on_error
            )
            generated, failed = generated + ok, failed + len(batch) - ok
            bar.update(len(batch))
    finally:
        bar.close()
        results.close()
        errors.close()
    sync()
    if rank == 0:
        merge(out_dir, expected, bad, world_size)
    return BatchReport(len(expected), len(done), generated, failed, bad, rank, world_size)


def plan(
    requests: Sequence[Request],
    params: dict[int, dict[str, Any]],
    done: dict[tuple[str, int], dict],
    rank: int,
    world_size: int,
) -> list[Job]:
    """This rank's contiguous slice of the pending images, sorted by (parameters, request seed, line, k)."""
    keys = {i: json.dumps(p, sort_keys=True) for i, p in params.items()}
    pending = sorted(
        (
            Job(i, k, requests[i].seed + k, keys[i])
            for i in params
            for k in range(requests[i].n)
            if (requests[i].id, k) not in done
        ),
        key=lambda job: (job.key, requests[job.request].seed, requests[job.request].line, job.k),
    )
    start, end = shard_bounds(len(pending), rank, world_size)
    return pending[start:end]


def run_one_batch(
    pipe: Any,
    requests: Sequence[Request],
    batch: list[Job],
    records: list[dict],
    params: dict[str, Any],
    out_dir: Path,
    results: AppendLog,
    errors: AppendLog,
    on_error: OnError,
) -> int:
    """Generate one batch, write its PNGs then its records; returns the number of images written.
    A failed batch raises with ``on_error="fatal"``, else writes an error row per image to ``errors``
    and returns 0. Used by ``run_batch`` and by ``omnigen.batch.ray_engine``'s actors."""
    try:
        images = _generate(pipe, requests, batch, params)
    except Exception as err:
        if on_error == "fatal":
            raise
        logger.error("batch of %s failed: %s", [r["file"] for r in records], err)
        for r in records:
            errors.write(
                {"line": r["line"], "id": r["id"], "k": r["k"], "error": f"{type(err).__name__}: {err}"}
            )
        return 0
    for record, image in zip(records, images, strict=True):
        _save_png(image, out_dir / record["file"], record["seed"])
        results.write(record)
    return len(batch)


def _generate(pipe: Any, requests: Sequence[Request], batch: list[Job], params: dict[str, Any]) -> list:
    prompts = [requests[job.request].prompt for job in batch]
    images = [list(requests[job.request].input_images) for job in batch]
    masks = [requests[job.request].mask for job in batch]  # one per prompt (None: unmasked)
    if all(masks):  # the output is each canvas (params hold its size): no explicit size for the model
        params = {k: v for k, v in params.items() if k not in ("height", "width")}
    outputs = pipe(
        prompts,
        input_images=images if any(images) else None,
        mask=masks if any(masks) else None,
        seed=batch[0].seed,
        num_images_per_prompt=1,
        progress=False,
        **params,
    )
    seeds = [image.info.get("seed") for image in outputs]
    if seeds != [job.seed for job in batch]:  # the pipeline's seed + k contract
        raise RuntimeError(f"pipeline returned seeds {seeds}, expected {[job.seed for job in batch]}")
    return outputs


def _save_png(image: Any, path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("seed", str(seed))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def remove_stale_temporaries(out_dir: Path, files: list[str]) -> None:
    """Delete the temporary files a killed run left next to the target ``files`` under ``out_dir``
    (atomic_write's naming), before a run writes them again."""
    for file in files:
        target = out_dir / file
        if target.parent.is_dir():
            for stale in target.parent.glob(f".{target.name}.*.tmp"):
                stale.unlink(missing_ok=True)


def merge(
    out_dir: Path, expected: dict[tuple[str, int], dict], bad: Sequence[BadLine], world_size: int
) -> Path:
    """results.jsonl: one record per finished expected image, in request-line then k order; and
    errors.jsonl: bad lines plus this run's failed images."""
    done = finished(out_dir, expected)
    ordered = sorted(done.values(), key=lambda r: (r["line"], r["k"]))
    text = "".join(json.dumps(record) + "\n" for record in ordered)
    atomic_write(out_dir / MERGED, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    error_rows = [b.to_dict() for b in bad]
    for r in range(world_size):
        path = rank_file(out_dir, r, "errors")
        if path.is_file():
            error_rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    errors = "".join(json.dumps(row) + "\n" for row in error_rows)
    atomic_write(out_dir / ERRORS, lambda tmp: tmp.write_text(errors, encoding="utf-8"))
    missing = len(expected) - len(done)
    logger.info("merged %d records into %s (%d images missing)", len(ordered), out_dir / MERGED, missing)
    return out_dir / MERGED
