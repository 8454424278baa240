"""Weight formats side by side: bf16, fp32, int8 (weight-only), fp8 (float8_e4m3fn, weight-only), GGUF's
q8_0 and q4_0 (weight-only, GGML blocks).

    python benchmarks/bench_formats.py [--quick] [--threads 1] [--rounds 3] [--steps 4] [--tokens 64]
        [--hidden 3072] [--json out.json]

Two parts, each format a contender, contenders alternated round by round (the median of the rounds is
reported, so a burst of load from other processes hits every format alike):

- the shipped miniature model (``omnigen.pipeline.default_model_path()``): bf16 and fp32 as loaded; int8 =
  the bf16 model with ``quantize(model, "int8")``; fp8 = the model exported with ``--dtype float8_e4m3fn``
  and loaded from that file (compute in bf16); q8_0 / q4_0 = the model exported with ``--dtype q8_0`` /
  ``q4_0`` and loaded from its model.gguf (compute in bf16). Seconds per sampling step (text-to-image, 16x16), and the
  output's PSNR and largest difference to the bf16 output (pixels in [0, 1]).
- one full-size OmniGen-v1 decoder layer's linears with random weights (hidden 3072: qkv 3072->9216, o
  3072->3072, gate_up 3072->16384, down 8192->3072; an MLP-shaped stack, no attention) on ``--tokens``
  tokens (q8_0 / q4_0: each Linear quantized by the gguf package, kept packed): seconds per forward, PSNR
  (peak = the bf16 output's largest magnitude) and largest difference.

Each output is also compared with the fp32 output (PSNR to fp32), the full-precision reference.

"resident MB" is the bytes of every parameter and buffer after load (torchao's wrapped int8 tensors
counted by their inner tensors), not the process RSS. Threads are pinned (``--threads``) and the load
average is recorded before and after. On CPUs these formats buy memory, not speed: int8, fp8 and the GGUF
types are dequantized at each matmul. ``--quick`` is a smoke run (1 round, 2 steps, hidden 768).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from omnigen.pipeline import OmniGenPipeline, default_model_path
from omnigen.weights import fp8, gguf_file
from omnigen.weights.quantize import quantize, tensor_bytes

FORMATS = ("bf16", "fp32", "int8", "fp8", "q8_0", "q4_0")
FILE_FORMATS = {"fp8": fp8.FP8, "q8_0": "q8_0", "q4_0": "q4_0"}  # exported, then loaded from the file


def resident_bytes(module: nn.Module) -> int:
    return sum(tensor_bytes(t) for t in [*module.parameters(), *module.buffers()])


def psnr(got: torch.Tensor, want: torch.Tensor, peak: float) -> float:
    mse = (got.float() - want.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(peak**2 / mse)).item()


class LayerStack(nn.Module):
    """The four projections of one Phi-3 decoder layer, chained like its MLP (as ``model.llm.layers``)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        inner = hidden * 16 // 6 // 64 * 64 if hidden != 3072 else 8192
        block = nn.Module()
        block.qkv_proj = nn.Linear(hidden, 3 * hidden, bias=False)
        block.o_proj = nn.Linear(hidden, hidden, bias=False)
        block.gate_up_proj = nn.Linear(hidden, 2 * inner, bias=False)
        block.down_proj = nn.Linear(inner, hidden, bias=False)
        self.llm = nn.Module()
        self.llm.layers = nn.ModuleList([block])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.llm.layers[0]
        h = b.o_proj(b.qkv_proj(x)[..., : x.shape[-1]])
        gate, up = b.gate_up_proj(h).chunk(2, dim=-1)
        return b.down_proj(F.silu(gate) * up)


def build_stack(kind: str, hidden: int) -> LayerStack:
    torch.manual_seed(0)
    stack = LayerStack(hidden)
    for p in stack.parameters():
        nn.init.normal_(p, std=0.02)
    stack = stack.to(torch.float32 if kind == "fp32" else torch.bfloat16).eval()
    if kind in ("int8", "fp8"):
        quantize(stack, kind)
    if kind in ("q8_0", "q4_0"):
        block = stack.llm.layers[0]
        for name, linear in list(block.named_children()):
            setattr(block, name, gguf_file.packed_linear(linear, kind))
    return stack


def build_pipeline(kind: str, folders: dict[str, Path]) -> OmniGenPipeline:
    if kind in folders:
        return OmniGenPipeline.from_pretrained(folders[kind], dtype=torch.bfloat16)
    pipe = OmniGenPipeline.from_pretrained(None, dtype=torch.float32 if kind == "fp32" else torch.bfloat16)
    if kind == "int8":
        quantize(pipe.model, "int8")
    return pipe


