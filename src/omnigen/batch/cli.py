"""``omnigen batch REQUESTS.jsonl --out DIR`` and the process-group setup it shares with ``omnigen eval``.

Scale out with ``torchrun --nproc_per_node N -m omnigen batch ...`` (add ``--nnodes``/``--node_rank``/
``--rdzv-endpoint`` across nodes; DIR must be a folder every node sees). Each rank loads the model on its
own device (``cuda:LOCAL_RANK`` when CUDA is used) and generates its slice of the pending images.
With ``--parallel cfg`` or ``sequence`` the ranks instead make every image together
(``omnigen.sampling.parallel``: each rank runs its own guidance branches, or its share of every step's
tokens and heads): rank 0 plans, writes and records; the others follow its calls.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from omnigen.cli.args import add_model_args, load_pipeline
from omnigen.generation import MAX_CONDITION_TOKENS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: str
    barrier: Callable[[], None] | None
    close: Callable[[], None]


def init_distributed(device: str | None = None) -> DistContext:
    """Rank, world size and device from torchrun's environment; a gloo (CPU) or nccl (CUDA) group when
    WORLD_SIZE > 1. `device` None picks CUDA when available."""
    import torch

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = (device is None and torch.cuda.is_available()) or (device or "").startswith("cuda")
    if world_size == 1:
        return DistContext(0, 1, device or ("cuda" if use_cuda else "cpu"), None, lambda: None)
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    # Ranks wait for each other at the end; the slowest shard may take hours.
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(hours=24))
    rank = dist.get_rank()
    return DistContext(
        rank,
        dist.get_world_size(),
        f"cuda:{local_rank}" if use_cuda else "cpu",
        dist.barrier,
        dist.destroy_process_group,
    )


def add_batch_args(p: argparse.ArgumentParser) -> None:
    """The model flags (``omnigen.cli.args``) and the batching flags of ``batch`` and ``eval``."""
    add_model_args(p)
    p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--max-condition-tokens",
        type=int,
        default=MAX_CONDITION_TOKENS,
        help=f"budget of prompt + input-image tokens per request; 0: none (default: {MAX_CONDITION_TOKENS})",
    )


def register(sub: argparse._SubParsersAction) -> None:
    from omnigen.batch.requests import PARAMETERS

    p = sub.add_parser(
        "batch",
        help="generate every request of a JSONL file (resumable; torchrun for several processes)",
        description=(
            "One JSON object per line: prompt, input_images, mask, id, n, seed, meta and any generation parameter "
            f"({', '.join(PARAMETERS)}). Writes DIR/<id>/<k>.png and DIR/results.jsonl. "
            "A rerun skips finished images. Launch with torchrun --nproc_per_node N -m omnigen batch ..."
        ),
    )
    p.add_argument("requests", help="request JSONL")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="base seed for requests without one (default 0)")
    p.add_argument(
        "--on-error",
        choices=["skip", "fatal"],
        default="skip",
        help="bad lines and failed batches: report and go on (skip, default) or stop (fatal)",
    )
    p.add_argument(
        "--engine",
        choices=["torchrun", "ray"],
        default="torchrun",
        help="torchrun: this process is one rank (default); ray: a Ray Data actor pool (docs/batch_at_scale.md)",
    )
    p.add_argument(
        "--actors", type=int, default=None, help="ray: pipelines in the pool (default: one per GPU, else 1)"
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="ray: the cluster to join (default: RAY_ADDRESS, else a local Ray)",
    )
    add_batch_args(p)
    p.add_argument(
        "--parallel",
        choices=["cfg", "sequence"],
        default=None,
        help="all ranks make each image together, rank 0 writes everything (default: each rank generates "
        "its own slice). cfg: each of 2-3 ranks runs its own guidance branches; sequence: each runs a "
        "share of every step's output tokens and attention heads",
    )
    p.set_defaults(func=_run)


def generate_requests(args: argparse.Namespace, requests: list, out, **kwargs):
    """Load the pipeline of ``args`` on this rank's device and run ``requests`` into ``out`` (every rank);
    shared by ``omnigen batch`` and the ``omnigen eval`` generators. Returns this rank's BatchReport."""
    from omnigen.batch.runner import BatchReport, run_batch
    from omnigen.sampling.parallel import check_parallel

    ctx = init_distributed(args.device)
    parallel = getattr(args, "parallel", None)
    try:
        check_parallel(parallel)
        pipe = load_pipeline(args, ctx.device)
        if parallel is not None and ctx.rank > 0:
            follow(pipe, parallel)
            return BatchReport(0, 0, 0, 0, rank=ctx.rank, world_size=ctx.world_size)
        alone = parallel is not None  # rank 0 is the only writer
        return run_batch(
            _Leader(pipe, parallel) if alone else pipe,
            requests,
            out,
            batch_size=args.batch_size,
            rank=ctx.rank,
            world_size=1 if alone else ctx.world_size,
            barrier=None if alone else ctx.barrier,
            model=str(args.model) if args.model is not None else None,
            progress=not args.no_progress,
            max_condition_tokens=args.max_condition_tokens or None,
            **kwargs,
        )
    finally:
        if parallel is not None and ctx.rank == 0 and ctx.world_size > 1:
            _broadcast(None)  # the followers stop
        ctx.close()


