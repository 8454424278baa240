"""omnigen.weights.keymap: our (= the official OmniGen-v1) key names <-> diffusers' OmniGenTransformer2DModel."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import random_model, tiny_config
from omnigen.weights.keymap import diffusers_sources, diffusers_to_ours, ours_to_diffusers


@pytest.fixture(scope="module")
def gqa_model():
    """A tiny model with grouped-query attention: q, k and v of different sizes in the fused qkv_proj."""
    config = tiny_config()
    config = replace(config, transformer=replace(config.transformer, num_heads=4, num_kv_heads=2))
    return random_model(config)


def test_round_trip_keeps_every_tensor(gqa_model):
    state = gqa_model.state_dict()
    theirs = ours_to_diffusers(state, gqa_model.config)
    back = diffusers_to_ours(theirs, gqa_model.config)
    assert set(back) == set(state)
    for key, value in state.items():
        assert torch.equal(back[key], value), key
    # and the other way round: diffusers -> ours -> diffusers is the identity too
    again = ours_to_diffusers(back, gqa_model.config)
    assert set(again) == set(theirs) and all(torch.equal(again[k], theirs[k]) for k in theirs)


def test_diffusers_side_has_diffusers_names_and_split_qkv(gqa_model):
    config = gqa_model.config
    state = gqa_model.state_dict()
    theirs = ours_to_diffusers(state, config)
    assert not any(k.startswith("llm.") or "qkv_proj" in k for k in theirs)
    assert len(theirs) == len(state) + 2 * config.transformer.num_layers  # each qkv becomes three
    for name in (
        "patch_embedding.pos_embed",
        "patch_embedding.output_image_proj.weight",
        "norm_out.linear.weight",
        "proj_out.weight",
        "layers.1.self_attn.to_out.0.weight",
    ):
        assert name in theirs, name
    t = config.transformer
    qkv = state["llm.layers.1.self_attn.qkv_proj.weight"]
    q, k, v = (theirs[f"layers.1.self_attn.to_{x}.weight"] for x in "qkv")
    assert q.shape[0] == t.num_heads * t.head_dim and k.shape[0] == v.shape[0] == t.num_kv_heads * t.head_dim
    assert torch.equal(torch.cat([q, k, v]), qkv)  # rows in the order q, k, v


def test_sources_name_what_each_of_our_keys_is_made_of(gqa_model):
    theirs = ours_to_diffusers(gqa_model.state_dict(), gqa_model.config)
    plan = diffusers_sources(theirs, gqa_model.config)
    assert plan["llm.layers.0.self_attn.qkv_proj.weight"] == tuple(
        f"layers.0.self_attn.to_{x}.weight" for x in "qkv"
    )
    assert plan["pos_embed"] == ("patch_embedding.pos_embed",)
    assert set(plan) == set(gqa_model.state_dict())


def test_unknown_keys_pass_through_for_the_strict_check(gqa_model):
    """A key the table does not know is kept under its name (then reported as unexpected), never dropped."""
    config = gqa_model.config
    extra = {"some.unknown.weight": torch.ones(1)}
    assert ours_to_diffusers(extra, config) == extra
    assert diffusers_to_ours(extra, config) == extra
    # an incomplete q/k/v triple is not fused: the parts stay visible
    partial = {"layers.0.self_attn.to_q.weight": torch.ones(2, 2)}
    assert set(diffusers_to_ours(partial, config)) == {"layers.0.self_attn.to_q.weight"}
