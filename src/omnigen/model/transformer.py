"""The decoder stack (Phi-3 shaped) over input embeddings, with an optional condition cache.

The stack holds only weights and config. How its layers run is the ``Runner`` handed to each call
(``omnigen.model.runner``): on one device or split over several, with weights streamed from the host,
with gradient checkpointing, with an fp32 residual stream under fp16 weights (``Runner.fp16_guard``).
A call may also run a sub-range of the layers (the step cache runs the first layer, then decides
whether to run the rest) and leave out the final norm.

Legend: B batch, L query length, Lc cached length, D hidden.
"""

from __future__ import annotations

import torch
from torch import nn

from omnigen.config import TransformerConfig
from omnigen.model.cache import ConditionCache
from omnigen.model.layers import Block, RMSNorm, RotaryEmbedding
from omnigen.model.runner import PLAIN, ForwardInputs, Runner


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def inputs(
        self,
        position_ids: torch.Tensor,
        row_max_position: torch.Tensor,
        mask: torch.Tensor | None,
        past: ConditionCache | None = None,
        collect: ConditionCache | None = None,
    ) -> ForwardInputs:
        """The inputs of a call at ``position_ids`` (B, L); ``row_max_position`` (B,) the largest position
        of each full row (it picks the rotary scaling); mask (B, L, Lc + L) bool or None."""
        return ForwardInputs(self.rotary(position_ids, row_max_position), mask, past, collect)

    def forward(
        self,
        x: torch.Tensor,
        inputs: ForwardInputs,
        runner: Runner = PLAIN,
        layer_range: tuple[int, int] | None = None,
        normalize: bool = True,
    ) -> torch.Tensor:
        """x (B, L, D) through the layers as ``runner`` runs them; returns (B, L, D) on x's device.

        ``layer_range``: run only layers [start, stop) (default all).
        ``normalize``: apply the final norm; without it the raw residual stream is returned (fp32 when the
        fp16 guard is on), to be fed to a later ``layer_range`` or to ``finish``.
        """
        start, stop = (0, len(self.layers)) if layer_range is None else layer_range
        if self.compute_dtype == torch.float16 and runner.fp16_guard:
            x = x.float()
        x = runner.run(self.layers, x, inputs, range(start, stop))
        return self.finish(x) if normalize else x

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm of a raw residual stream, in the compute dtype."""
        return self.norm(x).to(self.compute_dtype)
