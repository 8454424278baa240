"""The OmniGen nodes: a loader (-> OMNIGEN_PIPE), a LoRA node (OMNIGEN_PIPE -> OMNIGEN_PIPE) and a generate
node (-> IMAGE), on omnigen's pipeline.

LoRA, as ComfyUI's own LoraLoader: each LoRA node adds an adapter (a peft folder) and its strength to the
pipe it passes on; chaining nodes stacks adapters. The pipe value only records the stack
(``LoadedOmniGen.loras``) and never changes the upstream pipeline object, so two branches from one loader
keep their own adapters; the generate node makes the model's adapters exactly its pipe's stack before it
runs (``omnigen.weights.lora.apply_loras``: free when the stack is unchanged).

The node contract is ComfyUI's (``nodes.py`` / ``execution.py`` in comfyanonymous/ComfyUI):
``INPUT_TYPES`` lists required and optional inputs as ``(type, options)`` with ``default``/``min``/``max``
/``step`` for numbers and a list of strings for a choice; the executor calls ``FUNCTION`` on an instance
with the inputs as keyword arguments (optional inputs only when connected or set) and expects a tuple
with one value per ``RETURN_TYPES`` entry. ComfyUI itself is used only through ``host``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .convert import image_to_pil, mask_to_pil, pixels_to_image
from .host import Progress, check_interrupt, free_memory, model_folders, torch_device

try:
    from omnigen.sampling.solvers import step_kinds
    from omnigen.util.dtypes import AUTO, AUTO_HELP, DTYPE_CHOICES
    from omnigen.weights import lora

    from . import fields
except ImportError as error:  # ComfyUI's Python needs the library itself
    raise ImportError(
        "the OmniGen ComfyUI nodes need the omnigen package in ComfyUI's Python environment: "
        "pip install -e <path to this repository> (or pip install -r requirements.txt in it)"
    ) from error

CATEGORY = "OmniGen"
PIPE_TYPE = "OMNIGEN_PIPE"
DEVICES = ["auto", "cuda", "cpu"]
SHIPPED_MODEL = "shipped miniature model"
MAX_INPUT_IMAGES = 3


@dataclass(frozen=True)
class LoadedOmniGen:
    """The OMNIGEN_PIPE value: a pipeline and the operator settings chosen at load time (pipeline
    keyword arguments; a setting left at the model's default is absent)."""

    pipeline: Any  # omnigen.pipeline.OmniGenPipeline
    operator: dict[str, Any]
    loras: tuple[tuple[str, float], ...] = ()  # (adapter folder, strength), applied in order by generate


def _weights_size(folder: Path | None) -> int:
    if folder is None or not folder.is_dir():
        return 0
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.gguf") for f in folder.rglob(pattern))


STORED = "stored"  # the weights' dtype as the file holds them (``from_pretrained(dtype=None)``)
LOADER_DTYPES = [*DTYPE_CHOICES, STORED]


class OmniGenLoader:
    """Load an OmniGen model folder (ours, the official OmniGen-v1 layout or diffusers'), or a hub id."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "dtype": (
                    LOADER_DTYPES,
                    {"default": AUTO, "tooltip": f"{AUTO_HELP}; stored: as the file holds them"},
                ),
                "device": (DEVICES, {"default": "auto", "tooltip": "auto: ComfyUI's device"}),
            },
            "optional": {  # optional: a workflow that names only model_path (or nothing) still runs
                "model": (
                    [SHIPPED_MODEL, *model_folders()],
                    {
                        "default": SHIPPED_MODEL,
                        "tooltip": "ComfyUI's models/omnigen (and OmniGen pipelines in "
                        "models/diffusers), or the miniature model shipped with omnigen",
                    },
                ),
                "model_path": (
                    "STRING",
                    {"default": "", "tooltip": "a model folder or hub id; when set, used instead of model"},
                ),
                "vae_path": ("STRING", {"default": "", "tooltip": "VAE folder when the model has none"}),
                "lora_path": ("STRING", {"default": "", "tooltip": "a LoRA adapter folder (peft format)"}),
                "lora_strength": STRENGTH,
                **fields.widgets("operator"),
            },
        }

    RETURN_TYPES = (PIPE_TYPE,)
    RETURN_NAMES = ("pipe",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(
        self,
        dtype: str,
        device: str,
        model: str = SHIPPED_MODEL,
        model_path: str = "",
        vae_path: str = "",
        lora_path: str = "",
        lora_strength: float = 1.0,
        **operator: Any,
    ) -> tuple[LoadedOmniGen]:
        from omnigen.pipeline import OmniGenPipeline

        if dtype not in LOADER_DTYPES:
            raise ValueError(f"dtype must be one of {LOADER_DTYPES}, got {dtype!r}")
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was chosen but torch sees no CUDA device; choose 'auto' or 'cpu'")
        settings = fields.to_arguments(operator, "operator")
        unknown = sorted(set(operator) - set(fields.widgets("operator")))
        if unknown:
            raise TypeError(f"unknown loader inputs {unknown}")
        loras = (checked_lora(lora_path, lora_strength),) if lora_path.strip() else ()
        target = torch_device() if device == "auto" else torch.device(device)
        folder = _model_folder(model, model_path)
        free_memory(_weights_size(folder), target)
        pipeline = OmniGenPipeline.from_pretrained(
            folder, device=target, dtype=None if dtype == STORED else dtype, vae_path=vae_path.strip() or None
        )
        try:
            pipeline.defaults.replace(**settings)  # refuse bad settings at load time
        except (TypeError, ValueError) as error:
            raise fields.in_node_terms(error) from error
        return (LoadedOmniGen(pipeline, settings, loras),)


STRENGTH = (
    "FLOAT",
    {"default": 1.0, "min": -lora.MAX_SCALE, "max": lora.MAX_SCALE, "step": 0.01, "tooltip": "LoRA scale"},
)


def checked_lora(path: str, strength: float) -> tuple[str, float]:
    """(folder, strength) of a LoRA input, refused at once if the folder is not an adapter."""
    folder = Path(path.strip())
    lora.read_adapter(folder)  # a clear ValueError for a wrong folder, before any generation
    return str(folder), lora.check_scale(strength, "strength")


class OmniGenLoraLoader:
    """Add a LoRA adapter to the pipe (chain several to stack them); the upstream pipe is unchanged."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "pipe": (PIPE_TYPE,),
                "lora_path": ("STRING", {"default": "", "tooltip": "a LoRA adapter folder (peft format)"}),
                "strength": STRENGTH,
            }
        }

    RETURN_TYPES = (PIPE_TYPE,)
    RETURN_NAMES = ("pipe",)
    FUNCTION = "add_lora"
    CATEGORY = CATEGORY

    def add_lora(self, pipe: LoadedOmniGen, lora_path: str, strength: float) -> tuple[LoadedOmniGen]:
        if not isinstance(pipe, LoadedOmniGen):
            raise TypeError(f"pipe must come from the OmniGen loader node, got {type(pipe).__name__}")
        if not lora_path.strip():
            raise ValueError("lora_path is empty: give a LoRA adapter folder")
        return (replace(pipe, loras=(*pipe.loras, checked_lora(lora_path, strength))),)


