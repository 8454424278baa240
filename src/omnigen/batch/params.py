"""A batch request's generation parameters resolved against the pipeline (``omnigen.plan``, as every
front end resolves a call): its defaults filled in, the output size known, the call's checks (empty
prompt, model sizes, the mask) passed and the condition-token budget checked. Opens input images'
headers only (a mask's canvas is prepared); generates and writes nothing (``runner``)."""

from __future__ import annotations

from typing import Any

from omnigen.batch.requests import PARAMETERS, Request


def resolve_params(pipe: Any, request: Request, max_condition_tokens: int | None = None) -> dict[str, Any]:
    """Every generation parameter of `request` with the pipeline's defaults filled in; height and width
    are the size of the image that will come out (the mask's canvas with a mask: the size joins the
    parameter group's key). Raises ValueError for values the model cannot take and for a condition
    (prompt + input images) of more than ``max_condition_tokens`` tokens."""
    call = pipe.plan(
        request.prompt, list(request.input_images), request.mask, seed=request.seed, **request.params
    )
    params: dict[str, Any] = {name: getattr(call.config, name) for name in PARAMETERS}
    (params["height"], params["width"]), (tokens,) = call.sizes[0], call.budget_tokens
    if max_condition_tokens is not None and tokens > max_condition_tokens:
        raise ValueError(
            f"the prompt and its {len(request.input_images)} input image(s) at "
            f"max_input_image_size={call.config.max_input_image_size}"
            f"{' and the negative prompt' if call.negative_tokens else ''} make {tokens} condition tokens; "
            f"the budget max_condition_tokens is {max_condition_tokens}"
        )
    return params
