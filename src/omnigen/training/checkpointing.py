"""A run's checkpoints: ``save`` gathers the run's state (a collective under FSDP: every rank gathers,
rank 0 writes through ``omnigen.training.state``) and ``resume`` loads the latest one back into a run.

What a checkpoint holds (its format is ``omnigen.training.state``'s): the trainable weights (the whole
model, or the LoRA tensors), the EMA, AdamW's state by parameter name, and ``state.json`` with the
step, the stage, the sampler position, the world size, the LoRA base model, the loss scaler and the EMA's
update count (its warm-up position); ``manifest.json`` holds each file's size and hash. There is no RNG
state: every draw derives from (seed, step, sample index).

``resume`` takes the newest intact checkpoint: its manifest verified, every tensor finite, and every entry
the run needs there (each weight, the EMA if the run keeps one, optimizer state as the parameters had it).
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
from omnigen.weights.checkpoint import CheckpointError

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
            "ema_updates": run.ema_updates,
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
    resumed = load_checkpoint(folder(run), check=lambda loaded: check_entries(run, loaded))
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
    run.ema_updates = info.get("ema_updates", info["step"])  # older checkpoints: one update a step
    if run.is_main:
        logger.info("resumed from %s at step %d", resumed["path"], info["step"])
    return ResumePoint(info["step"], info["sampler"], info.get("stage"))


def check_entries(run: Run, loaded: dict[str, Any]) -> None:
    """CheckpointError unless ``loaded`` holds every entry ``run`` resumes from: each weight (no more),
    the EMA of each trainable parameter when the run keeps one, and optimizer state for the run's
    parameters, each with the same moments (a parameter that never had a gradient has none)."""
    path = loaded["path"]
    names = set(run.trainable)
    expected = names if run.is_lora else set(run.model.state_dict())
    _same_names(expected, set(loaded["model"]), path / "model.safetensors")
    if run.ema is not None:
        if loaded["ema"] is None:
            raise CheckpointError(f"{path / 'ema.safetensors'} is missing and the run keeps an EMA")
        _same_names(names, set(loaded["ema"]), path / "ema.safetensors")
    optimizer = loaded["optimizer"]
    grouped = {name for group in optimizer["param_groups"] for name in group["params"]}
    _same_names(names, grouped, path / "state.json (optimizer param_groups)")
    moments = {key: set(values) for key, values in optimizer["state"].items()}
    every = set().union(*moments.values())
    odd = sorted(str(key) for key, found in moments.items() if key not in names or found != every)
    if odd:
        raise CheckpointError(
            f"{path / 'optimizer.safetensors'}: incomplete or unknown entries for {odd[:10]}"
        )


def _same_names(expected: set[str], found: set[str], where: Path | str) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: missing entries {missing[:10]}, unexpected entries {unexpected[:10]}"
        )


def save_adapter(run: Run, target: Path, state: dict[str, Any], ema_state: dict[str, Any] | None) -> None:
    """A PEFT adapter folder of ``state`` with the EMA tensors (if any) in place of the last weights."""
    from omnigen.weights.lora import save_lora

    save_lora(run.model, target, state_dict={**state, **(ema_state or {})}, base_model=run.base_reference)
