"""The trainer's batches when ``data:`` names tar shards: ``ShardBatchStream``, the streaming twin of
``schedule.BatchStream`` (same ``next_step`` / ``state`` interface).

Each rank reads its own ``SampleStream`` (its shards, its shuffle buffer, ``omnigen.training.stream``),
so ranks never share a sample within a pass; with ``data_workers: W`` it is read by W DataLoader worker
processes instead, each its share of the rank's shards (``omnigen.training.stream_loader``). A step takes ``grad_accum`` x stage batch_size samples from
it; their images are written to a small per-rank spool folder (a local temporary folder, emptied every
step, removed with the stream)
and handed to the usual ``BatchBuilder`` as X2I samples, so dropout, the processor, the codec and the
loss are the JSONL path's.

The builder sees a global batch of world x batch_size entries in which this rank's slice
(``sampling_data.shard``) holds its own samples, so each sample draws from its own generator
``(seed, step, rank * batch_size + j)``, and every rank's loss is normalised by its own weight sum (the
same as the global weighted mean when every rank's samples weigh the same, e.g. all 1).

Resume: ``state()`` gathers every rank's stream state (position in its shards, RNG, buffered
references; with loader workers, each worker's), so a checkpoint holds them all and each rank continues
exactly where it stopped; the run must resume with the same world size and ``data_workers``. Square outputs only (``keep_raw_resolution`` needs per-bucket
pools, not built yet).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch

from omnigen.training import distributed
from omnigen.training.batches import BatchBuilder
from omnigen.training.config import Stage, TrainConfig
from omnigen.training.latent_cache import codec_fingerprint
from omnigen.training.schedule import stage_of
from omnigen.training.shard_latents import read_sample
from omnigen.training.stream import SampleStream, ShardSource
from omnigen.training.stream_loader import LoaderStream
from omnigen.training.x2i import FewShot, X2ISample

logger = logging.getLogger(__name__)


class StepLatents:
    """The latents a step's shard samples bring (``KEY.latents.safetensors``), in the shape of a
    ``LatentCache``: the builder asks it before encoding a view."""

    def __init__(self) -> None:
        self.entries: dict[str, torch.Tensor] = {}
        self.misses = 0

    def key(self, path: str | Path, view: str) -> str:
        return f"{Path(path).resolve()}|{view}"

    def get(self, key: str) -> torch.Tensor | None:
        return self.entries.get(key)

    def put(self, key: str, latent: torch.Tensor) -> None:
        self.misses += 1  # encoded by the run: not kept past the step

    def flush(self) -> None:
        pass


def spool_sample(folder: Path, name: str, files: dict[str, bytes]) -> tuple[X2ISample, dict[str, Path]]:
    """Write one shard sample's images under ``folder``; returns it as an X2I sample and its image paths
    by name (in0, out, ...)."""
    meta = json.loads(files["json"])
    paths: dict[str, Path] = {}

    def image(part: str) -> Path:
        suffix = next(s for s in files if s.startswith(f"{part}."))
        paths[part] = folder / f"{name}.{suffix}"
        paths[part].write_bytes(files[suffix])
        return paths[part]

    inputs = tuple(image(f"in{k}") for k in range(len(meta.get("input_sizes", []))))
    shot = meta.get("few_shot")
    few_shot = None
    if shot:
        count = len(shot.get("input_images") or [])
        few_shot = FewShot(
            shot["instruction"], tuple(image(f"shot_in{k}") for k in range(count)), image("shot_out")
        )
    sample = X2ISample(
        instruction=meta["instruction"],
        input_images=inputs,
        output_image=image("out"),
        task_type=meta.get("task_type"),
        id=str(meta.get("id", name)),
        weight=float(meta.get("weight", 1.0)),
        few_shot=few_shot,
        source=meta.get("source", name),
    )
    return sample, paths


def _sample_stream(
    config: TrainConfig,
    sources: list[ShardSource],
    runtime: distributed.Runtime,
    buffer_size: int,
    state: dict[str, Any] | None,
) -> SampleStream | LoaderStream:
    """This rank's samples: read in this process (``data_workers: 0``) or by loader workers."""
    if config.data_workers:
        options = {"rank": runtime.rank, "world": runtime.world, "workers": config.data_workers}
        options["buffer_size"] = buffer_size
        return LoaderStream(sources, config.seed, state=state, **options)
    stream = SampleStream(
        sources, seed=config.seed, rank=runtime.rank, world=runtime.world, buffer_size=buffer_size
    )
    if state is not None:
        if "workers" in state:
            raise ValueError(
                f"the checkpoint's stream was read by {state['workers']} data workers, this run has none: resume "
                "with the data_workers it was saved with"
            )
        stream.load_state_dict(state)
    return stream


