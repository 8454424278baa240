"""Side-by-side speed of our pipeline, the diffusers OmniGen transformer loop and the original package.

    python benchmarks/bench_pipeline.py [--hidden 768 --layers 8 --heads 8 --steps 10 --size 256 --reps 3]
                                        [--vae tiny|sdxl] [--threads 2] [--original-python PATH]
                                        [--ours-extra LABEL=JSON ...]

The reference contender is what ``diffusers.OmniGenPipeline`` runs per step: the full sequence of every
CFG row (batched, left padded) through ``OmniGenTransformer2DModel``, no cache. (diffusers' pipeline
object itself needs torchvision for its processor, which does not import beside this CPU torch wheel,
so its loop is reproduced here around its own transformer.)

``--original-python PATH`` adds the original ``omnigen`` 1.0.3 package itself: it pins torch<2.5 and
transformers 4.45, so it runs in its own virtual environment (``benchmarks/setup_original.sh`` creates
one) under ``original_runner.py``, which loads the same random weights, VAE and tokenizer from an
OmniGen-v1 folder written here. Its default mode (KV cache + separate CFG) and its batched mode
(``separate_cfg_infer=False``) join the alternation as two more contenders; its noise is the same (a
seeded CPU generator). Without the flag these columns are skipped with a message.

``--ours-extra LABEL=JSON`` (repeatable) adds our pipeline called with extra options as another
contender, e.g. ``'fast={"num_inference_steps": 4}'``; its output is compared with the exact one
(max latent difference, PSNR of the decoded image), not checked.

Each contender runs once untimed (warm-up), then contenders run alternately, ``--reps`` times each; the
median seconds per image, peak RSS increase (``--memory``), ratios ours/reference, FLOPs per phase and
achieved FLOP/s against a measured matmul peak are printed.
Outputs are checked: our images equal the reference run row by row (tolerance printed); so does the
original's uncached call, and its cached modes' deviation is shown to be its step-0 cache (see
``original_runner.py``).

``--options step_cache,mask_free,int8,compile,channels_last`` then measures our speed/memory options on
one task (``--options-task``), end to end with VAE decode, against our default call: per setting the median
seconds per image, the speed-up, the PSNR of the decoded image against the exact output, the sampling
steps that ran all layers, and the decoder's linear-weight memory. ``--tasks ""`` skips the reference
comparison. Step-cache thresholds come from ``--thresholds`` (default 0.05,0.1,0.2). Speed-up is the
default call's seconds over the setting's; the default already runs mask-free step attention, so the
"mask_free off" row shows what that option saves as a speed-up below 1.

    python benchmarks/bench_pipeline.py --tasks "" --options step_cache,mask_free,int8,compile --steps 50
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from original_client import ORIGINAL_MODES, ORIGINAL_SEPARATE, OriginalSession
from peak_rss import PeakRSS

from omnigen.config import OmniGenConfig, RopeScaling, TransformerConfig
from omnigen.generation import GenerationConfig
from omnigen.model import OmniGenModel, masks
from omnigen.model.vae import AutoencoderKLCodec
from omnigen.pipeline import OmniGenPipeline
from omnigen.sampling.euler import make_noise
from omnigen.sampling.flow import time_grid
from omnigen.sampling.guidance import combine
from omnigen.text.collate import collate
from omnigen.text.processor import cfg_prompts
from omnigen.text.tokenizer import Tokenizer
from omnigen.weights.keymap import ours_to_diffusers
from omnigen.weights.quantize import linear_weight_bytes, quantize_int8

WORDS = "a an the red blue green cat dog man woman photo of in on with make it wearing sitting desk".split()
TASKS = {
    "t2i": ("a photo of a red cat sitting on a desk", 0),
    "edit": ("<img><|image_1|></img> make it blue", 1),
    "subject": ("a man in <img><|image_1|></img> with a dog in <img><|image_2|></img>", 2),
}


def build_tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, processors

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|end|>", "<|assistant|>", "<|diffusion|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(WORDS + list("<>/|_,.") + ["img"])))}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    backend.add_special_tokens(specials)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return Tokenizer(backend)


def build_vae(kind: str):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    if kind == "sdxl":  # SDXL VAE architecture (83.7M parameters), random weights
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=2,
            sample_size=1024,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[128, 256, 512, 512],
            scaling_factor=0.13025,
        )
    else:  # a small VAE with the same 8x downsampling
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[16, 16, 32, 32],
        )
    return vae.eval()


def reference_sample(
    ref, pipe: OmniGenPipeline, prompt, images, size, steps, scale, img_scale, seed, per_row
):
    """diffusers' loop: every step runs the whole batched, left-padded sequence (or one row at a time).

    The latents stay fp32 between steps and are cast to the transformer's dtype at its input (as ours)."""
    config = pipe.model.config
    pixels = [pipe.processor.prepare_image(img) for img in images]
    cond = pipe.processor(prompt, pixels)
    branches = cfg_prompts(prompt, pixels, pipe.defaults.negative_prompt, bool(images))
    rows = [cond, pipe.processor(*branches.uncond)] + ([pipe.processor(*branches.img_cond)] if images else [])
    latents = [[pipe.codec.encode(p[None])[0] for p in row.pixel_values] for row in rows]
    n = config.num_image_tokens(size, size)
    groups = [[k] for k in range(len(rows))] if per_row else [list(range(len(rows)))]
    batches = []
    for group in groups:
        batch = collate(
            [rows[k] for k in group], [latents[k] for k in group], config.transformer.pad_token_id
        )
        spans = {r: [list(s) for s in row] for r, row in enumerate(batch.image_spans) if row}
        batches.append(
            (
                batch,
                spans,
                masks.full_mask(batch.token_mask, batch.image_spans, n).long(),
                masks.full_positions(batch.token_mask, n),
            )
        )
    z = make_noise((4, size // 8, size // 8), [seed])
    grid = time_grid(steps)
    for i in range(steps):
        outs = []
        for batch, spans, mask, positions in batches:
            b = batch.batch_size
            outs.extend(
                ref(
                    hidden_states=z.repeat(b, 1, 1, 1).to(ref.dtype),
                    timestep=grid[i].repeat(b),
                    input_ids=batch.input_ids,
                    input_img_latents=[lat[None].to(ref.dtype) for row in batch.image_latents for lat in row],
                    input_image_sizes=spans,
                    attention_mask=mask,
                    position_ids=positions,
                    return_dict=False,
                )[0]
                .float()
                .chunk(b)
            )
        z = z + (grid[i + 1] - grid[i]) * combine(outs, scale, img_scale)
    return z, rows, n


def flops(config: OmniGenConfig, rows, n: int, steps: int) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of the transformer per image, by phase."""
    t = config.transformer
    per_token = 2 * (
        t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim
        + t.num_heads * t.head_dim * t.hidden_size
        + 3 * t.hidden_size * t.intermediate_size
    )
    attn = lambda q, k: 4 * q * k * t.num_heads * t.head_dim  # noqa: E731  QK^T and AV
    cond = [len(r.input_ids) for r in rows]
    prefill = sum(t.num_layers * (per_token * lc + attn(lc, lc)) for lc in cond)
    step = sum(t.num_layers * (per_token * (n + 1) + attn(n + 1, lc + n + 1)) for lc in cond)
    full = sum(t.num_layers * (per_token * (lc + n + 1) + attn(lc + n + 1, lc + n + 1)) for lc in cond)
    return {
        "prefill": prefill,
        "step": step,
        "cached_total": prefill + steps * step,
        "uncached_total": steps * full,
    }


def matmul_peak() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    return 2 * 1024**3 * reps / (time.perf_counter() - start)


def psnr(image: torch.Tensor, exact: torch.Tensor) -> float:
    """PSNR in dB of pixels in [-1, 1] (peak-to-peak 2) against the exact output."""
    mse = (image.float() - exact.float()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def options_report(
    pipe: OmniGenPipeline,
    prompt: str,
    images: list,
    args: argparse.Namespace,
    diffusers_s: float | None = None,
) -> None:
    """Each option against the default call, same seed, timed end to end (decode included).

    With ``diffusers_s`` (the reference loop's end-to-end seconds for this task, same run) each step-cache
    threshold also gets the target line: <= 0.25x diffusers at >= 30 dB against the exact output."""
    sections = [s for s in args.options.split(",") if s]
    allowed = {"step_cache", "mask_free", "int8", "compile", "channels_last"}
    unknown = sorted(set(sections) - allowed)
    if unknown:
        raise SystemExit(f"unknown --options {unknown}; allowed: {sorted(allowed)}")
    calls: list[int] = []

    def timed(target: OmniGenPipeline, **kw) -> tuple[float, torch.Tensor, int]:
        times, out = [], None
        hook = target.model.llm.layers[-1].register_forward_hook(lambda *a: calls.append(1))
        try:
            for _ in range(args.reps):
                calls.clear()
                start = time.perf_counter()
                out = target(prompt, images or None, seed=0, progress=False, output_type="pt", **kw)
                times.append(time.perf_counter() - start)
        finally:
            hook.remove()
        return statistics.median(times), out, len(calls)

    pipe(prompt, images or None, seed=0, progress=False, output_type="pt")  # warm-up
    base_s, exact, base_calls = timed(pipe)
    per_pass = base_calls // (args.steps + 1)  # model calls per step (= per prefill)
    memory = linear_weight_bytes(pipe.model.llm.layers) / 2**20
    print(f"# options on {prompt!r} ({len(images)} input images), {args.reps} reps, end to end with decode")
    print(
        f"{'option':11} {'setting':22} {'s/image':>8} {'speed-up':>8} {'PSNR dB':>8} {'steps run':>9} {'linear MB':>9}"
    )

    def line(option: str, setting: str, seconds: float, out: torch.Tensor, n_calls: int, mb: float) -> None:
        steps_run = n_calls // max(per_pass, 1) - 1
        print(
            f"{option:11} {setting:22} {seconds:8.3f} {base_s / seconds:8.2f} {psnr(out, exact):8.1f} "
            f"{steps_run:5d}/{args.steps:<3d} {mb:9.1f}"
        )

    line("default", "exact", base_s, exact, base_calls, memory)
    if "step_cache" in sections:
        targets = []
        for threshold in [float(x) for x in args.thresholds.split(",")]:
            seconds, out, n_calls = timed(pipe, step_cache_threshold=threshold)
            line("step_cache", f"threshold {threshold:g}", seconds, out, n_calls, memory)
            targets.append((threshold, seconds, psnr(out, exact)))
        for threshold, seconds, db in targets if diffusers_s else []:
            ratio = seconds / diffusers_s
            ok = ratio <= 0.25 and db >= 30
            print(
                f"# step_cache {threshold:g}: end-to-end {ratio:.2f}x diffusers at {db:.1f} dB "
                f"[{'PASS' if ok else 'FAIL'} <= 0.25x at >= 30 dB]"
            )
    if "mask_free" in sections:
        line("mask_free", "off (masked SDPA)", *timed(pipe, mask_free_attention=False), memory)
    if "channels_last" in sections:
        pipe.codec.channels_last()
        try:
            line("channels_last", "VAE in NHWC", *timed(pipe), memory)
        finally:
            pipe.codec.channels_last(False)
    if "int8" in sections:
        quantized = pipe.with_defaults()
        quantized.model = copy.deepcopy(pipe.model)
        backend = quantize_int8(quantized.model)
        mb = linear_weight_bytes(quantized.model.llm.layers) / 2**20
        line("int8", f"weight-only ({backend})", *timed(quantized), mb)
    if "compile" in sections:
        compiled = pipe.with_defaults()
        compiled.model = copy.deepcopy(pipe.model)
        compiled.compile()
        start = time.perf_counter()
        compiled(prompt, images or None, seed=0, progress=False, output_type="latent")
        print(f"# compile: first call (compiling) {time.perf_counter() - start:.1f} s")
        line("compile", "decoder blocks", *timed(compiled), memory)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--vae", choices=["tiny", "sdxl"], default="tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks", default="t2i,edit,subject", help='reference comparison; "" skips it')
    parser.add_argument(
        "--options", default="", help="step_cache,mask_free,int8,compile,channels_last (default none)"
    )
    parser.add_argument("--options-task", choices=sorted(TASKS), default="t2i")
    parser.add_argument("--thresholds", default="0.05,0.1,0.2", help="step-cache thresholds")
    parser.add_argument(
        "--memory",
        choices=["fresh", "inline"],
        default="fresh",
        help="peak RSS of each contender in its own fresh process (default; the allocator of a shared "
        "process keeps freed pages, hiding later contenders' growth) or inline during the timed runs",
    )
    parser.add_argument(
        "--memory-only", action="store_true", help="only the fresh-process peak-memory table of --tasks"
    )
    parser.add_argument(
        "--original-python",
        default=None,
        metavar="PATH",
        help="python of a venv holding the original omnigen 1.0.3 (benchmarks/setup_original.sh): adds its "
        "default mode (cache, separate CFG) and its batched mode as contenders; skipped when not given",
    )
    parser.add_argument(
        "--ours-extra",
        action="append",
        default=[],
        metavar="LABEL=JSON",
        help="one more contender: our pipeline called with these extra options (a JSON object), e.g. "
        """'steps4={"num_inference_steps": 4}'; repeatable; compared with the exact output, not checked""",
    )
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # TASK:CONTENDER, internal
    return parser.parse_args(argv)


def extra_options(specs: list[str]) -> dict[str, dict]:
    """``--ours-extra LABEL=JSON`` values -> {"ours (LABEL)": options}."""
    extras = {}
    for spec in specs:
        label, _, text = spec.partition("=")
        try:
            options = json.loads(text)
        except json.JSONDecodeError as err:
            raise SystemExit(f"--ours-extra {spec!r}: the part after '=' is not JSON ({err})") from err
        if not label or not isinstance(options, dict):
            raise SystemExit(f"--ours-extra {spec!r}: expected LABEL={{JSON object of call options}}")
        extras[f"ours ({label})"] = options
    return extras


class Bench:
    """The shared set-up: one random model, loaded into ours and into diffusers' transformer."""

    def __init__(self, args: argparse.Namespace) -> None:
        from diffusers import OmniGenTransformer2DModel

        self.args = args
        head_dim = args.hidden // args.heads
        fixture = Path(__file__).parents[1] / "tests" / "fixtures" / "omnigen_v1_config.json"
        official = OmniGenConfig.load(fixture)
        rope = official.transformer.rope_scaling  # OmniGen-v1's su factors when the head dim is the real 96
        if head_dim != official.transformer.head_dim:
            rope = RopeScaling((1.0,) * (head_dim // 2), (1.0,) * (head_dim // 2))
        transformer = TransformerConfig(
            hidden_size=args.hidden,
            intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
            num_layers=args.layers,
            num_heads=args.heads,
            num_kv_heads=args.heads,
            vocab_size=64,
            pad_token_id=3,
            rope_scaling=rope,
        )
        self.config = config = OmniGenConfig(transformer)
        torch.manual_seed(0)
        model = OmniGenModel(config)
        model.initialize_weights()
        with torch.no_grad():
            for p in model.final_layer.parameters():
                p.normal_(0, 0.02)
        self.model = model.eval()
        self.ref = OmniGenTransformer2DModel(**config.to_diffusers_dict())
        self.ref.load_state_dict(ours_to_diffusers(model.state_dict(), config))
        self.ref.eval()
        defaults = GenerationConfig(
            height=args.size, width=args.size, num_inference_steps=args.steps, max_input_image_size=args.size
        )
        self.pipe = OmniGenPipeline(
            model, AutoencoderKLCodec(build_vae(args.vae)), build_tokenizer(), defaults
        )
        gen = torch.Generator().manual_seed(0)
        self.images = [
            (torch.rand(args.size, args.size, 3, generator=gen) * 255).byte().numpy() for _ in range(2)
        ]

    def contenders(self, task: str) -> dict:
        """name -> a call returning the final latents (decode is timed separately)."""
        prompt, k = TASKS[task]
        imgs, args, pipe = self.images[:k], self.args, self.pipe

        def ours(separate: bool):
            return pipe(
                prompt,
                imgs or None,
                seed=0,
                separate_cfg_infer=separate,
                progress=False,
                output_type="latent",
            )

        def theirs():
            return reference_sample(
                self.ref, pipe, prompt, imgs, args.size, args.steps, 3.0, 1.6, 0, per_row=False
            )[0]

        def extra(options: dict) -> torch.Tensor:
            call = {"seed": 0, "progress": False, **options, "output_type": "latent"}
            return pipe(prompt, imgs or None, **call)

        runs = {BATCHED: lambda: ours(False), SEPARATE: lambda: ours(True), DIFFUSERS: theirs}
        for name, options in extra_options(args.ours_extra).items():
            runs[name] = partial(extra, options)
        return runs


BATCHED, SEPARATE = "ours (cache, batched CFG)", "ours (cache, separate CFG)"
DIFFUSERS = "diffusers loop (batched)"
CONTENDERS = (BATCHED, SEPARATE, DIFFUSERS)


@dataclass(frozen=True)
class Timing:
    total: float  # seconds per image, end to end (VAE decode included)
    transformer: float  # seconds up to the final latents (processor, input-image encode, sampling)
    peak_mb: float  # resident memory growth during the call, measured inline
    latents: torch.Tensor


def timed_local(run: Callable[[], torch.Tensor], codec: AutoencoderKLCodec) -> Timing:
    """A contender of this process: its latents call, then the VAE decode."""
    with PeakRSS() as rss:
        start = time.perf_counter()
        out = run()
        transformer = time.perf_counter() - start
        codec.decode(out)
        total = time.perf_counter() - start
    return Timing(total, transformer, rss.delta_mb, out)


def measure_fresh(bench: Bench, task: str, name: str) -> None:
    """Internal (``--measure TASK:CONTENDER``): one end-to-end call in this fresh process, peak RSS printed."""
    run = bench.contenders(task)[name]
    with torch.no_grad():
        with PeakRSS() as sampling:
            latents = run()
        with PeakRSS() as decode:
            bench.pipe.codec.decode(latents)
    print(f"PEAK_MB {sampling.delta_mb:.3f} {sampling.delta_mb + decode.delta_mb:.3f}")


def fresh_peak_mb(argv: list[str], task: str, name: str) -> tuple[float, float]:
    """Peak RSS increase of one call of a contender in a new interpreter with the same set-up: during
    sampling (the transformer: what differs between contenders), and by the end of the VAE decode (the
    same decoder for all; it dominates with the SDXL VAE)."""
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--measure", f"{task}:{name}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    line = next(line for line in out.splitlines() if line.startswith("PEAK_MB"))
    sampling, total = (float(x) for x in line.split()[1:])
    return sampling, total


def fresh_peak(
    argv: list[str], args: argparse.Namespace, task: str, name: str, session: OriginalSession | None
) -> tuple[float, float]:
    """``fresh_peak_mb`` for our and diffusers' contenders, a runner started for it for the original's."""
    if name in ORIGINAL_MODES:
        return session.fresh_peak(name, *TASKS[task])
    return fresh_peak_mb(argv, task, name)


def all_names(args: argparse.Namespace, session: OriginalSession | None) -> list[str]:
    originals = list(ORIGINAL_MODES) if session else []
    return [*CONTENDERS, *extra_options(args.ours_extra), *originals]


def memory_table(argv: list[str], args: argparse.Namespace, session: OriginalSession | None) -> None:
    """``--memory-only``: the fresh-process peaks of every contender, no timing."""
    print(f"{'task':8} {'contender':30} {'sampling MB':>11} {'with decode':>11} {'ratio':>6}")
    for task in [t for t in args.tasks.split(",") if t]:
        peaks = {name: fresh_peak(argv, args, task, name, session) for name in all_names(args, session)}
        for name, (sampling, total) in peaks.items():
            ratio = sampling / max(peaks[DIFFUSERS][0], 1e-9)
            verdict = "" if name == DIFFUSERS else f" [{'PASS' if ratio <= 0.8 else 'FAIL'} <= 0.8]"
            print(f"{task:8} {name:30} {sampling:11.0f} {total:11.0f} {ratio:6.2f}{verdict}")


def original_session(args: argparse.Namespace, bench: Bench | None) -> OriginalSession | nullcontext:
    """The original's runner when ``--original-python`` is given (and there are tasks), else a no-op."""
    if not args.original_python or not args.tasks:
        why = (
            "no --tasks"
            if args.original_python
            else "pass --original-python PATH, the python of the venv benchmarks/setup_original.sh creates"
        )
        print(f"# original omnigen 1.0.3: skipped ({why})")
        return nullcontext()
    session = OriginalSession(
        args.original_python, bench.pipe, bench.images, args.threads, args.size, args.steps
    )
    print(session.describe())
    return session


def time_task(
    bench: Bench, task: str, session: OriginalSession | None
) -> tuple[dict[str, list[Timing]], torch.Tensor, list, int]:
    """Warm-up, then ``--reps`` alternating rounds over every contender; the exact (row by row) result."""
    args, pipe = bench.args, bench.pipe
    prompt, k = TASKS[task]
    runs = {name: partial(timed_local, run, pipe.codec) for name, run in bench.contenders(task).items()}
    if session:  # the original times itself in its runner process (decode included)
        runs.update(session.contenders(prompt, k))
    results: dict[str, list[Timing]] = {}
    with torch.no_grad():
        for run in runs.values():  # warm-up: first-call allocations and kernel set-up untimed
            run()
        for _ in range(args.reps):
            for name, run in runs.items():
                results.setdefault(name, []).append(run())
        exact, rows, n = reference_sample(
            bench.ref, pipe, prompt, bench.images[:k], args.size, args.steps, 3.0, 1.6, 0, per_row=True
        )
    return results, exact, rows, n


def print_ratios(task: str, medians: dict, memory: dict, session: OriginalSession | None) -> None:
    """Ours against diffusers (with the issue's targets), then every contender against the original."""
    base_total, base_transformer = medians[DIFFUSERS]
    for name in (BATCHED, SEPARATE):
        t_ratio, e_ratio = medians[name][1] / base_transformer, medians[name][0] / base_total
        m_ratio = memory[name] / max(memory[DIFFUSERS], 1e-9)
        print(
            f"{task:8} ratio {name}/diffusers: transformer {t_ratio:.2f} "
            f"[{'PASS' if t_ratio <= 0.35 else 'FAIL'} <= 0.35], end-to-end {e_ratio:.2f} "
            f"[{'PASS' if e_ratio <= 0.6 else 'FAIL'} <= 0.6], peak memory {m_ratio:.2f} "
            f"[{'PASS' if m_ratio <= 0.8 else 'FAIL'} <= 0.8]"
        )
    if session:
        orig_total, orig_transformer = medians[ORIGINAL_SEPARATE]
        for name, (total, transformer) in medians.items():
            if name != ORIGINAL_SEPARATE:
                print(
                    f"{task:8} ratio {name}/original default: transformer {transformer / orig_transformer:.2f}, "
                    f"end-to-end {total / orig_total:.2f}, peak memory "
                    f"{memory[name] / max(memory[ORIGINAL_SEPARATE], 1e-9):.2f}"
                )


def check_outputs(
    bench: Bench, task: str, results: dict, exact: torch.Tensor, session: OriginalSession | None
) -> None:
    """Exact contenders against the reference run row by row; the others' distance from it."""
    latents_of = {name: runs[-1].latents for name, runs in results.items()}
    err = {name: (latents - exact).abs().max().item() for name, latents in latents_of.items()}
    diff = max(err[BATCHED], err[SEPARATE])
    print(
        f"{task:8} outputs: ours vs the reference run row by row, max |latent diff| = {diff:.2e} "
        f"[{'PASS' if diff <= 1e-3 else 'FAIL'} <= 1e-3]; diffusers batched vs row by row {err[DIFFUSERS]:.2e} "
        "(its row-0 rotary bug)"
    )
    extras = extra_options(bench.args.ours_extra)
    if extras:
        with torch.no_grad():
            exact_pixels = bench.pipe.codec.decode(exact)
            for name in extras:
                db = psnr(bench.pipe.codec.decode(latents_of[name]), exact_pixels)
                print(
                    f"{task:8} outputs: {name} vs the exact output: max |latent diff| {err[name]:.2e}, "
                    f"decoded PSNR {db:.1f} dB"
                )
    if session:
        timed = {name: latents_of[name] for name in ORIGINAL_MODES}
        with torch.no_grad():
            print(f"{task:8} " + session.check(*TASKS[task], exact, timed))


def compare_task(bench: Bench, task: str, argv: list[str], session: OriginalSession | None) -> float:
    """One task: the timed rows, memory, ratios and output checks; returns diffusers' end-to-end s."""
    args = bench.args
    results, exact, rows, n = time_task(bench, task, session)
    memory = {  # the sampling phase's peak (fresh) or the whole call's (inline)
        name: (
            fresh_peak(argv, args, task, name, session)[0]
            if args.memory == "fresh"
            else max(r.peak_mb for r in runs)
        )
        for name, runs in results.items()
    }
    f = flops(bench.config, rows, n, args.steps)
    medians = {
        name: (statistics.median(r.total for r in runs), statistics.median(r.transformer for r in runs))
        for name, runs in results.items()
    }
    extras = extra_options(args.ours_extra)
    for name, (total, transformer) in medians.items():
        work = f["uncached_total"] if name == DIFFUSERS else f["cached_total"]
        flop = "-" if name in extras else f"{work / 1e9:.1f}"  # an extra's work depends on its options
        rate = "-" if name in extras else f"{work / transformer / 1e9:.1f}"
        print(f"{task:8} {name:30} {total:8.2f} {transformer:9.2f} {memory[name]:8.0f} {flop:>8} {rate:>8}")
    print_ratios(task, medians, memory, session)
    check_outputs(bench, task, results, exact, session)
    print(
        f"{task:8} FLOPs/image prefill {f['prefill'] / 1e9:.2f} G, step {f['step'] / 1e9:.2f} G, VAE not "
        f"counted; exact-output floor: cached/uncached transformer FLOPs = "
        f"{f['cached_total'] / f['uncached_total']:.2f} (a ratio below this needs skipped work: step caching)"
    )
    return medians[DIFFUSERS][0]


def print_header(bench: Bench) -> None:
    args, config = bench.args, bench.config
    peak = matmul_peak()
    print(
        f"# omnigen benchmark: hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
        f"(head dim {config.transformer.head_dim}), {bench.model.num_parameters() / 1e6:.1f}M params, "
        f"{args.vae} VAE, {args.size}x{args.size}, {args.steps} steps, {args.threads} threads, "
        f"torch {torch.__version__}"
    )
    print(f"# load average at start {os.getloadavg()}, measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(
        "# peak MB: resident memory growth, "
        + (
            "during sampling (transformer), each contender in its own fresh process"
            if args.memory == "fresh"
            else "inline (max over reps; a shared allocator hides later contenders' growth)"
        )
    )


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    extra_options(args.ours_extra)  # a malformed --ours-extra fails here, before any set-up
    if args.original_python and not Path(args.original_python).is_file():
        raise SystemExit(
            f"--original-python {args.original_python} does not exist; benchmarks/setup_original.sh creates it"
        )
    if args.measure:  # a child process of fresh_peak_mb (checked first: it inherits the parent's flags)
        task, name = args.measure.split(":", 1)
        measure_fresh(Bench(args), task, name)
        return
    if args.memory_only:  # every measurement runs in a child process with its own set-up
        print(
            f"# peak resident memory growth of one call, each contender in a fresh process ({args.vae} VAE)"
        )
        with original_session(args, Bench(args) if args.original_python else None) as session:
            memory_table(argv, args, session)
        return
    bench = Bench(args)
    print_header(bench)
    baseline_e2e: dict[str, float] = {}
    with original_session(args, bench) as session:
        if args.tasks:
            print(
                f"{'task':8} {'contender':30} {'s/image':>8} {'transf s':>9} {'peak MB':>8} {'GFLOP':>8} "
                f"{'GFLOP/s':>8}"
            )
        for task in [t for t in args.tasks.split(",") if t]:
            baseline_e2e[task] = compare_task(bench, task, argv, session)
    if args.options:
        prompt, k = TASKS[args.options_task]
        with torch.no_grad():
            options_report(bench.pipe, prompt, bench.images[:k], args, baseline_e2e.get(args.options_task))
    print(f"# load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
