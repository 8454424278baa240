"""The trainer: progressive-resolution stages, AdamW, warm-up + schedule, accumulation, clipping, EMA,
autocast, checkpoints with exact resume, loss per t-bin; a full fine-tune or LoRA; one process or
torchrun (DDP or FSDP2).

``train(config)`` reads straight down (DiT style): distributed set-up, model (+ LoRA), EMA, optimizer,
data, resume, loop, final export. Only rank 0 logs and writes checkpoints (a latent cache gets shards
from every rank).

Rank layout does not change the run. Every rank runs the same sampler over *global* batches (stage
batch_size x world size samples, all of one output-size bucket) and takes its contiguous slice (padded
with zero-weight samples when a bucket's last batch does not split evenly). Each sample's condition
dropout, t and noise come from its own generator, seeded by (seed, step, sample index), and the loss is
the weighted sum over the whole global batch (all micro-batches, all ranks) divided by its weight sum.
So N ranks x batch b and one process x batch N*b take the same steps up to float rounding, and no RNG
state is needed to resume.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import TextIO

import torch
from tqdm.auto import tqdm

from omnigen.checkpoint import build_model, load_model, save_model
from omnigen.config import OmniGenConfig
from omnigen.generation import GenerationConfig
from omnigen.model import OmniGenModel
from omnigen.tokenizer import Tokenizer
from omnigen.training import distributed
from omnigen.training.batches import BatchBuilder
from omnigen.training.config import TrainConfig
from omnigen.training.grow import grow_depth, grow_width, remap_vocabulary
from omnigen.training.loss import flow_matching_loss
from omnigen.training.sampling_data import ShardedBucketSampler, sample_generator
from omnigen.training.state import load_checkpoint, save_checkpoint
from omnigen.training.validation import Validator, swapped_in
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
def update_ema(ema: dict[str, torch.Tensor], params: dict[str, torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params, name by name (the trainable parameters only)."""
    for name, e in ema.items():
        e.mul_(decay).add_(params[name].detach(), alpha=1 - decay)


def _stage_of(step: int, config: TrainConfig) -> int:
    start = 0
    for index, stage in enumerate(config.stages):
        if step < start + stage.steps:
            return index
        start += stage.steps
    return len(config.stages) - 1


def _build(config: TrainConfig, device: torch.device) -> tuple[OmniGenModel, Tokenizer, object]:
    tokenizer = Tokenizer.from_file(config.tokenizer_file())
    if config.init_from:
        # fp32 master weights whatever the folder stores (the shipped model is fp16)
        model, _ = load_model(config.init_from, device=device, dtype=torch.float32)
        change = config.vocabulary_change()
        if change is not None:
            model = remap_vocabulary(model, *change)
        if config.grow_layers is not None:
            model = grow_depth(model, config.grow_layers, seed=config.seed)
        if config.grow_intermediate is not None:
            model = grow_width(model, config.grow_intermediate, seed=config.seed)
    else:
        torch.manual_seed(config.seed)
        model = OmniGenModel(config.model_config()).to(device)
        model.initialize_weights()
    return model, tokenizer, _make_codec(config, model.config, device)


def _make_codec(config: TrainConfig, model_config: OmniGenConfig, device: torch.device):  # noqa: ANN202
    if config.codec == "identity":
        return IdentityCodec(channels=model_config.in_channels)
    return AutoencoderKLCodec.from_pretrained(config.codec).to(device)


def precompute_latents(config: TrainConfig, device: str | None = None, rank: int = 0, world: int = 1) -> int:
    """Fill ``config.latent_cache`` with every latent the run can use (each stage's sizes) without loading
    the model's weights; process ``rank`` of ``world`` takes every world-th sample. Training fills the
    cache lazily anyway; this only moves the encoding up front. Returns how many latents were encoded."""
    if config.latent_cache is None:
        raise ValueError("precompute_latents needs `latent_cache` (a folder) in the config")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_config = config.model_config()
    tokenizer = Tokenizer.from_file(config.tokenizer_file())
    codec = _make_codec(config, model_config, device)
    builder = BatchBuilder.from_config(config, tokenizer, codec, model_config, device, rank)
    indices = range(rank, len(builder.samples), world)
    return sum(builder.precompute(indices, r) for r in sorted({s.resolution for s in config.stages}))


