"""The OmniGen nodes: a loader (-> OMNIGEN_PIPE) and a generate node (-> IMAGE), on omnigen's pipeline.

The node contract is ComfyUI's (``nodes.py`` / ``execution.py`` in comfyanonymous/ComfyUI):
``INPUT_TYPES`` lists required and optional inputs as ``(type, options)`` with ``default``/``min``/``max``
/``step`` for numbers and a list of strings for a choice; the executor calls ``FUNCTION`` on an instance
with the inputs as keyword arguments (optional inputs only when connected or set) and expects a tuple
with one value per ``RETURN_TYPES`` entry. ComfyUI itself is used only through ``host``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .convert import image_to_pil, mask_to_pil, pixels_to_image
from .host import Progress, check_interrupt, free_memory, torch_device

try:
    from omnigen.sampling.solvers import SOLVERS, step_kinds
except ImportError as error:  # ComfyUI's Python needs the library itself
    raise ImportError(
        "the OmniGen ComfyUI nodes need the omnigen package in ComfyUI's Python environment: "
        "pip install -e <path to this repository>"
    ) from error

CATEGORY = "OmniGen"
PIPE_TYPE = "OMNIGEN_PIPE"
DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEVICES = ["auto", "cuda", "cpu"]
MAX_INPUT_IMAGES = 3
MAX_SEED = 2**63 - 1  # image k of a batch uses seed + k; torch seeds go up to 2**64 - 1
SIZE = {"min": 16, "max": 4096, "step": 16}


@dataclass(frozen=True)
class LoadedOmniGen:
    """The OMNIGEN_PIPE value: a pipeline and the per-call memory options chosen at load time."""

    pipeline: Any  # omnigen.pipeline.OmniGenPipeline
    offload_model: bool
    offload_kv_cache: bool


def _weights_size(folder: Path | None) -> int:
    if folder is None or not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors"))


class OmniGenLoader:
    """Load an OmniGen model folder (ours, the official OmniGen-v1 layout or diffusers'), or a hub id."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model_path": (
                    "STRING",
                    {"default": "", "tooltip": "model folder or hub id; empty: the shipped miniature model"},
                ),
                "dtype": (list(DTYPES), {"default": "auto", "tooltip": "auto: the checkpoint's own dtype"}),
                "device": (DEVICES, {"default": "auto", "tooltip": "auto: ComfyUI's device"}),
                "offload_model": ("BOOLEAN", {"default": False, "tooltip": "decoder layers on the CPU"}),
                "offload_kv_cache": ("BOOLEAN", {"default": True, "tooltip": "condition cache on the CPU"}),
            },
            "optional": {
                "vae_path": ("STRING", {"default": "", "tooltip": "VAE folder when the model has none"}),
            },
        }

    RETURN_TYPES = (PIPE_TYPE,)
    RETURN_NAMES = ("pipe",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(
        self,
        model_path: str,
        dtype: str,
        device: str,
        offload_model: bool,
        offload_kv_cache: bool,
        vae_path: str = "",
    ) -> tuple[LoadedOmniGen]:
        from omnigen.pipeline import OmniGenPipeline

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was chosen but torch sees no CUDA device; choose 'auto' or 'cpu'")
        target = torch_device() if device == "auto" else torch.device(device)
        folder = Path(model_path.strip()) if model_path.strip() else None
        free_memory(_weights_size(folder), target)
        pipeline = OmniGenPipeline.from_pretrained(
            folder, device=target, dtype=DTYPES[dtype], vae_path=vae_path.strip() or None
        )
        return (LoadedOmniGen(pipeline, bool(offload_model), bool(offload_kv_cache)),)


def call_pipeline(pipeline: Any, arguments: dict, mask: Any = None, sampler: str = "euler") -> torch.Tensor:
    """Call the pipeline, passing ``mask=`` and ``sampler=`` only when used, so that an omnigen without
    them still serves everything else; asking for one it lacks is a clear ValueError.

    (Both arguments come with the local-editing and solver work of issue 16; once they are in the
    pipeline this can pass them unconditionally.)
    """
    extras = {}
    if mask is not None:
        extras["mask"] = mask
    if sampler != "euler":
        extras["sampler"] = sampler
    try:
        return pipeline(**arguments, **extras)
    except TypeError as error:
        missing = [name for name in extras if f"unexpected keyword argument '{name}'" in str(error)]
        if missing:
            raise ValueError(
                f"{missing[0]} needs omnigen with {missing[0]} support (this one has none)"
            ) from error
        raise


def collect_images(images: list[torch.Tensor | None]) -> list:
    """image_1..image_k connected in order (no gaps) -> PIL images for <|image_1|>..<|image_k|>."""
    count = sum(image is not None for image in images)
    if any(image is None for image in images[:count]):
        connected = [f"image_{k + 1}" for k, image in enumerate(images) if image is not None]
        raise ValueError(
            f"connect the input images in order from image_1 (the prompt refers to them as "
            f"<|image_1|>, <|image_2|>, ...); connected: {connected}"
        )
    return [image_to_pil(image, f"image_{k + 1}") for k, image in enumerate(images[:count])]


class OmniGenGenerate:
    """Text-to-image, or editing / composition with up to three input images and an optional mask."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        images = {
            f"image_{k}": ("IMAGE", {"tooltip": f"<img><|image_{k}|></img> in the prompt"})
            for k in range(1, MAX_INPUT_IMAGES + 1)
        }
        return {
            "required": {
                "pipe": (PIPE_TYPE,),
                "prompt": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "refer to input k as <img><|image_k|></img>",
                    },
                ),
                "width": ("INT", {"default": 1024, **SIZE}),
                "height": ("INT", {"default": 1024, **SIZE}),
                "use_input_image_size": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "output the size of image_1 (needs exactly one input image)",
                    },
                ),
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "model evaluations"}),
                "guidance_scale": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 30.0, "step": 0.1}),
                "img_guidance_scale": ("FLOAT", {"default": 1.6, "min": 0.0, "max": 30.0, "step": 0.1}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED}),
                "sampler": (list(SOLVERS), {"default": "euler"}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
            },
            "optional": {
                **images,
                "mask": ("MASK", {"tooltip": "regenerate where 1, keep the first input image elsewhere"}),
            },
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "generate"
    CATEGORY = CATEGORY

    def generate(
        self,
        pipe: LoadedOmniGen,
        prompt: str,
        width: int,
        height: int,
        use_input_image_size: bool,
        steps: int,
        guidance_scale: float,
        img_guidance_scale: float,
        seed: int,
        sampler: str,
        batch_size: int,
        image_1: torch.Tensor | None = None,
        image_2: torch.Tensor | None = None,
        image_3: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor]:
        if not isinstance(pipe, LoadedOmniGen):
            raise TypeError(f"pipe must come from the OmniGen loader node, got {type(pipe).__name__}")
        images = collect_images([image_1, image_2, image_3])
        progress = Progress(len(step_kinds(sampler, steps)))  # the callback runs once per solver step

        def on_step_end(_pipeline: Any, index: int, _t: float, _latents: torch.Tensor) -> None:
            progress.done(index + 1)
            check_interrupt()

        arguments = {
            "prompt": prompt,
            "input_images": images or None,
            "height": height,
            "width": width,
            "num_inference_steps": steps,
            "guidance_scale": guidance_scale,
            "img_guidance_scale": img_guidance_scale,
            "seed": seed,
            "use_input_image_size_as_output": bool(use_input_image_size),
            "num_images_per_prompt": batch_size,
            "offload_model": pipe.offload_model,
            "offload_kv_cache": pipe.offload_kv_cache,
            "callback_on_step_end": on_step_end,
            "output_type": "pt",
        }
        pixels = call_pipeline(
            pipe.pipeline, arguments, mask=None if mask is None else mask_to_pil(mask), sampler=sampler
        )
        return (pixels_to_image(pixels),)


NODE_CLASS_MAPPINGS = {"OmniGenLoader": OmniGenLoader, "OmniGenGenerate": OmniGenGenerate}
NODE_DISPLAY_NAME_MAPPINGS = {"OmniGenLoader": "OmniGen Loader", "OmniGenGenerate": "OmniGen Generate"}
