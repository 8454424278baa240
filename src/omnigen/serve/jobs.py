"""The generation path of every route: admit a checked request's job to the queue, wait for it.

``run_job`` is the one way a route gets images: ``Worker.submit`` (a full queue answers 429 with
``Retry-After``), then ``wait_for_job`` (the request's deadline answers 504; a client that disconnects
cancels its job, waiting or running). While the service shuts down (``Worker.drain``) a new job and a
waiting one are answered 503 ``shutting_down`` at once, as is a running one the grace cut short.
Request parsing is ``inputs``'s, the queue ``worker``'s.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import Request

from omnigen.serve.errors import ApiError
from omnigen.serve.settings import ServeSettings
from omnigen.serve.worker import GeneratedImage, JobCancelled, QueueFull, Worker, WorkerStopped


class ClientGone(Exception):
    """The client disconnected while its job waited or ran."""


async def run_job(request: Request, kwargs: dict[str, Any], deadline: float) -> list[GeneratedImage]:
    """The images of ``pipeline(**kwargs)``, run by the app's worker; raises ApiError or ClientGone."""
    worker: Worker = request.app.state.worker
    settings: ServeSettings = request.app.state.settings
    try:
        job = worker.submit(kwargs)
    except WorkerStopped as err:
        raise shutting_down() from err
    except QueueFull as err:
        retry = str(worker.retry_after())
        message = f"the queue is full ({settings.queue_size} waiting jobs); retry in {retry} s"
        raise ApiError(
            429, "queue_full", message, limit="queue_size", headers={"Retry-After": retry}
        ) from err
    return await wait_for_job(job, request, deadline, settings.timeout_s)


def shutting_down(message: str = "the service is shutting down") -> ApiError:
    return ApiError(503, "shutting_down", message, headers={"Retry-After": "30", "Connection": "close"})


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
            draining = request.app.state.worker.draining.is_set()
            if draining and not future.done() and not job.future.running():
                raise shutting_down("the service is shutting down; the job had not started")
    except BaseException:
        job.cancel()
        future.cancel()
        raise
    if future.cancelled():
        raise ApiError(503, "cancelled", "the job was cancelled")
    try:
        return future.result()
    except WorkerStopped as err:
        raise shutting_down(f"the job did not finish: {err}") from err
    except JobCancelled as err:
        raise ApiError(503, "service_unavailable", f"the job did not finish: {err}") from err
    except (ValueError, TypeError) as err:
        raise ApiError(400, "invalid_value", str(err)) from err
    except Exception as err:
        raise ApiError(500, "generation_failed", f"{type(err).__name__}: {err}") from err
