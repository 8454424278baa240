"""OpenAI's Images API on the service: ``POST /v1/images/generations``, ``POST /v1/images/edits``,
``GET /v1/models`` (+ ``/v1/models/{id}``), as an APIRouter that ``app`` mounts.

The request is ``GenerationRequest`` (every request field of ``GenerationConfig`` as an extension: an OpenAI
client sends them with ``extra_body=``) plus OpenAI's own fields (``ImagesRequest``); ``resolve`` maps
OpenAI's spellings onto ours: ``n`` is ``num_images_per_prompt``, ``size`` "WxH" (width first) is
``width``/``height``. ``quality``, ``style``, ``user``, ``moderation`` and ``safety_identifier`` are accepted
and ignored; ``output_format`` can only be "png"; ``stream`` and ``response_format="url"`` are refused
with a 400 (the service keeps no images to link to). The answer is OpenAI's ``{"created", "data":
[{"b64_json", "revised_prompt"?}]}`` with our details (seed, width, height) as extra fields, or with
``response_format="png"`` the PNG itself (one image, header X-Seed). An edit's images are the multipart
file parts ``image`` (the openai client sends a list as ``image[]``), referenced as ``<|image_k|>`` in
order; a prompt without image tags gets them prepended, since OpenAI clients never write tags. Every
route shares the queue, limits and API key of ``app`` and the generation path of ``jobs``.
"""

from __future__ import annotations

import base64
import inspect
import json
import re
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from PIL import ImageOps
from pydantic import BaseModel, Field, create_model

from omnigen.serve.decode import DecodePool, decode_image, image_cost
from omnigen.serve.errors import ApiError, ErrorResponse
from omnigen.serve.inputs import GenerationRequest, ParsedRequest, parse_request, pipeline_kwargs
from omnigen.serve.jobs import ClientGone, run_job
from omnigen.serve.settings import ServeSettings
from omnigen.serve.worker import GeneratedImage
from omnigen.text.tags import BARE_TAG_PATTERN, image_tag

GENERATIONS_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"
EDIT_IMAGE_FIELDS = ("image", "image[]")
SIZE_PATTERN = re.compile(r"(\d+)x(\d+)")
_IGNORED = "accepted for OpenAI compatibility and ignored"

ImagesRequest = create_model(
    "ImagesRequest",
    __base__=GenerationRequest,
    n=(int | None, Field(None, ge=1, description="images per prompt (OpenAI's num_images_per_prompt)")),
    size=(
        str | None,
        Field(
            None,
            description="'WxH' in pixels, width first; 'auto' or unset: the model's size (generations), the "
            "input image's (edits with one image)",
        ),
    ),
    output_format=(Literal["png"] | None, Field(None, description="png only")),
    stream=(bool | None, Field(None, description="false only (no streaming)")),
    **{name: (str | None, Field(None, description=_IGNORED)) for name in ("quality", "style", "user")},
    **{name: (str | None, Field(None, description=_IGNORED)) for name in ("moderation", "safety_identifier")},
)


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None  # an edit's prompt with the image tags it was given
    seed: int
    width: int
    height: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    model: str
    output_format: str = "png"
    size: str


router = APIRouter()


# ------------------------------------------------------------------------------------------ requests


def parse_size(size: str) -> tuple[int, int]:
    """'WxH' -> (width, height)."""
    match = SIZE_PATTERN.fullmatch(size.strip().lower())
    if match is None:
        message = f"size {size!r} is not 'WxH' (width x height in pixels, e.g. '1024x768') or 'auto'"
        raise ApiError(400, "invalid_value", message, field="size")
    return int(match.group(1)), int(match.group(2))


def _merge(update: dict[str, Any], req: Any, name: str, value: int, openai_name: str) -> None:
    given = getattr(req, name)
    if given is not None and given != value:
        message = f"{openai_name} gives {name}={value} but {name}={given} is given too; send one of them"
        raise ApiError(400, "invalid_value", message, field=openai_name)
    update[name] = value