def _model_folder(model: str, model_path: str) -> Path | None:
    """The folder (or hub id) to load: ``model_path`` when set, else the chosen model (None: shipped)."""
    if model_path.strip():
        return Path(model_path.strip())
    if model == SHIPPED_MODEL:
        return None
    folders = model_folders()
    if model not in folders:
        raise ValueError(f"model {model!r} is not one of {[SHIPPED_MODEL, *folders]}")
    return folders[model]


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
    """Text-to-image, or editing / composition with up to three input images and an optional mask.

    Its settings are GenerationConfig's request fields (``fields``); left at their defaults they are the
    loaded model's own."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        images = {
            f"image_{k}": ("IMAGE", {"tooltip": f"<img><|image_{k}|></img> in the prompt"})
            for k in range(1, MAX_INPUT_IMAGES + 1)
        }
        settings = fields.widgets("request")
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
                "seed": settings.pop("seed"),
            },
            "optional": {
                **settings,
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
        seed: int,
        image_1: torch.Tensor | None = None,
        image_2: torch.Tensor | None = None,
        image_3: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        **settings: Any,
    ) -> tuple[torch.Tensor]:
        if not isinstance(pipe, LoadedOmniGen):
            raise TypeError(f"pipe must come from the OmniGen loader node, got {type(pipe).__name__}")
        unknown = sorted(set(settings) - set(fields.widgets("request")))
        if unknown:
            raise TypeError(f"unknown inputs {unknown}")
        images = collect_images([image_1, image_2, image_3])
        arguments = {**fields.to_arguments({**settings, "seed": seed}, "request"), **pipe.operator}
        try:
            chosen = pipe.pipeline.defaults.replace(**arguments)
        except (TypeError, ValueError) as error:
            raise fields.in_node_terms(error) from error
        progress = Progress(len(step_kinds(chosen.sampler, chosen.num_inference_steps)))
        lora.apply_loras(pipe.pipeline.model, pipe.loras)  # this branch's adapters, exactly

        def on_step_end(_pipeline: Any, index: int, _t: float, _latents: torch.Tensor) -> None:
            progress.done(index + 1)  # once per solver step
            check_interrupt()

        try:
            pixels = pipe.pipeline(
                prompt,
                input_images=images or None,
                mask=None if mask is None else mask_to_pil(mask),
                callback_on_step_end=on_step_end,
                output_type="pt",
                **arguments,
            )
        except (TypeError, ValueError) as error:
            raise fields.in_node_terms(error) from error
        return (pixels_to_image(pixels),)


NODE_CLASS_MAPPINGS = {
    "OmniGenLoader": OmniGenLoader,
    "OmniGenLoraLoader": OmniGenLoraLoader,
    "OmniGenGenerate": OmniGenGenerate,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "OmniGenLoader": "OmniGen Loader",
    "OmniGenLoraLoader": "OmniGen LoRA",
    "OmniGenGenerate": "OmniGen Generate",
}
