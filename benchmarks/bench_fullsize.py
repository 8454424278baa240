"""The real OmniGen-v1 shapes on a CPU: the full architecture (3.76B parameters) with random weights.

    python benchmarks/bench_fullsize.py [--dtype bfloat16] [--size 256] [--steps 2] [--threads 2]
        [--tasks t2i,edit] [--modes batched,separate,kv_offload,offload_model] [--big-size 1024]
        [--layers 32] [--compare modes|dtypes|presets] [--quick]

Weights are built in place in the target dtype (meta device -> ``to_empty`` -> seeded init), so nothing is
downloaded and the fp32 model is never materialised. Every contender runs in a fresh process (its peak
resident memory is its own): our pipeline in each memory mode, and diffusers' ``OmniGenTransformer2DModel``
on the same weights, driven as diffusers' pipeline drives it (all CFG rows batched, no cache) and also one
row at a time (the reference our outputs must equal: the batched diffusers loop has the row-0 rotary bug).
A small random AutoencoderKL (8x downsampling) encodes the edit's input image; latents are compared, so
no decode is timed. Then one ``--big-size`` text-to-image step (1024: 4096 output tokens, positions past
4096, so the long rotary factors are in use) runs in ours and in the per-row reference and is compared.

Columns: build (seconds to build the random model), first step (prefill included), later steps (mean),
peak RSS of the process during the call (weights included; the build's transient memory excluded), growth
of RSS during the call, KV cache bytes, and the largest |latent difference| to the per-row reference. On a CPU the two offload modes move nothing (the
"device" is the host), so they show the cost of their bookkeeping, not their savings.

``--compare dtypes``: bfloat16 vs float32 in our batched loop and diffusers' loop in bfloat16, each step's
matmul GFLOP/s as a share of a 3072-wide bfloat16 matmul measured in the same run, and the latents'
difference to float32. ``--compare presets``: resident memory of each ``--memory`` preset (bf16 weights,
one t2i step). ``--quick``: a narrow one-layer model that checks the harness in a few minutes.
docs/cpu_bf16.md has the results.

The closing table estimates GPU memory at ``--big-size`` for each mode from exact tensor sizes
(weights, KV cache) plus an activation bound (see ``estimate_gpu_gb``); it is an estimate, not a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_pipeline import TASKS, build_tokenizer, build_vae, reference_sample
from peak_rss import PeakRSS
from safetensors.torch import load_file, save_file

from omnigen.config import OmniGenConfig
from omnigen.generation import DEFAULT_NEGATIVE_PROMPT, GenerationConfig
from omnigen.model import OmniGenModel
from omnigen.model.embeddings import sincos_2d
from omnigen.model.layers import RMSNorm
from omnigen.model.offload import MAX_RESIDENT_LAYERS
from omnigen.model.vae import AutoencoderKLCodec
from omnigen.pipeline import OmniGenPipeline
from omnigen.text.processor import OmniGenProcessor, cfg_prompts
from omnigen.util import cpu
from omnigen.weights.keymap import ours_to_diffusers

FIXTURE = Path(__file__).parents[1] / "tests" / "fixtures" / "omnigen_v1_config.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = {
    "batched": dict(separate_cfg_infer=False, offload_kv_cache=False),
    "separate": dict(separate_cfg_infer=True, offload_kv_cache=False),
    "kv_offload": dict(separate_cfg_infer=True, offload_kv_cache=True),
    "offload_model": dict(separate_cfg_infer=True, offload_kv_cache=True, offload_model=True),
}
GUIDANCE, IMG_GUIDANCE, SEED = 3.0, 1.6, 0
PUBLISHED_GB = {"t2i": 9.0, "edit": 12.0}  # the original's README, A800, 1024x1024, its memory-saving modes


QUICK_SHAPES = dict(hidden_size=384, intermediate_size=1024, num_heads=4, num_kv_heads=4)  # head dim 96


def full_config(layers: int | None = None, quick: bool = False) -> OmniGenConfig:
    """OmniGen-v1's config (``tests/fixtures``), optionally with fewer decoder layers; ``quick``: a narrow
    one-layer model of the same head size (a smoke test of the harness, not a measurement)."""
    config = OmniGenConfig.load(FIXTURE)
    changes = dict(QUICK_SHAPES, num_layers=1) if quick else ({"num_layers": layers} if layers else {})
    if changes:
        config = dataclasses.replace(config, transformer=dataclasses.replace(config.transformer, **changes))
    return config


def build_random_model(
    config: OmniGenConfig, dtype: torch.dtype, device: torch.device | str = "cpu", seed: int = 0
) -> OmniGenModel:
    """Random weights allocated once, in ``dtype`` on ``device`` (no fp32 copy), the same for every seed
    and process: xavier linears, N(0, 0.02) embeddings and a non-zero output head, unit norms."""
    with torch.device("meta"):
        model = OmniGenModel(config)
    model = model.to(dtype).to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        model.initialize_weights()
        for p in model.final_layer.parameters():
            p.normal_(0, 0.02)
        table = sincos_2d(
            config.transformer.hidden_size, config.pos_embed_max_size, config.pos_embed_base_size
        )
        model.pos_embed.copy_(table[None])
    model.materialize_buffers(device)
    return model.eval()


def build_pipeline(model: OmniGenModel, size: int, device: torch.device | str = "cpu") -> OmniGenPipeline:
    defaults = GenerationConfig(height=size, width=size, max_input_image_size=size)
    codec = AutoencoderKLCodec(build_vae("tiny")).to(device)
    return OmniGenPipeline(model, codec, build_tokenizer(), defaults, device)


def input_images(size: int, count: int) -> list:
    gen = torch.Generator().manual_seed(0)
    return [(torch.rand(size, size, 3, generator=gen) * 255).byte().numpy() for _ in range(count)]


def condition_lengths(config: OmniGenConfig, task: str, size: int) -> list[int]:
    """Token count of each CFG branch's condition for ``task`` with input images of ``size``."""
    processor = OmniGenProcessor(build_tokenizer(), config, size)
    prompt, k = TASKS[task]
    pixels = [processor.prepare_image(img) for img in input_images(size, k)]
    branches = cfg_prompts(prompt, pixels, DEFAULT_NEGATIVE_PROMPT, bool(pixels))
    rows = [branches.cond, branches.uncond] + ([branches.img_cond] if pixels else [])
    return [len(processor(text, imgs).input_ids) for text, imgs in rows]


