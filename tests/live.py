"""Live-server helpers for the service tests: a free port, a uvicorn server running in a thread, and a
server process (``omnigen serve`` / ``omnigen demo``) waited for until it answers."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
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


@contextmanager
def live_process(
    command: list[str],
    log_path: Path,
    ready: Callable[[], Any],
    not_yet: tuple[type[BaseException], ...] = (OSError,),
    env: dict[str, str] | None = None,
    start_s: float = 60,
) -> Iterator[Any]:
    """``command`` run as a server process (stdout and stderr to ``log_path``) until ``ready()`` returns a
    truthy value, which it yields; ``not_yet`` are the errors ``ready`` raises while the server is not up
    (a refused connection). Fails, with the log's tail, if the process exits or ``start_s`` pass first.
    On exit the process is terminated (killed if it does not stop)."""
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + start_s
            while True:
                assert process.poll() is None, f"{command} exited:\n{log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, (
                    f"{command} did not come up:\n{log_path.read_text()[-3000:]}"
                )
                try:
                    value = ready()
                except not_yet:
                    value = None
                if value:
                    break
                time.sleep(0.2)
            yield value
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
