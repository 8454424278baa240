"""One optimizer step: the step's micro-batches forward and backward (this rank's slice of each global
batch), unscale + clip, AdamW, the loss scaler's update, the EMA, and the step's numbers summed over
ranks.

Each sample's condition dropout, t and noise come from its own generator, seeded by (seed, step,
sample index), and the loss is the weighted sum over the whole global batch (all micro-batches, all
ranks) divided by its weight sum, so the split over ranks and micro-batches does not change the step.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from omnigen.training import distributed
from omnigen.training.config import Stage
from omnigen.training.loss import flow_matching_loss
from omnigen.training.run import Run
from omnigen.training.sampling_data import sample_generator
from omnigen.training.schedule import lr_at

logger = logging.getLogger(__name__)

T_BINS = 5  # the loss is also reported per t in [k/T_BINS, (k+1)/T_BINS)


@dataclass(frozen=True)
class StepResult:
    loss: float  # the global batch's weighted mean loss
    grad_norm: float | None  # before clipping; None with clipping off
    bins: torch.Tensor  # (T_BINS, 2) float32: loss sum and sample count per t-bin, all ranks
    samples: int  # global samples in the step (pads included)
    stop: bool  # some rank was asked to stop (SIGTERM)


class NonFiniteLossError(FloatingPointError):
    """A step's loss was NaN or infinite (the run stops before the optimizer takes it)."""


def ema_decay_at(updates: int, decay: float) -> float:
    """The decay of EMA update number ``updates`` (0-based): ``decay`` warmed up as min(decay, (1 + s) /
    (10 + s)), so a short run's EMA follows the raw weights instead of staying at the initial ones."""
    return min(decay, (1 + updates) / (10 + updates))


@torch.no_grad()
def update_ema(ema: dict[str, torch.Tensor], params: dict[str, torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params, name by name (the trainable parameters only)."""
    for name, e in ema.items():
        e.mul_(decay).add_(params[name].detach(), alpha=1 - decay)


def autocast_context(config_precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 / fp16 autocast, or nothing for fp32."""
    if config_precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if config_precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def train_step(
    run: Run, step: int, stage: Stage, global_batches: list[list[int]], stop_requested: Callable[[], bool]
) -> StepResult:
    """Optimizer step ``step`` (0-based) over ``global_batches`` (its ``grad_accum`` global batches).
    ``stop_requested()``, asked once the gradients are in: this rank was asked to stop (e.g. SIGTERM
    during the step); all ranks learn it through the step's all-reduce. A NaN/inf loss raises
    ``NonFiniteLossError`` before the update, or with ``skip_nonfinite_loss`` skips the update."""
    config, runtime = run.config, run.runtime
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(step, config)
    if config.lora is not None and config.lora.dropout > 0:  # LoRA dropout draws from the global RNG
        torch.manual_seed(sample_generator(config.seed, step, -1 - runtime.rank).initial_seed())
    run.train_model.train()
    total_weight = sum(run.builder.samples[i].weight for indices in global_batches for i in indices)
    stats = torch.zeros(2 + 2 * T_BINS, dtype=torch.float64)  # loss sum, stop flag, t-bins
    for micro, indices in enumerate(global_batches):
        last = micro == len(global_batches) - 1
        _micro_batch(run, step, stage, indices, total_weight, last, stats)
    stats[1] = float(stop_requested())
    stats = distributed.all_reduce_sum(stats, runtime)  # before the update: every rank sees a NaN loss
    loss = stats[0].item() / total_weight
    grad_norm = None
    if math.isfinite(loss):
        grad_norm = _update(run)
    elif config.skip_nonfinite_loss:
        logger.warning("step %d: the loss is %s; its batch is skipped (skip_nonfinite_loss)", step + 1, loss)
    else:
        raise NonFiniteLossError(
            f"step {step + 1}: the loss is {loss}, the weights are left as they were after step {step} "
            "(lower the learning rate, check the data, or set skip_nonfinite_loss: true to skip such batches)"
        )
    run.optimizer.zero_grad(set_to_none=True)
    return StepResult(
        loss=loss,
        grad_norm=grad_norm,
        bins=stats[2:].view(T_BINS, 2).float(),
        samples=sum(len(indices) for indices in global_batches),
        stop=bool(stats[1] > 0),
    )


def _update(run: Run) -> float | None:
    """Unscale + clip, AdamW, the loss scaler's update and the EMA; returns the grad norm before clipping."""
    grad_norm = None
    if run.config.clip_grad > 0:
        run.scaler.unscale_(run.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(list(run.trainable.values()), run.config.clip_grad)
        grad_norm = distributed.full_tensor(norm).item()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.ema is not None:
        update_ema(run.ema, run.trainable, ema_decay_at(run.ema_updates, run.config.ema_decay))
        run.ema_updates += 1
    return grad_norm


def _micro_batch(
    run: Run,
    step: int,
    stage: Stage,
    indices: list[int],
    total_weight: float,
    last: bool,
    stats: torch.Tensor,
) -> None:
    """Forward + backward of this rank's slice of one global batch; adds its loss sum and t-bins to
    ``stats``. Gradients are reduced over ranks only on the ``last`` micro-batch."""
    config, runtime = run.config, run.runtime
    batch, generators, real = run.builder.rank_batch(
        indices, stage.resolution, config.seed, step, runtime.rank, runtime.world
    )
    sync = distributed.gradient_sync(run.train_model, runtime, last)
    with sync, autocast_context(config.precision, runtime.device):
        result = flow_matching_loss(
            run.train_model,
            batch,
            generators,
            config.loss_settings(),
            normalizer=total_weight / runtime.world,  # DDP / FSDP average over ranks
            max_tokens=config.max_tokens,
            runner=run.runner,
        )
        run.scaler.scale(result.loss).backward()
    per_sample, t = result.per_sample.cpu().double(), result.t.cpu()
    stats[0] += (per_sample * batch.weights.cpu()).sum()
    index = (t * T_BINS).long().clamp(max=T_BINS - 1)[real]
    pairs = torch.stack([per_sample[real], torch.ones(len(index), dtype=torch.float64)], 1)
    stats[2:].view(T_BINS, 2).index_add_(0, index, pairs)
