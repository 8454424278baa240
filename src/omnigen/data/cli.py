"""``omnigen data miniworld --out DIR --n N --seed S [--split ...] [--size S] [--weight TASK=N ...]`` and
``omnigen data shards --jsonl META.jsonl [--jsonl ...] --images SRC --out DIR [--samples-per-shard N]
[--latents CODEC --resolution R] [--workers N]``."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from omnigen.miniworld.world import SPLITS

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    m = data_sub.add_parser("miniworld", help="write the procedural miniature X2I world (JSONL + PNGs)")
    m.add_argument("--out", required=True, help="output folder")
    m.add_argument("--n", type=int, required=True, help="number of samples")
    m.add_argument("--seed", type=int, default=0, help="(default: 0)")
    m.add_argument("--split", default="train", choices=SPLITS, help="(default: train)")
    m.add_argument("--size", type=int, default=16, help="image side in pixels (default: 16)")
    m.add_argument(
        "--weight",
        action="append",
        default=[],
        metavar="TASK=N",
        help="cards per deck round for a task kind or family (repeatable), e.g. t2i/relation=6",
    )
    m.set_defaults(func=_run_miniworld)
    s = data_sub.add_parser("shards", help="pack X2I JSONL rows and their images into webdataset tar shards")
    s.add_argument("--jsonl", action="append", required=True, help="X2I JSONL file (repeatable)")
    s.add_argument(
        "--images", required=True, help="image folder, .tar / .tar.gz, or first part of a split archive"
    )
    s.add_argument("--out", required=True, help="output folder (a rerun keeps its finished shards)")
    s.add_argument(
        "--samples-per-shard",
        type=int,
        default=1000,
        help="rows per shard, less the skipped ones (default: 1000)",
    )
    s.add_argument("--max-side", type=int, default=4096, help="skip larger images (default: 4096)")
    s.add_argument("--latents", metavar="CODEC", help="also store latents: 'identity' or a VAE folder")
    s.add_argument("--resolution", type=int, help="with --latents: the training resolution they are made at")
    s.add_argument(
        "--workers", type=int, default=1, help="processes writing shards; the output is the same (default: 1)"
    )
    s.set_defaults(func=_run_shards)


def _run_miniworld(args: argparse.Namespace) -> int:
    from pathlib import Path

    from omnigen.miniworld.world import save_tokenizer, write_dataset

    weights = {}
    for item in args.weight:
        name, _, count = item.partition("=")
        if not count.isdigit():
            raise ValueError(f"--weight takes TASK=N with N an int >= 0, got {item!r}")
        weights[name] = int(count)
    path = write_dataset(args.out, args.n, args.seed, args.split, args.size, weights)
    save_tokenizer(Path(args.out) / "tokenizer.json")
    logger.info("wrote %s and %s", path, Path(args.out) / "tokenizer.json")
    return 0


def _run_shards(args: argparse.Namespace) -> int:
    from omnigen.data.shards import write_shards
    from omnigen.training.shard_latents import load_codec

    if (args.latents is None) != (args.resolution is None):
        raise ValueError("--latents CODEC and --resolution R go together")
    latents = load_codec(args.latents, args.resolution) if args.latents else None
    report = write_shards(
        args.jsonl, args.images, args.out, args.samples_per_shard, args.max_side, latents, args.workers
    )
    skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(report.skipped.items())) or "none"
    print(
        f"wrote {report.written} samples in {len(report.shards)} shard(s) to {args.out}; skipped: {skipped}"
    )
    for reason, examples in sorted(report.examples.items()):
        print(f"  {reason}: {examples[0]}")
    return 0
