"""The live objects of one training run (``Run``), built once by ``start_run`` from a built model:
LoRA adapters (if any), the distributed wrapper, the trainable tensors, the EMA, AdamW, the fp16 loss
scaler, the batch builder and the decoder's runner (gradient checkpointing). The step, checkpoint and log code take a ``Run`` instead of long lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from omnigen.model import OmniGenModel
from omnigen.model.runner import Runner
from omnigen.text.tokenizer import Tokenizer
from omnigen.training import distributed
from omnigen.training.batches import BatchBuilder
from omnigen.training.config import TrainConfig
from omnigen.training.x2i import X2ISample


@dataclass
class Run:
    config: TrainConfig
    runtime: distributed.Runtime
    out: Path  # the run folder
    model: OmniGenModel  # the model itself (FSDP2 shards it in place)
    train_model: torch.nn.Module  # what forward/backward run on: the model or its DDP wrapper
    tokenizer: Tokenizer
    codec: object  # a LatentCodec
    trainable: dict[str, torch.Tensor]  # name -> parameter, the ones with requires_grad
    ema: dict[str, torch.Tensor] | None  # name -> EMA of that parameter; None without EMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    builder: BatchBuilder
    base_reference: str | None  # LoRA: the folder of the adapted base model
    runner: Runner  # how the decoder layers run (gradient checkpointing)
    ema_updates: int = 0  # EMA updates done (its warm-up position; saved in checkpoints)

    @property
    def is_lora(self) -> bool:
        return self.config.lora is not None

    @property
    def is_main(self) -> bool:
        return self.runtime.is_main


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay only on tensors with >= 2 dimensions (matrices, embeddings, convs)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def start_run(
    config: TrainConfig,
    runtime: distributed.Runtime,
    model: OmniGenModel,
    tokenizer: Tokenizer,
    codec: object,
    base_reference: str | None,
    samples: list[X2ISample] | None = None,
) -> Run:
    """Everything around ``model`` that training needs (module docstring); no weights are loaded here.
    ``samples``: the run's JSONL samples when already read (``BaseModel.samples``), else read here."""
    device = runtime.device
    if config.lora is not None:
        from omnigen.weights.lora import add_lora

        torch.manual_seed(config.seed)  # the same adapter initialisation on every rank
        add_lora(model, **config.lora.arguments())
    train_model = distributed.wrap(model, runtime)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    ema = {name: p.detach().clone() for name, p in trainable.items()} if config.ema_decay > 0 else None
    optimizer = torch.optim.AdamW(
        param_groups(model, config.weight_decay), lr=config.stages[0].lr, betas=config.betas
    )
    # fp16 autocast: scale the loss so small gradients do not flush to zero in half precision; a step
    # whose gradients overflowed is skipped and the scale backs off (a no-op for fp32 and bf16)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    builder = BatchBuilder.from_config(config, tokenizer, codec, model.config, device, runtime.rank, samples)
    return Run(
        config=config,
        runtime=runtime,
        out=Path(config.out_dir),
        model=model,
        train_model=train_model,
        tokenizer=tokenizer,
        codec=codec,
        trainable=trainable,
        ema=ema,
        optimizer=optimizer,
        scaler=scaler,
        builder=builder,
        base_reference=base_reference,
        runner=Runner(checkpoint=config.gradient_checkpointing),
    )
