"""``omnigen serve``: load one pipeline and serve it over HTTP with uvicorn (imported only when run).

With ``--replicas N`` (or ``--min-replicas/--max-replicas``, ``--ray-address``, ``--write-serve-config``)
the same app runs as a Ray Serve deployment instead (``ray_deploy``; Ray is imported only then)."""

from __future__ import annotations

import argparse
import os

from omnigen import generation
from omnigen.cli.args import add_generation_args, add_model_args, generation_overrides
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
    _add_ray_args(p.add_argument_group("replicas (Ray Serve; pip install 'omnigen-unified[ray]')"), d)
    p.set_defaults(func=_run)


# The flags of Ray Serve mode; none of them given: the single process.
RAY_FLAGS = (
    "replicas",
    "min_replicas",
    "max_replicas",
    "ray_address",
    "gpus_per_replica",
    "threads_per_replica",
    "max_ongoing_requests",
    "max_queued_requests",
    "write_serve_config",
)
RAY_DEFAULTS = {"gpus_per_replica": 0.0, "threads_per_replica": 1, "max_queued_requests": 8}
RAY_MODE_FLAGS = ("replicas", "min_replicas", "max_replicas", "ray_address", "write_serve_config")


def _add_ray_args(g: argparse._ArgumentGroup, d: ServeSettings) -> None:
    g.add_argument("--replicas", type=int, default=None, help="serve N replicas, one pipeline each")
    g.add_argument("--min-replicas", type=int, default=None, help="autoscale from this many replicas")
    g.add_argument("--max-replicas", type=int, default=None, help="autoscale up to this many replicas")
    g.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one)")
    d_ray = RAY_DEFAULTS
    g.add_argument(
        "--gpus-per-replica",
        type=float,
        default=d_ray["gpus_per_replica"],
        help="fractions allowed (default: 0)",
    )
    g.add_argument(
        "--threads-per-replica",
        type=int,
        default=d_ray["threads_per_replica"],
        help="torch threads/CPUs each (default: 1)",
    )
    g.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=None,
        help=f"per replica (default: --queue-size + 1 = {d.queue_size + 1})",
    )
    g.add_argument(
        "--max-queued-requests",
        type=int,
        default=d_ray["max_queued_requests"],
        help="waiting at Ray's proxy, more get 429 (default: 8)",
    )
    g.add_argument(
        "--write-serve-config",
        default=None,
        metavar="FILE",
        help="write a Serve config (serve deploy) and exit",
    )


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    return ServeSettings(
        **{field: getattr(args, field) for field in SETTING_FLAGS},
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        model_name=args.model_name,
        docs=args.docs,
    )


def build_app(args: argparse.Namespace):
    """The app of these flags: the settings, the operator's modes, the loaded pipeline."""
    from omnigen.serve.app import load_service

    return load_service(
        args, settings_from_args(args), generation_overrides(args, generation.names("operator"))
    )


def service_spec(args: argparse.Namespace) -> dict:
    """What a Ray replica needs to build ``build_app(args)``'s app, as JSON-able values: the model flags,
    the settings (checked here, once) and the operator's modes."""
    from dataclasses import asdict

    model_args = {k: v for k, v in vars(args).items() if k not in ("func", *RAY_FLAGS)}
    settings = asdict(settings_from_args(args))  # OMNIGEN_API_KEY is read here, not in the replica
    return {
        "args": model_args,
        "settings": settings,
        "modes": generation_overrides(args, generation.names("operator")),
    }


def _run(args: argparse.Namespace) -> int:
    if any(getattr(args, name) is not None for name in RAY_MODE_FLAGS):
        return _run_ray(args)
    given = [name for name in RAY_FLAGS if getattr(args, name) != RAY_DEFAULTS.get(name)]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(f"{flags} only apply with --replicas N (or --min-replicas/--max-replicas)")
    try:
        import fastapi  # noqa: F401  (the message below names what is missing)

        from omnigen.serve.server import make_server
    except ImportError as err:
        raise ImportError(f"omnigen serve needs {err.name}: pip install 'omnigen-unified[serve]'") from err
    app = build_app(args)
    make_server(app, app.state.settings, args.host, args.port, log_level="info").run()
    return 0


def _run_ray(args: argparse.Namespace) -> int:
    try:
        from omnigen.serve import ray_deploy
    except ImportError as err:
        raise ImportError(
            f"omnigen serve --replicas needs {err.name}: pip install 'omnigen-unified[ray]'"
        ) from err
    plan = ray_deploy.ReplicaPlan(
        replicas=args.replicas or 1,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        gpus_per_replica=args.gpus_per_replica,
        threads_per_replica=args.threads_per_replica,
        max_ongoing_requests=args.max_ongoing_requests or args.queue_size + 1,
        max_queued_requests=args.max_queued_requests,
    )
    spec = service_spec(args)  # bad settings or modes fail here, not in every replica
    if args.gpus_per_replica > 0 and not str(args.device).startswith("cuda"):
        spec["args"]["device"] = "cuda"  # the replica's own GPU (Ray sets its CUDA_VISIBLE_DEVICES)
    if args.write_serve_config:
        config = ray_deploy.serve_config(spec, plan, args.host, args.port)
        ray_deploy.write_config(args.write_serve_config, config)
        return 0
    ray_deploy.run(spec, plan, args.ray_address, args.host, args.port)
    return 0
