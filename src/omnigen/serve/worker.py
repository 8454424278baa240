"""One pipeline, one thread, a bounded queue of jobs: admission, cancellation and counters.

This module owns the job life cycle: ``submit`` admits a job or raises ``QueueFull``; the worker thread
runs jobs one at a time in arrival order; ``Job.cancel`` drops a waiting job from the queue at once and
stops a running one at the end of its current sampling step. It knows nothing about HTTP.
"""

from __future__ import annotations

import collections
import io
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds ``queue_size`` waiting jobs."""


class JobCancelled(Exception):
    """Raised inside the pipeline's step callback once a running job is cancelled."""


class WorkerStopped(Exception):
    """The service is shutting down: the job was not admitted, or did not run or finish in time."""


@dataclass(frozen=True)
class GeneratedImage:
    png: bytes
    seed: int
    width: int
    height: int


@dataclass
class Job:
    kwargs: dict[str, Any]  # keyword arguments of OmniGenPipeline.__call__
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.monotonic)
    _worker: Worker | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """Forget a waiting job; make a running one stop at its next step. Idempotent."""
        self.cancelled.set()
        if self._worker is not None:
            self._worker._drop(self)


class JobQueue:
    """A FIFO of at most ``maxsize`` jobs that supports removing a job from the middle."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._jobs: collections.deque[Job] = collections.deque()
        self._ready = threading.Condition()

    def put(self, job: Job) -> None:
        with self._ready:
            if len(self._jobs) >= self.maxsize:
                raise QueueFull
            self._jobs.append(job)
            self._ready.notify()

    def get(self, timeout: float) -> Job | None:
        with self._ready:
            if not self._jobs:
                self._ready.wait(timeout)
            return self._jobs.popleft() if self._jobs else None

    def remove(self, job: Job) -> bool:
        with self._ready:
            try:
                self._jobs.remove(job)
            except ValueError:
                return False
            return True

    def drain(self) -> list[Job]:
        with self._ready:
            jobs = list(self._jobs)
            self._jobs.clear()
            return jobs

    def __len__(self) -> int:
        with self._ready:
            return len(self._jobs)


class Worker:
    """Runs ``pipeline(**job.kwargs)`` for each job on one daemon thread; results are PNG bytes."""

    def __init__(self, pipeline: Callable[..., list], queue_size: int) -> None:
        self.pipeline = pipeline
        self.queue = JobQueue(queue_size)
        self.counts = collections.Counter(accepted=0, rejected=0, completed=0, failed=0, cancelled=0)
        self._lock = threading.Lock()
        self._durations: collections.deque[float] = collections.deque(maxlen=32)
        self._stop = threading.Event()
        self.draining = threading.Event()  # shutting down: admit nothing, let the running job finish
        self._grace_end = math.inf  # monotonic time at which a draining worker cancels its running job
        self._thread: threading.Thread | None = None
        self.running: Job | None = None
        self.adapters: Any = None  # serve.adapters.AdapterSwitch: a job's "loras" (--lora-dir)

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="omnigen-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking jobs, fail the waiting ones, cancel the running one and join the thread."""
        self._stop.set()
        for job in self.queue.drain():
            job.future.set_exception(WorkerStopped("the service is shutting down"))
        if self.running is not None:
            self.running.cancelled.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def drain(self, grace_s: float) -> None:
        """Begin shutting down: admit no job (``submit`` raises WorkerStopped), let the running job finish
        within ``grace_s`` seconds, then cancel it. Waiting jobs are failed by their waiters
        (``jobs.wait_for_job``) and by the thread. Only sets flags, so a signal handler may call it; a
        second call can only shorten the grace."""
        self._grace_end = min(self._grace_end, time.monotonic() + grace_s)
        self.draining.set()

    def past_grace(self) -> bool:
        return self.draining.is_set() and time.monotonic() >= self._grace_end

    def submit(self, kwargs: dict[str, Any]) -> Job:
        if self.draining.is_set():
            self._count("rejected")
            raise WorkerStopped("the service is shutting down")
        job = Job(kwargs, _worker=self)
        try:
            self.queue.put(job)
        except QueueFull:
            self._count("rejected")
            raise
        self._count("accepted")
        return job

    def _drop(self, job: Job) -> None:
        if self.queue.remove(job):
            job.future.cancel()
            self._count("cancelled")

    # ------------------------------------------------------------------ state
    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            counts = dict(self.counts)
        return {
            "status": "shutting_down" if self.draining.is_set() else "ok",
            "queue_size": self.queue.maxsize,
            "waiting": len(self.queue),
            "running": self.running is not None,
            "jobs": counts,
            **({} if self.adapters is None else self.adapters.stats()),
        }

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free (mean recent job time x jobs ahead), at least 1."""
        with self._lock:
            mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, min(3600, math.ceil(mean * (len(self.queue) + 1))))

    # ------------------------------------------------------------------ thread
    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.draining.is_set():
                for waiting in self.queue.drain():
                    waiting.future.set_exception(WorkerStopped("the service is shutting down"))
            job = self.queue.get(timeout=0.1)
            if job is None:
                continue
            if job.cancelled.is_set():  # cancelled between leaving the queue and now
                job.future.cancel()
            if not job.future.set_running_or_notify_cancel():
                self._count("cancelled")
                continue
            self.running = job
            start = time.monotonic()
            error: BaseException | None = None
            try:
                result = self._run(job)
            except JobCancelled:
                self._count("cancelled")
                error = (
                    WorkerStopped("the service shut down before the job finished (shutdown grace)")
                    if self.past_grace()
                    else JobCancelled("cancelled")
                )
            except Exception as err:  # reported to the client; the worker keeps going
                if not isinstance(err, (ValueError, TypeError)):
                    logger.exception("job failed")
                self._count("failed")
                error = err
            else:
                with self._lock:
                    self._durations.append(time.monotonic() - start)
                self._count("completed")
            # The job is no longer running before its client can see the answer (so /health agrees).
            self.running = None
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

    def _run(self, job: Job) -> list[GeneratedImage]:
        def check(_pipe: Any, _step: int, _t: float, _latents: Any) -> None:
            if job.cancelled.is_set() or self.past_grace():
                raise JobCancelled

        if job.cancelled.is_set():
            raise JobCancelled
        kwargs = dict(job.kwargs)
        loras = kwargs.pop("loras", None)
        if loras is not None:
            self.adapters.apply(loras)
        images = self.pipeline(**kwargs, callback_on_step_end=check, progress=False)
        out = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            out.append(GeneratedImage(buffer.getvalue(), int(image.info["seed"]), image.width, image.height))
        return out
