"""Side-by-side speed of our pipeline and the diffusers OmniGen transformer loop, same random weights.

    python benchmarks/bench_pipeline.py [--hidden 768 --layers 8 --heads 8 --steps 10 --size 256 --reps 3]
                                        [--vae tiny|sdxl] [--threads 2]

The reference contender is what ``diffusers.OmniGenPipeline`` runs per step: the full sequence of every
CFG row (batched, left padded) through ``OmniGenTransformer2DModel``, no cache. (diffusers' pipeline
object itself needs torchvision for its processor, which does not import beside this CPU torch wheel,
so its loop is reproduced here around its own transformer.) The original ``omnigen`` package pins
torch<2.5 and transformers' old Cache API and cannot be installed beside this environment; its default
mode (KV cache + separate CFG) is emulated by our own ``separate_cfg_infer=True`` path, which computes
the same thing.

Each contender runs once untimed (warm-up), then contenders run alternately, ``--reps`` times each; the
median seconds per image, peak RSS increase (``--memory``), ratios ours/reference, FLOPs per phase and
achieved FLOP/s against a measured matmul peak are printed.
Outputs are checked: our images equal the reference run row by row (tolerance printed).

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
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

from omnigen import masks
from omnigen.collate import collate
from omnigen.config import OmniGenConfig, RopeScaling, TransformerConfig
from omnigen.flow import time_grid
from omnigen.guidance import combine
from omnigen.keymap import ours_to_diffusers
from omnigen.model import OmniGenModel
from omnigen.pipeline import GenerationDefaults, OmniGenPipeline
from omnigen.processor import cfg_prompts
from omnigen.quantize import linear_weight_bytes, quantize_int8
from omnigen.sampling import make_noise
from omnigen.tokenizer import Tokenizer
from omnigen.vae import AutoencoderKLCodec

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


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms."""

    def __enter__(self) -> PeakRSS:
        self.process = psutil.Process()
        self.base = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        self.running = False
        self.thread.join()

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.base) / 2**20


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

    def timed(target: OmniGenPipeline, **kw) -> tuple[float, torch.Tensor, int]:  # noqa: ANN003
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
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # TASK:CONTENDER, internal
    return parser.parse_args(argv)


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
        defaults = GenerationDefaults(
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

        def ours(separate: bool):  # noqa: ANN202
            return pipe(
                prompt,
                imgs or None,
                seed=0,
                separate_cfg_infer=separate,
                progress=False,
                output_type="latent",
            )

        def theirs():  # noqa: ANN202
            return reference_sample(
                self.ref, pipe, prompt, imgs, args.size, args.steps, 3.0, 1.6, 0, per_row=False
            )[0]

        return {BATCHED: lambda: ours(False), SEPARATE: lambda: ours(True), DIFFUSERS: theirs}


BATCHED, SEPARATE = "ours (cache, batched CFG)", "ours (cache, separate CFG)"
DIFFUSERS = "diffusers loop (batched)"
CONTENDERS = (BATCHED, SEPARATE, DIFFUSERS)


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


def memory_table(argv: list[str], args: argparse.Namespace) -> None:
    """``--memory-only``: the fresh-process peaks of every contender, no timing."""
    print(f"{'task':8} {'contender':28} {'sampling MB':>11} {'with decode':>11} {'ratio':>6}")
    for task in [t for t in args.tasks.split(",") if t]:
        peaks = {name: fresh_peak_mb(argv, task, name) for name in CONTENDERS}
        for name, (sampling, total) in peaks.items():
            ratio = sampling / max(peaks[DIFFUSERS][0], 1e-9)
            verdict = "" if name == DIFFUSERS else f" [{'PASS' if ratio <= 0.8 else 'FAIL'} <= 0.8]"
            print(f"{task:8} {name:28} {sampling:11.0f} {total:11.0f} {ratio:6.2f}{verdict}")


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.measure:  # a child process of fresh_peak_mb (checked first: it inherits the parent's flags)
        task, name = args.measure.split(":", 1)
        measure_fresh(Bench(args), task, name)
        return
    if args.memory_only:  # every measurement runs in a child process with its own set-up
        print(
            f"# peak resident memory growth of one call, each contender in a fresh process ({args.vae} VAE)"
        )
        memory_table(argv, args)
        return
    bench = Bench(args)
    config, model, ref, pipe = bench.config, bench.model, bench.ref, bench.pipe
    peak = matmul_peak()
    params = model.num_parameters()
    print(
        f"# omnigen benchmark: hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
        f"(head dim {config.transformer.head_dim}), {params / 1e6:.1f}M params, {args.vae} VAE, "
        f"{args.size}x{args.size}, {args.steps} steps, {args.threads} threads, torch {torch.__version__}"
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
    header = f"{'task':8} {'contender':28} {'s/image':>8} {'transf s':>9} {'peak MB':>8} {'GFLOP':>8} {'GFLOP/s':>8}"
    if args.tasks:
        print(header)
    baseline_e2e: dict[str, float] = {}
    for task in [t for t in args.tasks.split(",") if t]:
        prompt, k = TASKS[task]
        imgs = bench.images[:k]
        results: dict[str, list] = {}
        contenders = bench.contenders(task)
        latents_of: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for run in contenders.values():  # warm-up: first-call allocations and kernel set-up untimed
                pipe.codec.decode(run())
            for _ in range(args.reps):
                for name, run in contenders.items():
                    with PeakRSS() as rss:
                        start = time.perf_counter()
                        out = run()
                        transformer_s = time.perf_counter() - start
                        pipe.codec.decode(out)
                        total = time.perf_counter() - start
                    results.setdefault(name, []).append((total, transformer_s, rss.delta_mb))
                    latents_of[name] = out
            exact, rows, n = reference_sample(
                ref, pipe, prompt, imgs, args.size, args.steps, 3.0, 1.6, 0, per_row=True
            )
        memory = {  # the sampling phase's peak (fresh) or the whole call's (inline)
            name: (fresh_peak_mb(argv, task, name)[0] if args.memory == "fresh" else max(r[2] for r in runs))
            for name, runs in results.items()
        }
        f = flops(config, rows, n, args.steps)
        for name, runs in results.items():
            total = statistics.median(r[0] for r in runs)
            transformer = statistics.median(r[1] for r in runs)
            work = f["uncached_total"] if name == DIFFUSERS else f["cached_total"]
            print(
                f"{task:8} {name:28} {total:8.2f} {transformer:9.2f} {memory[name]:8.0f} {work / 1e9:8.1f} "
                f"{work / transformer / 1e9:8.1f}"
            )
        base = statistics.median(r[1] for r in results[DIFFUSERS])
        base_total = baseline_e2e[task] = statistics.median(r[0] for r in results[DIFFUSERS])
        for name in (BATCHED, SEPARATE):
            runs = results[name]
            t_ratio = statistics.median(r[1] for r in runs) / base
            e_ratio = statistics.median(r[0] for r in runs) / base_total
            m_ratio = memory[name] / max(memory[DIFFUSERS], 1e-9)
            print(
                f"{task:8} ratio {name}/diffusers: transformer {t_ratio:.2f} "
                f"[{'PASS' if t_ratio <= 0.35 else 'FAIL'} <= 0.35], end-to-end {e_ratio:.2f} "
                f"[{'PASS' if e_ratio <= 0.6 else 'FAIL'} <= 0.6], peak memory {m_ratio:.2f} "
                f"[{'PASS' if m_ratio <= 0.8 else 'FAIL'} <= 0.8]"
            )
        diff = max((latents_of[k] - exact).abs().max().item() for k in latents_of if k.startswith("ours"))
        bug = (latents_of[DIFFUSERS] - exact).abs().max().item()
        print(
            f"{task:8} outputs: ours vs the reference run row by row, max |latent diff| = {diff:.2e} "
            f"[{'PASS' if diff <= 1e-3 else 'FAIL'} <= 1e-3]; diffusers batched vs row by row {bug:.2e} "
            f"(its row-0 rotary bug); FLOPs/image prefill {f['prefill'] / 1e9:.2f} G, "
            f"step {f['step'] / 1e9:.2f} G, VAE not counted"
        )
        print(
            f"{task:8} exact-output floor: cached/uncached transformer FLOPs = "
            f"{f['cached_total'] / f['uncached_total']:.2f} (a ratio below this needs skipped work: "
            "step caching)"
        )
    if args.options:
        prompt, k = TASKS[args.options_task]
        with torch.no_grad():
            options_report(pipe, prompt, bench.images[:k], args, baseline_e2e.get(args.options_task))
    print(f"# load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
