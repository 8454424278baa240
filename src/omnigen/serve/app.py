"""FastAPI app: ``create_app(pipeline, settings) -> FastAPI``.

Routes: OpenAI's Images API (``openai``: ``POST /v1/images/generations`` and ``/v1/images/edits``,
``GET /v1/models``), ``GET /health`` and the OpenAPI schema. This module owns the app: its state (the
pipeline, the settings, the worker whose thread starts and stops with the app's lifespan), the API key
check and the error handlers, which answer every error in the one shape of ``errors``. The generation
path is ``jobs``'s, request parsing and limits ``inputs``'s, the queue ``worker``'s.
"""

from __future__ import annotations

import hmac
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from omnigen.serve import openai
from omnigen.serve.adapters import AdapterSwitch, available
from omnigen.serve.decode import DecodePool
from omnigen.serve.errors import ApiError
from omnigen.serve.settings import ServeSettings
from omnigen.serve.worker import Worker

logger = logging.getLogger(__name__)

GENERATIONS_PATH = openai.GENERATIONS_PATH
OPEN_PATHS = frozenset({"/health"})


class ApiKeyMiddleware:
    """Pure ASGI: every HTTP route but OPEN_PATHS needs ``Authorization: Bearer KEY`` or ``X-API-Key``."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and not self._authorised(scope):
            error = ApiError(
                401, "invalid_api_key", "missing or wrong API key: send 'Authorization: Bearer KEY'"
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


def create_app(pipeline: Any, settings: ServeSettings | None = None) -> FastAPI:
    """The service for a ready pipeline. The worker thread starts and stops with the app's lifespan."""
    from omnigen import __version__

    settings = settings or ServeSettings()
    worker = Worker(pipeline, settings.queue_size)
    if settings.lora_dir is not None:
        worker.adapters = AdapterSwitch(pipeline.model)
    decode_pool = DecodePool(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            decode_pool.close()

    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None}  # their pages need a CDN
    app = FastAPI(title="OmniGen", version=__version__, lifespan=lifespan, description=__doc__, **docs)
    app.state.pipeline, app.state.worker, app.state.settings = pipeline, worker, settings
    app.state.decode_pool = decode_pool
    app.openapi = lambda: openapi_schema(app, bool(settings.api_key))  # type: ignore[method-assign]
    app.state.created = int(time.time())  # the "created" of GET /v1/models
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return ApiError(err.status_code, code, str(err.detail), headers=err.headers).response()

    @app.exception_handler(Exception)
    async def _server_error(_request: Request, err: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return ApiError(500, "server_error", f"internal error: {type(err).__name__}").response()

    @app.get(
        "/health",
        summary="liveness and queue state (no API key needed); 503 while shutting down",
        responses={503: {"description": "shutting down: the same body, status 'shutting_down'"}},
    )
    async def health() -> JSONResponse:
        stats = {"model": settings.model_name, **worker.stats(), **decode_pool.in_flight()}
        if settings.lora_dir is not None:
            stats["loras"] = available(settings.lora_dir)
        return JSONResponse(stats, status_code=503 if worker.draining.is_set() else 200)

    app.include_router(openai.router)
    return app


def load_service(args: Any, settings: ServeSettings, modes: dict[str, Any]) -> FastAPI:
    """The app of ``omnigen serve``'s model flags (``args``: ``cli.args.load_pipeline``'s), the operator's
    generation modes and the settings: how the single process and every Ray replica build it."""
    from omnigen.cli.args import load_pipeline

    return create_app(load_pipeline(args).with_defaults(**modes), settings)


def openapi_schema(app: FastAPI, keyed: bool) -> dict[str, Any]:
    """FastAPI's schema, plus the HTTP bearer security scheme and, with an API key, its requirement and
    the 401 answer on every route but OPEN_PATHS. Built once."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearer"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "the service's API key (omnigen serve --api-key); X-API-Key works too",
    }
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, operations in schema["paths"].items():
        if path in OPEN_PATHS:
            continue
        for operation in operations.values():
            if keyed:
                operation["security"] = [{"bearer": []}]
                operation["responses"].setdefault(
                    "401", {"description": "missing or wrong API key", "content": error}
                )
    app.openapi_schema = schema
    return schema
