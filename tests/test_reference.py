"""Equivalence with the reference semantics, using the diffusers OmniGen port as the reference model.

The reference transformer is driven one CFG row at a time (its correct regime); its inputs (ids, masks,
positions) come from the diffusers collator, not from our code.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import OmniGenTransformer2DModel
from diffusers.pipelines.omnigen import processor_omnigen as ref

from conftest import random_model, tiny_config
from omnigen.config import OmniGenConfig
from omnigen.model import masks
from omnigen.sampling.euler import make_noise
from omnigen.sampling.flow import time_grid
from omnigen.sampling.guidance import combine
from omnigen.text.collate import collate
from omnigen.text.processor import OmniGenProcessor, cfg_prompts
from omnigen.weights.keymap import ours_to_diffusers
from torchvision_shim import Transforms as _TorchvisionTransforms

PROMPT = "a red <img><|image_2|></img> cat left of <img><|image_1|></img> dog photo"


class _HFTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text):
        return SimpleNamespace(input_ids=self.tokenizer.encode(text))


@pytest.fixture
def reference_processor(monkeypatch, tokenizer):
    monkeypatch.setattr(ref, "transforms", _TorchvisionTransforms, raising=False)
    processor = ref.OmniGenMultiModalProcessor(_HFTokenizer(tokenizer), max_image_size=64)
    processor.collator = ref.OmniGenCollator(pad_token_id=3, hidden_size=32)
    return processor


def reference_model(ours, config: OmniGenConfig) -> OmniGenTransformer2DModel:
    model = OmniGenTransformer2DModel(**config.to_diffusers_dict())
    model.load_state_dict(ours_to_diffusers(ours.state_dict(), config), strict=True)
    return model.eval()


def build_rows(tokenizer, config, images, height, width, negative="low quality , blurry"):
    """Our processor + collate for [cond, uncond, img_cond] of PROMPT, plus per-row inputs."""
    processor = OmniGenProcessor(tokenizer, config, max_input_image_size=64)
    pixels = [processor.prepare_image(img) for img in images]
    cond = processor(PROMPT, pixels)
    branches = cfg_prompts(PROMPT, pixels, negative, use_img_cfg=True)
    prompts = [cond, processor(*branches.uncond), processor(*branches.img_cond)]
    return prompts


def encode(pixels_list, codec_seed=0):
    """Fixed fake 'latents' for each image: a deterministic function of the pixels (downsample 2)."""
    return [torch.nn.functional.avg_pool2d(p[None], 2)[0].repeat(2, 1, 1)[:4] * 0.7 for p in pixels_list]


def reference_row_velocity(ref_model, prompt, latents, x, t, num_output_tokens, pad_token_id=3):
    """Run the reference on one row with the reference collator's mask and positions."""
    collator = ref.OmniGenCollator(pad_token_id=pad_token_id, hidden_size=32)
    size = [
        x.shape[-2] * 2,
        x.shape[-1] * 2,
    ]  # pixel size for the collator's // 16 // 16 (patch 2 x down 2 ≠ 16)
    mllm = {
        "input_ids": list(prompt.input_ids),
        "pixel_values": None,
        "image_sizes": [list(s) for s in prompt.image_spans],
    }
    ids, _, image_sizes = collator.pad_input_ids(
        [mllm["input_ids"]], {0: mllm["image_sizes"]} if prompt.image_spans else {}
    )
    attention = torch.ones(1, len(prompt.input_ids), dtype=torch.long)
    n = num_output_tokens
    position_ids = collator.create_position(attention, [n])
    mask, _ = collator.create_mask(attention, [n])
    mask = collator.adjust_attention_for_input_images(mask, image_sizes)
    del size
    return ref_model(
        hidden_states=x,
        timestep=t,
        input_ids=ids,
        input_img_latents=[lat[None] for lat in latents],
        input_image_sizes=image_sizes,
        attention_mask=mask,
        position_ids=position_ids,
        return_dict=False,
    )[0]


@pytest.mark.parametrize("long_rope", [True, False])
def test_transformer_forward_matches_reference_per_row(tokenizer, rgb_image, long_rope):
    config = tiny_config(long_rope=long_rope)
    ours = random_model(config)
    theirs = reference_model(ours, config)
    images = [rgb_image(32, 32, seed=1), rgb_image(48, 32, seed=2)]
    prompts = build_rows(tokenizer, config, images, 32, 32)
    latents = [encode(p.pixel_values) for p in prompts]
    x = torch.randn(3, 4, 16, 16)
    t = torch.tensor([0.25, 0.25, 0.25])
    n = config.num_image_tokens(32, 32)
    batch = collate(prompts, latents, config.transformer.pad_token_id)
    ours_batched = ours(x, t, condition=batch)
    for row, prompt in enumerate(prompts):
        expected = reference_row_velocity(theirs, prompt, latents[row], x[row : row + 1], t[row : row + 1], n)
        alone = ours(x[row : row + 1], t[row : row + 1], condition=collate([prompt], [latents[row]], 3))
        torch.testing.assert_close(alone, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours_batched[row : row + 1], expected, atol=1e-5, rtol=0)
    if long_rope:
        assert (
            max(len(p.input_ids) for p in prompts) + 1 + n
            > config.transformer.original_max_position_embeddings
        )


