"""Live-server helpers for the service tests: a free port, and a uvicorn server running in a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (for a server started in another process)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def live_server(make_server: Callable[[int], Any], start_s: float = 20) -> Iterator[tuple[str, Any, Any]]:
    """The uvicorn server ``make_server(port)`` on 127.0.0.1:<free port>, run in a daemon thread on a
    socket held from the start (no race for the port). Yields (base URL, server, thread); on exit the
    server is told to stop and must have stopped."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = make_server(port)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_s
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", server, thread
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "server did not stop"