def resolve(req: Any, *, edit: bool, images: int) -> Any:
    """The request with OpenAI's fields mapped onto ours; what we cannot answer is refused."""
    if req.response_format == "url":
        message = (
            "response_format 'url' is not supported: the service keeps no images to link to; "
            "use 'b64_json' (the default) or 'png'"
        )
        raise ApiError(400, "unsupported_value", message, field="response_format")
    if req.stream:
        raise ApiError(400, "unsupported_value", "stream=true is not supported", field="stream")
    update: dict[str, Any] = {}
    if req.n is not None:
        _merge(update, req, "num_images_per_prompt", req.n, "n")
    if req.size is not None and req.size.strip().lower() != "auto":
        width, height = parse_size(req.size)
        _merge(update, req, "width", width, "size")
        _merge(update, req, "height", height, "size")
    elif edit and images == 1 and req.height is None and req.width is None:
        if req.use_input_image_size_as_output is None:
            update["use_input_image_size_as_output"] = True
    if edit:
        update["prompt"] = tagged_prompt(req.prompt, images)
    return req.model_copy(update=update)


def tagged_prompt(prompt: str, count: int) -> str:
    """``prompt`` with ``<img><|image_1|></img> ... <img><|image_n|></img> `` in front when it has no tag
    (an empty prompt stays empty: it is refused, as everywhere)."""
    if count == 0 or not prompt.strip() or BARE_TAG_PATTERN.search(prompt):
        return prompt
    return " ".join(image_tag(k) for k in range(1, count + 1)) + " " + prompt


def request_mask(data: bytes | None, edit: bool, pipe: Any, settings: ServeSettings) -> Any:
    """The request's ``mask`` as the pipeline's (white = regenerate): on edits OpenAI's (fully transparent =
    edit there), on generations ours (white = regenerate, black = keep; read by ``omnigen.sampling.inpaint``)."""
    if data is None:
        return None
    if "mask" not in inspect.signature(pipe).parameters:
        message = "mask not supported: this pipeline has no masked editing; send the request without 'mask'"
        raise ApiError(400, "unsupported_parameter", message, field="mask")
    image = decode_image(data, "mask", settings, mode=None)
    if not edit:
        return image
    if "A" not in image.getbands() and "transparency" not in image.info:
        message = "mask has no alpha channel: its transparent pixels mark where to edit; send an RGBA PNG"
        raise ApiError(400, "invalid_image", message, field="mask")
    return ImageOps.invert(image.convert("RGBA").getchannel("A"))


def _checked_kwargs(
    req: Any, images: list, mask: Any, pipe: Any, settings: ServeSettings, edit: bool
) -> dict[str, Any]:
    """``inputs.pipeline_kwargs``, its errors naming the OpenAI field the client sent."""
    try:
        return pipeline_kwargs(req, images, pipe, settings, mask)
    except ApiError as err:
        renamed = {"images": "image"} if edit else {}
        if req.n is not None:
            renamed["num_images_per_prompt"] = "n"
        if req.size is not None:
            renamed.update(height="size", width="size")
        err.detail.param = renamed.get(err.detail.param, err.detail.param)
        raise


def respond(results: list[GeneratedImage], req: Any, model: str, revised_prompt: str | None) -> Response:
    if req.response_format == "png":
        (image,) = results
        return Response(image.png, media_type="image/png", headers={"X-Seed": str(image.seed)})
    data = [
        ImageData(
            b64_json=base64.b64encode(r.png).decode("ascii"),
            revised_prompt=revised_prompt,
            seed=r.seed,
            width=r.width,
            height=r.height,
        )
        for r in results
    ]
    size = f"{results[0].width}x{results[0].height}"
    body = ImagesResponse(created=int(time.time()), data=data, model=model, size=size)
    return JSONResponse(body.model_dump(exclude_none=True))


def prepare(parsed: ParsedRequest, pipe: Any, settings: ServeSettings, edit: bool) -> tuple[Any, dict]:
    """(the resolved request, the pipeline's keyword arguments): decodes the images and the mask and checks
    everything. Blocking (decoding, mask preparation): runs in the ``DecodePool``."""
    images = [decode_image(data, name, settings) for name, data in parsed.blobs]
    req = resolve(parsed.req, edit=edit, images=len(images))
    mask = request_mask(parsed.files.get("mask"), edit, pipe, settings)
    return req, _checked_kwargs(req, images, mask, pipe, settings, edit)


async def _images(request: Request, edit: bool) -> Response:
    settings: ServeSettings = request.app.state.settings
    pool: DecodePool = request.app.state.decode_pool
    deadline = time.monotonic() + settings.timeout_s
    fields = EDIT_IMAGE_FIELDS if edit else ("images",)
    parsed = await parse_request(request, settings, ImagesRequest, fields, ("mask",))
    if edit and not parsed.blobs:
        raise ApiError(400, "missing_required_parameter", "an edit needs at least one 'image'", field="image")
    uploads = parsed.blobs + [("mask", data) for data in parsed.files.values()]
    pixels, nbytes = await pool.run(image_cost, uploads, settings)  # headers only: the budget's count
    async with pool.budget(pixels, nbytes, deadline):
        req, kwargs = await pool.run(prepare, parsed, request.app.state.pipeline, settings, edit)
    try:
        results = await run_job(request, kwargs, deadline)
    except ClientGone:
        return Response(status_code=499)
    revised = req.prompt if req.prompt != parsed.req.prompt else None
    return respond(results, req, settings.model_name, revised)


