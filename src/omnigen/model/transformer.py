"""The decoder stack (Phi-3 shaped) over input embeddings, with an optional condition cache.

Legend: B batch, L query length, Lc cached length, D hidden.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from omnigen.config import TransformerConfig
from omnigen.model.cache import ConditionCache
from omnigen.model.layers import Block, RMSNorm, RotaryEmbedding


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.gradient_checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        row_max_position: torch.Tensor,
        mask: torch.Tensor,
        past: ConditionCache | None = None,
        collect: ConditionCache | None = None,
        offload_layers: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (B, L, D); position_ids (B, L); mask (B, L, Lc + L) bool.

        ``past``: a filled cache whose keys/values are prepended at every layer.
        ``collect``: an empty cache that receives this call's keys/values (a prefill).
        ``offload_layers``: layers live on the CPU and visit ``x.device`` one at a time.
        ``rope``: precomputed rotary cos/sin for ``position_ids`` (skips recomputing them).
        Returns the final-normed hidden states (B, L, D).
        """
        if rope is None:
            rope = self.rotary(position_ids, row_max_position)
        for index, layer in enumerate(self.layers):
            if offload_layers:
                layer.to(x.device)
            layer_past = None if past is None else past.get(index, x.device)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, kv = checkpoint(layer, x, rope, mask, layer_past, use_reentrant=False)
            else:
                x, kv = layer(x, rope, mask, layer_past)
            if collect is not None:
                collect.append(kv)
            if offload_layers:
                layer.to("cpu")
        return self.norm(x)
