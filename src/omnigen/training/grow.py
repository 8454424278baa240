"""Model growth for continued training: more layers or wider MLPs (both function-preserving), a new
vocabulary.

The old blocks keep their order and are spread evenly over the deeper stack; every new block starts as the
identity on the residual stream (its attention ``o_proj`` and MLP ``down_proj`` are zero, the rest is
initialised as from scratch), so the grown model computes exactly what the trained one did and training
picks up where it stopped (net2net-style growth; the same zero-init idea as DiT's adaLN-zero).

Wider MLPs (`grow_width`): new hidden units whose down_proj columns are zero, the same trick.

A new tokenizer (more words, other ids) keeps every known token's embedding under its new id
(`remap_vocabulary`), so text the old model understood is understood the same way.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import nn

from omnigen.model.layers import Block
from omnigen.model.omnigen import OmniGenModel
from omnigen.text.tokenizer import embedding_rows
from omnigen.util.checks import check_int

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
    num_layers = check_int("grow_layers", num_layers, old)  # at least the model's own layers
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


def remap_vocabulary(
    model: OmniGenModel, old_vocab: dict[str, int], new_vocab: dict[str, int]
) -> OmniGenModel:
    """A copy of `model` for a new tokenizer: each token's embedding row moves to its new id, and tokens the
    old vocabulary lacks start at the mean of the old rows (a neutral word). Ids the model had that the old
    tokenizer did not use are dropped. Everything but the token embedding is kept as it is."""
    old_table = model.llm.embed_tokens.weight.detach()
    unknown = sorted(token for token, index in old_vocab.items() if index >= old_table.shape[0])
    if unknown:
        raise ValueError(
            f"the old tokenizer has ids beyond the model's {old_table.shape[0]} embeddings: {unknown}"
        )
    size = embedding_rows(new_vocab)
    table = old_table.mean(dim=0, keepdim=True).repeat(size, 1)
    kept = [(new_vocab[token], index) for token, index in old_vocab.items() if token in new_vocab]
    rows, sources = zip(*kept, strict=True) if kept else ((), ())
    table[list(rows)] = old_table[list(sources)]
    config = replace(model.config, transformer=replace(model.config.transformer, vocab_size=size))
    param = next(model.parameters())
    with torch.device("meta"):
        remapped = OmniGenModel(config)
    state = {**model.state_dict(), "llm.embed_tokens.weight": table}
    remapped.load_state_dict(state, strict=True, assign=True)
    remapped.materialize_buffers(param.device)
    logger.info(
        "remapped the vocabulary: %d tokens kept, %d new, %d dropped",
        len(kept),
        len(set(new_vocab) - set(old_vocab)),
        len(set(old_vocab) - set(new_vocab)),
    )
    return remapped.to(param.device).train(model.training)


def grow_width(model: OmniGenModel, intermediate_size: int, seed: int = 0) -> OmniGenModel:
    """A copy of `model` whose MLPs have `intermediate_size` (>= its own) hidden units, equal in output to
    `model`: the new units' gate and up rows are initialised as from scratch and their down_proj columns
    are zero, so they add nothing until training moves them."""
    old = model.config.transformer.intermediate_size
    intermediate_size = check_int("grow_intermediate", intermediate_size, old)  # at least the model's own
    if intermediate_size == old:
        return model
    transformer = replace(model.config.transformer, intermediate_size=intermediate_size)
    param = next(model.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        grown = OmniGenModel(replace(model.config, transformer=transformer)).to(param.device, param.dtype)
        for block in grown.llm.layers:
            nn.init.xavier_uniform_(block.mlp.gate_up_proj.weight)
    state = model.state_dict()
    with torch.no_grad():
        for index, block in enumerate(grown.llm.layers):
            prefix = f"llm.layers.{index}.mlp."
            gate, up = state[prefix + "gate_up_proj.weight"].chunk(2, dim=0)  # rows [gate; up]
            new_gate, new_up = block.mlp.gate_up_proj.weight.chunk(2, dim=0)
            new_gate[:old], new_up[:old] = gate, up
            block.mlp.down_proj.weight.zero_()
            block.mlp.down_proj.weight[:, :old] = state[prefix + "down_proj.weight"]
    kept = {
        k: v for k, v in state.items() if not k.endswith(("mlp.gate_up_proj.weight", "mlp.down_proj.weight"))
    }
    grown.load_state_dict(kept, strict=False)
    grown.materialize_buffers(param.device)
    logger.info(
        "widened the MLPs from %d to %d units (%d parameters)", old, intermediate_size, grown.num_parameters()
    )
    return grown.train(model.training)