def test_reference_bug_rotary_from_row_zero(tokenizer, rgb_image):
    """Known diffusers bug we must not copy: its rotary cos/sin come from row 0's position ids and are
    applied to every left-padded row, so a row with less padding than row 0 gets wrong positions.
    Here row 0 (cond, short) is padded and row 1 (uncond, long negative prompt) is not."""
    config = tiny_config(long_rope=False)
    ours = random_model(config)
    theirs = reference_model(ours, config)
    prompts = build_rows(
        tokenizer,
        config,
        [rgb_image(16, 16), rgb_image(16, 16, seed=3)],
        32,
        32,
        negative="low quality , blurry " * 30,
    )[:2]
    assert len(prompts[0].input_ids) < len(prompts[1].input_ids)
    latents = [encode(p.pixel_values) for p in prompts]
    batch = collate(prompts, latents, 3)
    x, t = torch.randn(2, 4, 16, 16), torch.full((2,), 0.5)
    n = config.num_image_tokens(32, 32)
    spans = {r: [list(s) for s in row] for r, row in enumerate(batch.image_spans) if row}
    reference_batched = theirs(
        hidden_states=x,
        timestep=t,
        input_ids=batch.input_ids,
        input_img_latents=[lat[None] for row in latents for lat in row],
        input_image_sizes=spans,
        attention_mask=masks.full_mask(batch.token_mask, batch.image_spans, n).long(),
        position_ids=masks.full_positions(batch.token_mask, n),
        return_dict=False,
    )[0]
    row1_alone = reference_row_velocity(theirs, prompts[1], latents[1], x[1:], t[1:], n)
    ours_batched = ours(x, t, condition=batch)
    assert (reference_batched[1:] - row1_alone).abs().max() > 1e-3  # the bug
    torch.testing.assert_close(ours_batched[1:], row1_alone, atol=1e-5, rtol=0)  # we are right


def test_processor_and_collator_match_reference(tokenizer, reference_processor, rgb_image):
    """Ids, image spans, pixels, positions and the attention mask equal the reference's for the three CFG
    branches (left-padded together), with an image multiple of 16 as in OmniGen-v1."""
    config = tiny_config(latent_downsample=8)
    images = [rgb_image(70, 40, seed=5), rgb_image(33, 90, seed=6)]
    ref_out = reference_processor(
        [PROMPT], [images], height=32, width=48, negative_prompt="low quality , blurry", use_img_cfg=True
    )
    prompts = build_rows(tokenizer, config, images, 32, 48)
    ref_out_ids = ref_out["input_ids"]
    batch = collate(prompts, [list(p.pixel_values) for p in prompts], pad_token_id=3)
    assert torch.equal(batch.input_ids, ref_out_ids)
    n = config.num_image_tokens(32, 48)
    assert torch.equal(masks.full_positions(batch.token_mask, n), ref_out["position_ids"])
    ours_mask = masks.full_mask(batch.token_mask, batch.image_spans, n)
    ref_mask = ref_out["attention_mask"].bool()
    real = torch.cat([batch.token_mask, torch.ones(3, 1 + n, dtype=torch.bool)], 1)
    for row in range(3):
        assert torch.equal(ours_mask[row][real[row]], ref_mask[row][real[row]])
    assert {r: [list(s) for s in row] for r, row in enumerate(batch.image_spans) if row} == ref_out[
        "input_image_sizes"
    ]
    ours_pixels = [p for row in batch.image_latents for p in row]
    assert len(ours_pixels) == len(ref_out["input_pixel_values"])
    for a, b in zip(ours_pixels, ref_out["input_pixel_values"]):
        torch.testing.assert_close(a[None], b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_sampling_matches_reference_loop(pipeline, tokenizer, rgb_image, num_images):
    """Whole sampling runs: our pipeline (KV cache, batched rows) vs a loop running the reference
    transformer one CFG row at a time on the full sequence, with the same noise and input latents."""
    ours = pipeline.model
    config = ours.config
    theirs = reference_model(ours, config)
    images = [rgb_image(32, 32, seed=s) for s in range(num_images)]
    prompt = "a red cat photo" + "".join(f" <img><|image_{num_images - k}|></img>" for k in range(num_images))
    steps, scale, img_scale, seed = 3, 2.5, 1.6, 11
    got = pipeline(
        prompt,
        images or None,
        height=32,
        width=32,
        num_inference_steps=steps,
        guidance_scale=scale,
        img_guidance_scale=img_scale,
        seed=seed,
        separate_cfg_infer=False,
        output_type="latent",
        progress=False,
    )
    processor = pipeline.processor
    pixels = [processor.prepare_image(img) for img in images]
    cond = processor(prompt, pixels)
    branches = cfg_prompts(prompt, pixels, pipeline.defaults.negative_prompt, num_images > 0)
    rows = [cond, processor(*branches.uncond)] + ([processor(*branches.img_cond)] if num_images else [])
    latents = [[pipeline.codec.encode(p[None])[0] for p in row.pixel_values] for row in rows]
    z = make_noise((4, 16, 16), [seed])
    grid = time_grid(steps)
    n = config.num_image_tokens(32, 32)
    with torch.no_grad():
        for i in range(steps):
            t = grid[i].reshape(1)
            outs = [reference_row_velocity(theirs, row, lat, z, t, n) for row, lat in zip(rows, latents)]
            z = z + (grid[i + 1] - grid[i]) * combine(outs, scale, img_scale)
    torch.testing.assert_close(got, z, atol=1e-4, rtol=0)
