"""Images/s of ``omnigen serve --replicas 2`` (one torch thread each) against the single process, with
``--clients`` requests in flight, and the latency Ray's proxy adds to one request.

Both services are real ``omnigen serve`` processes on 127.0.0.1 (free ports), started and stopped
(SIGTERM) here, one after the other; at the end no ``raylet``/``gcs_server`` this run started may be left.

    python benchmarks/bench_replicas.py                 # the shipped model, 4 clients, 24 requests
    python benchmarks/bench_replicas.py --quick         # a smoke run: 8 requests, 10 latency probes

Prints a markdown table (docs/ray.md) and the 1-minute load average, since the CPU may be shared.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import psutil

URL = "/v1/images/generations"
START_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_pids() -> set[int]:
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in ("raylet", "gcs_server")}


@contextmanager
def service(extra: list[str], threads: int, model: str | None):
    """An ``omnigen serve`` process; yields its base URL; SIGTERM and wait at the end."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "omnigen", "serve", "--port", str(port), "--device", "cpu", *extra]
    if model:
        cmd += ["--model", model]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_S
        while not ready(base):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(cmd)} did not start (exit code {proc.poll()})")
            time.sleep(1)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ready(base: str) -> bool:
    try:
        return httpx.get(base + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def throughput(base: str, clients: int, requests: int, steps: int) -> float:
    """Images per second with ``clients`` requests in flight (after one warm-up request per client)."""

    def one(seed: int) -> None:
        body = {
            "prompt": "a red circle",
            "seed": seed,
            "num_inference_steps": steps,
            "response_format": "png",
        }
        with httpx.Client(base_url=base, timeout=600) as client:
            for _ in range(20):  # a 429 (both services bound their queues) waits and tries again
                answer = client.post(URL, json=body)
                if answer.status_code != 429:
                    break
                time.sleep(0.2)
            answer.raise_for_status()

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))  # warm-up
        start = time.perf_counter()
        list(pool.map(one, range(requests)))
    return requests / (time.perf_counter() - start)


def latency_ms(base: str, probes: int) -> float:
    """Median milliseconds of ``GET /v1/models`` (no generation: the transport's own cost)."""
    times = []
    with httpx.Client(base_url=base, timeout=30) as client:
        for _ in range(probes):
            start = time.perf_counter()
            client.get("/v1/models").raise_for_status()
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure(extra: list[str], threads: int, args: argparse.Namespace) -> tuple[float, float]:
    with service(extra, threads, args.model) as base:
        return throughput(base, args.clients, args.requests, args.steps), latency_ms(base, args.probes)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the shipped one)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--probes", type=int, default=50, help="requests timed for the proxy's latency")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="8 requests, 10 probes, 2 steps")
    args = p.parse_args()
    if args.quick:
        args.requests, args.probes, args.steps = 8, 10, 2
    before = ray_pids()
    single = measure([], 1, args)
    replicas = measure(["--replicas", str(args.replicas), "--threads-per-replica", "1"], 1, args)
    load = os.getloadavg()[0]
    deadline = time.monotonic() + 60  # the raylet and gcs_server exit shortly after the CLI does
    while (left := ray_pids() - before) and time.monotonic() < deadline:
        time.sleep(1)
    print(f"| service | images/s ({args.clients} clients, {args.steps} steps) | GET /v1/models median ms |")
    print("|---|---|---|")
    print(f"| single process (1 thread) | {single[0]:.2f} | {single[1]:.1f} |")
    print(f"| --replicas {args.replicas} (1 thread each) | {replicas[0]:.2f} | {replicas[1]:.1f} |")
    print(f"speed-up {replicas[0] / single[0]:.2f}x, proxy adds {replicas[1] - single[1]:.1f} ms")
    print(f"load average (1 min) at the end: {load:.2f} on {os.cpu_count()} CPUs")
    if left:
        print(f"Ray processes left: {sorted(left)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