# ---------------------------------------------------------------------- children (one contender each)
def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (VmHWM) at the current RSS, so a call's peak excludes the
    transient memory of building the random model (Linux; elsewhere the peak includes it)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gb() -> float:
    """This process's peak RSS (VmHWM; ru_maxrss where /proc is missing, which includes the parent's)."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 2**20
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child_ours(args: argparse.Namespace) -> dict:
    config = full_config(args.layers, args.quick)
    start = time.perf_counter()
    model = build_random_model(config, DTYPES[args.dtype])
    build_s = time.perf_counter() - start
    pipe = build_pipeline(model, args.size)
    prompt, k = TASKS[args.task]
    images = input_images(args.size, k)
    cache_bytes: list[int] = []
    prefill = model.prefill

    def counting_prefill(*a, **kw):
        cache = prefill(*a, **kw)
        cache_bytes.append(cache.nbytes())
        return cache

    model.prefill = counting_prefill
    stamps: list[float] = []
    reset_peak_rss()
    with torch.no_grad(), PeakRSS() as rss:
        start = time.perf_counter()
        latents = pipe(
            prompt,
            images or None,
            num_inference_steps=args.steps,
            guidance_scale=GUIDANCE,
            img_guidance_scale=IMG_GUIDANCE,
            seed=SEED,
            progress=False,
            output_type="latent",
            callback_on_step_end=lambda p, i, t, z: stamps.append(time.perf_counter()),
            **MODES[args.mode],
        )
        call_s = time.perf_counter() - start
    save_file({"latents": latents.float().contiguous()}, args.save)
    steps_after = len(stamps) - 1
    return {
        "build_s": build_s,
        "first_step_s": stamps[0] - start,
        "step_s": (stamps[-1] - stamps[0]) / steps_after if steps_after else None,
        "call_s": call_s,
        "growth_gb": rss.delta_mb / 1024,
        "kv_cache_mb": sum(cache_bytes) / 2**20,
    }


def child_reference(args: argparse.Namespace) -> dict:
    """diffusers' transformer on the same weights: its batched loop (timed), then the per-row reference."""
    from diffusers import OmniGenTransformer2DModel

    config = full_config(args.layers, args.quick)
    start = time.perf_counter()
    model = build_random_model(config, DTYPES[args.dtype])
    with torch.device("meta"):
        ref = OmniGenTransformer2DModel(**config.to_diffusers_dict())
    ref.load_state_dict(ours_to_diffusers(model.state_dict(), config), strict=True, assign=True)
    ref.eval()
    build_s = time.perf_counter() - start
    pipe = build_pipeline(model, args.size)  # its processor, codec and config only
    prompt, k = TASKS[args.task]
    images = input_images(args.size, k)
    out: dict = {"build_s": build_s}
    saved = {}
    reset_peak_rss()
    with torch.no_grad():
        for per_row in (False, True) if args.reference == "both" else (args.reference == "rows",):
            name = "rows" if per_row else "batched"
            with PeakRSS() as rss:
                start = time.perf_counter()
                z = reference_sample(
                    ref, pipe, prompt, images, args.size, args.steps, GUIDANCE, IMG_GUIDANCE, SEED, per_row
                )[0]
                seconds = time.perf_counter() - start
            saved[name] = z.float().contiguous()
            out[f"{name}_step_s"] = seconds / args.steps
            out[f"{name}_growth_gb"] = rss.delta_mb / 1024
    save_file(saved, args.save)
    return out


