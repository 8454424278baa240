"""``omnigen train --config FILE [key=value ...]``."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import MISSING, fields

from omnigen.cli.args import add_device_arg
from omnigen.training.config import TrainConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train or fine-tune from a YAML/TOML config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train or fine-tune OmniGen. Launch with torchrun for several processes.\n\nConfig fields:\n"
        + describe_fields(),
    )
    p.add_argument("--config", required=True, help="YAML or TOML training config")
    p.add_argument("overrides", nargs="*", help="key=value overrides of config fields")
    add_device_arg(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from omnigen.training.trainer import train

    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 logs
        logging.getLogger("omnigen").setLevel(logging.WARNING)
    config = TrainConfig.load(args.config, args.overrides)
    train(config, device=args.device)
    return 0


def describe_fields() -> str:
    """The help text listing every field."""
    lines = []
    for f in fields(TrainConfig):
        default = (
            "required"
            if f.default is MISSING and f.default_factory is MISSING
            else (f"default {f.default!r}" if f.default is not MISSING else "default empty")
        )
        lines.append(f"  {f.name:<24} {f.metadata.get('help', '')} ({default})")
    return "\n".join(lines)
