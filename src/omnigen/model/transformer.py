"""The decoder stack (Phi-3 shaped) over input embeddings, with an optional condition cache.

Besides the plain pass it can: run a sub-range of its layers (the step cache runs the first layer, then
decides whether to run the rest), keep an fp32 residual stream under fp16 weights (``fp16_guard``), and
run its layers spread over several devices (``layer_devices``, set by ``omnigen.model.placement``), moving the
hidden states from one device to the next, or stream offloaded weights and keys/values to the device layer
by layer (``omnigen.model.offload``).

Legend: B batch, L query length, Lc cached length, D hidden.
"""

from __future__ import annotations

from contextlib import closing

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from omnigen.config import TransformerConfig
from omnigen.model.cache import ConditionCache
from omnigen.model.layers import Block, RMSNorm, RotaryEmbedding
from omnigen.model.offload import OffloadedWeights, Streamer, stream_layers


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        # With fp16 weights, carry the residual stream in fp32: Phi-3's residual activations can exceed
        # fp16's 65504 and then become inf, and NaN after the next RMSNorm. Costs only elementwise work.
        self.fp16_guard = True
        # Device of each layer when the stack is split over devices (omnigen.model.placement); None: one device.
        self.layer_devices: list[torch.device] | None = None
        # Host master weights of the layers under ``offload_layers`` (omnigen.model.offload); None: off.
        self.offloaded: OffloadedWeights | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        row_max_position: torch.Tensor,
        mask: torch.Tensor | None,
        past: ConditionCache | None = None,
        collect: ConditionCache | None = None,
        offload_layers: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        layer_range: tuple[int, int] | None = None,
        normalize: bool = True,
    ) -> torch.Tensor:
        """x (B, L, D); position_ids (B, L); mask (B, L, Lc + L) bool, or None (see ``Attention``).

        ``past``: a filled cache whose keys/values are prepended at every layer.
        ``collect``: an empty cache that receives this call's keys/values (a prefill).
        ``offload_layers``: the layers' weights live on the host (``self.offloaded``) and stream to
        ``x.device`` one layer at a time (``omnigen.model.offload``).
        ``rope``: precomputed rotary cos/sin for ``position_ids`` (skips recomputing them).
        ``layer_range``: run only layers [start, stop) (default all).
        ``normalize``: apply the final norm; without it the raw residual stream is returned (fp32 when the
        fp16 guard is on), to be fed to a later ``layer_range`` or to ``finish``.
        Returns the hidden states (B, L, D) on ``x``'s device.
        """
        if rope is None:
            rope = self.rotary(position_ids, row_max_position)
        start, stop = (0, len(self.layers)) if layer_range is None else layer_range
        home = x.device
        if offload_layers and self.offloaded is None:
            raise ValueError(
                "offload_layers=True needs omnigen.model.offload.offload_layers(transformer) first"
            )
        weights = self.offloaded if offload_layers else None
        placed = self.layer_devices
        devices = [home] * len(self.layers) if offload_layers or placed is None else placed
        if self.compute_dtype == torch.float16 and self.fp16_guard:
            x = x.float()
        streamer = Streamer()
        kv_layers = None if past is None else past.layers
        on_host = offload_layers or (past is not None and past.offload)
        run = stream_layers(range(start, stop), devices, streamer, weights, kv_layers, stream=on_host)
        with closing(run) as layers:
            for index, layer_past in layers:
                if x.device != devices[index]:
                    x, rope, mask = _move(devices[index], x, rope, mask)
                layer = self.layers[index]
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    x, kv = checkpoint(layer, x, rope, mask, layer_past, use_reentrant=False)
                else:
                    x, kv = layer(x, rope, mask, layer_past)
                if collect is not None:
                    collect.append(streamer.to_host(kv) if collect.offload else kv)
        if collect is not None and collect.offload:
            streamer.finish()  # the host copies are complete before anyone reads them
        x = x.to(home)
        return self.finish(x) if normalize else x

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm of a raw residual stream, in the compute dtype."""
        return self.norm(x).to(self.compute_dtype)


def _move(
    device: torch.device, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """The hidden states and the per-call inputs, on the next layer's device."""
    rope = (rope[0].to(device), rope[1].to(device))
    return x.to(device), rope, None if mask is None else mask.to(device)
