"""The nodes' setting widgets, derived from ``omnigen.generation.GenerationConfig`` (never a list of our own).

Every "request" field of GenerationConfig is a widget of "OmniGen Generate", every "operator" field one
of "OmniGen Loader" (in ComfyUI the user is also the one who runs the process). ComfyUI reads
``INPUT_TYPES`` before any model is loaded, and a widget always sends a value; so each widget has a value
that means "the loaded model's default" (its ``omnigen_generation.json``), and that is the widget's
default. A fresh node therefore generates with the model's own settings: 16 x 16 pixels on the shipped
miniature model, where GenerationConfig's 1024 x 1024 is refused.

- a number: the largest whole number below GenerationConfig's lowest allowed value (0 for sizes, steps
  and the time shift, -1 for the guidance scales and denoise; whole, as ComfyUI's UI rounds a float
  widget to its step's decimals: -0.999 would become -1.0); ``seed`` and the batch size are always
  sent (ComfyUI's seed widget, a batch of 1);
- a choice: ``MODEL_DEFAULT``; a string: empty;
- a switch: GenerationConfig's default (a switch has no third state).

The settings are optional inputs: a workflow in ComfyUI's API format may leave any of them out (the
model's default). The allowed ranges are GenerationConfig's, checked by the pipeline; ``UI_RANGES`` holds
only the widgets' upper ends and steps, which ComfyUI needs and GenerationConfig does not set.
"""

from __future__ import annotations

import math
import re
from typing import Any

from omnigen import generation

MODEL_DEFAULT = "model default"
MAX_SEED = 2**63 - 1  # image k of a batch uses seed + k; torch seeds go up to 2**64 - 1
# ComfyUI's own names for four fields (what its other nodes call them); every other input is the field.
INPUT_NAMES = {
    "num_inference_steps": "steps",
    "num_images_per_prompt": "batch_size",
    "use_input_image_size_as_output": "use_input_image_size",
    "strength": "denoise",
}
ALWAYS_SENT = {"seed": 0, "num_images_per_prompt": 1}  # -> the widget's default
# (upper end, step) of each number widget; the lower end comes from GenerationConfig.
UI_RANGES: dict[str, tuple[float, float]] = {
    "height": (4096, 16),
    "width": (4096, 16),
    "max_input_image_size": (4096, 16),
    "num_inference_steps": (1000, 1),
    "guidance_scale": (30.0, 0.1),
    "img_guidance_scale": (30.0, 0.1),
    "seed": (MAX_SEED, 1),
    "num_images_per_prompt": (64, 1),
    "time_shift": (20.0, 0.05),
    "mask_blur": (256, 1),
    "step_cache_threshold": (1.0, 0.01),
    "guidance_start": (1.0, 0.01),
    "guidance_end": (1.0, 0.01),
    "strength": (1.0, 0.01),
}
# What the pipeline's messages call the node's inputs.
ARGUMENT_NAMES = {**INPUT_NAMES, "input_images": "image_1..image_3"}


def input_name(field: str) -> str:
    return INPUT_NAMES.get(field, field)


def model_default_value(field: str) -> Any:
    """The widget value that stands for "the loaded model's default" (None: the field has none)."""
    param = generation.param(field)
    if field in ALWAYS_SENT or param.kind == "bool":
        return None
    if param.kind in ("int", "float"):
        return param.python_type(math.ceil(param.low or 0) - 1)
    return MODEL_DEFAULT if param.kind == "choice" else ""


def widget(field: str) -> tuple:
    """The ComfyUI input spec ``(type, options)`` of one GenerationConfig field."""
    param = generation.param(field)
    sentinel = model_default_value(field)
    tooltip = param.help if sentinel is None else f"{param.help}; {sentinel!r}: the model's default"
    if param.kind == "bool":
        return ("BOOLEAN", {"default": generation.default(field), "tooltip": tooltip})
    if param.kind == "choice":
        return ([MODEL_DEFAULT, *param.choices], {"default": MODEL_DEFAULT, "tooltip": tooltip})
    if param.kind == "str":
        return ("STRING", {"default": "", "multiline": True, "tooltip": tooltip})
    if param.kind not in ("int", "float") or field not in UI_RANGES:
        raise TypeError(f"GenerationConfig field {field!r} ({param.kind}) has no ComfyUI widget: add one")
    high, step = UI_RANGES[field]
    low = param.low if sentinel is None else sentinel
    options = {"default": ALWAYS_SENT.get(field, sentinel), "min": low, "max": high, "step": step}
    if field == "seed":
        options["control_after_generate"] = True
    return ("INT" if param.kind == "int" else "FLOAT", {**options, "tooltip": tooltip})


def widgets(scope: str) -> dict[str, tuple]:
    """The input specs of every field of ``scope`` ("request" or "operator"), by input name."""
    return {input_name(field): widget(field) for field in generation.names(scope)}


def to_arguments(values: dict[str, Any], scope: str) -> dict[str, Any]:
    """Node input values -> the pipeline's keyword arguments (a model-default value becomes None)."""
    arguments = {}
    for field in generation.names(scope):
        value = values.get(input_name(field))
        if value is None or value == model_default_value(field):
            continue
        arguments[field] = value
    return arguments


def in_node_terms(error: Exception) -> Exception:
    """The same error, its message naming the node's inputs instead of the pipeline's arguments."""
    message = str(error)
    for argument, name in ARGUMENT_NAMES.items():
        message = re.sub(rf"\b{argument}\b", name, message)
    return type(error)(message)
