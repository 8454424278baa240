"""How the decoder's layers run: the runtime choices that are neither weights nor config.

A ``Runner`` says where each decoder layer computes (one device, or a split over several made by
``omnigen.model.placement.place_layers``), whether the layers' weights stream from host masters
(``omnigen.model.offload``), whether backward recomputes each layer (gradient checkpointing) and
whether fp16 weights carry an fp32 residual stream. It is handed to every forward call and never stored
on the model, so one model can run under several runners (a plain one, an offloaded one) and placing
or offloading it leaves its modules holding only their weights and config.

``ForwardInputs`` are a decoder call's inputs beside the hidden states: the rotary tables, the mask,
the condition cache to attend to (``past``) and the cache to fill (``collect``, a prefill). The runner
owns the layer loop: it moves the hidden states from one layer's device to the next, streams weights
and keys/values, and appends each layer's keys/values to ``collect``.

Legend: B batch, L query length, Lc cached length, E head dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from omnigen.model.cache import ConditionCache
from omnigen.model.offload import OffloadedWeights, Streamer, stream_layers

if TYPE_CHECKING:
    from omnigen.model.ulysses import SequenceShard, TokenSplit

Rope = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ForwardInputs:
    """The per-call inputs of the decoder's layers."""

    rope: Rope  # rotary cos, sin (B, L, E)
    mask: torch.Tensor | None  # (B, L, Lc + L) bool, or None for a mask-free step (``Attention``)
    past: ConditionCache | None = None  # a filled cache whose keys/values every layer prepends
    collect: ConditionCache | None = None  # an empty cache that receives this call's keys/values
    split: TokenSplit | None = None  # a sequence-parallel step: its tokens over the ranks (``ulysses``)


@dataclass(frozen=True)
class Runner:
    """How to run the decoder layers (module docstring). ``Runner()`` runs them where the input is."""

    devices: tuple[torch.device, ...] | None = None  # each layer's device (a split); None: the input's
    offloaded: OffloadedWeights | None = None  # stream the layers' weights from these host masters
    checkpoint: bool = False  # recompute each layer in backward (training; only while grad is enabled)
    # With fp16 weights, carry the residual stream in fp32: Phi-3's residual activations can exceed
    # fp16's 65504 and then become inf, and NaN after the next RMSNorm. Costs only elementwise work.
    fp16_guard: bool = True
    # Sequence parallel (``omnigen.model.ulysses``): a cached step runs this rank's slice of the tokens,
    # its attention exchanging heads with the other ranks; a prefill keeps this rank's heads of the cache.
    sequence: SequenceShard | None = None

    def layer_devices(self, layers: Sequence[nn.Module], home: torch.device) -> list[torch.device]:
        """The device each layer computes on for an input on ``home``; checks this runner fits ``layers``."""
        if self.offloaded is not None:
            if not self.offloaded.is_current(layers):
                raise ValueError(
                    "this runner's offloaded weights are not those of these layers (they were moved, "
                    "quantized or given LoRA since, or belong to another model); place the model again"
                )
            return [home] * len(layers)
        if self.devices is None:
            return [home] * len(layers)
        if len(self.devices) != len(layers):
            raise ValueError(f"the runner places {len(self.devices)} layers but the model has {len(layers)}")
        return list(self.devices)

    def run(
        self, layers: Sequence[nn.Module], x: torch.Tensor, inputs: ForwardInputs, indices: Sequence[int]
    ) -> torch.Tensor:
        """x (B, L, D) through ``layers[i]`` for i in ``indices``; returned on x's device. Fills
        ``inputs.collect`` with each layer's keys/values (on the host when that cache is offloaded)."""
        home = x.device
        devices = self.layer_devices(layers, home)
        rope, mask, past, collect = inputs.rope, inputs.mask, inputs.past, inputs.collect
        streamer = Streamer()
        kv_layers = None if past is None else past.layers
        on_host = self.offloaded is not None or (past is not None and past.offload)
        turns = stream_layers(indices, devices, streamer, self.offloaded, kv_layers, stream=on_host)
        with closing(turns) as each:
            for index, layer_past in each:
                if x.device != devices[index]:
                    x, rope, mask = _move(devices[index], x, rope, mask)
                layer = layers[index]
                if self.checkpoint and torch.is_grad_enabled():
                    x, kv = checkpoint(layer, x, rope, mask, layer_past, use_reentrant=False)
                else:
                    x, kv = layer(x, rope, mask, layer_past, inputs.split)
                if collect is not None:
                    kv = kv if self.sequence is None else self.sequence.own_heads(kv)
                    collect.append(streamer.to_host(kv) if collect.offload else kv)
        if collect is not None and collect.offload:
            streamer.finish()  # the host copies are complete before anyone reads them
        return x.to(home)


PLAIN = Runner()


def _move(
    device: torch.device, x: torch.Tensor, rope: Rope, mask: torch.Tensor | None
) -> tuple[torch.Tensor, Rope, torch.Tensor | None]:
    """The hidden states and the per-call inputs, on the next layer's device."""
    rope = (rope[0].to(device), rope[1].to(device))
    return x.to(device), rope, None if mask is None else mask.to(device)
