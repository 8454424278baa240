"""Token-budget packing vs padding: useful tokens per second of a training forward + backward.

Same model, same samples, same draws; only the layout differs. ``padded``: every sample is a row, left
padded to the batch's longest condition. ``packed``: the samples are packed into rows of at most
``--max-tokens`` tokens (default: the longest sample), ``omnigen.model.packing``. Useful tokens are the
samples' own tokens (condition + time token + output tokens), the same count for both.

The length mix follows X2I: text-to-image rows (no input image) beside edits and subject rows with one
to three input images. Per batch of 10: 5 text-to-image, 2 one-image edits, 2 two-image edits, 1
three-image subject row (``MIX``); text lengths are drawn from 12-40 tokens. Images are ``--side`` x
``--side`` latent tokens each (input and output), as a resolution's images would be.

The two contenders alternate for ``--rounds`` rounds with the thread count pinned; the load average is
recorded around every segment, since a busy machine skews both sides.

    python benchmarks/bench_packing.py --threads 1 --rounds 3 --steps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

MIX = [0, 0, 0, 0, 0, 1, 1, 2, 2, 3]  # input images per sample, one batch
PAD, IMAGE = 3, 4  # token ids: padding, image placeholder


def make_model(hidden: int, layers: int, side: int):
    from omnigen.config import OmniGenConfig
    from omnigen.model import OmniGenModel

    config = OmniGenConfig.from_dict(
        {
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "vocab_size": 64,
            "pad_token_id": PAD,
            "max_position_embeddings": 8192,
            "original_max_position_embeddings": 8192,
            "rope_scaling": None,
            "omnigen": {
                "in_channels": 4,
                "patch_size": 1,
                "latent_downsample": 1,
                "pos_embed_max_size": side,
            },
        }
    )
    torch.manual_seed(0)
    model = OmniGenModel(config)
    model.initialize_weights()
    return model.train()


def make_batch(side: int, batches: int, seed: int = 0):
    """``batches`` copies of the MIX with drawn text lengths, collated (left padding) as in training."""
    from omnigen.text.collate import collate
    from omnigen.training.batches import TrainBatch
    from omnigen.types import ProcessedPrompt

    g = torch.Generator().manual_seed(seed)
    prompts, latents = [], []
    for count in MIX * batches:
        text = int(torch.randint(12, 41, (1,), generator=g))
        ids, spans = list(torch.randint(10, 64, (text,), generator=g).tolist()), []
        for _ in range(count):
            ids.append(5)  # <img>
            spans.append((len(ids), len(ids) + side * side))
            ids += [IMAGE] * (side * side) + [6]  # placeholders, </img>
        pixels = tuple(torch.zeros(3, side, side) for _ in spans)
        prompts.append(ProcessedPrompt(tuple(ids), tuple(spans), pixels))
        latents.append([torch.randn(4, side, side, generator=g) for _ in spans])
    condition = collate(prompts, latents, PAD)
    b = len(prompts)
    x1 = torch.randn(b, 4, side, side, generator=g)
    return TrainBatch(condition, x1, torch.zeros_like(x1), torch.zeros(b, dtype=torch.bool), torch.ones(b))


def run(model, batch, max_tokens: int | None, steps: int) -> float:
    """Seconds per forward + backward."""
    from omnigen.training.config import LossSettings
    from omnigen.training.loss import flow_matching_loss

    started = time.perf_counter()
    for step in range(steps):
        generator = torch.Generator().manual_seed(step)
        result = flow_matching_loss(model, batch, generator, LossSettings(), max_tokens=max_tokens)
        result.loss.backward()
        model.zero_grad(set_to_none=True)
    return (time.perf_counter() - started) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two contenders")
    parser.add_argument("--steps", type=int, default=3, help="timed forward+backward passes per segment")
    parser.add_argument("--side", type=int, default=12, help="latent tokens per image side (default 12)")
    parser.add_argument("--batches", type=int, default=1, help="copies of the 10-sample mix per batch")
    parser.add_argument("--hidden", type=int, default=128, help="model width (default 128)")
    parser.add_argument("--layers", type=int, default=2, help="model depth (default 2)")
    parser.add_argument("--max-tokens", type=int, default=None, help="row budget (default: longest sample)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from omnigen.model import packing

    model = make_model(args.hidden, args.layers, args.side)
    batch = make_batch(args.side, args.batches)
    lengths = packing.sample_lengths(batch.condition.token_mask, args.side * args.side)
    max_tokens = args.max_tokens or max(lengths)
    rows = packing.plan_rows(lengths, max_tokens)
    useful = sum(lengths)
    print(
        f"mix {MIX} x{args.batches}: {len(lengths)} samples, {useful} useful tokens; padded "
        f"{len(lengths)} rows x {max(lengths)} = {len(lengths) * max(lengths)} tokens; packed {len(rows)} rows "
        f"<= {max_tokens} (row lengths {[sum(lengths[i] for i in row) for row in rows]})"
    )
    run(model, batch, None, 1), run(model, batch, max_tokens, 1)  # warm-up
    times: dict[str, list[float]] = {"padded": [], "packed": []}
    for round_ in range(args.rounds):
        order = [("padded", None), ("packed", max_tokens)]
        for name, budget in order if round_ % 2 == 0 else order[::-1]:  # who goes first alternates too
            before = os.getloadavg()[0]
            seconds = run(model, batch, budget, args.steps)
            times[name].append(seconds)
            print(
                f"round {round_} {name}: {seconds * 1e3:.1f} ms/step, {useful / seconds:,.0f} useful tokens/s "
                f"(load {before:.2f} -> {os.getloadavg()[0]:.2f})"
            )
    padded, packed = (statistics.median(times[k]) for k in ("padded", "packed"))
    print(
        f"median: padded {useful / padded:,.0f}, packed {useful / packed:,.0f} useful tokens/s; "
        f"packed/padded = {padded / packed:.2f}x (threads {args.threads})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
