"""``omnigen train --config FILE [key=value ...]``."""

from __future__ import annotations

import argparse
import logging
import os

from omnigen.cli.args import add_device_arg
from omnigen.training.config import describe_fields


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
    from omnigen.training.config import TrainConfig
    from omnigen.training.trainer import train

    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 logs
        logging.getLogger("omnigen").setLevel(logging.WARNING)
    config = TrainConfig.load(args.config, args.overrides)
    train(config, device=args.device)
    return 0