def train(config: TrainConfig, device: str | None = None, stop_after: int | None = None) -> Path:
    """Runs (or resumes) the run in ``config.out_dir``; returns the exported model (or adapter) folder.

    ``stop_after``: stop (with a checkpoint) once this many optimizer steps are done — for tests.
    """
    runtime = distributed.setup(device, config.distributed)
    device, main = runtime.device, runtime.is_main
    out = Path(config.out_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(config.to_json())

    model, tokenizer, codec = _build(config, device)
    lora, base_reference = config.lora_arguments(), None
    if lora is not None:
        from omnigen.lora import add_lora

        base_reference = _base_reference(config, model, tokenizer, codec, out, main)
        torch.manual_seed(config.seed)  # the same adapter initialisation on every rank
        add_lora(model, **lora)
    model.llm.gradient_checkpointing = config.gradient_checkpointing
    train_model = distributed.wrap(model, runtime)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    ema = {name: p.detach().clone() for name, p in trainable.items()} if config.ema_decay > 0 else None
    optimizer = torch.optim.AdamW(
        param_groups(model, config.weight_decay), lr=config.stages[0].lr, betas=config.betas
    )
    # fp16 autocast: scale the loss so small gradients do not flush to zero in half precision; a step
    # whose gradients overflowed is skipped and the scale backs off (a no-op for fp32 and bf16)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    loss_settings = config.loss_settings()

    builder = BatchBuilder.from_config(config, tokenizer, codec, model.config, device, runtime.rank)
    samples = builder.samples
    validator = Validator(config, builder, runtime) if config.val_data else None
    val_every = config.val_every or config.checkpoint_every
    step, sampler_state, sampler_stage = 0, None, None
    resumed = load_checkpoint(out / "checkpoints")
    if resumed is not None:
        if lora is not None:
            distributed.load_tensors(trainable, resumed["model"])
        else:
            distributed.load_model(model, resumed["model"])
        if ema is not None and resumed["ema"] is not None:
            distributed.load_tensors(ema, resumed["ema"])
        distributed.load_optimizer(model, optimizer, resumed["optimizer"])
        info = resumed["info"]
        step, sampler_state, sampler_stage = info["step"], info["sampler"], info.get("stage")
        if info.get("grad_scaler"):
            scaler.load_state_dict(info["grad_scaler"])
        if main:
            logger.info("resumed from %s at step %d", resumed["path"], step)

    stop = {"now": False}
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True)) if in_main_thread else None
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16 if config.precision == "bf16" else torch.float16)
        if config.precision != "fp32"
        else contextlib.nullcontext()
    )
    bins = torch.zeros(T_BINS, 2)
    # rank 0 draws a progress bar on a terminal only (tqdm's disable=None), other ranks never
    progress = tqdm(total=config.total_steps, initial=step, disable=None if main else True, desc="train")
    loss_log = _open_loss_log(out / "loss.jsonl", step) if main else None
    val_log = _open_loss_log(out / "val.jsonl", step) if main and validator is not None else None
    started, seen, stopping = time.perf_counter(), 0, False
    stage_index, sampler, batches = -1, None, None

    def checkpoint() -> None:  # a collective under FSDP: every rank gathers, rank 0 writes
        if builder.cache is not None:
            builder.cache.flush()
        model_state = (
            distributed.gather_tensors(trainable, runtime)
            if lora is not None
            else distributed.gather_model(model, runtime)
        )
        ema_state = distributed.gather_tensors(ema, runtime) if ema is not None else None
        optimizer_state = distributed.gather_optimizer(model, optimizer, runtime)
        if main:
            info = {
                "step": step,
                "stage": stage_index,
                "sampler": sampler.state_dict() if sampler else None,
                "world_size": runtime.world,
                "base_model": base_reference,
                "grad_scaler": scaler.state_dict(),
            }
            adapter = (
                (
                    lambda folder: _save_adapter(
                        model, folder / "adapter", model_state, ema_state, base_reference
                    )
                )
                if lora is not None
                else None
            )
            save_checkpoint(
                out / "checkpoints",
                model_state,
                ema_state,
                optimizer_state,
                info,
                config.keep_checkpoints,
                extra=adapter,
            )
        distributed.barrier(runtime)

    def next_global_batch() -> list[int]:
        nonlocal batches
        indices = next(batches, None)
        if indices is None:  # next epoch
            sampler.set_epoch(sampler.state_dict()["epoch"] + 1)
            batches = iter(sampler)
            indices = next(batches)
        return indices

    try:
        while step < config.total_steps and not stopping:
            if _stage_of(step, config) != stage_index:
                stage_index = _stage_of(step, config)
                stage = config.stages[stage_index]
                sampler = ShardedBucketSampler(  # a global batch holds one bucket; each rank takes a slice
                    builder.target_sizes(stage.resolution),
                    stage.batch_size * runtime.world,
                    seed=config.seed,
                    lengths=builder.sequence_lengths(stage.resolution) if config.length_groups > 1 else None,
                    length_groups=config.length_groups,
                )
                sampler.set_epoch(stage_index * 10_000)
                if sampler_state is not None and sampler_stage in (None, stage_index):
                    sampler.load_state_dict(sampler_state)
                sampler_state = None
                batches = iter(sampler)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config)
            if lora is not None and lora["dropout"] > 0:  # LoRA dropout draws from the global RNG
                torch.manual_seed(sample_generator(config.seed, step, -1 - runtime.rank).initial_seed())
            train_model.train()
            step_batches = [next_global_batch() for _ in range(config.grad_accum)]
            total_weight = sum(samples[i].weight for indices in step_batches for i in indices)
            stats = torch.zeros(2 + 2 * T_BINS, dtype=torch.float64)  # loss sum, stop flag, t-bins
            for micro, indices in enumerate(step_batches):
                batch, generators, real = builder.rank_batch(
                    indices, stage.resolution, config.seed, step, runtime.rank, runtime.world
                )
                weights = batch.weights
                sync = distributed.gradient_sync(train_model, runtime, micro == config.grad_accum - 1)
                with sync, autocast:
                    result = flow_matching_loss(
                        train_model,
                        batch,
                        generators,
                        loss_settings,
                        normalizer=total_weight / runtime.world,  # DDP / FSDP average over ranks
                    )
                    scaler.scale(result.loss).backward()
                per_sample, t = result.per_sample.cpu().double(), result.t.cpu()
                stats[0] += (per_sample * weights.cpu()).sum()
                index = (t * T_BINS).long().clamp(max=T_BINS - 1)[real]
                pairs = torch.stack([per_sample[real], torch.ones(len(index), dtype=torch.float64)], 1)
                stats[2:].view(T_BINS, 2).index_add_(0, index, pairs)
            grad_norm = None
            if config.clip_grad > 0:
                scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), config.clip_grad)
                grad_norm = distributed.full_tensor(norm).item()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                update_ema(ema, trainable, 0.0 if step == 0 else config.ema_decay)
            step += 1
            stats[1] = float(stop["now"])
            stats = distributed.all_reduce_sum(stats, runtime)
            stopping = bool(stats[1] > 0)
            loss = stats[0].item() / total_weight
            bins += stats[2:].view(T_BINS, 2).float()
            seen += sum(len(indices) for indices in step_batches)
            progress.update(1)
            if main:
                record = {
                    "step": step,
                    "loss": loss,
                    "lr": lr_at(step - 1, config),
                    "grad_norm": grad_norm,
                    "time": time.perf_counter() - started,  # seconds since this process began training
                }
                loss_log.write(json.dumps(record) + "\n")
                loss_log.flush()
            if main and (step % config.log_every == 0 or step == config.total_steps):
                per_bin = (bins[:, 0] / bins[:, 1].clamp(min=1)).tolist()
                rate = seen / (time.perf_counter() - started)
                progress.set_postfix(
                    loss=f"{loss:.4f}", lr=f"{lr_at(step - 1, config):.2e}", sps=f"{rate:.1f}"
                )
                logger.info(
                    "step %d loss %.4f lr %.2e samples/s %.1f loss by t-bin %s",
                    step,
                    loss,
                    lr_at(step - 1, config),
                    rate,
                    " ".join(f"{v:.3f}" for v in per_bin),
                )
                bins.zero_()
            last = step == config.total_steps or (stop_after is not None and step >= stop_after)
            if validator is not None and (step % val_every == 0 or last or stopping):
                with swapped_in(trainable, ema):  # the EMA is what the run exports
                    val_loss = validator(train_model, stage.resolution, stage.batch_size)
                if main:
                    weights = "ema" if ema is not None else "model"
                    val_log.write(json.dumps({"step": step, "val_loss": val_loss, "weights": weights}) + "\n")
                    val_log.flush()
                    logger.info("step %d validation loss %.4f (%s weights)", step, val_loss, weights)
            if step % config.checkpoint_every == 0 or last or stopping:
                if stopping and main:
                    logger.warning("SIGTERM: checkpoint at step %d", step)
                checkpoint()
            if stop_after is not None and step >= stop_after:
                break
    finally:
        progress.close()
        if builder.cache is not None:
            builder.cache.flush()
        if loss_log is not None:
            loss_log.close()
        if val_log is not None:
            val_log.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    final = out / "final"
    if step >= config.total_steps:
        _export_final(config, model, trainable, ema, tokenizer, codec, final, base_reference, runtime)
    distributed.barrier(runtime)
    distributed.teardown(runtime)
    return final


