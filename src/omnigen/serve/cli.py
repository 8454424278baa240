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
    p.set_defaults(func=_run)


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    return ServeSettings(
        **{field: getattr(args, field) for field in SETTING_FLAGS},
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        model_name=args.model_name,
    )


def _run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from omnigen.serve.app import create_app
    except ImportError as err:
        raise ImportError(f"omnigen serve needs {err.name}: pip install 'omnigen-unified[serve]'") from err
    from omnigen.cli.args import generation_overrides, load_pipeline

    settings = settings_from_args(args)
    modes = generation_overrides(args, generation.names("operator"))
    pipe = load_pipeline(args).with_defaults(**modes)
    uvicorn.run(create_app(pipe, settings), host=args.host, port=args.port, log_level="info")
    return 0
