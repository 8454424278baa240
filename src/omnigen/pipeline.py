"""OmniGenPipeline: prompt (+ images) -> images. process -> collate -> encode inputs -> sample -> decode.

Every CFG branch is a row of the condition batch: [cond rows | uncond rows | img_cond rows] (the
reference's order), its own batch with ``separate_cfg_infer``, else all rows together. With ``use_kv_cache`` the condition is prefilled once and only the time token and the
output tokens run at each step.

A call is planned first (``omnigen.plan``: the validated ``GenerationConfig``, sizes, masks, schedule),
then run: the solver is ``omnigen.sampling.solvers``'s, the guided velocity ``omnigen.sampling.guidance``'s.

Speed and memory options (each measured by ``benchmarks/bench_pipeline.py --options``):
- ``mask_free_attention`` (on): a cached step whose rows have no padding (separate CFG with one prompt)
  runs its attention without a mask; exact.
- ``step_cache_threshold`` (off): skip the layers after the first at steps whose input barely changed
  (``omnigen.sampling.step_cache``); an approximation.
- ``compile()`` (opt-in); ``omnigen.weights.quantize.quantize(pipe.model, kind)``: int8/fp8/nf4 weights.
- fp16 guard (on, ``pipe.runner.fp16_guard``): fp16 weights run with an fp32 residual stream.
- ``vae_tiling`` (off): decode large images tile by tile (diffusers' tiled decode).
- ``pipe.place_layers(devices)``: decoder layers split over several devices, held by ``pipe.runner``.
- ``parallel="cfg"`` or ``"sequence"`` (``omnigen.sampling.parallel``): one image over several ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from omnigen.generation import GenerationConfig
from omnigen.model import OmniGenModel
from omnigen.model.placement import place_layers, place_model
from omnigen.model.runner import Runner
from omnigen.model.vae import AutoencoderKLCodec, LatentCodec, load_codec, tiled_decoding, to_uint8
from omnigen.plan import CallPlan, count_condition_tokens, plan_call
from omnigen.sampling import img2img
from omnigen.sampling.euler import draw_noise, noise_generators
from omnigen.sampling.guidance import branch_rows, guided_velocity
from omnigen.sampling.inpaint import CanvasMask, MaskedEdit, MaskLike
from omnigen.sampling.parallel import CfgGroup, join
from omnigen.sampling.solvers import solve
from omnigen.sampling.step_cache import StepCache
from omnigen.text.collate import collate
from omnigen.text.processor import OmniGenProcessor, cfg_prompts, resized_size
from omnigen.text.tokenizer import Tokenizer
from omnigen.types import ProcessedPrompt
from omnigen.util.dtypes import resolve_dtype
from omnigen.weights.checkpoint import load_config, load_model, resolve_layout, resolve_model_path

logger = logging.getLogger(__name__)

StepEndCallback = Callable[["OmniGenPipeline", int, float, torch.Tensor], "torch.Tensor | None"]
OUTPUT_TYPES = ("pil", "pt", "latent")


def default_model_path() -> Path:
    """The miniature model shipped inside the package."""
    return Path(__file__).parent / "assets" / "miniworld"


class OmniGenPipeline:
    def __init__(
        self,
        model: OmniGenModel,
        codec: LatentCodec,
        tokenizer: Tokenizer,
        defaults: GenerationConfig | None = None,
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
        self.defaults = defaults or GenerationConfig()
        self.device = torch.device(device)
        self.runner = Runner()  # how the decoder layers run (module docstring)
        self.processor = OmniGenProcessor(tokenizer, model.config, self.defaults.max_input_image_size)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path | None = None,
        device: torch.device | str = "cpu",
        dtype: str | torch.dtype | None = "auto",
        vae_path: str | Path | None = None,
    ) -> OmniGenPipeline:
        """A local folder (official, diffusers or ours), a hub id, or None for the shipped model.

        ``dtype``: "auto" (``omnigen.util.dtypes.resolve_dtype``: by device, and on a CPU by its bf16 speed
        and the model's width), "float32", "bfloat16", "float16", a torch dtype, or None (as stored)."""
        folder = default_model_path() if name_or_path is None else resolve_model_path(name_or_path)
        layout = resolve_layout(folder)
        config = load_config(layout)  # read once: its width decides "auto" on a CPU
        dtype = resolve_dtype(dtype, device, config.transformer.hidden_size)
        model, layout = load_model(layout, device, dtype, config)
        codec = (
            AutoencoderKLCodec.from_pretrained(vae_path) if vae_path is not None else load_codec(layout.root)
        )
        if codec is None:
            raise ValueError(
                f"{folder} has no vae/ folder or codec.json; pass vae_path= (e.g. a local copy of stabilityai/sdxl-vae)"
            )
        tokenizer = Tokenizer.from_file(layout.tokenizer_dir)
        return cls(model, codec.to(device), tokenizer, GenerationConfig.load(layout.root), device)

    # ------------------------------------------------------------------ call
    def plan(
        self,
        prompt: str | Sequence[str],
        input_images: Sequence | None = None,
        mask: MaskLike | Sequence[MaskLike | None] | None = None,
        **overrides: Any,
    ) -> CallPlan:
        """What ``self(prompt, input_images, mask=mask, **overrides)`` would do, resolved and checked
        without running the model (``omnigen.plan``): config, output sizes, masks, condition tokens and
        the schedule (``num_evaluations``, ``num_steps``, ``progress``). Bad input raises as the call would."""
        return plan_call(
            self.defaults, self.model.config, self.processor, prompt, input_images, mask, **overrides
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        input_images: Sequence | None = None,
        callback_on_step_end: StepEndCallback | None = None,
        progress: bool = True,
        output_type: str = "pil",
        mask: MaskLike | Sequence[MaskLike | None] | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        parallel: str | None = None,
        **overrides: Any,
    ) -> list[Image.Image] | torch.Tensor:
        """Generate one image per prompt (times ``num_images_per_prompt``).

        ``overrides``: any field of ``GenerationConfig`` (None keeps this pipeline's default); a bad value
        raises a ValueError/TypeError naming the field and its range. An empty prompt is refused.
        ``output_type``: "pil" (list of images), "pt" (pixels in [-1, 1]) or "latent" (the final latents).
        Image k of the call (prompt-major) uses noise seeded with ``seed + k``, so a batch equals the same
        prompts generated one by one with consecutive seeds. The seed of each image is in ``image.info["seed"]``.
        ``callback_on_step_end(pipe, i, t, latents)`` runs after each solver step: ``self.plan(...).num_steps``
        times per output size (Heun's steps make two model evaluations each).
        ``generator`` (diffusers' convention, instead of ``seed``): one ``torch.Generator`` that the images
        draw their noise from in turn (in sampling order: by output size, then prompt), or a list of one
        per image (prompt-major); ``torch.Generator().manual_seed(s)``
        gives the image ``seed=s`` gives (no ``image.info["seed"]`` then).

        ``mask`` (``omnigen.sampling.inpaint``): regenerate only where it is white on the first input image (the
        canvas; the output has its size) and keep every other pixel exactly; ``mask_blur`` feathers the
        seam (pixels). For a list of prompts: one mask for all, or a list with a mask or None per prompt.

        ``parallel="cfg"`` (``omnigen.sampling.parallel``), inside an initialized process group of 2 or 3
        ranks that all make the same call: each rank runs its own guidance branches; every rank returns
        the images, equal to one process's. ``"sequence"`` (``omnigen.model.ulysses``): each rank runs
        a share of every step's output tokens and attention heads.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(
                f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}, got {output_type!r}"
            )
        call = self.plan(prompt, input_images, mask, **overrides)
        cfg, sizes = call.config, call.sizes
        if generator is not None and overrides.get("seed") is not None:
            raise ValueError("pass seed= or generator=, not both")
        if output_type != "pil" and len(set(sizes)) > 1:
            raise ValueError(
                f"output_type={output_type!r} stacks the outputs into one tensor, but the output sizes differ "
                f"({sorted(set(sizes))}); use output_type='pil', or call once per size"
            )
        processed, branches = self._prompt_rows(call)
        ranks = join(parallel, 2 + (branches[0].img_cond is not None), self.model.config, cfg, call.seed)
        generators = noise_generators(generator, ranks.seed, call.num_images)  # the same on every rank
        self.runner = place_model(self.model, self.device, self.runner, offload_layers=cfg.offload_model)
        per_prompt = cfg.num_images_per_prompt
        outputs: list = [None] * len(call.prompts)
        for size in dict.fromkeys(sizes):  # one sampling run per output size, in order
            rows = [i for i, s in enumerate(sizes) if s == size]
            result = self._generate(
                [processed[i] for i in rows],
                [branches[i] for i in rows],
                size,
                [g for i in rows for g in generators[i * per_prompt : (i + 1) * per_prompt]],
                call,
                (callback_on_step_end, progress and ranks.lead, output_type != "latent"),
                [call.masks[i] for i in rows],
                ranks.group,
                replace(self.runner, sequence=ranks.shard),
            )
            for i, images_of_prompt in zip(rows, result):
                outputs[i] = images_of_prompt
        flat = [img for group in outputs for img in group]
        return _assemble(
            flat,
            [m for m in call.masks for _ in range(per_prompt)],
            output_type,
            None if generator is not None else ranks.seed,
        )

    def _prompt_rows(self, call: CallPlan) -> tuple[list[ProcessedPrompt], list]:
        """Each prompt processed and its CFG prompts; images become tensors once, in the caller's order
        (the image-only branch numbers them 1..n)."""
        cfg = call.config
        pixels = [
            [self.processor.prepare_image(img, cfg.max_input_image_size) for img in imgs]
            for imgs in call.images
        ]
        processed = [self.processor(p, imgs) for p, imgs in zip(call.prompts, pixels, strict=True)]
        use_img_cfg = cfg.use_img_guidance and any(call.images)
        branches = [
            cfg_prompts(p, imgs, cfg.negative_prompt, use_img_cfg) for p, imgs in zip(call.prompts, pixels)
        ]
        return processed, branches

    def condition_tokens(
        self, prompt: str, image_sizes: Sequence[tuple[int, int]], max_input_image_size: int | None = None
    ) -> int:
        """Tokens of the conditional prompt (its text and every input image, given as (width, height)
        before resizing): the length of one prefill row, what a service budgets before running it."""
        longest = self.defaults.replace(max_input_image_size=max_input_image_size).max_input_image_size
        multiple = self.model.config.image_multiple
        sizes = [resized_size(w, h, longest, multiple) for w, h in image_sizes]
        return count_condition_tokens(self.processor, prompt, sizes)

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
        generators: list[torch.Generator],
        call: CallPlan,
        hooks: tuple[StepEndCallback | None, bool, bool],
        masks: Sequence[CanvasMask | None],
        group: CfgGroup | None,
        runner: Runner,
    ) -> list[list[torch.Tensor]]:
        """Sample the prompts of one output size; returns, per prompt, its images (or latents).
        ``generators``: one per image (the noise); ``hooks``: (step-end callback, progress bar, decode).
        ``group``: CFG-parallel, this rank's branches; ``runner``: the call's (sequence parallel's)."""
        callback, progress, decode = hooks
        cfg = call.config
        config, per_prompt = self.model.config, cfg.num_images_per_prompt
        rows = branch_rows(self.processor, processed, branches)
        mine = rows if group is None else group.mine(rows)
        all_rows = [p for branch in mine for p in branch]
        latents = self._encode_images(all_rows)
        dtype = next(self.model.parameters()).dtype
        pad = config.transformer.pad_token_id
        if cfg.separate_cfg_infer or group is not None:
            conditions = [
                collate(branch, latents[k * len(branch) : (k + 1) * len(branch)], pad)
                for k, branch in enumerate(mine)
            ]
        else:
            conditions = [collate(all_rows, latents, pad)]
        conditions = [c.to(self.device, dtype) for c in conditions]

        h, w = size[0] // config.latent_downsample, size[1] // config.latent_downsample
        noise = draw_noise((config.in_channels, h, w), generators, self.device)
        steps = cfg.num_inference_steps
        step_cache = None if cfg.step_cache_threshold is None else StepCache(cfg.step_cache_threshold, steps)
        velocity = guided_velocity(
            self.model,
            conditions,
            len(rows),
            config.num_image_tokens(*size),
            cfg,
            step_cache,
            runner,
            group,
        )
        step_callback = None if callback is None else (lambda i, t, latent: callback(self, i, t, latent))
        schedule = call.schedule
        z = noise
        if cfg.strength < 1:  # img2img: from the first input image (cond rows come first)
            start = torch.stack([latents[k][0] for k in range(len(processed)) for _ in range(per_prompt)])
            z, schedule = img2img.start_from_image(noise, start, schedule, cfg.strength)
        edit = MaskedEdit.prepare([m for m in masks for _ in range(per_prompt)], self.codec, noise)
        project = None if edit is None else (lambda x, t: edit.blend(x, t, noise))
        z = solve(velocity, z, schedule, project, callback=step_callback, progress=progress)
        if step_cache is not None:
            logger.info("step cache: ran all layers at %d of %d steps", step_cache.num_computed, steps)
        if decode:
            with tiled_decoding(self.codec, cfg.vae_tiling):
                z = self.codec.decode(z)
        pixels = z.float().cpu()
        return [list(pixels[i * per_prompt : (i + 1) * per_prompt]) for i in range(len(processed))]

    def to(self, device: torch.device | str) -> OmniGenPipeline:
        self.device = torch.device(device)
        self.runner = replace(self.runner, devices=None, offloaded=None)  # no split, nothing offloaded
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

    def with_defaults(self, **changes: Any) -> OmniGenPipeline:
        """A pipeline sharing this one's model and runner with some defaults changed (validated)."""
        pipe = OmniGenPipeline(
            self.model, self.codec, self.tokenizer, self.defaults.replace(**changes), self.device
        )
        pipe.runner = self.runner
        return pipe

    def place_layers(
        self, devices: Sequence[str | torch.device], memory: Sequence[int] | None = None
    ) -> OmniGenPipeline:
        """Split the decoder layers over ``devices`` (``placement.place_layers``); ``to`` undoes it."""
        self.runner = replace(
            self.runner, devices=place_layers(self.model, devices, memory).devices, offloaded=None
        )
        return self

    def save_pretrained(
        self,
        folder: str | Path,
        layout: str = "original",
        dtype: torch.dtype | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write a model folder in the official OmniGen-v1 ("original") or the "diffusers" layout
        (``omnigen.weights.export.save_pretrained``)."""
        from omnigen.weights.export import save_pretrained

        return save_pretrained(self, folder, layout=layout, dtype=dtype, overwrite=overwrite)

    # ------------------------------------------------------------------ LoRA (see omnigen.weights.lora)
    def load_lora(self, path: str | Path, scale: float = 1.0) -> None:
        """Inject the peft-format adapter in ``path`` (ours or the original OmniGen's) into the model."""
        from omnigen.weights import lora

        lora.load_lora(self.model, path, scale=scale)

    def merge_lora(self) -> None:
        """Fold the loaded adapter into the base weights (same outputs, no per-step LoRA cost)."""
        from omnigen.weights import lora

        lora.merge_lora(self.model)

    def unmerge_lora(self) -> None:
        from omnigen.weights import lora

        lora.unmerge_lora(self.model)

    def unload_lora(self) -> None:
        """Remove the adapter and restore the base weights."""
        from omnigen.weights import lora

        lora.unload_lora(self.model)


def _assemble(
    flat: list[torch.Tensor], masks: Sequence[CanvasMask | None], output_type: str, seed: int | None
) -> list[Image.Image] | torch.Tensor:
    """The call's outputs (image k, prompt-major): composited with their masks (``inpaint``) and stacked
    ("pt", "latent") or turned into PIL images carrying their seed."""
    if output_type == "pt":
        flat = [x if m is None else m.composite(x) for x, m in zip(flat, masks)]
    if output_type != "pil":
        return torch.stack(flat)
    pil = []
    for k, (pixels, m) in enumerate(zip(flat, masks)):
        image = Image.fromarray(to_uint8(pixels[None])[0].numpy())
        image = image if m is None else m.composite_image(image)
        if seed is not None:
            image.info["seed"] = seed + k
        pil.append(image)
    return pil
