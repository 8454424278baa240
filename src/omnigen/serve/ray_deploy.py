"""``omnigen serve --replicas N``: the same FastAPI app, as a Ray Serve deployment of N replicas.

Each replica is one Ray actor that loads its own pipeline and serves ``create_app``'s app through
``@serve.ingress`` (every route, the API key, the error shape are the single process's). The replica is
built from ``serve.cli.service_spec``'s spec (the parsed flags, the settings, the modes, as JSON-able
values), so the same spec drives the CLI, the tests and a Serve config file (``serve_config``) for
``serve deploy`` or KubeRay, whose ``import_path`` is ``omnigen.serve.ray_deploy:build``.

Backpressure: a replica takes at most ``max_ongoing_requests`` requests (by default the running job plus
its worker's queue, ``queue_size + 1``); Ray's proxy holds at most ``max_queued_requests`` more, and
answers the rest 429 with ``Retry-After`` (``BackpressureConfig``). Ray writes that answer as plain text;
``proxy_middlewares`` (imported by the proxy through ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, which
``start_ray`` sets for a cluster it starts) rewrites Ray's own plain-text errors into our error shape.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve.config import AutoscalingConfig, BackpressureConfig

from omnigen.util.checks import check_float, check_int

logger = logging.getLogger(__name__)

APP_NAME = "omnigen"
DEPLOYMENT_NAME = "OmniGenReplica"
PROXY_CALLBACK = "omnigen.serve.ray_deploy:proxy_middlewares"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
# Ray's own rejections (proxy queue full, no replica) -> our error code, by HTTP status.
RAY_ERROR_CODES = {408: "timeout", 429: "queue_full", 500: "server_error", 503: "service_unavailable"}


@dataclass(frozen=True)
class ReplicaPlan:
    """How many replicas, what each one gets, and how much may wait. ``replicas`` fixed, or autoscaling
    between ``min_replicas`` and ``max_replicas`` on ongoing requests (``target_ongoing``) when both are
    given."""

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    gpus_per_replica: float = 0.0
    threads_per_replica: int = 1
    max_ongoing_requests: int = 9  # the running job + ServeSettings.queue_size (8) by default
    max_queued_requests: int = 8  # at Ray's proxy, over all replicas
    retry_after_s: float = 5.0
    target_ongoing: float = 1.0

    def __post_init__(self) -> None:
        check_int("replicas", self.replicas, 1)
        check_int("threads_per_replica", self.threads_per_replica, 1)
        check_int("max_ongoing_requests", self.max_ongoing_requests, 1)
        check_int("max_queued_requests", self.max_queued_requests, 0)
        check_float("gpus_per_replica", self.gpus_per_replica, 0)
        check_float("retry_after_s", self.retry_after_s, 0)
        check_float("target_ongoing", self.target_ongoing, 0, low_open=True)
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("min_replicas and max_replicas go together: give both or neither")
        if self.min_replicas is not None:
            check_int("min_replicas", self.min_replicas, 0)
            check_int("max_replicas", self.max_replicas, max(1, self.min_replicas))

    def deployment_options(self) -> dict[str, Any]:
        """The options of ``serve.deployment`` (also the deployment's entry of a Serve config file)."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "backpressure_config": {"status_code": 429, "retry_after_s": self.retry_after_s},
            "ray_actor_options": {"num_cpus": self.threads_per_replica, "num_gpus": self.gpus_per_replica},
        }
        if self.min_replicas is None:
            options["num_replicas"] = self.replicas
        else:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "initial_replicas": min(max(self.replicas, self.min_replicas), self.max_replicas),
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing,
            }
        return options


def load_app(spec: dict[str, Any]) -> Any:
    """The app of ``serve.cli.service_spec``'s spec: ``{"args", "settings", "modes"}``."""
    from omnigen.cli.args import resolve_device
    from omnigen.serve.app import load_service
    from omnigen.serve.settings import ServeSettings

    args = argparse.Namespace(**spec["args"])
    args.device = resolve_device(args.device)
    return load_service(args, ServeSettings(**spec["settings"]), dict(spec.get("modes", {})))


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class OmniGenReplica:
    """One pipeline and its app, in one Ray actor; ``threads`` torch threads."""

    def __init__(self, spec: dict[str, Any], threads: int = 1) -> None:
        import torch

        torch.set_num_threads(threads)
        self._app = load_app(spec)

    def __serve_build_asgi_app__(self) -> Any:
        return self._app


def application(spec: dict[str, Any], plan: ReplicaPlan) -> Any:
    """The bound Ray Serve application."""
    deployment_options = plan.deployment_options()
    deployment_options["backpressure_config"] = BackpressureConfig(
        **deployment_options["backpressure_config"]
    )
    if "autoscaling_config" in deployment_options:
        deployment_options["autoscaling_config"] = AutoscalingConfig(
            **deployment_options["autoscaling_config"]
        )
    return OmniGenReplica.options(**deployment_options).bind(spec, plan.threads_per_replica)


