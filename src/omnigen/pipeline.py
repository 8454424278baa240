"""OmniGenPipeline: prompt (+ images) -> images. process -> collate -> encode inputs -> sample -> decode.

Every CFG branch is a row of the condition batch: [cond rows | uncond rows | img_cond rows] (the
reference's order). With ``separate_cfg_infer`` each branch runs as its own batch; otherwise all rows
run together. With ``use_kv_cache`` the condition is prefilled once and only the time token and the
output tokens run at each step.

Speed and memory options (each measured by ``benchmarks/bench_pipeline.py --options``):
- ``mask_free_attention`` (on): a cached step whose rows have no padding (separate CFG with one prompt)
  runs its attention without a mask; exact.
- ``step_cache_threshold`` (off): skip the layers after the first at steps whose input barely changed
  (``omnigen.step_cache``); an approximation.
- ``compile()`` (opt-in): ``torch.compile`` of the decoder blocks.
- ``omnigen.quantize.quantize_int8(pipe.model)``: int8 weight-only decoder linears.
- fp16 guard (on, ``model.llm.fp16_guard``): fp16 weights run with an fp32 residual stream.
- ``vae_tiling`` (off): decode large images tile by tile (diffusers' tiled decode).
- ``omnigen.placement.place_layers(pipe.model, devices)``: decoder layers split over several devices.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from PIL import Image

from omnigen.checkpoint import load_model, resolve_model_path
from omnigen.collate import collate
from omnigen.guidance import combine
from omnigen.inpaint import CanvasMask, MaskedEdit, MaskLike, check_output_size, prepare_masks
from omnigen.model import ConditionCache, OmniGenModel
from omnigen.processor import DEFAULT_NEGATIVE_PROMPT, OmniGenProcessor, cfg_prompts
from omnigen.sampling import make_noise
from omnigen.solvers import plan, solve
from omnigen.step_cache import StepCache
from omnigen.tokenizer import Tokenizer
from omnigen.types import Condition, ProcessedPrompt
from omnigen.vae import AutoencoderKLCodec, LatentCodec, load_codec, to_uint8

logger = logging.getLogger(__name__)

GENERATION_CONFIG = "generation_config.json"
StepEndCallback = Callable[["OmniGenPipeline", int, float, torch.Tensor], "torch.Tensor | None"]


@dataclass(frozen=True)
class GenerationDefaults:
    """Per-model defaults for the call's arguments (the reference's defaults for OmniGen-v1)."""

    height: int = 1024
    width: int = 1024
    num_inference_steps: int = 50
    guidance_scale: float = 3.0
    img_guidance_scale: float = 1.6
    max_input_image_size: int = 1024
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT

    @classmethod
    def load(cls, folder: Path) -> GenerationDefaults:
        path = folder / GENERATION_CONFIG
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; allowed: {sorted(allowed)}")
        return cls(**data)

    def save(self, folder: str | Path) -> None:
        (Path(folder) / GENERATION_CONFIG).write_text(json.dumps(asdict(self), indent=1))


@dataclass(frozen=True)
class _SamplingOptions:
    steps: int
    scale: float
    img_scale: float
    use_kv_cache: bool
    offload_kv_cache: bool
    offload_model: bool
    separate_cfg_infer: bool
    callback: StepEndCallback | None
    progress: bool
    decode: bool
    step_cache_threshold: float | None = None
    mask_free_attention: bool = True
    vae_tiling: bool = False


def default_model_path() -> Path:
    """The miniature model shipped inside the package."""
    return Path(__file__).parent / "assets" / "miniworld"


class OmniGenPipeline:
    def __init__(
        self,
        model: OmniGenModel,
        codec: LatentCodec,
        tokenizer: Tokenizer,
        defaults: GenerationDefaults | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if codec.channels != model.config.in_channels:
            raise ValueError(
                f"codec has {codec.channels} channels but the model expects {model.config.in_channels}"
            )
        if codec.downsample != model.config.latent_downsample:
            raise ValueError(
                f"codec downsamples by {codec.downsample} but the model config says {model.config.latent_downsample}"
            )
        self.model = model.eval()
        self.codec = codec
        self.tokenizer = tokenizer
        self.defaults = defaults or GenerationDefaults()
        self.device = torch.device(device)
        self.processor = OmniGenProcessor(tokenizer, model.config, self.defaults.max_input_image_size)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        vae_path: str | Path | None = None,
    ) -> OmniGenPipeline:
        """A local folder (official, diffusers or ours), a hub id, or None for the shipped model."""
        folder = default_model_path() if name_or_path is None else resolve_model_path(name_or_path)
        model, layout = load_model(folder, device=device, dtype=dtype)
        codec = (
            AutoencoderKLCodec.from_pretrained(vae_path) if vae_path is not None else load_codec(layout.root)
        )
        if codec is None:
            raise ValueError(
                f"{folder} has no vae/ folder or codec.json; pass vae_path= (e.g. a local copy of stabilityai/sdxl-vae)"
            )
        tokenizer = Tokenizer.from_file(layout.tokenizer_dir)
        return cls(model, codec.to(device), tokenizer, GenerationDefaults.load(layout.root), device)

    # ------------------------------------------------------------------ inputs
    def _normalise(self, prompt, input_images) -> tuple[list[str], list[list]]:  # noqa: ANN001
        if isinstance(prompt, str):
            prompts = [prompt]
            if input_images is not None and not isinstance(input_images, (list, tuple)):
                input_images = [input_images]
            images = [list(input_images or [])]
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
            if input_images is None:
                images = [[] for _ in prompts]
            elif not isinstance(input_images, (list, tuple)) or len(input_images) != len(prompts):
                raise ValueError(
                    f"with {len(prompts)} prompts, input_images must be a list of {len(prompts)} lists (or None)"
                )
            else:
                images = [list(x or []) for x in input_images]
        else:
            raise TypeError(f"prompt must be a str or a non-empty list of str, got {prompt!r:.80}")
        return prompts, images

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        input_images: Sequence | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        img_guidance_scale: float | None = None,
        use_img_guidance: bool = True,
        negative_prompt: str | None = None,
        seed: int | None = None,
        use_kv_cache: bool = True,
        offload_kv_cache: bool = True,
        offload_model: bool = False,
        separate_cfg_infer: bool = True,
        use_input_image_size_as_output: bool = False,
        max_input_image_size: int | None = None,
        num_images_per_prompt: int = 1,
        callback_on_step_end: StepEndCallback | None = None,
        progress: bool = True,
        output_type: str = "pil",
        step_cache_threshold: float | None = None,
        mask_free_attention: bool = True,
        vae_tiling: bool = False,
        mask: MaskLike | Sequence[MaskLike | None] | None = None,
        mask_blur: float = 0,
    ) -> list[Image.Image] | torch.Tensor:
        """Generate one image per prompt (times ``num_images_per_prompt``).

        ``output_type``: "pil" (list of images), "pt" (pixels in [-1, 1]) or "latent" (the final latents).
        Image k of the call (prompt-major) uses noise seeded with ``seed + k``, so a batch equals the same
        prompts generated one by one with consecutive seeds. The seed of each image is in ``image.info["seed"]``.

        ``step_cache_threshold``: None (default) runs every layer at every step; a number >= 0 turns on step
        caching with that accumulated relative-change threshold (``omnigen.step_cache``; 0 is exact, about
        0.05-0.2 skips steps at some cost in fidelity). ``mask_free_attention``: run the cached steps'
        attention without a mask when the rows have no padding (exact; off only for comparisons).
        ``vae_tiling``: decode with diffusers' tiled decoder (less memory for large images; the result
        differs slightly where tiles blend; no effect with a codec that has no tiled decoder).

        ``mask`` (``omnigen.inpaint``): regenerate only where it is white on the first input image (the
        canvas; the output has its size) and keep every other pixel exactly; ``mask_blur`` feathers the
        seam (pixels). For a list of prompts: one mask for all, or a list with a mask or None per prompt.
        """
        d = self.defaults
        height_given, width_given = height, width
        prompts, images = self._normalise(prompt, input_images)
        pick = lambda value, default: default if value is None else value  # noqa: E731
        height, width = pick(height, d.height), pick(width, d.width)
        steps = pick(num_inference_steps, d.num_inference_steps)
        scale, img_scale = (
            pick(guidance_scale, d.guidance_scale),
            pick(img_guidance_scale, d.img_guidance_scale),
        )
        negative = pick(negative_prompt, d.negative_prompt)
        max_input = pick(max_input_image_size, d.max_input_image_size)
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {steps!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
        if output_type not in ("pil", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
        if use_input_image_size_as_output and any(len(x) != 1 for x in images):
            raise ValueError("use_input_image_size_as_output needs exactly one input image per prompt")
        if not use_input_image_size_as_output:
            self.model.config.check_image_size(height, width, "output")
        if seed is None:
            seed = random.randrange(2**31)
        elif not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        if step_cache_threshold is not None:
            StepCache(step_cache_threshold, steps)  # validates the threshold
        masks = prepare_masks(
            mask, images, mask_blur, max_input, self.model.config.image_multiple, not isinstance(prompt, str)
        )
        if not use_input_image_size_as_output:
            check_output_size(masks, height_given, width_given)

        # Images become tensors once, in the caller's order (the image-only branch numbers them 1..n).
        pixels = [[self.processor.prepare_image(img, max_input) for img in imgs] for imgs in images]
        processed = [self.processor(p, imgs) for p, imgs in zip(prompts, pixels, strict=True)]
        use_img_cfg = use_img_guidance and any(images)
        branches = [cfg_prompts(p, imgs, negative, use_img_cfg) for p, imgs in zip(prompts, pixels)]
        sizes = [
            tuple(proc.pixel_values[0].shape[-2:]) if use_input_image_size_as_output else (height, width)
            for proc in processed
        ]
        sizes = [size if m is None else m.size for size, m in zip(sizes, masks)]
        if output_type != "pil" and len(set(sizes)) > 1:
            raise ValueError(
                f"output_type={output_type!r} stacks the outputs into one tensor, but the output sizes differ "
                f"({sorted(set(sizes))}); use output_type='pil', or call once per size"
            )
        self._place_model(offload_model)
        options = _SamplingOptions(
            steps,
            scale,
            img_scale,
            use_kv_cache,
            offload_kv_cache,
            offload_model,
            separate_cfg_infer,
            callback_on_step_end,
            progress,
            decode=output_type != "latent",
            step_cache_threshold=step_cache_threshold,
            mask_free_attention=mask_free_attention,
            vae_tiling=vae_tiling,
        )
        outputs: list = [None] * len(prompts)
        for size in dict.fromkeys(sizes):  # one sampling run per output size, in order
            rows = [i for i, s in enumerate(sizes) if s == size]
            result = self._generate(
                [processed[i] for i in rows],
                [branches[i] for i in rows],
                size,
                [seed + i * num_images_per_prompt for i in rows],
                num_images_per_prompt,
                options,
                [masks[i] for i in rows],
            )
            for i, images_of_prompt in zip(rows, result):
                outputs[i] = images_of_prompt
        flat = [img for group in outputs for img in group]
        flat_masks = [m for m in masks for _ in range(num_images_per_prompt)]
        if output_type == "pt":
            flat = [x if m is None else m.composite(x) for x, m in zip(flat, flat_masks)]
        if output_type != "pil":
            return torch.stack(flat)
        pil = []
        for k, (pixels, m) in enumerate(zip(flat, flat_masks)):
            image = Image.fromarray(to_uint8(pixels[None])[0].numpy())
            image = image if m is None else m.composite_image(image)
            image.info["seed"] = seed + k
            pil.append(image)
        return pil

    def _encode_images(self, conditions: list[ProcessedPrompt]) -> list[list[torch.Tensor]]:
        """Latents of every input image, each distinct tensor encoded once."""
        encoded: dict[int, torch.Tensor] = {}
        out = []
        for prompt in conditions:
            row = []
            for pixels in prompt.pixel_values:
                if id(pixels) not in encoded:
                    encoded[id(pixels)] = self.codec.encode(pixels[None].to(self.device))[0]
                row.append(encoded[id(pixels)])
            out.append(row)
        return out

    def _generate(
        self,
        processed: list[ProcessedPrompt],
        branches: list,
        size: tuple[int, int],
        seeds: list[int],
        per_prompt: int,
        options: _SamplingOptions,
        masks: Sequence[CanvasMask | None] = (),
    ) -> list[list[torch.Tensor]]:
        """Sample the prompts of one output size; returns, per prompt, its images (or latents)."""
        config = self.model.config
        names = ["cond", "uncond"] + (["img_cond"] if branches[0].img_cond is not None else [])
        # Each branch: the prompts of all samples, repeated per image of a prompt.
        branch_prompts = []
        for name in names:
            texts = [getattr(b, name) for b in branches]
            procs = [
                processed[i] if name == "cond" else self.processor(text, imgs, template=True)
                for i, (text, imgs) in enumerate(texts)
            ]
            branch_prompts.append([p for p in procs for _ in range(per_prompt)])
        all_prompts = [p for group in branch_prompts for p in group]
        latents = self._encode_images(all_prompts)
        dtype = next(self.model.parameters()).dtype
        conditions = [
            collate(group, latents[k * len(group) : (k + 1) * len(group)], config.transformer.pad_token_id)
            for k, group in enumerate(branch_prompts)
        ]
        if not options.separate_cfg_infer:
            conditions = [collate(all_prompts, latents, config.transformer.pad_token_id)]
        conditions = [c.to(self.device, dtype) for c in conditions]

        h, w = size[0] // config.latent_downsample, size[1] // config.latent_downsample
        all_seeds = [s + j for s in seeds for j in range(per_prompt)]
        z = make_noise((config.in_channels, h, w), all_seeds, self.device)
        threshold = options.step_cache_threshold
        step_cache = None if threshold is None else StepCache(threshold, options.steps)
        velocity = self._velocity_fn(
            conditions, len(names), config.num_image_tokens(*size), options, step_cache
        )
        callback = options.callback
        step_callback = None if callback is None else (lambda i, t, latent: callback(self, i, t, latent))
        edit = MaskedEdit.prepare([m for m in masks for _ in range(per_prompt)], self.codec, z)
        project = None if edit is None else (lambda x, t, noise=z: edit.blend(x, t, noise))
        z = solve(
            velocity, z, plan("euler", options.steps), project, step_callback, progress=options.progress
        )
        if step_cache is not None:
            logger.info(
                "step cache: ran all layers at %d of %d steps", step_cache.num_computed, options.steps
            )
        if options.decode:
            with _vae_tiling(self.codec, options.vae_tiling):
                z = self.codec.decode(z)
        pixels = z.float().cpu()
        return [list(pixels[i * per_prompt : (i + 1) * per_prompt]) for i in range(len(processed))]

    def _velocity_fn(
        self,
        conditions: list[Condition],
        num_branches: int,
        n: int,
        options: _SamplingOptions,
        step_cache: StepCache | None = None,
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """v(z, t) with guidance; the conditions are prefilled into caches once, here."""
        model = self.model
        caches: list[ConditionCache | None] = [
            model.prefill(
                c,
                n,
                offload_cache=options.offload_kv_cache,
                offload_layers=options.offload_model,
                mask_free=options.mask_free_attention,
            )
            if options.use_kv_cache
            else None
            for c in conditions
        ]

        def run(index: int, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            cond = None if caches[index] is not None else conditions[index]
            return model(
                z,
                t,
                condition=cond,
                cache=caches[index],
                offload_layers=options.offload_model,
                step_cache=step_cache,
                branch=index,
            ).float()

        def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if step_cache is not None:
                step_cache.begin_step()
            if len(conditions) == 1:  # all branches in one batch
                out = run(0, torch.cat([z] * num_branches), torch.cat([t] * num_branches))
                return combine(list(out.chunk(num_branches)), options.scale, options.img_scale)
            return combine([run(k, z, t) for k in range(num_branches)], options.scale, options.img_scale)

        return velocity

    def _place_model(self, offload_model: bool) -> None:
        """With ``offload_model`` the decoder layers live on the CPU and visit the device one at a time
        (the transformer moves them); otherwise each lives on its device of ``omnigen.placement`` if the
        model was split, else on the pipeline's device. Everything else lives on the pipeline's device."""
        layers = self.model.llm.layers
        placed = self.model.llm.layer_devices
        if offload_model or placed is None:
            wanted = torch.device("cpu") if offload_model else self.device
            if next(layers.parameters()).device != wanted:
                layers.to(wanted)
        else:
            for layer, device in zip(layers, placed):
                if next(layer.parameters()).device != device:
                    layer.to(device)
        if next(self.model.x_embedder.parameters()).device != self.device:
            for name, child in self.model.named_children():
                if name != "llm":
                    child.to(self.device)
            self.model.llm.embed_tokens.to(self.device)
            self.model.llm.norm.to(self.device)
            self.model.llm.rotary.materialize(self.device)
            self.model.pos_embed = self.model.pos_embed.to(self.device)

    def to(self, device: torch.device | str) -> OmniGenPipeline:
        self.device = torch.device(device)
        self.model.llm.layer_devices = None
        self.model.to(self.device)
        self.model.materialize_buffers(self.device)
        self.codec.to(self.device)
        return self

    def compile(self, mode: str | None = None, dynamic: bool | None = None) -> OmniGenPipeline:
        """``torch.compile`` the decoder blocks in place (regional compilation: the blocks share one
        compiled graph, so compiling costs one block; the cache, offload and step-cache logic around them
        stays eager). The first calls are slow while graphs compile; outputs equal the eager ones up to
        float reordering. Returns self."""
        for layer in self.model.llm.layers:
            layer.compile(mode=mode, dynamic=dynamic)
        return self

    def with_defaults(self, **changes) -> OmniGenPipeline:  # noqa: ANN003
        """A pipeline sharing this one's model with some defaults changed."""
        return OmniGenPipeline(
            self.model, self.codec, self.tokenizer, replace(self.defaults, **changes), self.device
        )

    def save_pretrained(
        self,
        folder: str | Path,
        layout: str = "original",
        dtype: torch.dtype | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write a model folder in the official OmniGen-v1 ("original") or the "diffusers" layout
        (``omnigen.export.save_pretrained``)."""
        from omnigen.export import save_pretrained

        return save_pretrained(self, folder, layout=layout, dtype=dtype, overwrite=overwrite)

    # ------------------------------------------------------------------ LoRA (see omnigen.lora)
    def load_lora(self, path: str | Path, scale: float = 1.0) -> None:
        """Inject the peft-format adapter in ``path`` (ours or the original OmniGen's) into the model."""
        from omnigen import lora

        lora.load_lora(self.model, path, scale=scale)

    def merge_lora(self) -> None:
        """Fold the loaded adapter into the base weights (same outputs, no per-step LoRA cost)."""
        from omnigen import lora

        lora.merge_lora(self.model)

    def unmerge_lora(self) -> None:
        from omnigen import lora

        lora.unmerge_lora(self.model)

    def unload_lora(self) -> None:
        """Remove the adapter and restore the base weights."""
        from omnigen import lora

        lora.unload_lora(self.model)


@contextmanager
def _vae_tiling(codec: LatentCodec, enabled: bool) -> Iterator[None]:
    """Turn on diffusers' tiled decoding for the duration of a decode, then restore the VAE's setting."""
    vae = getattr(codec, "vae", None)
    if not enabled or vae is None or not hasattr(vae, "use_tiling"):
        yield
        return
    before = vae.use_tiling
    vae.use_tiling = True
    try:
        yield
    finally:
        vae.use_tiling = before
