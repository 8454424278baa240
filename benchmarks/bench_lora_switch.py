"""Cost of switching LoRA adapters between service requests (``omnigen serve --lora-dir``).

    python benchmarks/bench_lora_switch.py [--layers 2] [--rank 16] [--repeats 5] [--device cpu]

Builds a scaled OmniGen-v1 model (the real widths, ``--layers`` decoder layers, bf16, random weights),
saves two rank-``--rank`` adapters on all four projections, and times what the service's worker does
before a request (``serve.adapters.AdapterSwitch.apply``): an adapter's first request (read from disk,
inject), a switch between two loaded adapters (which are active), the same adapter again; and, for
comparison, switching by unloading and loading (``weights.lora.apply_loras``, what ``--lora`` and the
ComfyUI node do), whose cost grows with the adapted layers: the full model has 32 (x 32 / layers).
Also the shipped miniature model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_fullsize import build_random_model, full_config

from omnigen.serve.adapters import AdapterSwitch
from omnigen.weights import lora


def adapters(model: torch.nn.Module, folder: Path, rank: int) -> list[Path]:
    out = []
    for name in ("a", "b"):
        lora.add_lora(model, rank=rank, alpha=rank)
        with torch.no_grad():
            for key, p in model.named_parameters():
                if ".lora_B" in key:
                    p.normal_(0, 0.01)
        out.append(lora.save_lora(model, folder / name))
        lora.unload_lora(model)
    return out


def timed(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(label: str, model: torch.nn.Module, rank: int, repeats: int, layers: int | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        a, b = adapters(model, Path(tmp), rank)
        size = sum(f.stat().st_size for f in Path(a).iterdir()) / 2**20
        switch = AdapterSwitch(model)
        stacks = [((str(a), 1.0),), ((str(b), 1.0),)]
        for stack in stacks:  # the first request for each adapter loads it
            switch.apply(stack)
        load = switch.stats()["lora_load_mean_s"]
        turn = iter(range(10**6))
        swap = timed(lambda: switch.apply(stacks[next(turn) % 2]), repeats)
        same = timed(lambda: switch.apply(stacks[1]), repeats)
        lora.unload_lora(model)
        flips = iter(range(10**6))
        reload = timed(lambda: lora.apply_loras(model, [(stacks[next(flips) % 2][0][0], 1.0)]), repeats)
        print(
            f"{label}: adapter {size:.1f} MiB; first request of an adapter (read + inject) "
            f"{load * 1000:.0f} ms; switch between loaded adapters {swap * 1000:.2f} ms; same adapter "
            f"{same * 1000:.3f} ms; unload + reload instead {reload * 1000:.0f} ms"
            + ("" if layers is None else f" (x 32 / {layers} layers: {reload * 32 / layers * 1000:.0f} ms)")
            + f" (medians of {repeats})"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_grad_enabled(False)

    from omnigen.pipeline import default_model_path
    from omnigen.weights.checkpoint import load_model

    shipped, _ = load_model(default_model_path(), device=args.device)
    measure("shipped miniature model", shipped, args.rank, args.repeats, None)
    model = build_random_model(full_config(args.layers), torch.bfloat16, args.device)
    measure(f"OmniGen-v1 widths, {args.layers} layers, bf16", model, args.rank, args.repeats, args.layers)


if __name__ == "__main__":
    main()
