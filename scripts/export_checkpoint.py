"""Export a training checkpoint's EMA (or raw) weights as a model folder that from_pretrained loads.

python scripts/export_checkpoint.py RUN_DIR OUT_DIR [--step step_00001500] [--raw] [--fp16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from omnigen.generation import GenerationConfig
from omnigen.model.vae import IdentityCodec
from omnigen.training.base import resolve_base
from omnigen.training.config import TrainConfig
from omnigen.weights.checkpoint import build_model, save_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--step", default=None, help="checkpoint folder name (default: the latest)")
    parser.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    parser.add_argument("--fp16", action="store_true", help="store the weights in float16")
    args = parser.parse_args()
    folder = args.run / "checkpoints"
    step = args.step or (folder / "latest").read_text().strip()
    config = TrainConfig.from_dict(json.loads((args.run / "train_config.json").read_text()))
    if config.codec != "identity":
        raise SystemExit("only pixel-space (identity codec) runs are exported by this script")
    weights = "model.safetensors" if args.raw else "ema.safetensors"
    base = resolve_base(config)
    model = build_model(base.model_config, load_file(str(folder / step / weights)))
    save_model(model, args.out, dtype=torch.float16 if args.fp16 else None)
    base.tokenizer.save(args.out)
    IdentityCodec(channels=model.config.in_channels).save(args.out)
    GenerationConfig.from_dict(config.generation, "generation").save(args.out)
    (args.out / "training.json").write_text(
        json.dumps({"run": str(args.run), "checkpoint": step, "weights": weights}, indent=1)
    )
    print(f"exported {folder / step / weights} -> {args.out}")


if __name__ == "__main__":
    main()
