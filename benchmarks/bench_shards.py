"""Shard-writing throughput: ``omnigen data shards`` (``write_shards``) with one and two processes.

Makes ``--samples`` miniworld samples (``--size`` px images) as an X2I JSONL + image folder, then
writes them to shards with 1 and 2 worker processes, alternating (who goes first alternates too) for
``--rounds`` rounds, each into a fresh folder. Prints samples/s per segment with the load average
around it, the medians and the ratio 2 workers / 1 worker, and checks that both wrote the same bytes.
``--latents`` adds the same pair with ``--latents identity --resolution SIZE``.

The first two-worker call starts the forkserver (one process importing omnigen and torch); that
one-off cost is timed in a warm-up and printed apart; the rounds then time the steady state (a CLI run
pays it once per command). Thread counts are pinned (``--threads``, also in the workers through
OMP_NUM_THREADS).

    python benchmarks/bench_shards.py --samples 3000 --size 64 --rounds 3 --latents
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def digest(folder: Path) -> str:
    """One hash over every file of a shard folder, by name."""
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


def timed(jsonl: Path, images: Path, out: Path, args, workers: int, latents) -> tuple[float, str]:
    from omnigen.data.shards import write_shards

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    report = write_shards([jsonl], images, out, args.per_shard, latents=latents, workers=workers)
    seconds = time.perf_counter() - started
    if report.written != args.samples:
        raise SystemExit(f"wrote {report.written} of {args.samples} samples: {report.to_dict()}")
    return seconds, digest(out)


def contest(jsonl: Path, images: Path, work: Path, args, label: str, latents) -> float:
    """Alternating rounds of 1 and 2 workers; prints each segment and the medians; returns the ratio."""
    times: dict[int, list[float]] = {1: [], 2: []}
    digests: set[str] = set()
    for round_ in range(args.rounds):
        for workers in (1, 2) if round_ % 2 == 0 else (2, 1):
            before = os.getloadavg()[0]
            seconds, found = timed(jsonl, images, work / f"out{workers}", args, workers, latents)
            times[workers].append(seconds)
            digests.add(found)
            print(
                f"{label} round {round_} workers {workers}: {seconds:.2f} s, {args.samples / seconds:,.0f} samples/s "
                f"(load {before:.2f} -> {os.getloadavg()[0]:.2f})"
            )
    if len(digests) != 1:
        raise SystemExit(f"{label}: 1 and 2 workers wrote different shards ({sorted(digests)})")
    one, two = (statistics.median(times[w]) for w in (1, 2))
    print(
        f"{label} median: 1 worker {args.samples / one:,.0f}, 2 workers {args.samples / two:,.0f} samples/s; "
        f"2/1 = {one / two:.2f}x; identical output {digests.pop()}"
    )
    return one / two


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2000, help="miniworld samples (default 2000)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--per-shard", type=int, default=100, help="--samples-per-shard (default 100)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of 1 and 2 workers (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch / OMP threads per process (default 1)")
    parser.add_argument("--latents", action="store_true", help="also time --latents identity")
    parser.add_argument("--work", help="scratch folder (default: a temporary one, removed)")
    parser.add_argument(
        "--smoke", action="store_true", help="a seconds-long check: 24 samples, 16 px, 1 round"
    )
    args = parser.parse_args()
    if args.smoke:
        args.samples, args.size, args.per_shard, args.rounds = 24, 16, 4, 1
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch loads, here and in the workers
    import torch

    from omnigen.miniworld.world import write_dataset
    from omnigen.training.shard_latents import load_codec

    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-shards-"))
    try:
        started = time.perf_counter()
        jsonl = write_dataset(work / "world", args.samples, seed=0, size=args.size)
        images = sum(1 for _ in (work / "world" / "images").iterdir())
        print(
            f"{args.samples} miniworld samples ({images} images, {args.size}x{args.size} px) made in "
            f"{time.perf_counter() - started:.1f} s; {args.per_shard} per shard; threads {args.threads}; "
            f"{os.cpu_count()} CPUs"
        )
        for workers in (1, 2):  # warm-up; the first 2-worker call starts the forkserver
            seconds, _ = timed(jsonl, work / "world", work / "warm", args, workers, None)
            print(f"warm-up workers {workers}: {seconds:.2f} s (load {os.getloadavg()[0]:.2f})")
        contest(jsonl, work / "world", work, args, "images", None)
        if args.latents:
            latents = load_codec("identity", args.size)
            contest(jsonl, work / "world", work, args, "latents", latents)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
