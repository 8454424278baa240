"""Request side of the HTTP service: our request schema and the parsing of a request's body.

This module owns ``GenerationRequest`` (the request-scope fields of ``GenerationConfig`` plus the request's
own), the body formats (JSON with base64 images; multipart or url-encoded forms with image uploads under
the route's image field names, and named extra file fields such as ``mask``) and the request limits of
``ServeSettings``. ``parse_request`` + ``pipeline_kwargs`` (the call itself through ``omnigen.plan``) check a request completely, so that a bad one
never takes a queue slot. OpenAI's spellings of the fields are ``openai``'s; no routes here.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Request
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from omnigen import generation
from omnigen.serve import adapters
from omnigen.serve.decode import decode_base64, too_large
from omnigen.serve.errors import ApiError
from omnigen.serve.settings import ServeSettings
from omnigen.util.strict_json import check_text, parse_json

MAX_SEED = 2**53  # exact in JSON numbers


def _request_field(name: str) -> tuple[Any, Any]:
    """The pydantic type and Field of one request-scope field of GenerationConfig (unset: the model's)."""
    param = generation.param(name)
    limits: dict[str, Any] = {}
    if param.low is not None:
        limits["gt" if param.low_open else "ge"] = param.low
    if param.high is not None:
        limits["le"] = param.high
    if name == "seed":
        limits["le"] = MAX_SEED
    if param.kind == "float":
        limits["allow_inf_nan"] = False
    kind = Literal[param.choices] if param.choices else param.python_type  # type: ignore[valid-type]
    return kind | None, Field(
        None, description=f"{param.help} ({param.describe()}; unset: the model's)", **limits
    )


# Our request body: the request-scope fields of GenerationConfig, plus the request's own. The operator-scope
# fields (memory modes) are flags of ``omnigen serve``, never a request's. ``openai`` adds OpenAI's names.
GenerationRequest = create_model(
    "GenerationRequest",
    __config__=ConfigDict(extra="forbid"),
    prompt=(str, Field(description="instruction; input image k is referenced as <img><|image_k|></img>")),
    images=(
        list[str],
        Field(
            default_factory=list, description="JSON: base64 images (data URLs allowed); multipart: file parts"
        ),
    ),
    mask=(
        str | None,
        Field(
            None,
            description="base64 PNG (data URL allowed): regenerate the first input image where it is white, "
            "keep it exactly where black (on /v1/images/edits: OpenAI's convention, transparent = edit; "
            "multipart: a file part)",
        ),
    ),
    model=(str | None, Field(None, description="must name the served model when given")),
    response_format=(
        Literal["b64_json", "png", "url"],
        Field(
            "b64_json",
            description="b64_json: JSON with base64 PNGs (OpenAI's shape); png: the image itself (one image "
            "only, header X-Seed); url: refused (the service keeps no images to link to)",
        ),
    ),
    **{name: _request_field(name) for name in generation.names("request")},
    **adapters.REQUEST_FIELDS,
)


@dataclass
class ParsedRequest:
    req: BaseModel  # GenerationRequest or a subclass of it
    blobs: list[tuple[str, bytes]]  # (name for errors, bytes) of each input image, in order, not decoded
    files: dict[str, bytes] = field(default_factory=dict)  # the extra file fields (raw bytes)


async def read_body(request: Request, max_bytes: int, chunk_timeout_s: float) -> bytes:
    """The body, refusing (413) more than ``max_bytes`` without reading it all, and (408) a client that
    sends no chunk for ``chunk_timeout_s`` seconds."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise too_large(f"request body of {declared} bytes exceeds {max_bytes} bytes")
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), chunk_timeout_s)
        except StopAsyncIteration:
            break
        except TimeoutError:
            message = f"the request body stalled: no data for {chunk_timeout_s:g} s (limit body_timeout_s)"
            raise ApiError(408, "timeout", message, limit="body_timeout_s") from None
        size += len(chunk)
        if size > max_bytes:
            raise too_large(f"request body exceeds {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _validation_error(err: ValidationError, schema: type[BaseModel]) -> ApiError:
    problems, first, code = [], None, "invalid_value"
    for item in err.errors():
        where = ".".join(str(part) for part in item["loc"]) or "body"
        first = first or where
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(schema.model_fields)
            problems.append(f"unknown field {where!r} (allowed: {allowed})")
            code = "unknown_parameter"
        else:
            problems.append(f"{where}: {item['msg']}")
    return ApiError(400, code, "; ".join(problems), field=first)


def _check_image_count(count: int, settings: ServeSettings, field: str) -> None:
    if count > settings.max_images:
        message = f"{count} input images given; at most {settings.max_images} allowed (limit max_images)"
        raise ApiError(400, "limit_exceeded", message, limit="max_images", field=field)


async def parse_request(
    request: Request,
    settings: ServeSettings,
    schema: type[BaseModel] = GenerationRequest,
    image_fields: tuple[str, ...] = ("images",),
    file_fields: tuple[str, ...] = (),
) -> ParsedRequest:
    """JSON or multipart body -> validated request + decoded input images + the raw extra files (all
    limits but queueing). In a form, the images are the file parts named one of ``image_fields``; in JSON,
    the base64 strings of ``images``."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    per_image = math.ceil(settings.max_upload_bytes * 4 / 3) + 1024
    body = await read_body(
        request,
        (settings.max_images + 1) * per_image + settings.max_prompt_chars * 4 + 65536,
        settings.body_timeout_s,
    )
    if media_type == "application/json":
        try:
            data = parse_json(body)
        except ValueError as err:
            raise ApiError(400, "invalid_json", f"the body is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_json", "the body must be a JSON object")
        if isinstance(data.get("images"), list):
            _check_image_count(len(data["images"]), settings, "images")
        req = _validate(data, schema)
        blobs = [
            (f"images[{k}]", decode_base64(text, f"images[{k}]", settings))
            for k, text in enumerate(req.images)
        ]
        files: dict[str, bytes] = {}
    elif media_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = _FormFields(schema, image_fields, file_fields)
        req, blobs, files = await form.parse(request, body, settings, per_image)
    else:
        message = (
            f"unsupported content type {media_type or 'none'!r}: send application/json or multipart/form-data"
        )
        raise ApiError(415, "unsupported_media_type", message)
    if getattr(req, "mask", None) is not None:
        if "mask" in files:
            raise ApiError(400, "invalid_value", "field 'mask' given twice", field="mask")
        files["mask"] = decode_base64(req.mask, "mask", settings)
    return ParsedRequest(req, blobs, files)


@dataclass(frozen=True)
class _FormFields:
    """How one route reads a form: its schema, the names its images come under, its extra file fields."""

    schema: type[BaseModel]
    image_fields: tuple[str, ...]
    file_fields: tuple[str, ...]

    async def parse(
        self, request: Request, body: bytes, settings: ServeSettings, per_image: int
    ) -> tuple[BaseModel, list[tuple[str, bytes]], dict[str, bytes]]:
        request._body = body  # the bounded read above; Starlette's form parser streams from it
        limits = {"max_files": settings.max_images + 8, "max_fields": 64, "max_part_size": per_image}
        try:
            form = await request.form(**limits)
        except StarletteHTTPException as err:
            raise ApiError(400, "invalid_multipart", str(err.detail)) from err
        fields: dict[str, Any] = {}
        images: list[tuple[str, UploadFile | str]] = []
        files: dict[str, UploadFile] = {}
        for key, value in form.multi_items():
            if key in self.image_fields:
                images.append((key, value))
            elif key in fields or key in files:
                raise ApiError(400, "invalid_value", f"field {key!r} given twice", field=key)
            elif isinstance(value, UploadFile) and key in self.file_fields:
                files[key] = value
            elif isinstance(value, UploadFile):
                names = " or ".join(repr(name) for name in self.image_fields)
                message = f"unexpected file field {key!r}; upload images as {names}"
                raise ApiError(400, "unknown_parameter", message, field=key)
            else:
                fields[key] = self._form_value(key, value)
        fields = {key: value for key, value in fields.items() if value is not None}
        _check_image_count(len(images), settings, self.image_fields[0])
        req = _validate(fields, self.schema)
        blobs = [(name, await self._read(item, name, settings)) for name, item in _numbered(images)]
        extra = {key: await self._read(item, key, settings) for key, item in files.items()}
        await form.close()
        return req, blobs, extra

    def _form_value(self, key: str, value: str) -> str | None:
        """A form field's text; "" or "null" for a field that may be null is None (its default)."""
        try:
            check_text(value, f"field {key!r}")
        except ValueError as err:
            raise ApiError(400, "invalid_value", str(err), field=key) from err
        spec = self.schema.model_fields.get(key)
        nullable = spec is not None and spec.default is None and not spec.is_required()
        return None if nullable and value.strip().lower() in ("", "null") else value

    @staticmethod
    async def _read(item: UploadFile | str, name: str, settings: ServeSettings) -> bytes:
        if isinstance(item, UploadFile):
            return await item.read(settings.max_upload_bytes + 1)
        return decode_base64(item, name, settings)


def _numbered(images: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """('image[]', upload) parts -> ('image[0] (in.png)', upload): the names errors use."""
    named = []
    for k, (key, item) in enumerate(images):
        name = f"{key.removesuffix('[]')}[{k}]"
        filename = getattr(item, "filename", None)
        named.append((f"{name} ({filename})" if filename else name, item))
    return named


def _validate(data: dict[str, Any], schema: type[BaseModel]) -> BaseModel:
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise _validation_error(err, schema) from err


def check_prompt_chars(req: Any, settings: ServeSettings) -> None:
    """The prompt and the request's negative prompt within max_prompt_chars together."""
    negative = req.negative_prompt or ""
    if len(req.prompt) + len(negative) > settings.max_prompt_chars:
        message = (
            f"prompt and negative_prompt have {len(req.prompt) + len(negative)} characters together; limit "
            f"max_prompt_chars is {settings.max_prompt_chars}"
        )
        where = "negative_prompt" if len(negative) > len(req.prompt) else "prompt"
        raise ApiError(400, "limit_exceeded", message, limit="max_prompt_chars", field=where)


def pipeline_kwargs(
    req: Any, images: list[Image.Image], pipe: Any, settings: ServeSettings, mask: Any = None
) -> dict[str, Any]:
    """Keyword arguments of OmniGenPipeline.__call__ for a ``GenerationRequest`` (or a subclass: only
    GenerationConfig's fields are passed on) and its ``mask`` (the pipeline's, white = regenerate; None:
    none), after every limit and the call's own checks (``omnigen.plan``: the empty prompt, image tags,
    output sizes, the mask, the exact condition tokens), so a bad request never takes a queue slot."""
    check_prompt_chars(req, settings)
    if req.model is not None and req.model != settings.model_name:
        raise ApiError(
            404,
            "model_not_found",
            f"model {req.model!r} is not served; use {settings.model_name!r}",
            field="model",
        )
    overrides = req.model_dump(include=set(generation.names("request")), exclude_none=True)
    try:
        cfg = pipe.defaults.replace(**overrides)
    except (ValueError, TypeError) as err:
        where = next((name for name in overrides if name in str(err)), None)
        raise ApiError(400, "invalid_value", str(err), field=where) from err
    _check_limits(cfg, req, settings)
    try:
        call = pipe.plan(req.prompt, images or None, mask, **overrides)
    except (ValueError, TypeError) as err:
        raise ApiError(400, "invalid_value", str(err), field=getattr(err, "field", None)) from err
    pixels = max(height * width for height, width in call.sizes)
    if pixels > settings.max_pixels:
        message = f"output of {pixels} pixels exceeds the limit max_pixels={settings.max_pixels}"
        raise ApiError(400, "limit_exceeded", message, limit="max_pixels", field="height")
    (tokens,) = call.budget_tokens
    if tokens > settings.max_condition_tokens:
        message = (
            f"the prompt and its {len(images)} input image(s) at max_input_image_size={cfg.max_input_image_size}"
            f"{' and the negative prompt' if call.negative_tokens else ''} make {tokens} condition tokens; limit max_condition_tokens is {settings.max_condition_tokens} "
            "(use smaller or fewer images, or a lower max_input_image_size)"
        )
        raise ApiError(400, "limit_exceeded", message, limit="max_condition_tokens", field="images")
    extra = {} if mask is None else {"mask": mask}
    loras = adapters.request_stack(req, settings.lora_dir)
    if loras is not None:
        extra["loras"] = loras  # the worker's, not the pipeline's (``serve.adapters``)
    return {"prompt": req.prompt, "input_images": images or None, **overrides, **extra}


def _check_limits(cfg: Any, req: Any, settings: ServeSettings) -> None:
    """The operator's limits on one request's work (``ServeSettings``)."""
    if cfg.num_inference_steps > settings.max_steps:
        message = (
            f"num_inference_steps={cfg.num_inference_steps} exceeds the limit max_steps={settings.max_steps}"
        )
        raise ApiError(400, "limit_exceeded", message, limit="max_steps", field="num_inference_steps")
    if cfg.num_images_per_prompt > settings.max_outputs:
        message = (
            f"num_images_per_prompt={cfg.num_images_per_prompt} exceeds the limit "
            f"max_outputs={settings.max_outputs}"
        )
        raise ApiError(400, "limit_exceeded", message, limit="max_outputs", field="num_images_per_prompt")
    if req.response_format == "png" and cfg.num_images_per_prompt > 1:
        message = "response_format 'png' returns one image; use 'b64_json' for n (num_images_per_prompt) > 1"
        raise ApiError(400, "invalid_value", message, field="response_format")
