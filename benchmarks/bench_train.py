"""Training throughput: our trainer's step beside a plain hand-written torch loop, in one run.

Both train the same tiny pixel-space OmniGen (same config, same seed) on the same batch (a miniworld
data set exactly one batch large) with the same loss (rectified-flow velocity MSE, uniform t), AdamW
and grad clipping; fp32, no EMA, no condition dropout. The plain loop builds its batch once and then
only runs forward/backward/step; the trainer also builds every batch (tokenise, collate, per-sample
generators), logs a loss line and does its bookkeeping, so the ratio is the trainer's overhead.

The two alternate for ``--rounds`` rounds with the thread count pinned; the trainer's time per step
comes from the ``time`` field of its ``loss.jsonl`` (start-up, export and the first ``--warmup`` steps
excluded). The load average is recorded at every segment, since a busy machine skews both sides.

    python benchmarks/bench_train.py --threads 1 --rounds 5 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "pad_token_id": 3,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "rope_scaling": None,
    "omnigen": {
        "in_channels": 3,
        "patch_size": 4,
        "latent_downsample": 1,
        "pos_embed_max_size": 16,
        "pos_embed_base_size": 16,
    },
}


def make_data(folder: Path, batch: int, size: int) -> tuple[Path, Path]:
    from omnigen.miniworld.world import save_tokenizer, write_dataset

    jsonl = write_dataset(folder, batch, seed=0, size=size)
    return jsonl, save_tokenizer(folder / "tokenizer.json")


def train_config(args: argparse.Namespace, jsonl: Path, tokenizer: Path, out: Path, vocab: int):
    from omnigen.training.config import TrainConfig

    steps = args.warmup + args.steps
    return TrainConfig.from_dict(
        {
            "data": [str(jsonl)],
            "out_dir": str(out),
            "tokenizer": str(tokenizer),
            "model": {**MODEL, "vocab_size": vocab},
            "stages": [{"resolution": args.size, "steps": steps, "batch_size": args.batch, "lr": 1e-3}],
            "drop_text": 0.0,
            "drop_images": 0.0,
            "drop_both": 0.0,
            "ema_decay": 0.0,
            "t_distribution": "uniform",
            "log_every": 10**9,
            "checkpoint_every": 10**9,
            "keep_checkpoints": 1,
        }
    )


def run_trainer(config, warmup: int) -> float:
    """Samples/s over the steps after the warm-up, from the trainer's own per-step clock."""
    import logging

    from omnigen.training.trainer import train

    logging.getLogger("omnigen").setLevel(logging.WARNING)
    train(config, device="cpu")
    rows = [json.loads(x) for x in (Path(config.out_dir) / "loss.jsonl").read_text().splitlines()]
    times = [r["time"] for r in rows]
    per_step = (times[-1] - times[warmup - 1]) / (len(times) - warmup)
    return config.stages[0].batch_size / per_step


def plain_setup(config):
    """The same model init and the same batch as the trainer, built once."""
    from omnigen.config import OmniGenConfig
    from omnigen.model import OmniGenModel
    from omnigen.model.vae import IdentityCodec
    from omnigen.text.processor import OmniGenProcessor
    from omnigen.text.tokenizer import Tokenizer
    from omnigen.training.batches import BatchBuilder
    from omnigen.training.sampling_data import ConditionDropout
    from omnigen.training.x2i import read_x2i

    torch.manual_seed(config.seed)
    model = OmniGenModel(OmniGenConfig.from_dict(config.model))
    model.initialize_weights()
    samples = read_x2i(config.data).samples
    processor = OmniGenProcessor(
        Tokenizer.from_file(config.tokenizer), model.config, config.stages[0].resolution
    )
    builder = BatchBuilder(
        samples, processor, IdentityCodec(3), ConditionDropout(0, 0, 0), torch.device("cpu")
    )
    batch = builder(list(range(len(samples))), config.stages[0].resolution, torch.Generator().manual_seed(0))
    return model, batch


def run_plain(config, warmup: int, steps: int) -> float:
    """A hand-written loop: t ~ U(0, 1), x_t = t x1 + (1 - t) x0, MSE to x1 - x0, AdamW, clip."""
    model, batch = plain_setup(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.stages[0].lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    x1 = batch.x1
    model.train()
    for step in range(warmup + steps):
        if step == warmup:
            started = time.perf_counter()
        t = torch.rand(x1.shape[0], generator=generator)
        x0 = torch.randn(x1.shape, generator=generator)
        xt = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0
        loss = ((model(xt, t, condition=batch.condition) - (x1 - x0)) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return x1.shape[0] * steps / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating trainer/plain rounds")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per segment")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per segment")
    parser.add_argument("--batch", type=int, default=8, help="samples per step (= the data set size)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (16, 32 or 64)")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be >= 1")
    torch.set_num_threads(args.threads)
    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        jsonl, tokenizer = make_data(root / "data", args.batch, args.size)
        vocab = Tokenizer.from_file(str(tokenizer)).get_vocab_size()
        results: dict[str, list[float]] = {"trainer": [], "plain": []}
        print(
            f"threads {torch.get_num_threads()}, batch {args.batch}, {args.size}px, {args.steps} timed steps"
        )
        print(f"{'round':>5} {'what':>8} {'samples/s':>10} {'load avg (1 min) before/after':>31}")
        for round_index in range(args.rounds):
            for what in ("trainer", "plain"):
                before = os.getloadavg()[0]
                config = train_config(args, jsonl, tokenizer, root / f"run{round_index}", vocab)
                rate = (
                    run_trainer(config, args.warmup)
                    if what == "trainer"
                    else run_plain(config, args.warmup, args.steps)
                )
                after = os.getloadavg()[0]
                results[what].append(rate)
                print(f"{round_index:>5} {what:>8} {rate:>10.1f} {before:>15.2f} / {after:.2f}", flush=True)
    trainer, plain = statistics.median(results["trainer"]), statistics.median(results["plain"])
    ratios = [a / b for a, b in zip(results["trainer"], results["plain"])]
    print(f"median samples/s: trainer {trainer:.1f}, plain loop {plain:.1f}")
    print(
        f"ratio trainer/plain: {trainer / plain:.3f} (of medians); per round "
        + " ".join(f"{r:.3f}" for r in ratios)
        + f"; median {statistics.median(ratios):.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
