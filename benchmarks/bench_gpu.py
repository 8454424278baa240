"""OmniGen-v1 at full size on one GPU: our memory/speed modes against diffusers' pipeline, same weights.

    python benchmarks/bench_gpu.py                      # cuda, bf16, 1024x1024, 50 steps (<= ~8 minutes)
    python benchmarks/bench_gpu.py --tiny --device cpu  # the same code on a tiny model (a test runs it)

Random full-size weights are built in place in bf16 on the device (``bench_fullsize.build_random_model``),
with a random SDXL-architecture VAE. Tasks: text to image and a 1-image edit at ``--size``. Contenders
(``--contenders``, in this order): ours with batched CFG, ours with separate CFG, ``pipe.compile()``
(batched), int8 and fp8 weight-only decoder linears through torchao (batched), ``offload_model`` (separate
CFG, KV offload; ``--offload-steps`` steps timed and scaled) and diffusers' ``OmniGenPipeline`` on the
same transformer weights, VAE and token ids, from our initial noise.

Each contender warms up with a 2-step call and then runs ``--reps`` times. Per task and contender:
seconds per image (sampling to latents plus one VAE decode, timed once per task), the sampling seconds
alone, peak device memory during sampling (``max_memory_allocated`` less the original weights kept
beside a compiled or quantized copy; RSS growth on a CPU), the achieved share of the card's bf16 matmul
peak (measured with a large matmul; the transformer's FLOPs as in ``bench_pipeline.flops``; input-image
encoding counts as time) and the largest |latent difference| to the first contender (our batched run).

Expected differences to diffusers' pipeline (not errors of either): its batched rows take the rotary
cos/sin of row 0 (a bug we do not copy), it encodes input images to a posterior sample (we use the mean),
and bf16 reorderings. Guards: a contender whose dependency is missing (torchao, a working
``torch.compile`` backend, diffusers' pipeline, which needs torchvision) prints why it was skipped, and
with ``--budget-s`` the remaining contenders are skipped once the run has used that many seconds; a
contender that fails prints its error and the run goes on.
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_fullsize import build_random_model, full_config, input_images
from bench_pipeline import TASKS, build_tokenizer, build_vae, flops
from peak_rss import PeakRSS

from omnigen.config import OmniGenConfig, RopeScaling, TransformerConfig
from omnigen.generation import GenerationConfig
from omnigen.model.vae import AutoencoderKLCodec
from omnigen.pipeline import OmniGenPipeline
from omnigen.sampling.euler import make_noise
from omnigen.text.processor import cfg_prompts
from omnigen.weights.quantize import quantize_int8

CONTENDERS = ("batched", "separate", "compile", "int8", "fp8", "offload_model", "diffusers")
GUIDANCE, IMG_GUIDANCE, SEED = 3.0, 1.6, 0


class Skip(Exception):
    """A contender that cannot run here (the message says why)."""


def tiny_config() -> OmniGenConfig:
    head_dim = 16
    rope = RopeScaling((1.0,) * (head_dim // 2), (1.5,) * (head_dim // 2))
    transformer = TransformerConfig(
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        vocab_size=64,
        pad_token_id=3,
        original_max_position_embeddings=64,
        max_position_embeddings=4096,
        rope_scaling=rope,
    )
    return OmniGenConfig(transformer, pos_embed_max_size=16)


class Device:
    """Peak memory, synchronisation and the matmul peak of the device (CUDA or CPU)."""

    def __init__(self, name: str) -> None:
        self.device = torch.device(name)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def measure(self):  # a context manager with .gb
        return _CudaPeak(self.device) if self.cuda else _HostPeak()

    def matmul_peak(self, dtype: torch.dtype) -> float:
        n = 8192 if self.cuda else 512
        a = torch.randn(n, n, device=self.device, dtype=dtype)
        for _ in range(3):
            a @ a
        self.sync()
        start, reps = time.perf_counter(), 10
        for _ in range(reps):
            a @ a
        self.sync()
        return 2 * n**3 * reps / (time.perf_counter() - start)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


class _CudaPeak:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> _CudaPeak:
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        self.gb = torch.cuda.max_memory_allocated(self.device) / 1e9


class _HostPeak:
    def __enter__(self) -> _HostPeak:
        self.rss = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.rss.__exit__(*exc)
        self.gb = self.rss.delta_mb * 2**20 / 1e9


def build(args: argparse.Namespace, device: Device) -> OmniGenPipeline:
    config = tiny_config() if args.tiny else full_config()
    model = build_random_model(config, torch.bfloat16, device.device)
    vae = build_vae("tiny" if args.tiny else "sdxl").to(device.device, torch.bfloat16)
    defaults = GenerationConfig(height=args.size, width=args.size, max_input_image_size=args.size)
    return OmniGenPipeline(model, AutoencoderKLCodec(vae), build_tokenizer(), defaults, device.device)


def ours(pipe: OmniGenPipeline, task: str, args: argparse.Namespace, **options):
    prompt, k = TASKS[task]
    images = input_images(args.size, k)

    def call(steps: int) -> torch.Tensor:
        return pipe(
            prompt,
            images or None,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            img_guidance_scale=IMG_GUIDANCE,
            seed=SEED,
            progress=False,
            output_type="latent",
            **options,
        )

    return call


def quantized(pipe: OmniGenPipeline, kind: str) -> OmniGenPipeline:
    """A copy of the pipeline whose decoder linears are int8 or fp8 weight-only (torchao)."""
    try:
        from torchao.quantization import quantize_
    except Exception as err:  # missing or broken install
        raise Skip(f"torchao not importable ({type(err).__name__}: {err}); pip install torchao") from err
    copy_ = pipe.with_defaults()
    copy_.model = copy.deepcopy(pipe.model)
    if kind == "int8":
        quantize_int8(copy_.model, backend="torchao")
        return copy_
    try:
        from torchao.quantization import Float8WeightOnlyConfig

        quantize_(copy_.model.llm.layers, Float8WeightOnlyConfig())
    except Exception as err:  # fp8 needs a recent torchao and a device that has fp8
        raise Skip(f"fp8 weight-only unavailable here ({type(err).__name__}: {err})") from err
    return copy_


def compiled(pipe: OmniGenPipeline, backend: str) -> OmniGenPipeline:
    """A copy of the pipeline with its decoder blocks compiled (graphs compile at the warm-up call)."""
    copy_ = pipe.with_defaults()
    copy_.model = copy.deepcopy(pipe.model)
    if backend == "inductor":
        copy_.compile()
    else:  # the same regional compilation with another backend (e.g. aot_eager: no C++ toolchain needed)
        for layer in copy_.model.llm.layers:
            layer.compile(backend=backend)
    return copy_


def diffusers_call(pipe: OmniGenPipeline, task: str, args: argparse.Namespace, device: Device):
    """diffusers' OmniGenPipeline on our weights (shared storage), VAE and token ids, our initial noise."""
    try:
        import torchvision  # noqa: F401 - diffusers' OmniGen processor needs it
        from diffusers import FlowMatchEulerDiscreteScheduler, OmniGenTransformer2DModel
        from diffusers import OmniGenPipeline as DiffusersPipeline
        from transformers import PreTrainedTokenizerFast
    except Exception as err:
        raise Skip(f"diffusers' pipeline unavailable ({type(err).__name__}: {err})") from err
    from omnigen.weights.keymap import ours_to_diffusers

    config = pipe.model.config
    with torch.device("meta"):
        transformer = OmniGenTransformer2DModel(**config.to_diffusers_dict())
    transformer.load_state_dict(ours_to_diffusers(pipe.model.state_dict(), config), strict=True, assign=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=pipe.tokenizer.backend, bos_token="<s>")
    reference = DiffusersPipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=pipe.codec.vae,
        tokenizer=tokenizer,
    )
    reference.set_progress_bar_config(disable=True)
    prompt, k = TASKS[task]
    images = [_pil(img) for img in input_images(args.size, k)]
    shape = (config.in_channels, args.size // config.latent_downsample, args.size // config.latent_downsample)
    noise = make_noise(shape, [SEED], device.device)

    def call(steps: int) -> torch.Tensor:
        return reference(
            prompt,
            input_images=images or None,
            height=args.size,
            width=args.size,
            num_inference_steps=steps,
            max_input_image_size=args.size,
            guidance_scale=GUIDANCE,
            img_guidance_scale=IMG_GUIDANCE,
            latents=noise.clone(),
            output_type="latent",
        ).images

    return call


def _pil(array):
    from PIL import Image

    return Image.fromarray(array)


def model_gb(pipe: OmniGenPipeline) -> float:
    model = pipe.model
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 1e9


def contender_call(name: str, pipe: OmniGenPipeline, task: str, args: argparse.Namespace, device: Device):
    """(call(steps) -> final latents, whether its FLOPs are the cached ones, GB resident on the device that
    the contender does not use: the original weights beside a compiled or quantized copy)."""
    if name == "batched":
        return ours(pipe, task, args, separate_cfg_infer=False), True, 0.0
    if name == "separate":
        return ours(pipe, task, args, separate_cfg_infer=True), True, 0.0
    if name == "compile":
        return (
            ours(compiled(pipe, args.compile_backend), task, args, separate_cfg_infer=False),
            True,
            model_gb(pipe),
        )
    if name in ("int8", "fp8"):
        return ours(quantized(pipe, name), task, args, separate_cfg_infer=False), True, model_gb(pipe)
    if name == "offload_model":
        options = dict(separate_cfg_infer=True, offload_model=True, offload_kv_cache=True)
        return ours(pipe, task, args, **options), True, 0.0
    return diffusers_call(pipe, task, args, device), False, 0.0


def timed(call, device: Device, args: argparse.Namespace, steps: int) -> tuple[float, float, torch.Tensor]:
    """Warm-up (2 steps: compiles, allocates, loads kernels), then the median seconds of ``--reps`` calls
    of ``steps`` steps to the final latents, the peak memory (GB) and the latents."""
    call(min(2, steps))
    seconds, peaks, latents = [], [], None
    for _ in range(args.reps):
        with device.measure() as peak:
            device.sync()
            start = time.perf_counter()
            latents = call(steps)
            device.sync()
            seconds.append(time.perf_counter() - start)
        peaks.append(peak.gb)
    return statistics.median(seconds), max(peaks), latents.float().cpu()


def decode_seconds(pipe: OmniGenPipeline, latents: torch.Tensor, device: Device) -> float:
    """The VAE decode of one image (the same VAE and latent shape for every contender)."""
    z = latents[:1].to(device.device)
    pipe.codec.decode(z)
    device.sync()
    start = time.perf_counter()
    pipe.codec.decode(z)
    device.sync()
    return time.perf_counter() - start


def task_flops(pipe: OmniGenPipeline, task: str, args: argparse.Namespace) -> dict[str, float]:
    prompt, k = TASKS[task]
    processor = pipe.processor
    pixels = [processor.prepare_image(img) for img in input_images(args.size, k)]
    branches = cfg_prompts(prompt, pixels, pipe.defaults.negative_prompt, bool(pixels))
    rows = [processor(*branches.cond), processor(*branches.uncond)]
    rows += [processor(*branches.img_cond)] if pixels else []
    return flops(
        pipe.model.config, rows, pipe.model.config.num_image_tokens(args.size, args.size), args.steps
    )


def run_contender(name, pipe, task, args, device) -> tuple[float, float, torch.Tensor | None, bool]:
    """Seconds for ``--steps`` steps, peak GB, final latents (None when fewer steps ran), cached FLOPs?

    ``offload_model`` streams every layer's weights from the host at each forward (slow), so it runs
    ``--offload-steps`` steps and its time is scaled to ``--steps`` (its latents are then not compared)."""
    call, cached, unused_gb = contender_call(name, pipe, task, args, device)
    steps = min(args.steps, args.offload_steps) if name == "offload_model" else args.steps
    seconds, gb, latents = timed(call, device, args, steps)
    if steps != args.steps:
        seconds, latents = seconds * args.steps / steps, None
    return seconds, gb - unused_gb, latents, cached


def run_task(pipe, task, args, device, peak, started) -> None:
    work = task_flops(pipe, task, args)
    baseline, decode_s = None, None
    for name in [c for c in args.contenders.split(",") if c]:
        if args.budget_s and time.perf_counter() - started > args.budget_s:
            print(f"{task:5} {name:14} skipped: time budget of {args.budget_s:.0f} s used", flush=True)
            continue
        try:
            seconds, gb, latents, cached = run_contender(name, pipe, task, args, device)
        except Skip as skip:
            print(f"{task:5} {name:14} skipped: {skip}", flush=True)
            continue
        except Exception as err:  # one failing contender must not end the run
            print(f"{task:5} {name:14} failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
            continue
        finally:
            pipe.to(device.device)  # offload_model leaves the decoder layers on the host
            device.free()  # the copies (compiled, quantized, diffusers' wrapper) are gone by now
        if baseline is None and latents is not None:
            baseline, decode_s = latents, decode_seconds(pipe, latents, device)
        flop = work["cached_total"] if cached else work["uncached_total"]
        share = flop / seconds / peak
        diff = (
            "-" if latents is None or baseline is None else f"{(latents - baseline).abs().max().item():.2e}"
        )
        total = seconds + (decode_s or 0.0)
        note = f"  ({args.offload_steps} steps timed, scaled)" if latents is None else ""
        print(
            f"{task:5} {name:14} {total:9.2f} {seconds:9.2f} {gb:9.3f} {share:9.1%} {diff:>10}{note}",
            flush=True,
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, 64x64, 2 steps (for tests)")
    parser.add_argument("--size", type=int, default=None, help="default 1024 (64 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="default 50 (2 with --tiny)")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--tasks", default="t2i,edit")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default inductor; aot_eager with --tiny)",
    )
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip what would start after this")
    parser.add_argument("--offload-steps", type=int, default=5, help="steps timed for offload_model")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (CPU device)")
    args = parser.parse_args(argv)
    args.size = args.size or (64 if args.tiny else 1024)
    args.steps = args.steps or (2 if args.tiny else 50)
    args.compile_backend = args.compile_backend or ("aot_eager" if args.tiny else "inductor")
    unknown = sorted(set(args.contenders.split(",")) - set(CONTENDERS) - {""})
    if unknown:
        parser.error(f"unknown --contenders {unknown}; allowed: {list(CONTENDERS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    logging.getLogger("omnigen.text.tokenizer").setLevel(
        logging.ERROR
    )  # the bench vocabulary lacks most words
    device = Device(args.device)
    if device.device.type == "cpu":
        torch.set_num_threads(args.threads)
    elif device.cuda and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here (try --tiny --device cpu)")
    peak = device.matmul_peak(torch.bfloat16)
    name = torch.cuda.get_device_name(device.device) if device.cuda else "cpu"
    with torch.no_grad():
        pipe = build(args, device)
        params = pipe.model.num_parameters()
        print(
            f"# {name}: {params / 1e6:.1f}M parameters, bf16, {args.size}x{args.size}, {args.steps} steps, "
            f"{args.reps} reps; measured bf16 matmul peak {peak / 1e9:.0f} GFLOP/s; torch {torch.__version__}"
        )
        print(
            f"{'task':5} {'contender':14} {'s/image':>9} {'transf s':>9} {'peak GB':>9} {'of peak':>9} "
            f"{'max |diff|':>10}   (diff: latents vs our batched run)",
            flush=True,
        )
        for task in [t for t in args.tasks.split(",") if t]:
            run_task(pipe, task, args, device, peak, started)
    print(f"# total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
