"""One image over several processes (``parallel="cfg"`` and ``"sequence"``) against one: seconds per image on CPU.

    python benchmarks/bench_cfg_parallel.py [--hidden 512] [--layers 8] [--size 128] [--steps 10] [--quick]
        [--contenders "1 proc x 1 thread,2 ranks x 1 thread sequence"]

Contenders, each in fresh processes (torch.multiprocessing, gloo on 127.0.0.1):
- ``1 proc x 1 thread`` and ``1 proc x 2 threads``: one process, ``separate_cfg_infer`` (the default);
- ``2 ranks x 1 thread`` and ``3 ranks x 1 thread``: ``parallel="cfg"``, one thread per rank;
- ``2 ranks x 1 thread sequence``: ``parallel="sequence"`` (``omnigen.model.ulysses``), one thread per rank.

Tasks: text-to-image (2 guidance branches; 3 ranks is refused: more ranks than branches) and a 1-image
edit (3 branches), at ``--size`` input and output. The model is random (the script builds it: OmniGen-v1's
layout at ``--hidden`` width and ``--layers`` depth, a small 8x VAE), the same in every process. Each
contender runs one warm-up call, then ``--repeats`` timed calls; the table gives the median seconds per
image, the ratio to one single-thread process, whether the image is byte-equal to that process's and the
largest difference of the final latents from its. The script fails when a parallel image differs from it
by more than one uint8 level. The load average is printed: on a shared machine the ranks compete for
cores and the ratios suffer. ``--quick``: a tiny model at 32x32, 2 steps, without the 2-thread process
(checks the script runs). ``--contenders``: a comma-separated subset (the baseline always runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_fullsize import build_pipeline, build_random_model, full_config, input_images
from bench_pipeline import TASKS

CONTENDERS = {  # name -> (processes, threads per process, parallel mode)
    "1 proc x 1 thread": (1, 1, None),
    "1 proc x 2 threads": (1, 2, None),
    "2 ranks x 1 thread": (2, 1, "cfg"),
    "3 ranks x 1 thread": (3, 1, "cfg"),
    "2 ranks x 1 thread sequence": (2, 1, "sequence"),
}
BASELINE = "1 proc x 1 thread"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512, help="hidden size (default 512)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    p.add_argument("--size", type=int, default=128, help="input and output side in pixels (default 128)")
    p.add_argument("--steps", type=int, default=10, help="sampling steps (default 10)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per contender (default 2)")
    p.add_argument(
        "--quick", action="store_true", help="tiny model, 32x32, 2 steps, 1 repeat, no 2-thread process"
    )
    p.add_argument("--contenders", default=None, help="comma-separated names (default: all)")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.size, args.steps, args.repeats = 64, 2, 32, 2, 1
    chosen = set(CONTENDERS) if args.contenders is None else {*args.contenders.split(","), BASELINE}
    if chosen - set(CONTENDERS):
        p.error(f"unknown contenders {sorted(chosen - set(CONTENDERS))}; known: {list(CONTENDERS)}")
    skip = "1 proc x 2 threads" if args.quick else None
    args.contenders = [name for name in CONTENDERS if name in chosen and name != skip]
    return args


def model_config(hidden: int, layers: int):
    config = full_config(layers)
    heads = max(2, hidden // 64)  # at least 2: sequence parallel splits the heads
    transformer = dataclasses.replace(
        config.transformer,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_heads=heads,
        num_kv_heads=heads,
        rope_scaling=None,  # OmniGen-v1's long-rope factors are per head dimension (96)
    )
    return dataclasses.replace(config, transformer=transformer)


def _worker(
    rank: int, world_size: int, port: int, threads: int, parallel: str | None, args: dict, out: str
) -> None:
    """One process of a contender: times every task it can run; rank 0 writes times, images, latents."""
    logging.getLogger("omnigen").setLevel(logging.ERROR)  # the random tokenizer's unknown-word warnings
    torch.set_num_threads(threads)
    if world_size > 1:
        import torch.distributed as dist

        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
    pipe = build_pipeline(
        build_random_model(model_config(args["hidden"], args["layers"]), torch.float32), args["size"]
    )
    results, final = {}, {}  # final: the last step's latents of the last call
    for task in ("t2i", "edit"):
        prompt, count = TASKS[task]
        if parallel == "cfg" and world_size > 2 + (count > 0):
            results[task] = None  # more ranks than guidance branches
            continue
        kw = {"input_images": input_images(args["size"], count) or None, "seed": 0, "progress": False}
        kw["callback_on_step_end"] = lambda pipe, i, t, latents: final.update(z=latents.clone())
        pipe(prompt, num_inference_steps=1, parallel=parallel, **kw)  # warm-up
        seconds = []
        for _ in range(args["repeats"]):
            start = time.perf_counter()
            image = pipe(prompt, num_inference_steps=args["steps"], parallel=parallel, **kw)[0]
            seconds.append(time.perf_counter() - start)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        latents = final["z"].flatten().tolist()
        results[task] = {"seconds": statistics.median(seconds), "png": buffer.getvalue().hex(), "z": latents}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    if world_size > 1:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace) -> dict[str, dict]:
    import torch.multiprocessing as mp

    settings = {k: getattr(args, k) for k in ("hidden", "layers", "size", "steps", "repeats")}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.contenders:
            processes, threads, parallel = CONTENDERS[name]
            out = str(Path(tmp) / "result.json")
            spawn_args = (processes, free_port(), threads, parallel, settings, out)
            mp.spawn(_worker, args=spawn_args, nprocs=processes)
            results[name] = json.loads(Path(out).read_text())
            print(f"# ran {name}", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before = os.getloadavg()
    results = run(args)
    load_after = os.getloadavg()
    print(
        f"# hidden {args.hidden}, {args.layers} layers, {args.size}x{args.size}, {args.steps} steps, "
        f"float32, median of {args.repeats}; {os.cpu_count()} CPUs"
    )
    print(
        "# load average (1, 5, 15 min) before: {:.2f} {:.2f} {:.2f}; after: {:.2f} {:.2f} {:.2f}".format(
            *load_before, *load_after
        )
    )
    print(f"| task | contender | s/image | vs {BASELINE} | image equal to it | max latent difference |")
    print("|---|---|---|---|---|---|")
    differs = []
    for task in ("t2i", "edit"):
        base = results[BASELINE][task]
        for name in args.contenders:
            row = results[name][task]
            if row is None:
                print(f"| {task} | {name} | refused: more ranks than branches | | | |")
                continue
            ratio = row["seconds"] / base["seconds"]
            levels = pixel_difference(row["png"], base["png"])
            equal = "yes" if levels == 0 else f"no (up to {levels} levels)"
            latent = max(abs(a - b) for a, b in zip(row["z"], base["z"]))
            # cfg must reproduce the single-thread image exactly, sequence within one uint8 level
            mode = CONTENDERS[name][2]
            if (mode == "cfg" and levels) or (mode == "sequence" and levels > 1):
                differs.append(f"{task}: {name}")
            print(f"| {task} | {name} | {row['seconds']:.2f} | {ratio:.2f}x | {equal} | {latent:.2e} |")
    if differs:
        sys.exit(f"parallel images differ from one process's: {differs}")


def pixel_difference(png: str, other: str) -> int:
    """The largest difference of two hex-encoded PNGs' pixels, in uint8 levels."""
    import numpy as np
    from PIL import Image

    a, b = (np.asarray(Image.open(io.BytesIO(bytes.fromhex(x)))).astype(int) for x in (png, other))
    return int(np.abs(a - b).max())


if __name__ == "__main__":
    main()
