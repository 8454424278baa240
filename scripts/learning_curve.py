"""Follow a training run: score each new checkpoint's EMA on the miniature world's held-out split.

    python scripts/learning_curve.py RUN_DIR OUT.jsonl [--n 112] [--every 60] [--until-step 15000] [--multiple 1000]

One JSON line per checkpoint: step, minutes of training (summed over resumes), overall and per-family accuracy.
Runs at low priority on one thread so the training keeps the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from omnigen.eval.miniworld import evaluate
from omnigen.generation import GenerationConfig
from omnigen.miniworld.score import summarize
from omnigen.model.vae import IdentityCodec
from omnigen.pipeline import OmniGenPipeline
from omnigen.training.base import resolve_base
from omnigen.training.config import TrainConfig
from omnigen.weights.checkpoint import build_model


def score(run: Path, step_dir: Path, n: int) -> dict:
    config = TrainConfig.from_dict(json.loads((run / "train_config.json").read_text()))
    base = resolve_base(config)
    model = build_model(base.model_config, load_file(str(step_dir / "ema.safetensors")))
    pipe = OmniGenPipeline(
        model,
        IdentityCodec(model.config.in_channels),
        base.tokenizer,
        GenerationConfig.from_dict(config.generation, "generation"),
    )
    result = evaluate(pipe, "heldout", n, data_seed=1, progress=False)
    families = summarize(result.records)
    correct = sum(r["correct"] for r in result.records)
    return {
        "accuracy": correct / len(result.records),
        "families": {k: round(v["accuracy"], 3) for k, v in families.items()},
    }


def training_minutes(run: Path) -> dict[int, float]:
    """Minutes of training up to each step, from loss.jsonl; its clock restarts when a run resumes, so the
    segments are added up (restart overhead excluded)."""
    minutes, offset, last = {}, 0.0, 0.0
    path = run / "loss.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        row = json.loads(line)
        if row["time"] < last:  # a resumed process
            offset += last
        last = row["time"]
        minutes[row["step"]] = (offset + last) / 60
    return minutes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=112)
    parser.add_argument("--every", type=float, default=60.0, help="seconds between looks")
    parser.add_argument("--until-step", type=int, default=None)
    parser.add_argument("--multiple", type=int, default=1, help="score only steps divisible by this")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.nice(10)
    done = set()
    if args.out.is_file():
        done = {json.loads(line)["step"] for line in args.out.read_text().splitlines() if line.strip()}
    while True:
        for step_dir in sorted((args.run / "checkpoints").glob("step_*")):
            step = int(step_dir.name.split("_")[1])
            if step in done or step % args.multiple or not (step_dir / "ema.safetensors").is_file():
                continue
            minutes = training_minutes(args.run).get(step)
            record = {
                "step": step,
                "minutes": None if minutes is None else round(minutes, 1),
                **score(args.run, step_dir, args.n),
            }
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            done.add(step)
            print(json.dumps(record), flush=True)
        if args.until_step is not None and args.until_step in done:
            return
        time.sleep(args.every)


if __name__ == "__main__":
    main()
