"""The uvicorn server of ``omnigen serve``: slow-client limits and the shutdown sequence.

Slow clients: a request's headers must arrive within ``header_timeout_s`` of the connection opening (or of
its previous answer), whatever trickles in meanwhile (``HeaderTimeoutH11``); headers larger than
``max_header_bytes`` are refused; idle keep-alive connections close after ``keep_alive_s``; past
``max_connections`` open connections uvicorn answers 503. The body's own timeout is the app's
(``inputs.read_body``).

Shutdown (SIGTERM or Ctrl-C): the worker stops admitting jobs (new requests get 503 ``shutting_down``,
``/health`` 503), waiting jobs are answered 503 at once, the running job may finish within
``shutdown_grace_s`` (then it is cancelled and answered 503), and the process exits. A second signal ends
the grace at once: the running job is answered 503 too, never dropped unanswered.
"""

from __future__ import annotations

import asyncio
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from omnigen.serve.settings import ServeSettings
from omnigen.serve.worker import Worker

ANSWER_MARGIN_S = 3.0  # after the grace: time for cancelled jobs' 503s to reach their clients


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete in time.

    uvicorn's own keep-alive timer restarts with every byte received, so a client sending a byte a second
    holds a connection forever; this deadline does not move."""

    header_timeout_s = 10.0  # set per server by ``make_server`` (a subclass per settings)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _header_timeout(self) -> None:
        if self._waiting_for_headers() and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if not self._waiting_for_headers() and self._header_timer is not None:
            self._header_timer.cancel()  # a request is in progress: the body has its own timeout
            self._header_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose exit signals drain the worker first (see the module's docstring)."""

    def __init__(self, config: uvicorn.Config, worker: Worker, grace_s: float) -> None:
        super().__init__(config)
        self.worker, self.grace_s = worker, grace_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: Worker.drain only sets flags. The second signal ends the grace now, and
        # does not force uvicorn's exit, so that every client still gets its 503.
        # uvicorn re-raises captured signals after its shutdown; a drained server exits normally instead.
        self.worker.drain(0.0 if self.should_exit else self.grace_s)
        self.should_exit = True


def make_server(app: Any, settings: ServeSettings, host: str, port: int, **config: Any) -> DrainingServer:
    """The server for ``create_app``'s ``app`` with the settings' connection limits."""
    protocol = type("HeaderTimeoutH11", (HeaderTimeoutH11,), {"header_timeout_s": settings.header_timeout_s})
    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        timeout_keep_alive=settings.keep_alive_s,
        limit_concurrency=settings.max_connections,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_graceful_shutdown=settings.shutdown_grace_s + ANSWER_MARGIN_S,
        **config,
    )
    return DrainingServer(uv_config, app.state.worker, settings.shutdown_grace_s)