class ShardBatchStream:
    def __init__(
        self,
        config: TrainConfig,
        builder: BatchBuilder,
        sources: list[ShardSource],
        runtime: distributed.Runtime,
        spool: Path | None = None,
        sampler_state: list[dict[str, Any]] | None = None,
        buffer_size: int = 1000,
    ) -> None:
        if config.keep_raw_resolution:
            raise ValueError("streaming from shards trains square outputs: set keep_raw_resolution: false")
        self.config, self.builder, self.runtime = config, builder, runtime
        if spool is None:
            spool = Path(tempfile.mkdtemp(prefix=f"omnigen-stream-rank{runtime.rank}-"))
            weakref.finalize(self, shutil.rmtree, spool, True)
        self.spool = spool / f"rank{runtime.rank}"
        self.stage_index = -1
        self.fingerprint = codec_fingerprint(builder.codec, config.codec)
        self.latents, self._warned = StepLatents(), False
        if sampler_state is not None:
            if not isinstance(sampler_state, list) or len(sampler_state) != runtime.world:
                saved = len(sampler_state) if isinstance(sampler_state, list) else "no per-rank"
                raise ValueError(
                    f"the checkpoint holds {saved} stream states but the run has {runtime.world} ranks: resume a "
                    "shard-streaming run with the world size it was saved with"
                )
        self.stream = _sample_stream(
            config,
            sources,
            runtime,
            buffer_size,
            None if sampler_state is None else sampler_state[runtime.rank],
        )

    def next_step(self, step: int) -> tuple[Stage, list[list[int]]]:
        """Step ``step``'s stage and its ``grad_accum`` global batches over the builder's fresh samples."""
        self.stage_index = stage_of(step, self.config)
        stage, world = self.config.stages[self.stage_index], self.runtime.world
        shutil.rmtree(self.spool, ignore_errors=True)
        self.builder.cache = self.latents = StepLatents()
        self.spool.mkdir(parents=True)
        samples, batches = [], []
        for micro in range(self.config.grad_accum):
            local = []
            for j in range(stage.batch_size):
                source, key, files = next(iter(self.stream))
                sample, paths = spool_sample(self.spool, f"{micro}-{j}-s{source}-{key}", files)
                if "latents.safetensors" in files:
                    self._add_latents(files["latents.safetensors"], paths, stage.resolution)
                local.append(sample)
            start = len(samples)
            samples += local * world  # slot rank * batch_size + j holds local[j]
            batches.append(list(range(start, start + world * stage.batch_size)))
        self.builder.reset_samples(samples)
        return stage, batches

    def _add_latents(self, data: bytes, paths: dict[str, Path], resolution: int) -> None:
        """A sample's stored latents, when made by this run's codec at this stage's resolution."""
        tensors, meta = read_sample(data)
        if meta.get("codec") != self.fingerprint or meta.get("resolution") != str(resolution):
            if not self._warned:
                logger.warning(
                    "shard latents made by %s at %s do not match this run (%s at %d): encoding the images",
                    meta.get("codec"), meta.get("resolution"), self.fingerprint, resolution,
                )  # fmt: skip
                self._warned = True
            return
        view = f"fill:{resolution}x{resolution}:{self.builder.processor.config.image_multiple}"
        for name, path in paths.items():
            self.latents.entries[self.latents.key(path, view)] = tensors[name].to(self.builder.device)

    def state(self) -> dict[str, Any]:
        """Every rank's stream state (a collective: call on every rank)."""
        states = [self.stream.state_dict()]
        if self.runtime.world > 1:
            import torch.distributed as dist

            states = [None] * self.runtime.world
            dist.all_gather_object(states, self.stream.state_dict())
        return {"stage": self.stage_index, "sampler": states}
