"""The trainer: progressive-resolution stages, AdamW, warm-up + schedule, accumulation, clipping, EMA,
autocast, checkpoints with exact resume, loss per t-bin, torchrun (DDP) aware.

``train(config)`` reads straight down (DiT style): distributed set-up, model, EMA, optimizer, data,
resume, loop, final export. Only rank 0 logs and writes.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from omnigen.checkpoint import load_model, save_model
from omnigen.config import OmniGenConfig
from omnigen.model import OmniGenModel
from omnigen.pipeline import GenerationDefaults
from omnigen.processor import OmniGenProcessor
from omnigen.tokenizer import Tokenizer
from omnigen.training.batches import BatchBuilder
from omnigen.training.config import TrainConfig
from omnigen.training.loss import flow_matching_loss
from omnigen.training.sampling_data import ConditionDropout, ShardedBucketSampler
from omnigen.training.state import load_checkpoint, save_checkpoint
from omnigen.training.x2i import read_x2i
from omnigen.vae import AutoencoderKLCodec, IdentityCodec

logger = logging.getLogger(__name__)
T_BINS = 5


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay only on tensors with >= 2 dimensions (matrices, embeddings, convs)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, config: TrainConfig) -> float:
    """Stage LR with linear warm-up and an optional cosine decay over the whole run."""
    stage_lr, start = config.stages[-1].lr, 0
    for stage in config.stages:
        if step < start + stage.steps:
            stage_lr = stage.lr
            break
        start += stage.steps
    factor = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    if config.schedule == "cosine" and step >= config.warmup_steps:
        progress = (step - config.warmup_steps) / max(1, config.total_steps - config.warmup_steps)
        factor *= 0.5 * (1 + math.cos(math.pi * progress))
    return stage_lr * factor


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def _stage_of(step: int, config: TrainConfig) -> int:
    start = 0
    for index, stage in enumerate(config.stages):
        if step < start + stage.steps:
            return index
        start += stage.steps
    return len(config.stages) - 1


def _build(config: TrainConfig, device: torch.device) -> tuple[OmniGenModel, Tokenizer, object]:
    if config.init_from:
        model, layout = load_model(config.init_from, device=device)
        tokenizer = Tokenizer.from_file(config.tokenizer or layout.tokenizer_dir)
    else:
        torch.manual_seed(config.seed)
        model = OmniGenModel(OmniGenConfig.from_dict(config.model)).to(device)
        model.initialize_weights()
        if config.tokenizer is None:
            raise ValueError("a new model needs `tokenizer` (a tokenizer.json)")
        tokenizer = Tokenizer.from_file(config.tokenizer)
    codec = (
        IdentityCodec(channels=model.config.in_channels)
        if config.codec == "identity"
        else AutoencoderKLCodec.from_pretrained(config.codec).to(device)
    )
    return model, tokenizer, codec


def train(config: TrainConfig, device: str | None = None, stop_after: int | None = None) -> Path:
    """Runs (or resumes) the run in ``config.out_dir``; returns the exported model folder.

    ``stop_after``: stop (with a checkpoint) once this many optimizer steps are done — for tests.
    """
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(config.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(config.to_json())

    model, tokenizer, codec = _build(config, device)
    model.llm.gradient_checkpointing = config.gradient_checkpointing
    ema = copy.deepcopy(model).requires_grad_(False) if config.ema_decay > 0 else None
    optimizer = torch.optim.AdamW(
        param_groups(model, config.weight_decay), lr=config.stages[0].lr, betas=config.betas
    )
    train_model: torch.nn.Module = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model)

    read = read_x2i(config.data, image_root=config.image_root, on_bad_row=config.on_bad_row)
    samples = read.samples
    processor = OmniGenProcessor(
        tokenizer, model.config, max_input_image_size=max(s.resolution for s in config.stages)
    )
    builder = BatchBuilder(
        samples,
        processor,
        codec,
        ConditionDropout(config.drop_text, config.drop_images, config.drop_both),
        device,
    )
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)
    step, sampler_state = 0, None
    resumed = load_checkpoint(out / "checkpoints")
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        if ema is not None and resumed["ema"] is not None:
            ema.load_state_dict(resumed["ema"])
        optimizer.load_state_dict(resumed["optimizer"])
        generator.set_state(resumed["generators"][f"rank{rank}"])
        step, sampler_state = resumed["info"]["step"], resumed["info"]["sampler"]
        logger.info("resumed from %s at step %d", resumed["path"], step)

    stop = {"now": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True)) if rank == 0 else None
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16 if config.precision == "bf16" else torch.float16)
        if config.precision != "fp32"
        else contextlib.nullcontext()
    )
    bins = torch.zeros(T_BINS, 2)
    progress = tqdm(total=config.total_steps, initial=step, disable=rank != 0, desc="train")
    started, seen = time.perf_counter(), 0
    stage_index, sampler, batches = -1, None, None

    def checkpoint() -> None:
        if rank != 0:
            return
        gens = {f"rank{r}": generator.get_state() for r in range(world)}  # ranks' states equal in shape
        info = {"step": step, "sampler": sampler.state_dict() if sampler else None}
        save_checkpoint(
            out / "checkpoints",
            model.state_dict(),
            ema.state_dict() if ema else None,
            optimizer.state_dict(),
            gens,
            info,
            config.keep_checkpoints,
        )

    while step < config.total_steps and not stop["now"]:
        if _stage_of(step, config) != stage_index:
            stage_index = _stage_of(step, config)
            stage = config.stages[stage_index]
            sampler = ShardedBucketSampler(
                [(stage.resolution, stage.resolution)] * len(samples),
                stage.batch_size,
                num_replicas=world,
                rank=rank,
                seed=config.seed,
            )
            sampler.set_epoch(stage_index * 10_000)
            if sampler_state is not None and sampler_state.get("batch_size") == stage.batch_size:
                sampler.load_state_dict(sampler_state)
            sampler_state = None
            batches = iter(sampler)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        train_model.train()
        for micro in range(config.grad_accum):
            indices = next(batches, None)
            if indices is None:  # next epoch
                sampler.set_epoch(sampler.state_dict()["epoch"] + 1)
                batches = iter(sampler)
                indices = next(batches)
            batch = builder(indices, stage.resolution, generator)
            sync = (
                contextlib.nullcontext()
                if not distributed or micro == config.grad_accum - 1
                else train_model.no_sync()
            )
            with sync, autocast:
                result = flow_matching_loss(
                    train_model,
                    batch.condition,
                    batch.x1,
                    generator,
                    config.t_distribution,
                    batch.reference,
                    batch.has_reference,
                    batch.weights,
                    config.edit_weight,
                    config.edit_threshold,
                )
                (result.loss / config.grad_accum).backward()
            index = (result.t * T_BINS).long().clamp(max=T_BINS - 1)
            bins.index_add_(
                0, index.cpu(), torch.stack([result.per_sample.cpu(), torch.ones_like(result.t).cpu()], 1)
            )
            seen += len(indices) * world
        if config.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            update_ema(ema, model, 0.0 if step == 0 else config.ema_decay)
        step += 1
        progress.update(1)
        if rank == 0 and (step % config.log_every == 0 or step == config.total_steps):
            per_bin = (bins[:, 0] / bins[:, 1].clamp(min=1)).tolist()
            rate = seen / (time.perf_counter() - started)
            progress.set_postfix(
                loss=f"{result.loss.item():.4f}", lr=f"{lr_at(step - 1, config):.2e}", sps=f"{rate:.1f}"
            )
            logger.info(
                "step %d loss %.4f lr %.2e samples/s %.1f loss by t-bin %s",
                step,
                result.loss.item(),
                lr_at(step - 1, config),
                rate,
                " ".join(f"{v:.3f}" for v in per_bin),
            )
            bins.zero_()
        last = step == config.total_steps or (stop_after is not None and step >= stop_after)
        if step % config.checkpoint_every == 0 or last:
            checkpoint()
        if stop_after is not None and step >= stop_after:
            break
    if stop["now"]:
        logger.warning("SIGTERM: checkpoint at step %d", step)
        checkpoint()
    progress.close()
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
    final = out / "final"
    if rank == 0 and step >= config.total_steps:
        export(ema or model, tokenizer, codec, final, config.generation)
    if distributed:
        dist.barrier()
    return final


def export(model: OmniGenModel, tokenizer: Tokenizer, codec, folder: Path, generation: dict) -> None:  # noqa: ANN001
    """A model folder ``OmniGenPipeline.from_pretrained`` loads."""
    save_model(model, folder)
    tokenizer.save(folder)
    codec.save(folder)
    GenerationDefaults(**generation).save(folder)