def child_flags(args: argparse.Namespace) -> list[str]:
    """The shape flags every child gets: threads, layers, quick."""
    flags = ["--threads", str(args.threads)] + (["--layers", str(args.layers)] if args.layers else [])
    return flags + (["--quick"] if args.quick else [])


def spawn(argv: list[str], save: Path) -> dict:
    """Run one contender in a fresh interpreter; its RESULT line plus its peak RSS."""
    command = [sys.executable, __file__, *argv, "--save", str(save)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"child {' '.join(argv)} failed:\n{done.stderr[-4000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


# ---------------------------------------------------------------------- estimate
def estimate_gpu_gb(config: OmniGenConfig, lengths: list[int], n: int, mode: str, nbytes: int = 2) -> float:
    """Device memory of one call in ``mode`` (GB): weights + KV cache + the largest live activations.

    Exact: weights (parameters + the stored position table) and the KV cache (every condition token of
    every branch, keys and values at every layer). Bound: activations of one layer for the rows that run
    together (residual and normed stream, fused qkv, fp32 rotary temporaries, keys/values concatenated with
    the cache, gate_up output and its product), with fused attention (no L x L matrix). Not counted: the
    allocator's fragmentation, kernels' workspaces, the VAE (the SDXL VAE's 1024x1024 decode adds ~3 GB
    unless tiled)."""
    t = config.transformer
    layer_params = sum(p.numel() for p in _meta_model(config).llm.layers[0].parameters())
    params = _meta_model(config).num_parameters() + config.pos_embed_max_size**2 * t.hidden_size
    options = MODES[mode]
    weights = params * nbytes
    visiting = min(MAX_RESIDENT_LAYERS, t.num_layers)  # streamed layers on the device at once
    if options.get("offload_model"):  # a few visiting layers on the device, the rest on the host
        weights -= (t.num_layers - visiting) * layer_params * nbytes
    kv_per_token = 2 * t.num_kv_heads * t.head_dim * nbytes  # per layer
    kv = sum(lengths) * t.num_layers * kv_per_token
    if options["offload_kv_cache"]:
        kv = sum(lengths) * visiting * kv_per_token  # a few layers' caches visit the device
    rows = [lengths] if not options["separate_cfg_infer"] else [[x] for x in lengths]

    def layer_bytes(tokens: int, keys: int) -> int:
        stream = tokens * (2 * t.hidden_size * nbytes + 3 * t.hidden_size * nbytes + 2 * t.hidden_size * 4)
        mlp = tokens * 3 * t.intermediate_size * nbytes
        return stream + mlp + keys * kv_per_token

    steps = max(layer_bytes(len(group) * (n + 1), sum(group) + len(group) * (n + 1)) for group in rows)
    prefill = max(layer_bytes(max(group) * len(group), max(group) * len(group)) for group in rows)
    return (weights + kv + max(steps, prefill)) / 1e9


_META: dict = {}


def _meta_model(config: OmniGenConfig) -> OmniGenModel:
    if config not in _META:
        with torch.device("meta"):
            _META[config] = OmniGenModel(config)
    return _META[config]


# ---------------------------------------------------------------------- parent
def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def compare_task(args: argparse.Namespace, task: str, work: Path) -> list[str]:
    common = ["--dtype", args.dtype, "--size", str(args.size), "--steps", str(args.steps), "--task", task]
    common += child_flags(args)
    results = {}
    for mode in [m for m in args.modes.split(",") if m]:
        results[mode] = spawn(["--child", "ours", "--mode", mode, *common], work / f"{task}_{mode}.st")
        print(f"# {task} {mode}: {json.dumps(results[mode])}", flush=True)
    reference = spawn(["--child", "reference", "--reference", "both", *common], work / f"{task}_ref.st")
    print(f"# {task} diffusers: {json.dumps(reference)}", flush=True)
    ref = load_file(str(work / f"{task}_ref.st"))
    lines = []
    for mode, r in results.items():
        z = load_file(str(work / f"{task}_{mode}.st"))["latents"]
        step = "-" if r["step_s"] is None else f"{r['step_s']:.1f}"
        lines.append(
            f"{task:5} {'ours ' + mode:26} {r['build_s']:6.1f} {r['first_step_s']:10.1f} {step:>8} "
            f"{r['peak_rss_gb']:8.2f} {r['growth_gb']:8.2f} {r['kv_cache_mb']:8.1f} {max_diff(z, ref['rows']):10.2e}"
        )
    for name in ("batched", "rows"):
        label = "diffusers " + ("batched loop" if name == "batched" else "per row (reference)")
        growth = reference[f"{name}_growth_gb"]
        lines.append(
            f"{task:5} {label:26} {reference['build_s']:6.1f} {'-':>10} {reference[f'{name}_step_s']:8.1f} "
            f"{reference['peak_rss_gb']:8.2f} {growth:8.2f} {'-':>8} {max_diff(ref[name], ref['rows']):10.2e}"
        )
    return lines


def big_step(args: argparse.Namespace, work: Path) -> list[str]:
    common = ["--dtype", args.dtype, "--size", str(args.big_size), "--steps", "1", "--task", "t2i"]
    common += child_flags(args)
    ours = spawn(["--child", "ours", "--mode", "separate", *common], work / "big_ours.st")
    print(f"# big ours: {json.dumps(ours)}", flush=True)
    ref = spawn(["--child", "reference", "--reference", "rows", *common], work / "big_ref.st")
    print(f"# big reference: {json.dumps(ref)}", flush=True)
    diff = max_diff(
        load_file(str(work / "big_ours.st"))["latents"], load_file(str(work / "big_ref.st"))["rows"]
    )
    size = f"{args.big_size}^2"
    return [
        f"t2i {size}, 1 step: ours (separate CFG) {ours['first_step_s']:.0f} s (prefill included), "
        f"peak RSS {ours['peak_rss_gb']:.2f} GB; diffusers per row {ref['rows_step_s']:.0f} s, "
        f"peak RSS {ref['peak_rss_gb']:.2f} GB; max |latent diff| {diff:.2e}"
    ]


def estimate_table(config: OmniGenConfig, size: int) -> list[str]:
    n = config.num_image_tokens(size, size)
    lines = [
        f"{'mode':14} {'t2i GB':>7} {'edit GB':>8}   (estimated at {size}x{size}, bf16, 1024^2 input image)"
    ]
    lengths = {task: condition_lengths(config, task, size) for task in ("t2i", "edit")}
    for mode in MODES:
        t2i, edit = (estimate_gpu_gb(config, lengths[task], n, mode) for task in ("t2i", "edit"))
        lines.append(f"{mode:14} {t2i:7.1f} {edit:8.1f}")
    lines.append(
        f"{'original':14} {PUBLISHED_GB['t2i']:7.1f} {PUBLISHED_GB['edit']:8.1f}   (published, A800, its defaults)"
    )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks", default="t2i,edit")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--big-size", type=int, default=1024, help="the one-step t2i check; 0 skips it")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a quick try)")
    parser.add_argument("--quick", action="store_true", help="a narrow 1-layer model: checks the harness")
    parser.add_argument(
        "--compare",
        choices=["modes", "dtypes", "presets"],
        default="modes",
        help="modes: the memory modes vs diffusers (default); dtypes: bfloat16 vs float32 (ours, batched) "
        "and diffusers' batched loop in bfloat16, with the share of the bf16 matmul peak; presets: peak "
        "memory of each --memory preset (bfloat16 weights, one step, t2i)",
    )
    parser.add_argument("--child", choices=["ours", "reference", "preset"], help=argparse.SUPPRESS)
    parser.add_argument("--task", choices=sorted(TASKS), default="t2i", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=sorted(MODES), default="separate", help=argparse.SUPPRESS)
    parser.add_argument(
        "--reference", choices=["both", "rows", "batched"], default="both", help=argparse.SUPPRESS
    )
    parser.add_argument("--preset", default="fast", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------- dtypes and memory presets (CPU)
def describe(args: argparse.Namespace) -> str:
    config = full_config(args.layers, args.quick)
    t = config.transformer
    return (
        f"{_meta_model(config).num_parameters() / 1e9:.2f}B parameters ({t.num_layers} layers, width "
        f"{t.hidden_size}), {args.size}x{args.size}, {args.steps} steps, {args.threads} threads, "
        f"torch {torch.__version__}, CPU bf16 flags {sorted(cpu.cpu_flags() & cpu.BF16_FLAGS)}"
    )


def matmul_gflops(dtype: torch.dtype, width: int = 3072, seconds: float = 2.0) -> float:
    """Best GFLOP/s of a ``width`` square matmul in ``dtype`` over ``seconds`` (the peak the step is measured
    against; same thread count as the step)."""
    a, b = torch.randn(width, width).to(dtype), torch.randn(width, width).to(dtype)
    torch.mm(a, b)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * width**3 / (time.perf_counter() - start) / 1e9)
    return best


