"""Load test for ``omnigen serve``: N concurrent clients send M generation requests; prints latency
percentiles, status counts and throughput.

    python benchmarks/load_serve.py --url http://127.0.0.1:8000 --clients 50 --requests 200
    python benchmarks/load_serve.py --model PATH --queue-size 8      # starts a server on 127.0.0.1

With --retry a client that gets 429 waits for Retry-After (at most --max-wait s) and tries again, up to
--attempts times. Every request has a timeout; the whole run is bounded by --deadline seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import math
import os
import socket
import threading
import time

import httpx

URL = "/v1/images/generations"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


async def run_load(args: argparse.Namespace, base: str) -> tuple[list[tuple[int, float]], float]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    body = {"prompt": args.prompt, "num_inference_steps": args.steps}
    if args.size:
        body.update(height=args.size, width=args.size)
    results: list[tuple[int, float]] = []  # (status, seconds) of the final attempt of each request
    next_id = iter(range(args.requests))
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(
        base_url=base, timeout=args.timeout, limits=limits, headers=headers
    ) as client:

        async def worker() -> None:
            for request_id in next_id:
                for attempt in range(args.attempts if args.retry else 1):
                    start = time.perf_counter()
                    try:
                        response = await client.post(URL, json={**body, "seed": request_id})
                        status = response.status_code
                    except httpx.HTTPError:
                        status = 0  # transport error or timeout
                    elapsed = time.perf_counter() - start
                    if status != 429 or not args.retry or attempt == args.attempts - 1:
                        results.append((status, elapsed))
                        break
                    await asyncio.sleep(min(args.max_wait, float(response.headers.get("retry-after", 1))))

        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(args.clients))), args.deadline)
        return results, time.perf_counter() - start


def report(results: list[tuple[int, float]], wall: float) -> str:
    counts = collections.Counter(status for status, _ in results)
    ok = [seconds for status, seconds in results if status == 200]
    lines = [f"requests {len(results)} in {wall:.2f} s"]
    lines += [f"status {status}: {count}" for status, count in sorted(counts.items())]
    for name, values in (("200", ok), ("all", [s for _, s in results])):
        cells = "  ".join(f"p{q} {percentile(values, q) * 1000:.0f} ms" for q in (50, 90, 99))
        worst = max(values, default=math.nan) * 1000
        lines.append(f"latency ({name}): {cells}  max {worst:.0f} ms")
    lines.append(f"throughput {len(ok) / wall:.2f} images/s ({len(results) / wall:.2f} answers/s)")
    return "\n".join(lines)


@contextlib.contextmanager
def local_server(args: argparse.Namespace):
    """Serve --model on 127.0.0.1 in this process (a free port)."""
    import uvicorn

    from omnigen.pipeline import OmniGenPipeline
    from omnigen.serve.app import create_app
    from omnigen.serve.settings import ServeSettings

    pipe = OmniGenPipeline.from_pretrained(None if args.model == "default" else args.model)
    app = create_app(pipe, ServeSettings(queue_size=args.queue_size, api_key=args.api_key))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument(
        "--model", help="start a local server with this model folder ('default': shipped model)"
    )
    parser.add_argument("--queue-size", type=int, default=8, help="with --model")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--prompt", default="a red circle in the top left on a white background")
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the model's)")
    parser.add_argument("--size", type=int, default=None, help="height = width (default: the model's)")
    parser.add_argument("--api-key", default=os.environ.get("OMNIGEN_API_KEY"))
    parser.add_argument("--retry", action="store_true", help="retry 429 answers after Retry-After")
    parser.add_argument("--attempts", type=int, default=20, help="attempts per request with --retry")
    parser.add_argument("--max-wait", type=float, default=2.0, help="longest Retry-After sleep (s)")
    parser.add_argument("--timeout", type=float, default=120.0, help="per request (s)")
    parser.add_argument("--deadline", type=float, default=600.0, help="the whole run (s)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1:
        parser.error("--clients and --requests must be >= 1")
    with contextlib.ExitStack() as stack:
        base = args.url.rstrip("/") if args.url else stack.enter_context(local_server(args))
        results, wall = asyncio.run(run_load(args, base))
    print(report(results, wall))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
