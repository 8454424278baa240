"""``omnigen serve``: load one pipeline and serve it over HTTP with uvicorn (imported only when run)."""

from __future__ import annotations

import argparse
import os

from omnigen import generation
from omnigen.cli.args import add_generation_args, add_model_args
from omnigen.serve.settings import ServeSettings

API_KEY_ENV = "OMNIGEN_API_KEY"
# ServeSettings field -> (flag, type, help): the service's queue and request limits, one row each.
SETTING_FLAGS = {
    "queue_size": ("--queue-size", int, "jobs that may wait, more get 429"),
    "timeout_s": ("--timeout", float, "seconds per request, queueing included"),
    "max_upload_bytes": ("--max-upload-bytes", int, "per input image"),
    "max_pixels": ("--max-pixels", int, "output height x width"),
    "max_input_pixels": ("--max-input-pixels", int, "per input image"),
    "max_steps": ("--max-steps", int, "sampling steps per request"),
    "max_images": ("--max-images", int, "input images per request"),
    "max_outputs": ("--max-outputs", int, "num_images_per_prompt"),
    "max_condition_tokens": ("--max-condition-tokens", int, "prompt + input-image tokens per request"),
    "max_prompt_chars": ("--max-prompt-chars", int, "prompt + negative_prompt characters per request"),
    "decode_workers": ("--decode-workers", int, "threads that decode uploads"),
    "decode_pixels": ("--decode-pixels", int, "upload pixels being decoded at once, all requests"),
    "decode_bytes": ("--decode-bytes", int, "bytes of uploads being decoded at once, all requests"),
    "header_timeout_s": ("--header-timeout", float, "seconds for a request's headers to arrive"),
    "body_timeout_s": ("--body-timeout", float, "seconds a request body may stall"),
    "keep_alive_s": ("--keep-alive", float, "seconds an idle connection stays open"),
    "max_connections": ("--max-connections", int, "open connections, more get 503"),
    "max_header_bytes": ("--max-header-bytes", int, "size of a request's headers"),
    "shutdown_grace_s": ("--shutdown-grace", float, "on SIGTERM: seconds the running job may take to finish"),
    "lora_dir": ("--lora-dir", str, "folder of LoRA adapters a request may name (its field lora)"),
}


def register(sub: argparse._SubParsersAction) -> None:
    d = ServeSettings()
    p = sub.add_parser(
        "serve",
        help="HTTP API in OpenAI's Images API shape: /v1/images/generations, /v1/images/edits (FastAPI)",
    )
    add_model_args(p)
    g = p.add_argument_group("memory modes (for every request; not a request field)")
    add_generation_args(g, scopes=("operator",))
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    p.add_argument(
        "--model-name", default=d.model_name, help=f"the id GET /v1/models reports (default: {d.model_name})"
    )
    p.add_argument(
        "--api-key", default=None, help=f"require this key on every route but /health (env {API_KEY_ENV})"
    )
    for field, (flag, kind, what) in SETTING_FLAGS.items():
        default = getattr(d, field)
        p.add_argument(flag, dest=field, type=kind, default=default, help=f"{what} (default: {default})")
    p.add_argument(
        "--docs",
        action="store_true",
        help="serve /docs and /redoc (they load from a CDN; /openapi.json always)",
    )
    p.set_defaults(func=_run)


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    return ServeSettings(
        **{field: getattr(args, field) for field in SETTING_FLAGS},
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        model_name=args.model_name,
        docs=args.docs,
    )


def _run(args: argparse.Namespace) -> int:
    try:
        from omnigen.serve.app import create_app
        from omnigen.serve.server import make_server
    except ImportError as err:
        raise ImportError(f"omnigen serve needs {err.name}: pip install 'omnigen-unified[serve]'") from err
    from omnigen.cli.args import generation_overrides, load_pipeline

    settings = settings_from_args(args)
    modes = generation_overrides(args, generation.names("operator"))
    pipe = load_pipeline(args).with_defaults(**modes)
    make_server(create_app(pipe, settings), settings, args.host, args.port, log_level="info").run()
    return 0