def step_gflop(config: OmniGenConfig, lengths: list[int], n: int, cached: bool) -> float:
    """Matmul GFLOP of one later sampling step, one row per condition of ``lengths``: the decoder's linears
    on the queries (time token + ``n`` image tokens, plus the condition when not ``cached``) and the
    attention products against every key. Embedders and the final layer are left out (< 1%)."""
    t = config.transformer
    layer = _meta_model(config).llm.layers[0]
    linear = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    flops = 0
    for c in lengths:
        queries, keys = (n + 1) if cached else (c + n + 1), c + n + 1
        flops += t.num_layers * (2 * linear * queries + 4 * queries * keys * t.hidden_size)
    return flops / 1e9


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS of ``a - b`` over RMS of ``b``."""
    return ((a - b).float().pow(2).mean() / b.float().pow(2).mean()).sqrt().item()


def compare_dtypes(args: argparse.Namespace) -> None:
    """bfloat16 vs float32 in our batched loop, and diffusers' batched loop in bfloat16, on t2i."""
    config = full_config(args.layers, args.quick)
    work = Path(tempfile.mkdtemp(prefix="bench_dtypes_"))
    common = ["--size", str(args.size), "--steps", str(args.steps), "--task", "t2i", *child_flags(args)]
    lengths, n = (
        condition_lengths(config, "t2i", args.size)[:2],
        config.num_image_tokens(args.size, args.size),
    )
    try:
        runs = {}
        for dtype in ("bfloat16", "float32"):
            runs[f"ours {dtype}"] = spawn(
                ["--child", "ours", "--mode", "batched", "--dtype", dtype, *common], work / f"{dtype}.st"
            )
        runs["diffusers bfloat16"] = spawn(
            ["--child", "reference", "--reference", "batched", "--dtype", "bfloat16", *common],
            work / "ref.st",
        )
        fp32 = load_file(str(work / "float32.st"))["latents"]
        outputs = {
            "ours bfloat16": load_file(str(work / "bfloat16.st"))["latents"],
            "ours float32": fp32,
            "diffusers bfloat16": load_file(str(work / "ref.st"))["batched"],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    width = 1024 if args.quick else 3072
    peaks = {
        dt: matmul_gflops(DTYPES[dt], width, 0.3 if args.quick else 3.0) for dt in ("bfloat16", "float32")
    }
    print(
        f"# matmul peak at width {width}: bfloat16 {peaks['bfloat16']:.0f}, float32 {peaks['float32']:.0f} GFLOP/s"
    )
    print(
        f"{'contender':20} {'step s':>8} {'GFLOP/step':>10} {'GFLOP/s':>8} {'% bf16 peak':>11} {'peak GB':>8} {'max|diff| fp32':>14} {'rel RMS':>8} {'fp32 max':>8}"
    )
    for name, r in runs.items():
        ours = name.startswith("ours")
        step = r["step_s"] if ours else r["batched_step_s"]
        work_gflop = step_gflop(config, lengths, n, cached=ours)
        rate = work_gflop / step if step else float("nan")
        print(
            f"{name:20} {step or float('nan'):8.2f} {work_gflop:10.0f} {rate:8.1f} "
            f"{100 * rate / peaks['bfloat16']:10.0f}% {r['peak_rss_gb']:8.2f} {max_diff(outputs[name], fp32):14.2e} "
            f"{rel_rms(outputs[name], fp32):8.1e} {fp32.abs().max().item():8.2f}",
            flush=True,
        )
    print(
        f"# bfloat16 speed-up over float32 (ours, later steps): {runs['ours float32']['step_s'] / runs['ours bfloat16']['step_s']:.2f}x"
    )


def child_preset(args: argparse.Namespace) -> dict:
    """One ``--memory`` preset in a fresh process: RSS above the post-import level over build + quantize +
    one t2i step (bf16 weights), and the growth during the step alone."""
    from omnigen.cli.args import MEMORY_PRESETS
    from omnigen.weights.quantize import quantize

    kind, offload_model, offload_kv_cache, separate = MEMORY_PRESETS[args.preset]
    with PeakRSS() as whole:
        model = build_random_model(full_config(args.layers, args.quick), torch.bfloat16)
        if kind != "none":
            quantize(model, kind)
        pipe = build_pipeline(model, args.size).with_defaults(
            offload_model=offload_model, offload_kv_cache=offload_kv_cache, separate_cfg_infer=separate
        )
        weights_gb = (whole.process.memory_info().rss - whole.base) / 2**30
        with torch.no_grad(), PeakRSS() as step:
            start = time.perf_counter()
            pipe(
                TASKS["t2i"][0],
                num_inference_steps=1,
                guidance_scale=GUIDANCE,
                seed=SEED,
                progress=False,
                output_type="latent",
            )
            step_s = time.perf_counter() - start
    return {
        "after_load_gb": weights_gb,
        "peak_gb": whole.delta_mb / 1024,
        "step_growth_gb": step.delta_mb / 1024,
        "step_s": step_s,
    }


def compare_presets(args: argparse.Namespace) -> None:
    from omnigen.cli.args import MEMORY_PRESETS

    work = Path(tempfile.mkdtemp(prefix="bench_presets_"))
    print(f"{'preset':10} {'after load GB':>13} {'peak GB':>8} {'step growth GB':>14} {'step s':>7}")
    try:
        for preset in MEMORY_PRESETS:
            argv = ["--child", "preset", "--preset", preset, "--size", str(args.size), *child_flags(args)]
            r = spawn(argv, work / f"{preset}.st")
            print(
                f"{preset:10} {r['after_load_gb']:13.2f} {r['peak_gb']:8.2f} {r['step_growth_gb']:14.2f} {r['step_s']:7.1f}",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("omnigen.text.tokenizer").setLevel(
        logging.ERROR
    )  # the bench vocabulary lacks most words
    if args.child:
        result = {"ours": child_ours, "reference": child_reference, "preset": child_preset}[args.child](args)
        result["peak_rss_gb"] = peak_rss_gb()
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.compare != "modes":
        print(f"# {args.compare}: {describe(args)}; load average at start {os.getloadavg()}", flush=True)
        (compare_dtypes if args.compare == "dtypes" else compare_presets)(args)
        print(f"# load average at end {os.getloadavg()}")
        return
    config = full_config(args.layers, args.quick)
    print(
        f"# OmniGen-v1 architecture, {_meta_model(config).num_parameters() / 1e9:.2f}B parameters "
        f"({config.transformer.num_layers} layers), random weights in {args.dtype}, {args.size}x{args.size}, "
        f"{args.steps} steps, {args.threads} threads, torch {torch.__version__}"
    )
    print(f"# load average at start {os.getloadavg()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench_fullsize_"))
    try:
        header = (
            f"{'task':5} {'contender':26} {'build':>6} {'first step':>10} {'step s':>8} {'peak GB':>8} "
            f"{'growth':>8} {'KV MB':>8} {'max |diff|':>10}"
        )
        print(header, flush=True)
        for task in [t for t in args.tasks.split(",") if t]:
            print("\n".join(compare_task(args, task, work)), flush=True)
        if args.big_size:
            print("\n".join(big_step(args, work)), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("# estimated GPU memory per mode")
    print("\n".join(estimate_table(full_config(), 1024)))
    print(f"# load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
