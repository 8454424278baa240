"""A batch request's generation parameters resolved against the pipeline: its defaults filled in, the
output size known, the model's constraints and the condition-token budget checked. Opens input images'
headers only; generates and writes nothing (``runner``)."""

from __future__ import annotations

from typing import Any

from PIL import Image

from omnigen.batch.requests import PARAMETERS, Request
from omnigen.sampling.inpaint import check_output_size, prepare_canvas_mask
from omnigen.text.processor import IMAGE_FORMATS, load_image, resize_and_crop


def resolve_params(pipe: Any, request: Request, max_condition_tokens: int | None = None) -> dict[str, Any]:
    """Every generation parameter of `request` with the pipeline's defaults filled in; height and width
    are the size of the image that will come out. Raises ValueError for values the model cannot take
    and for a condition (prompt + input images) of more than ``max_condition_tokens`` tokens."""
    cfg = pipe.defaults.replace(**request.params)
    params: dict[str, Any] = {name: getattr(cfg, name) for name in PARAMETERS}
    config = pipe.model.config
    pipe.processor.check_max_input_image_size(params["max_input_image_size"])
    if max_condition_tokens is not None:
        check_condition_tokens(pipe, request, cfg.max_input_image_size, max_condition_tokens)
    if params.get("use_input_image_size_as_output"):
        if len(request.input_images) != 1:
            raise ValueError("use_input_image_size_as_output needs exactly one input image")
        image = load_image(request.input_images[0])
        width, height = resize_and_crop(image, params["max_input_image_size"], config.image_multiple).size
        params["height"], params["width"] = height, width
    else:
        config.check_image_size(params["height"], params["width"], "output")
    if request.mask is not None:  # the output is the canvas: its size joins the parameter group's key
        canvas = prepare_canvas_mask(
            request.mask,
            request.input_images[0],
            cfg.mask_blur,
            cfg.max_input_image_size,
            config.image_multiple,
        )
        if not cfg.use_input_image_size_as_output:
            check_output_size([canvas], request.params.get("height"), request.params.get("width"))
        params["height"], params["width"] = canvas.size
    return params


def check_condition_tokens(pipe: Any, request: Request, max_input_image_size: int, budget: int) -> None:
    sizes = []
    for path in request.input_images:
        with Image.open(path, formats=IMAGE_FORMATS) as image:  # the header only
            sizes.append(image.size)
    tokens = pipe.condition_tokens(request.prompt, sizes, max_input_image_size)
    negative = request.params.get("negative_prompt")  # the line's own counts too (the model's is short)
    if negative:
        tokens += pipe.condition_tokens(negative, [], max_input_image_size)
    if tokens > budget:
        also = " and the negative prompt" if negative else ""
        raise ValueError(
            f"the prompt and its {len(sizes)} input image(s) at max_input_image_size={max_input_image_size}"
            f"{also} make {tokens} condition tokens; the budget max_condition_tokens is {budget}"
        )