def build(args: dict[str, Any]) -> Any:
    """The application builder of a Serve config file: ``args`` is ``{"spec": ..., "threads": ...}``;
    the replica counts and resources are the config file's ``deployments`` entry."""
    return OmniGenReplica.bind(dict(args["spec"]), int(args.get("threads", 1)))


def serve_config(spec: dict[str, Any], plan: ReplicaPlan, host: str, port: int) -> dict[str, Any]:
    """A Serve config file (``serve deploy FILE``, KubeRay's ``serveConfigV2``) for this spec and plan."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "omnigen.serve.ray_deploy:build",
                "args": {"spec": spec, "threads": plan.threads_per_replica},
                "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(plan.threads_per_replica)}},
                "deployments": [{"name": DEPLOYMENT_NAME, **plan.deployment_options()}],
            }
        ],
    }


# ----------------------------------------------------------------------------- Ray's own answers


class RayErrorShape:
    """Pure ASGI, in Ray's proxy: Ray's plain-text 408/429/500/503 answers (its queue full, a replica
    that died during the request, no replica)
    become our JSON error shape, headers (Retry-After) kept. The app's own answers are JSON already."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {"sent": False}

        async def rewrite(message: dict) -> None:
            if message["type"] == "http.response.start":
                held["sent"] = True
                if _is_ray_error(message):
                    held["start"], held["body"] = message, b""
                    return
            if "start" in held and message["type"] == "http.response.body":
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                for out in _our_shape(held["start"], held.pop("body").decode("utf-8", "replace")):
                    await send(out)
                return
            await send(message)

        try:
            await self.app(scope, receive, rewrite)
        except Exception:
            logger.exception("Ray's proxy failed a request")
        if not held["sent"]:  # e.g. the replica died mid-request: uvicorn would answer a bare 500
            start = {"type": "http.response.start", "status": 500, "headers": []}
            for out in _our_shape(start, "the replica serving this request failed; retry"):
                await send(out)


def _is_ray_error(start: dict) -> bool:
    headers = dict(start.get("headers", []))
    return start["status"] in RAY_ERROR_CODES and not headers.get(b"content-type", b"").startswith(
        b"application/json"
    )


def _our_shape(start: dict, text: str) -> list[dict]:
    from omnigen.serve.errors import ApiError

    status = start["status"]
    kept = {k.decode(): v.decode() for k, v in start.get("headers", []) if k.lower() == b"retry-after"}
    response = ApiError(
        status, RAY_ERROR_CODES[status], text.strip() or "unavailable", headers=kept
    ).response()
    raw = [(k, v) for k, v in response.raw_headers]
    return [
        {"type": "http.response.start", "status": status, "headers": raw},
        {"type": "http.response.body", "body": response.body},
    ]


def proxy_middlewares() -> list:
    """The callback of ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``: Ray's proxy's middlewares."""
    from starlette.middleware import Middleware

    return [Middleware(RayErrorShape)]


# ----------------------------------------------------------------------------- running it


def start_ray(address: str | None, host: str, port: int) -> bool:
    """Connect to the Ray cluster at ``address``, or start a local one (bound to loopback when ``host``
    is); start Serve's proxy on ``host:port``. True when this process started the cluster."""
    import os

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is None:
        os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)  # the local proxy inherits it
        local = {"_node_ip_address": "127.0.0.1"} if host in ("127.0.0.1", "localhost") else {}
        ray.init(include_dashboard=False, **local)
    else:
        ray.init(address=address)
    serve.start(http_options={"host": host, "port": port})
    return address is None


def stop_ray(started: bool) -> None:
    """Undo ``start_ray``: a cluster this process started goes entirely (Serve, then every Ray process);
    on someone else's cluster only our application goes."""
    import ray

    try:
        if started:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()


def run(spec: dict[str, Any], plan: ReplicaPlan, address: str | None, host: str, port: int) -> None:
    """Deploy and serve until SIGINT/SIGTERM, then stop what was started."""
    import signal
    import threading

    stop = threading.Event()
    started = start_ray(address, host, port)
    previous = {}
    try:
        serve.run(application(spec, plan), name=APP_NAME, route_prefix="/")
        # after ray.init and serve.run, which install their own handlers (the process would die or abort
        # with the cluster still up)
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
        logger.info("serving %s on http://%s:%d (%s)", APP_NAME, host, port, plan)
        stop.wait()
        logger.info("shutting down")
    finally:
        stop_ray(started)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def write_config(path: str, config: dict[str, Any]) -> None:
    import yaml

    from omnigen.util.atomic import atomic_write

    text = yaml.safe_dump(config, sort_keys=False)
    atomic_write(path, lambda tmp: tmp.write_text(text))
