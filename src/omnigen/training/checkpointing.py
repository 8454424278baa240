"""A run's checkpoints: ``save`` gathers the run's state (a collective under FSDP: every rank gathers,
rank 0 writes through ``omnigen.training.state``) and ``resume`` loads the latest one back into a run.

What a checkpoint holds (its format is ``omnigen.training.state``'s): the trainable weights (the whole
model, or the LoRA tensors), the EMA, AdamW's state by parameter name, and ``state.json`` with the
step, the stage, the sampler position, the world size, the LoRA base model and the loss scaler. There is
no RNG state: every draw derives from (seed, step, sample index).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnigen.training import distributed
from omnigen.training.run import Run
from omnigen.training.schedule import BatchStream
from omnigen.training.state import load_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumePoint:
    step: int  # optimizer steps done
    sampler_state: dict[str, int] | None
    sampler_stage: int | None  # the stage the sampler state belongs to (None: not recorded)


def folder(run: Run) -> Path:
    return run.out / "checkpoints"


def save(run: Run, step: int, stream: BatchStream) -> None:
    """Checkpoint ``run`` after ``step`` steps; call on every rank."""
    runtime = run.runtime
    if run.builder.cache is not None:
        run.builder.cache.flush()
    model_state = (
        distributed.gather_tensors(run.trainable, runtime)
        if run.is_lora
        else distributed.gather_model(run.model, runtime)
    )
    ema_state = distributed.gather_tensors(run.ema, runtime) if run.ema is not None else None
    optimizer_state = distributed.gather_optimizer(run.model, run.optimizer, runtime)
    stream_state = stream.state()  # every rank: a shard stream gathers each rank's position
    if run.is_main:
        info = {
            "step": step,
            **stream_state,  # stage, sampler
            "world_size": runtime.world,
            "base_model": run.base_reference,
            "grad_scaler": run.scaler.state_dict(),
        }
        adapter = (
            (lambda tmp: save_adapter(run, tmp / "adapter", model_state, ema_state)) if run.is_lora else None
        )
        save_checkpoint(
            folder(run),
            model_state,
            ema_state,
            optimizer_state,
            info,
            run.config.keep_checkpoints,
            extra=adapter,
        )
    distributed.barrier(runtime)


def resume(run: Run) -> ResumePoint:
    """Load the latest checkpoint into ``run`` (weights, EMA, optimizer, loss scale) and say where it
    stopped; step 0 if there is none. Every rank loads the full tensors and keeps its shard."""
    resumed = load_checkpoint(folder(run))
    if resumed is None:
        return ResumePoint(0, None, None)
    if run.is_lora:
        distributed.load_tensors(run.trainable, resumed["model"])
    else:
        distributed.load_model(run.model, resumed["model"])
    if run.ema is not None and resumed["ema"] is not None:
        distributed.load_tensors(run.ema, resumed["ema"])
    distributed.load_optimizer(run.model, run.optimizer, resumed["optimizer"])
    info = resumed["info"]
    if info.get("grad_scaler"):
        run.scaler.load_state_dict(info["grad_scaler"])
    if run.is_main:
        logger.info("resumed from %s at step %d", resumed["path"], info["step"])
    return ResumePoint(info["step"], info["sampler"], info.get("stage"))


def save_adapter(run: Run, target: Path, state: dict[str, Any], ema_state: dict[str, Any] | None) -> None:
    """A PEFT adapter folder of ``state`` with the EMA tensors (if any) in place of the last weights."""
    from omnigen.weights.lora import save_lora

    save_lora(run.model, target, state_dict={**state, **(ema_state or {})}, base_model=run.base_reference)