def _open_loss_log(path: Path, step: int) -> TextIO:
    """``loss.jsonl`` (one line per optimizer step) or ``val.jsonl``; lines past a resumed ``step`` are
    dropped."""
    kept = []
    if step > 0 and path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
    return path.open("a")


def _base_reference(config: TrainConfig, model, tokenizer, codec, out: Path, main: bool) -> str:  # noqa: ANN001
    """The folder of the model a LoRA run adapts: ``init_from``, or a new model exported to out/base."""
    if config.init_from:
        return str(Path(config.init_from).resolve())
    base = out / "base"
    if main and not (base / "model.safetensors").is_file():
        export(model, tokenizer, codec, base, config.generation)
    return str(base.resolve())


def _save_adapter(model, folder: Path, state, ema_state, base_reference) -> None:  # noqa: ANN001
    from omnigen.lora import save_lora

    save_lora(model, folder, state_dict={**state, **(ema_state or {})}, base_model=base_reference)


def _export_final(config, model, trainable, ema, tokenizer, codec, final, base_reference, runtime) -> None:  # noqa: ANN001
    """The EMA weights (or the last ones): a model folder, or a LoRA adapter folder."""
    ema_state = distributed.gather_tensors(ema, runtime) if ema is not None else {}
    if config.lora is not None:
        state = distributed.gather_tensors(trainable, runtime)
        if runtime.is_main:
            _save_adapter(model, final, state, ema_state, base_reference)
        return
    state = distributed.gather_model(model, runtime)
    if runtime.is_main:
        state.update(ema_state)
        export(build_model(model.config, state), tokenizer, codec, final, config.generation)


def export(model: OmniGenModel, tokenizer: Tokenizer, codec, folder: Path, generation: dict) -> None:  # noqa: ANN001
    """A model folder ``OmniGenPipeline.from_pretrained`` loads."""
    save_model(model, folder)
    tokenizer.save(folder)
    codec.save(folder)
    GenerationConfig.from_dict(generation, "generation").save(folder)