def run_shipped(args: argparse.Namespace, folders: dict[str, Path]) -> dict[str, dict]:
    pipes = {kind: build_pipeline(kind, folders) for kind in FORMATS}
    times: dict[str, list[float]] = {kind: [] for kind in FORMATS}
    outputs = {}
    for _ in range(args.rounds):
        for kind, pipe in pipes.items():
            start = time.perf_counter()
            pixels = pipe(
                "a red square", num_inference_steps=args.steps, seed=0, output_type="pt", progress=False
            )
            outputs[kind] = (pixels.float() + 1) / 2  # "pt" is [-1, 1]; the table's pixels are [0, 1]
            times[kind].append((time.perf_counter() - start) / args.steps)
    return summarize(pipes, times, outputs, peak=1.0, model=lambda p: p.model)


def run_stack(args: argparse.Namespace) -> dict[str, dict]:
    x = torch.randn(1, args.tokens, args.hidden, generator=torch.Generator().manual_seed(1))
    stacks = {kind: build_stack(kind, args.hidden) for kind in FORMATS}
    times: dict[str, list[float]] = {kind: [] for kind in FORMATS}
    outputs = {}
    with torch.no_grad():
        for _ in range(args.rounds):
            for kind, stack in stacks.items():
                dtype = torch.float32 if kind == "fp32" else torch.bfloat16
                start = time.perf_counter()
                outputs[kind] = stack(x.to(dtype))
                times[kind].append(time.perf_counter() - start)
    peak = outputs["bf16"].float().abs().max().item()
    return summarize(stacks, times, outputs, peak=peak, model=lambda s: s)


def summarize(contenders, times, outputs, peak, model) -> dict[str, dict]:
    ref = outputs["bf16"]
    return {
        kind: {
            "resident_mb": resident_bytes(model(c)) / 2**20,
            "seconds": statistics.median(times[kind]),
            "psnr_db": psnr(outputs[kind], ref, peak),
            "psnr_fp32_db": psnr(outputs[kind], outputs["fp32"], peak),
            "max_diff": (outputs[kind].float() - ref.float()).abs().max().item(),
        }
        for kind, c in contenders.items()
    }


def table(title: str, rows: dict[str, dict], unit: str) -> str:
    lines = [
        title,
        f"| format | resident MB | {unit} | PSNR to bf16 (dB) | max diff to bf16 | PSNR to fp32 (dB) |",
        "|---|---|---|---|---|---|",
    ]
    for kind, r in rows.items():
        lines.append(
            f"| {kind} | {r['resident_mb']:.2f} | {r['seconds']:.4f} | {r['psnr_db']:.1f} | {r['max_diff']:.4f} "
            f"| {r['psnr_fp32_db']:.1f} |"
        )
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 2 steps, hidden 768")
    p.add_argument("--threads", type=int, default=1, help="torch threads, pinned (default: 1)")
    p.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds; the median is shown (default: 3)"
    )
    p.add_argument("--steps", type=int, default=4, help="sampling steps on the shipped model (default: 4)")
    p.add_argument("--tokens", type=int, default=64, help="tokens through the layer stack (default: 64)")
    p.add_argument("--hidden", type=int, default=3072, help="layer stack width (default: 3072, OmniGen-v1)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.hidden, args.tokens = 1, 2, 768, 16
    for name in ("threads", "rounds", "steps", "tokens", "hidden"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        from omnigen.cli.export import export

        folders = {
            kind: export(Path(tmp) / kind, model=default_model_path(), dtype=dtype)
            for kind, dtype in FILE_FORMATS.items()
        }
        shipped = run_shipped(args, folders)
    stack = run_stack(args)
    load_after = os.getloadavg()
    print(
        f"threads {args.threads}, rounds {args.rounds} (median), load average {load_before[0]:.2f} -> {load_after[0]:.2f} "
        f"on {os.cpu_count()} CPUs"
    )
    print(table(f"shipped model, {args.steps} steps", shipped, "s/step"))
    print()
    print(
        table(f"one decoder layer's linears, hidden {args.hidden}, {args.tokens} tokens", stack, "s/forward")
    )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "shipped": shipped,
                    "stack": stack,
                    "load": [load_before, load_after],
                    "args": {k: str(v) for k, v in vars(args).items()},
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
