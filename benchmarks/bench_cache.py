"""Condition-cache bytes against ``num_images_per_prompt``: measured now, and what a row per image cost.

    python benchmarks/bench_cache.py [--layers 2] [--size 256] [--max-images 4] [--dtype bfloat16]

Runs our pipeline (OmniGen-v1's width, ``--layers`` decoder layers, random weights, one sampling step) on
the 1-image edit with ``--size`` input and output, for k = 1..``--max-images`` images per prompt, in both
CFG modes, and prints the bytes of the KV caches its prefills made. "before" is the layout that repeated
every condition row once per image (computed: k times the rows' tokens); "now" is measured and checked
against one row per prompt and branch. Bytes scale with depth, so both are also given for 32 layers, and
for a 1024x1024 input image (the service's default limit), computed from the same per-token size.
"""

from __future__ import annotations

import argparse
import logging

import torch
from bench_fullsize import (
    DTYPES,
    build_pipeline,
    build_random_model,
    condition_lengths,
    full_config,
    input_images,
)
from bench_pipeline import TASKS

from omnigen.config import OmniGenConfig
from omnigen.model import ConditionCache
from omnigen.pipeline import OmniGenPipeline

FULL_DEPTH = 32


def token_bytes(config: OmniGenConfig, dtype: torch.dtype) -> int:
    """KV-cache bytes of one condition token at one layer (keys and values)."""
    t = config.transformer
    return 2 * t.num_kv_heads * t.head_dim * torch.empty((), dtype=dtype).element_size()


def cache_tokens(lengths: list[int], separate: bool) -> int:
    """Tokens a cache stores for one row per branch: separate CFG has no padding, batched pads to the longest."""
    return sum(lengths) if separate else len(lengths) * max(lengths)


def measure(pipe: OmniGenPipeline, prompt: str, images: list, k: int, separate: bool) -> int:
    seen: list[int] = []
    prefill = pipe.model.prefill

    def counting(*args, **kwargs) -> ConditionCache:
        cache = prefill(*args, **kwargs)
        seen.append(cache.nbytes())
        return cache

    pipe.model.prefill = counting
    try:
        pipe(
            prompt,
            images,
            num_images_per_prompt=k,
            num_inference_steps=1,
            seed=0,
            progress=False,
            output_type="latent",
            separate_cfg_infer=separate,
            offload_kv_cache=True,
        )
    finally:
        del pipe.model.prefill
    return sum(seen)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--max-images", type=int, default=4)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("omnigen.text.tokenizer").setLevel(
        logging.ERROR
    )  # the bench vocabulary lacks most words
    config, dtype = full_config(args.layers), DTYPES[args.dtype]
    pipe = build_pipeline(build_random_model(config, dtype), args.size)
    prompt, count = TASKS["edit"]
    images = input_images(args.size, count)
    per_token = token_bytes(config, dtype)
    lengths = condition_lengths(config, "edit", args.size)
    big = condition_lengths(config, "edit", 1024)
    print(
        f"# edit, {args.size}x{args.size} input, condition tokens per branch {lengths} (1024^2 input: {big}), "
        f"{per_token} bytes per token and layer ({args.dtype})"
    )
    print(
        f"{'CFG':9} {'k':>2} {'now MB':>9} {'before MB':>10} {f'now MB @{FULL_DEPTH}':>12} "
        f"{f'before MB @{FULL_DEPTH}':>15} {'1024^2 now GB':>14} {'1024^2 before GB':>17}"
    )
    for separate in (True, False):
        for k in range(1, args.max_images + 1):
            now = measure(pipe, prompt, images, k, separate)
            expected = cache_tokens(lengths, separate) * per_token * args.layers
            if now != expected:
                raise SystemExit(f"measured {now} bytes but one row per prompt and branch is {expected}")
            scale = FULL_DEPTH / args.layers
            big_now = cache_tokens(big, separate) * per_token * FULL_DEPTH
            print(
                f"{'separate' if separate else 'batched':9} {k:2d} {now / 2**20:9.2f} {k * now / 2**20:10.2f} "
                f"{now * scale / 2**20:12.1f} {k * now * scale / 2**20:15.1f} {big_now / 2**30:14.2f} "
                f"{k * big_now / 2**30:17.2f}"
            )


if __name__ == "__main__":
    main()