class _Leader:
    """Rank 0's pipeline under ``--parallel``: each call's arguments go to the other ranks first."""

    def __init__(self, pipe, parallel: str) -> None:
        self.pipe, self.parallel = pipe, parallel

    def __getattr__(self, name: str):
        return getattr(self.pipe, name)

    def __call__(self, *args, **kwargs):
        _broadcast((args, kwargs))
        return self.pipe(*args, parallel=self.parallel, **kwargs)


def follow(pipe, parallel: str) -> int:
    """Ranks > 0 under ``--parallel``: make every call rank 0 makes, until it sends None; returns the
    number of calls. A failing call fails on rank 0 too, which records it."""
    calls = 0
    while (message := _broadcast(None)) is not None:
        args, kwargs = message
        try:
            pipe(*args, parallel=parallel, **kwargs)
        except Exception as err:
            logger.debug("followed call failed: %s", err)
        calls += 1
    return calls


def _broadcast(message):
    """Rank 0's ``message`` on every rank (what the others pass is ignored)."""
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _generate_with_ray(args: argparse.Namespace, requests: list, out, **kwargs):
    """``--engine ray``: the actors load the pipeline of ``args`` (one GPU each when CUDA is used, else
    one CPU); the driver plans with one loaded on the CPU. A Ray started (or joined) here is shut down."""
    import functools

    if args.actors is not None and args.actors < 1:
        raise ValueError(f"--actors must be >= 1, got {args.actors}")
    try:
        import ray
        import ray.data
    except ImportError as err:
        raise ImportError(f"--engine ray needs {err.name}: pip install 'omnigen-unified[raydata]'") from err

    from omnigen.batch.ray_engine import run_batch_ray

    ray.data.DataContext.get_current().enable_progress_bars = not args.no_progress
    started = not ray.is_initialized()
    if started:
        local = args.ray_address is None and not os.environ.get("RAY_ADDRESS")
        extra = {"_node_ip_address": "127.0.0.1"} if local else {}  # a local Ray listens on loopback only
        ray.init(address=args.ray_address, include_dashboard=False, **extra)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        device = args.device if args.device not in (None, "auto") else ("cuda" if gpus else "cpu")
        use_gpu = device.startswith("cuda")
        return run_batch_ray(
            functools.partial(
                load_pipeline, args, "cuda" if use_gpu else "cpu"
            ),  # an actor sees its GPU as 0
            requests,
            out,
            actors=args.actors or (gpus if use_gpu and gpus else 1),
            num_gpus=1 if use_gpu else 0,
            planner=load_pipeline(args, "cpu"),
            batch_size=args.batch_size,
            model=str(args.model) if args.model is not None else None,
            max_condition_tokens=args.max_condition_tokens or None,
            **kwargs,
        )
    finally:
        if started:
            ray.shutdown()


def _run(args: argparse.Namespace) -> int:
    from omnigen.batch.requests import RequestError, read_requests

    requests, bad = read_requests(args.requests, base_seed=args.seed)
    for line in bad if os.environ.get("RANK", "0") == "0" else []:
        logger.warning("%s:%d: %s", args.requests, line.line, line.reason)
    if bad and args.on_error == "fatal":
        raise RequestError(f"{args.requests}:{bad[0].line}: {bad[0].reason} ({len(bad)} bad line(s))")
    if args.engine != "ray" and (args.actors is not None or args.ray_address is not None):
        raise ValueError("--actors and --ray-address need --engine ray")
    if args.engine == "ray" and args.parallel is not None:
        raise ValueError(
            f"--parallel {args.parallel} runs under torchrun; with --engine ray each actor makes whole images"
        )
    run = _generate_with_ray if args.engine == "ray" else generate_requests
    report = run(args, requests, args.out, on_error=args.on_error, bad_lines=bad)
    logger.info(
        "rank %d: %d images requested, %d already done, %d generated, %d failed, %d bad line(s)",
        report.rank,
        report.total_images,
        report.already_done,
        report.generated,
        report.failed,
        len(report.bad_lines),
    )
    if report.bad_lines:  # skipped: they are in the log and DIR/errors.jsonl, and the run is not a success
        logger.error(
            "%d bad line(s) skipped (see %s)", len(report.bad_lines), Path(args.out) / "errors.jsonl"
        )
    return 1 if report.failed or report.bad_lines else 0
