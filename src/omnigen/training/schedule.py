"""What a training step works on, as a function of the step: the stage (progressive resolution), its
learning rate (warm-up, optional cosine decay) and its global batches (``BatchStream``).

Every rank runs the same sampler over *global* batches (stage batch_size x world size samples, all of
one output-size bucket); each rank later takes its own slice (``BatchBuilder.rank_batch``).
"""

from __future__ import annotations

import math
from typing import Any

from omnigen.training.batches import BatchBuilder
from omnigen.training.config import Stage, TrainConfig
from omnigen.training.sampling_data import ShardedBucketSampler

STAGE_EPOCH_OFFSET = 10_000  # stage k's sampler starts at epoch k * this: each stage its own data order


def stage_of(step: int, config: TrainConfig) -> int:
    """The index of the stage that step ``step`` (0-based) belongs to; the last one past the end."""
    start = 0
    for index, stage in enumerate(config.stages):
        if step < start + stage.steps:
            return index
        start += stage.steps
    return len(config.stages) - 1


def lr_at(step: int, config: TrainConfig) -> float:
    """Stage LR with linear warm-up and an optional cosine decay over the whole run."""
    stage_lr = config.stages[stage_of(step, config)].lr
    factor = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    if config.schedule == "cosine" and step >= config.warmup_steps:
        progress = (step - config.warmup_steps) / max(1, config.total_steps - config.warmup_steps)
        factor *= 0.5 * (1 + math.cos(math.pi * progress))
    return stage_lr * factor


class BatchStream:
    """The global batches of the run, step by step: one ``ShardedBucketSampler`` per stage, its epochs
    chained. ``sampler_state`` (from a checkpoint, with the ``stage`` it was saved in; None = unknown,
    checkpoints written before stages were recorded) restarts that stage's sampler where it stopped."""

    def __init__(
        self,
        config: TrainConfig,
        builder: BatchBuilder,
        world: int,
        sampler_state: dict[str, int] | None = None,
        sampler_stage: int | None = None,
    ) -> None:
        self.config, self.builder, self.world = config, builder, world
        self._resume = (sampler_state, sampler_stage)
        self.stage_index = -1
        self.sampler: ShardedBucketSampler | None = None
        self._batches = iter(())

    def next_step(self, step: int) -> tuple[Stage, list[list[int]]]:
        """Step ``step``'s stage and its ``grad_accum`` global batches (lists of sample indices)."""
        if stage_of(step, self.config) != self.stage_index:
            self._start_stage(stage_of(step, self.config))
        return self.config.stages[self.stage_index], [self._next() for _ in range(self.config.grad_accum)]

    def state(self) -> dict[str, Any]:
        """What a checkpoint records to continue this stream: ``stage`` and ``sampler``."""
        return {"stage": self.stage_index, "sampler": self.sampler.state_dict() if self.sampler else None}

    def _start_stage(self, index: int) -> None:
        config, stage = self.config, self.config.stages[index]
        self.stage_index = index
        self.sampler = ShardedBucketSampler(  # a global batch holds one bucket; each rank takes a slice
            self.builder.target_sizes(stage.resolution),
            stage.batch_size * self.world,
            seed=config.seed,
            lengths=self.builder.sequence_lengths(stage.resolution) if config.length_groups > 1 else None,
            length_groups=config.length_groups,
        )
        self.sampler.set_epoch(index * STAGE_EPOCH_OFFSET)
        state, saved_stage = self._resume
        if state is not None and saved_stage in (None, index):
            self.sampler.load_state_dict(state)
        self._resume = (None, None)
        self._batches = iter(self.sampler)

    def _next(self) -> list[int]:
        indices = next(self._batches, None)
        if indices is None:  # next epoch
            self.sampler.set_epoch(self.sampler.state_dict()["epoch"] + 1)
            self._batches = iter(self.sampler)
            indices = next(self._batches)
        return indices
