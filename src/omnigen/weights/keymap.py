"""Explicit key maps between our state dict (= the official OmniGen-v1 key names) and diffusers'
``OmniGenTransformer2DModel``. One table, read in both directions (loading and exporting); diffusers
splits the fused qkv.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from omnigen.config import OmniGenConfig

# (our name, diffusers name) for every tensor that is a plain rename; "{i}" is the layer index.
RENAMES: tuple[tuple[str, str], ...] = (
    ("x_embedder.proj.weight", "patch_embedding.output_image_proj.weight"),
    ("x_embedder.proj.bias", "patch_embedding.output_image_proj.bias"),
    ("input_x_embedder.proj.weight", "patch_embedding.input_image_proj.weight"),
    ("input_x_embedder.proj.bias", "patch_embedding.input_image_proj.bias"),
    ("pos_embed", "patch_embedding.pos_embed"),
    ("time_token.mlp.0.weight", "time_token.linear_1.weight"),
    ("time_token.mlp.0.bias", "time_token.linear_1.bias"),
    ("time_token.mlp.2.weight", "time_token.linear_2.weight"),
    ("time_token.mlp.2.bias", "time_token.linear_2.bias"),
    ("t_embedder.mlp.0.weight", "t_embedder.linear_1.weight"),
    ("t_embedder.mlp.0.bias", "t_embedder.linear_1.bias"),
    ("t_embedder.mlp.2.weight", "t_embedder.linear_2.weight"),
    ("t_embedder.mlp.2.bias", "t_embedder.linear_2.bias"),
    ("final_layer.adaLN_modulation.1.weight", "norm_out.linear.weight"),
    ("final_layer.adaLN_modulation.1.bias", "norm_out.linear.bias"),
    ("final_layer.linear.weight", "proj_out.weight"),
    ("final_layer.linear.bias", "proj_out.bias"),
    ("llm.embed_tokens.weight", "embed_tokens.weight"),
    ("llm.norm.weight", "norm.weight"),
    ("llm.layers.{i}.input_layernorm.weight", "layers.{i}.input_layernorm.weight"),
    ("llm.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_layernorm.weight"),
    ("llm.layers.{i}.self_attn.o_proj.weight", "layers.{i}.self_attn.to_out.0.weight"),
    ("llm.layers.{i}.mlp.gate_up_proj.weight", "layers.{i}.mlp.gate_up_proj.weight"),
    ("llm.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down_proj.weight"),
)
QKV = "llm.layers.{i}.self_attn.qkv_proj.weight"
SPLIT_QKV = tuple(f"layers.{{i}}.self_attn.to_{name}.weight" for name in "qkv")


def _expand(template: str, num_layers: int) -> list[tuple[int | None, str]]:
    """(layer index or None, key) for every key a template names."""
    if "{i}" not in template:
        return [(None, template)]
    return [(i, template.format(i=i)) for i in range(num_layers)]


def _rename(
    state: dict[str, torch.Tensor], pairs: tuple[tuple[str, str], ...], num_layers: int
) -> dict[str, torch.Tensor]:
    """Moves each tensor named by the first template of a pair out of ``state`` under the second."""
    out: dict[str, torch.Tensor] = {}
    for source, target in pairs:
        for i, name in _expand(source, num_layers):
            if name in state:
                out[target.format(i=i) if i is not None else target] = state.pop(name)
    return out


def diffusers_sources(keys: Iterable[str], config: OmniGenConfig) -> dict[str, tuple[str, ...]]:
    """Our key -> the diffusers key(s) it is made of: one for a rename, to_q/to_k/to_v (concatenated along
    rows, in that order) for a fused qkv_proj.

    Keys the table does not know map to themselves, so the strict check that follows reports them as
    unexpected instead of dropping them silently."""
    left = dict.fromkeys(keys)
    plan: dict[str, tuple[str, ...]] = {}
    layers = config.transformer.num_layers
    for ours, theirs in RENAMES:
        for i, name in _expand(theirs, layers):
            if name in left:
                plan[ours.format(i=i) if i is not None else ours] = (name,)
                del left[name]
    for i in range(layers):
        names = tuple(t.format(i=i) for t in SPLIT_QKV)
        if all(n in left for n in names):
            plan[QKV.format(i=i)] = names
            for n in names:
                del left[n]
    plan.update({name: (name,) for name in left})
    return plan


def diffusers_to_ours(state: dict[str, torch.Tensor], config: OmniGenConfig) -> dict[str, torch.Tensor]:
    """Rename a diffusers transformer state dict to ours, fusing to_q/to_k/to_v into qkv_proj."""
    return {
        ours: state[parts[0]] if len(parts) == 1 else torch.cat([state[k] for k in parts], dim=0)
        for ours, parts in diffusers_sources(state, config).items()
    }


def ours_to_diffusers(state: dict[str, torch.Tensor], config: OmniGenConfig) -> dict[str, torch.Tensor]:
    """The inverse map, through the same table (``omnigen.weights.export`` writes the diffusers layout with it).
    Keys the table does not know are kept as they are."""
    state = dict(state)
    t = config.transformer
    out = _rename(state, RENAMES, t.num_layers)
    sizes = [t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim, t.num_kv_heads * t.head_dim]
    for i in range(t.num_layers):
        name = QKV.format(i=i)
        if name in state:
            for part, key in zip(state.pop(name).split(sizes, dim=0), SPLIT_QKV, strict=True):
                out[key.format(i=i)] = part
    out.update(state)
    return out
