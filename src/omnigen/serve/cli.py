"""``omnigen serve``: load one pipeline and serve it over HTTP with uvicorn (imported only when run)."""

from __future__ import annotations

import argparse
import os

from omnigen import generation
from omnigen.cli_args import add_generation_args, add_model_args
from omnigen.serve.settings import ServeSettings

API_KEY_ENV = "OMNIGEN_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    d = ServeSettings()
    p = sub.add_parser(
        "serve",
        help="HTTP API in OpenAI's Images API shape: /v1/images/generations, /v1/images/edits (FastAPI)",
    )
    add_model_args(p, device_default="cpu")
    g = p.add_argument_group("memory modes (for every request; not a request field)")
    add_generation_args(g, scopes=("operator",))
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    p.add_argument(
        "--model-name", default=d.model_name, help=f"the id GET /v1/models reports (default: {d.model_name})"
    )
    p.add_argument(
        "--queue-size",
        type=int,
        default=d.queue_size,
        help=f"jobs that may wait, more get 429 (default: {d.queue_size})",
    )
    p.add_argument(
        "--api-key", default=None, help=f"require this key on every route but /health (env {API_KEY_ENV})"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=d.timeout_s,
        help=f"seconds per request, queueing included (default: {d.timeout_s})",
    )
    p.add_argument(
        "--max-upload-bytes",
        type=int,
        default=d.max_upload_bytes,
        help=f"per input image (default: {d.max_upload_bytes})",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=d.max_pixels,
        help=f"output height x width (default: {d.max_pixels})",
    )
    p.add_argument(
        "--max-input-pixels",
        type=int,
        default=d.max_input_pixels,
        help=f"per input image (default: {d.max_input_pixels})",
    )
    p.add_argument("--max-steps", type=int, default=d.max_steps, help=f"(default: {d.max_steps})")
    p.add_argument(
        "--max-images",
        type=int,
        default=d.max_images,
        help=f"input images per request (default: {d.max_images})",
    )
    p.add_argument(
        "--max-outputs",
        type=int,
        default=d.max_outputs,
        help=f"num_images_per_prompt (default: {d.max_outputs})",
    )
    p.add_argument(
        "--max-condition-tokens",
        type=int,
        default=d.max_condition_tokens,
        help=f"prompt + input-image tokens per request (default: {d.max_condition_tokens})",
    )
    p.set_defaults(func=_run)


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    return ServeSettings(
        queue_size=args.queue_size,
        max_upload_bytes=args.max_upload_bytes,
        max_pixels=args.max_pixels,
        max_input_pixels=args.max_input_pixels,
        max_steps=args.max_steps,
        max_images=args.max_images,
        max_outputs=args.max_outputs,
        max_condition_tokens=args.max_condition_tokens,
        timeout_s=args.timeout,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        model_name=args.model_name,
    )


def _run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from omnigen.serve.app import create_app
    except ImportError as err:
        raise ImportError(f"omnigen serve needs {err.name}: pip install 'omnigen-unified[serve]'") from err
    from omnigen.cli_args import generation_overrides, load_pipeline

    settings = settings_from_args(args)
    modes = generation_overrides(args, generation.names("operator"))
    pipe = load_pipeline(args).with_defaults(**modes)
    uvicorn.run(create_app(pipe, settings), host=args.host, port=args.port, log_level="info")
    return 0