# ------------------------------------------------------------------------------------------ OpenAPI


def _form_schema(title: str, images: dict[str, Any], edit: bool) -> dict[str, Any]:
    schema = json.loads(json.dumps(ImagesRequest.model_json_schema()))
    schema["title"] = title
    del schema["properties"]["images"]
    schema["properties"].update(images)
    what = "RGBA PNG, transparent = edit (OpenAI's convention)" if edit else "PNG, white = regenerate"
    schema["properties"]["mask"] = {"type": "string", "format": "binary", "description": what}
    return schema


def _body(edit: bool) -> dict[str, Any]:
    binary = {"type": "string", "format": "binary"}
    if edit:
        images = {"image": {"anyOf": [binary, {"type": "array", "items": binary}]}}
        return {
            "required": True,
            "content": {"multipart/form-data": {"schema": _form_schema("EditForm", images, True)}},
        }
    forms = _form_schema("GenerationForm", {"images": {"type": "array", "items": binary}}, False)
    content = {
        "application/json": {"schema": ImagesRequest.model_json_schema()},
        "multipart/form-data": {"schema": forms},
    }
    return {"required": True, "content": content}


def _responses() -> dict[int | str, dict[str, Any]]:
    error = {"model": ErrorResponse}
    return {
        200: {
            "model": ImagesResponse,
            "description": "JSON with base64 PNGs (response_format b64_json) or a PNG (png, header X-Seed)",
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        },
        400: {**error, "description": "invalid request or a limit exceeded (error.limit names it)"},
        401: {**error, "description": "missing or wrong API key"},
        404: {**error, "description": "model is not the served model"},
        408: {**error, "description": "the request body stalled (limit body_timeout_s)"},
        413: {**error, "description": "upload too large (limit max_upload_bytes)"},
        415: {**error, "description": "not JSON or multipart"},
        429: {**error, "description": "queue full; retry after the Retry-After header's seconds"},
        500: {**error, "description": "the generation failed"},
        503: {**error, "description": "shutting down (error.code shutting_down) or the job was cancelled"},
        504: {**error, "description": "no result within timeout_s"},
    }


# ------------------------------------------------------------------------------------------ routes


@router.post(
    GENERATIONS_PATH,
    summary="generate images from a prompt (and, as our extension, input images)",
    response_model=None,
    responses=_responses(),
    openapi_extra={"requestBody": _body(edit=False)},
)
async def generations(request: Request) -> Response:
    return await _images(request, edit=False)


@router.post(
    EDITS_PATH,
    summary="edit one or more images by a prompt (multipart: image or image[], prompt, optional mask)",
    response_model=None,
    responses=_responses(),
    openapi_extra={"requestBody": _body(edit=True)},
)
async def edits(request: Request) -> Response:
    return await _images(request, edit=True)


def model_card(request: Request) -> dict[str, Any]:
    """OpenAI's model object, with the served model's defaults and the request limits as extra fields."""
    pipe, settings = request.app.state.pipeline, request.app.state.settings
    return {
        "id": settings.model_name,
        "object": "model",
        "created": request.app.state.created,
        "owned_by": "omnigen",
        "defaults": pipe.defaults.to_dict(),
        "image_multiple": pipe.model.config.image_multiple,
        "max_image_size": pipe.model.config.max_image_size,
        "limits": settings.limits(),
    }


MODEL_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "no such model"},
}


@router.get(
    "/v1/models",
    summary="the served model (OpenAI's list shape), its defaults and the limits",
    responses={401: MODEL_ERRORS[401]},
)
async def models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(request)]}


@router.get("/v1/models/{model_id:path}", summary="the served model by its id", responses=MODEL_ERRORS)
async def model(request: Request, model_id: str) -> dict[str, Any]:
    card = model_card(request)
    if model_id != card["id"]:
        message = f"model {model_id!r} is not served; use {card['id']!r}"
        raise ApiError(404, "model_not_found", message, field="model")
    return card
