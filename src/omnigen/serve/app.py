"""FastAPI app: ``create_app(pipeline, settings) -> FastAPI``.

Routes: ``POST /v1/images/generations`` (JSON with base64 images, or multipart/form-data with image
uploads; answers a PNG or, with ``response_format="b64_json"``, JSON), ``GET /v1/models``,
``GET /health`` and the OpenAPI schema. This module owns the routes, waiting for a job (timeout, client
disconnect), the responses and the API key check; request parsing and limits live in ``inputs``, the
queue and the thread that runs the pipeline in ``worker``.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from omnigen.serve.inputs import (
    ApiError,
    ErrorResponse,
    GenerationRequest,
    GenerationResponse,
    ImageData,
    parse_request,
    pipeline_kwargs,
)
from omnigen.serve.settings import ServeSettings
from omnigen.serve.worker import GeneratedImage, JobCancelled, QueueFull, Worker, WorkerStopped

GENERATIONS_PATH = "/v1/images/generations"
OPEN_PATHS = frozenset({"/health"})


class ClientGone(Exception):
    """The client disconnected while its job waited or ran."""


# ------------------------------------------------------------------------------------------ running


async def wait_for_job(job: Any, request: Request, deadline: float, timeout_s: float) -> list[GeneratedImage]:
    """The job's images; cancels it when the client goes away or the deadline passes."""
    future = asyncio.wrap_future(job.future)
    try:
        while not future.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ApiError(
                    504, "timeout", f"no result within timeout_s={timeout_s:g} s", limit="timeout_s"
                )
            await asyncio.wait({future}, timeout=min(0.2, remaining))
            if not future.done() and await request.is_disconnected():
                raise ClientGone
    except BaseException:
        job.cancel()
        future.cancel()
        raise
    if future.cancelled():
        raise ApiError(503, "cancelled", "the job was cancelled")
    try:
        return future.result()
    except (JobCancelled, WorkerStopped) as err:
        raise ApiError(503, "service_unavailable", f"the job did not finish: {err}") from err
    except (ValueError, TypeError) as err:
        raise ApiError(400, "invalid_request", str(err)) from err
    except Exception as err:
        raise ApiError(500, "generation_failed", f"{type(err).__name__}: {err}") from err


def _respond(results: list[GeneratedImage], req: GenerationRequest, settings: ServeSettings) -> Response:
    if req.response_format == "png":
        (image,) = results
        return Response(image.png, media_type="image/png", headers={"X-Seed": str(image.seed)})
    data = [
        ImageData(
            b64_json=base64.b64encode(r.png).decode("ascii"), seed=r.seed, width=r.width, height=r.height
        )
        for r in results
    ]
    return JSONResponse(
        GenerationResponse(created=int(time.time()), model=settings.model_name, data=data).model_dump()
    )


# ------------------------------------------------------------------------------------------ app


class ApiKeyMiddleware:
    """Pure ASGI: every HTTP route but OPEN_PATHS needs ``Authorization: Bearer KEY`` or ``X-API-Key``."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and not self._authorised(scope):
            error = ApiError(
                401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer KEY'"
            )
            error.headers = {"WWW-Authenticate": "Bearer"}
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorised(self, scope: dict) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key", b"")
        bearer = headers.get(b"authorization", b"")
        if bearer[:7].lower() == b"bearer ":
            given = bearer[7:].strip()
        return hmac.compare_digest(given, self.api_key)


def _openapi_body() -> dict[str, Any]:
    schema = GenerationRequest.model_json_schema()
    multipart = json.loads(json.dumps(schema))
    multipart["title"] = "GenerationForm"
    multipart["properties"]["images"] = {"type": "array", "items": {"type": "string", "format": "binary"}}
    return {
        "required": True,
        "content": {"application/json": {"schema": schema}, "multipart/form-data": {"schema": multipart}},
    }


def _responses() -> dict[int | str, dict[str, Any]]:
    error = {"model": ErrorResponse}
    return {
        200: {
            "model": GenerationResponse,
            "description": "a PNG (response_format png, header X-Seed) or JSON (b64_json)",
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        },
        400: {**error, "description": "invalid request or a limit exceeded (error.limit names it)"},
        401: {**error, "description": "missing or wrong API key"},
        413: {**error, "description": "upload too large (limit max_upload_bytes)"},
        415: {**error, "description": "not JSON or multipart"},
        422: {**error, "description": "unknown or mistyped field"},
        429: {**error, "description": "queue full; retry after the Retry-After header's seconds"},
        504: {**error, "description": "no result within timeout_s"},
    }


def create_app(pipeline: Any, settings: ServeSettings | None = None) -> FastAPI:
    """The service for a ready pipeline. The worker thread starts and stops with the app's lifespan."""
    from omnigen import __version__

    settings = settings or ServeSettings()
    worker = Worker(pipeline, settings.queue_size)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # noqa: ANN202
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="OmniGen", version=__version__, lifespan=lifespan, description=__doc__)
    app.state.worker, app.state.settings = worker, settings
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return ApiError(err.status_code, kind, str(err.detail), headers=err.headers).response()

    @app.get("/health", summary="liveness and queue state (no API key needed)")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, **worker.stats()}

    @app.get("/v1/models", summary="the served model, its defaults and the request limits")
    async def models() -> dict[str, Any]:
        config = pipeline.model.config
        card = {
            "id": settings.model_name,
            "object": "model",
            "owned_by": "omnigen",
            "defaults": pipeline.defaults.to_dict(),
            "image_multiple": config.image_multiple,
            "max_image_size": config.max_image_size,
            "limits": settings.limits(),
        }
        return {"object": "list", "data": [card]}

    @app.post(
        GENERATIONS_PATH,
        summary="generate an image from a prompt and optional input images",
        response_model=None,
        responses=_responses(),
        openapi_extra={"requestBody": _openapi_body()},
    )
    async def generations(request: Request) -> Response:
        deadline = time.monotonic() + settings.timeout_s
        req, images = await parse_request(request, settings)
        kwargs = pipeline_kwargs(req, images, pipeline, settings)
        try:
            job = worker.submit(kwargs)
        except QueueFull as err:
            retry = str(worker.retry_after())
            message = f"the queue is full ({settings.queue_size} waiting jobs); retry in {retry} s"
            raise ApiError(
                429, "queue_full", message, limit="queue_size", headers={"Retry-After": retry}
            ) from err
        try:
            results = await wait_for_job(job, request, deadline, settings.timeout_s)
        except ClientGone:
            return Response(status_code=499)
        return _respond(results, req, settings)

    return app
