"""Function-preserving depth growth: continue training a trained model with more layers.

The old blocks keep their order and are spread evenly over the deeper stack; every new block starts as the
identity on the residual stream (its attention ``o_proj`` and MLP ``down_proj`` are zero, the rest is
initialised as from scratch), so the grown model computes exactly what the trained one did and training
picks up where it stopped (net2net-style growth; the same zero-init idea as DiT's adaLN-zero).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import nn

from omnigen.model.layers import Block
from omnigen.model.omnigen import OmniGenModel

logger = logging.getLogger(__name__)


def old_positions(old: int, new: int) -> list[int]:
    """Where the `old` trained blocks go in a stack of `new` (the first stays first, spacing even)."""
    return [(index * new) // old for index in range(old)]


def _identity_block(block: Block) -> Block:
    for module in block.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
    nn.init.zeros_(block.self_attn.o_proj.weight)
    nn.init.zeros_(block.mlp.down_proj.weight)
    return block


def grow_depth(model: OmniGenModel, num_layers: int, seed: int = 0) -> OmniGenModel:
    """A copy of `model` with `num_layers` transformer blocks (>= its own), equal in output to `model`."""
    old = model.config.transformer.num_layers
    if not isinstance(num_layers, int) or num_layers < old:
        raise ValueError(f"grow_layers must be an int >= the model's {old} layers, got {num_layers!r}")
    if num_layers == old:
        return model
    config = replace(model.config, transformer=replace(model.config.transformer, num_layers=num_layers))
    param = next(model.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        grown = OmniGenModel(config).to(device=param.device, dtype=param.dtype)
        positions = old_positions(old, num_layers)
        for index, block in enumerate(grown.llm.layers):
            if index not in positions:
                _identity_block(block)
    outside = {k: v for k, v in model.state_dict().items() if not k.startswith("llm.layers.")}
    grown.load_state_dict(outside, strict=False)  # every key exists in the grown model
    for old_index, new_index in enumerate(positions):
        grown.llm.layers[new_index].load_state_dict(model.llm.layers[old_index].state_dict())
    grown.materialize_buffers(param.device)
    logger.info(
        "grew the model from %d to %d layers (%d parameters)", old, num_layers, grown.num_parameters()
    )
    return grown.train(model.training)
