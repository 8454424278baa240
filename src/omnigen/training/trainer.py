"""The trainer: progressive-resolution stages, AdamW, warm-up + schedule, accumulation, clipping, EMA,
autocast, checkpoints with exact resume, loss per t-bin; a full fine-tune or LoRA; one process or
torchrun (DDP or FSDP2).

``train(config)`` reads straight down (DiT style): distributed set-up, model (+ LoRA), EMA, optimizer,
data, resume, loop, final export. Only rank 0 logs and writes checkpoints (a latent cache gets shards
from every rank). The pieces live beside it: ``run`` (the live objects), ``schedule`` (stage, LR,
global batches), ``step`` (one optimizer step), ``checkpointing`` (save, resume), ``run_log``
(loss.jsonl, val.jsonl, progress) and ``validation``.

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
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from omnigen.config import OmniGenConfig
from omnigen.generation import GenerationConfig
from omnigen.model import OmniGenModel
from omnigen.model.vae import AutoencoderKLCodec, IdentityCodec
from omnigen.text.tokenizer import Tokenizer
from omnigen.training import checkpointing, distributed
from omnigen.training.base import BaseModel, check_paths, resolve_base
from omnigen.training.batches import BatchBuilder
from omnigen.training.config import TrainConfig
from omnigen.training.grow import grow_depth, grow_width, remap_vocabulary
from omnigen.training.run import Run, start_run
from omnigen.training.run_log import RunLog
from omnigen.training.schedule import BatchStream, lr_at
from omnigen.training.step import ema_decay_at, train_step
from omnigen.training.stream import parse_sources
from omnigen.training.validation import Validator, swapped_in
from omnigen.weights.checkpoint import build_model, load_model, save_model

__all__ = ["export", "lr_at", "precompute_latents", "train"]

logger = logging.getLogger(__name__)


def _build(config: TrainConfig, base: BaseModel, device: torch.device) -> tuple[OmniGenModel, object]:
    if base.layout is not None:
        # fp32 master weights whatever the folder stores (the shipped model is fp16)
        model, _ = load_model(base.layout, device=device, dtype=torch.float32, config=base.folder_config)
        if base.vocabulary_change is not None:
            model = remap_vocabulary(model, *base.vocabulary_change)
        if config.grow_layers is not None:
            model = grow_depth(model, config.grow_layers, seed=config.seed)
        if config.grow_intermediate is not None:
            model = grow_width(model, config.grow_intermediate, seed=config.seed)
    else:
        torch.manual_seed(config.seed)
        model = OmniGenModel(base.model_config).to(device)
        model.initialize_weights()
    return model, _make_codec(config, model.config, device)


def _make_codec(config: TrainConfig, model_config: OmniGenConfig, device: torch.device):
    if config.codec == "identity":
        return IdentityCodec(channels=model_config.in_channels)
    return AutoencoderKLCodec.from_pretrained(config.codec).to(device)


def precompute_latents(config: TrainConfig, device: str | None = None, rank: int = 0, world: int = 1) -> int:
    """Fill ``config.latent_cache`` with every latent the run can use (each stage's sizes) without loading
    the model's weights; process ``rank`` of ``world`` takes every world-th sample. Training fills the
    cache lazily anyway; this only moves the encoding up front. Returns how many latents were encoded."""
    if config.latent_cache is None:
        raise ValueError("precompute_latents needs `latent_cache` (a folder) in the config")
    check_paths(config)
    base = resolve_base(config)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    codec = _make_codec(config, base.model_config, device)
    builder = BatchBuilder.from_config(
        config, base.tokenizer, codec, base.model_config, device, rank, base.samples
    )
    indices = range(rank, len(builder.samples), world)
    return sum(builder.precompute(indices, r) for r in sorted({s.resolution for s in config.stages}))


def train(config: TrainConfig, device: str | None = None, stop_after: int | None = None) -> Path:
    """Runs (or resumes) the run in ``config.out_dir``; returns the exported model (or adapter) folder.

    ``stop_after``: stop (with a checkpoint) once this many optimizer steps are done — for tests.
    """
    check_paths(config)
    base = resolve_base(config)
    runtime = distributed.setup(device, config.distributed)
    out = Path(config.out_dir)
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(config.to_json())
    model, codec = _build(config, base, runtime.device)
    tokenizer = base.tokenizer
    base_reference = (
        _base_reference(config, model, tokenizer, codec, out, runtime.is_main) if config.lora else None
    )
    run = start_run(config, runtime, model, tokenizer, codec, base_reference, base.samples)
    validator = Validator(config, run.builder, runtime) if config.val_data else None
    point = checkpointing.resume(run)
    step = point.step
    stream = _batch_stream(run, point)
    try:
        with (
            _stop_on_sigterm() as stop,
            RunLog(config, out, step, runtime.is_main, validator is not None) as log,
        ):
            step = _loop(run, stream, validator, log, stop, step, stop_after)
    finally:
        if run.builder.cache is not None:
            run.builder.cache.flush()
    final = out / "final"
    if step >= config.total_steps:
        _log_exported(run)
        _export_final(config, model, run.trainable, run.ema, tokenizer, codec, final, base_reference, runtime)
    distributed.barrier(runtime)
    distributed.teardown(runtime)
    return final


def _batch_stream(run: Run, point: checkpointing.ResumePoint):
    """The run's batches: over the JSONL samples (``BatchStream``) or streamed from tar shards."""
    config = run.config
    _, shards = parse_sources(config.data)
    if not shards:
        return BatchStream(config, run.builder, run.runtime.world, point.sampler_state, point.sampler_stage)
    from omnigen.training.stream_batches import ShardBatchStream

    return ShardBatchStream(config, run.builder, shards, run.runtime, sampler_state=point.sampler_state)


def _loop(
    run: Run,
    stream: BatchStream,
    validator: Validator | None,
    log: RunLog,
    stop: threading.Event,
    step: int,
    stop_after: int | None,
) -> int:
    """Optimizer steps from ``step`` to the end, a stop request or ``stop_after``; returns the steps done.
    Validates every ``val_every`` steps and checkpoints every ``checkpoint_every``, and both at the end."""
    config = run.config
    val_every = config.val_every or config.checkpoint_every
    while step < config.total_steps:
        stage, global_batches = stream.next_step(step)
        result = train_step(run, step, stage, global_batches, stop.is_set)
        step += 1
        log.step(step, result, lr_at(step - 1, config))
        last = step == config.total_steps or (stop_after is not None and step >= stop_after)
        if validator is not None and (step % val_every == 0 or last or result.stop):
            _validate(run, validator, stage.resolution, stage.batch_size, step, log)
        if step % config.checkpoint_every == 0 or last or result.stop:
            if result.stop and run.is_main:
                logger.warning("SIGTERM: checkpoint at step %d", step)
            checkpointing.save(run, step, stream)
        if last or result.stop:
            break
    return step


def _validate(
    run: Run, validator: Validator, resolution: int, batch_size: int, step: int, log: RunLog
) -> None:
    """The validation loss of the weights the run exports (the EMA if there is one)."""
    with swapped_in(run.trainable, run.ema):
        val_loss = validator(run.train_model, resolution, batch_size)
    log.validation(step, val_loss, "ema" if run.ema is not None else "model")


def _log_exported(run: Run) -> None:
    if not run.is_main:
        return
    if run.ema is None:
        logger.info("exporting the raw weights (ema_decay is 0)")
        return
    decay = ema_decay_at(max(run.ema_updates - 1, 0), run.config.ema_decay)
    logger.info(
        "exporting the EMA weights: %d updates, decay %s warmed up to %.4f at the last one",
        run.ema_updates,
        run.config.ema_decay,
        decay,
    )


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[threading.Event]:
    """An event set by SIGTERM while the block runs (in the main thread; elsewhere it is never set)."""
    stop = threading.Event()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if in_main_thread else None
    try:
        yield stop
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _base_reference(config: TrainConfig, model, tokenizer, codec, out: Path, main: bool) -> str:
    """The folder of the model a LoRA run adapts: ``init_from``, or a new model exported to out/base."""
    if config.init_from:
        return str(Path(config.init_from).resolve())
    base = out / "base"
    if main and not (base / "model.safetensors").is_file():
        export(model, tokenizer, codec, base, config.generation)
    return str(base.resolve())


def _export_final(config, model, trainable, ema, tokenizer, codec, final, base_reference, runtime) -> None:
    """The EMA weights (or the last ones): a model folder, or a LoRA adapter folder."""
    from omnigen.weights.lora import save_lora

    ema_state = distributed.gather_tensors(ema, runtime) if ema is not None else {}
    if config.lora is not None:
        state = distributed.gather_tensors(trainable, runtime)
        if runtime.is_main:
            save_lora(model, final, state_dict={**state, **ema_state}, base_model=base_reference)
        return
    state = distributed.gather_model(model, runtime)
    if runtime.is_main:
        state.update(ema_state)
        export(build_model(model.config, state), tokenizer, codec, final, config.generation)


def export(model: OmniGenModel, tokenizer: Tokenizer, codec, folder: Path, generation: dict) -> None:
    """A model folder ``OmniGenPipeline.from_pretrained`` loads."""
    save_model(model, folder)
    tokenizer.save(folder)
    codec.save(folder)
    GenerationConfig.from_dict(generation, "generation").save(folder)
