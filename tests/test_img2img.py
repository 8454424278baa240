"""Sampling controls beside the prompt: ``generator=`` (diffusers' convention), the guidance interval
(``guidance_start`` / ``guidance_end``) and img2img ``strength``, on the tiny random model."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import random_model, tiny_config, tiny_pipeline
from omnigen.generation import GenerationConfig
from omnigen.sampling.guidance import combine, guided_velocity

EDIT = "make it blue <img><|image_1|></img>"


@pytest.fixture(scope="module")
def pipe(tokenizer):
    return tiny_pipeline(
        random_model(tiny_config()), tokenizer, num_inference_steps=4, negative_prompt="blurry"
    )


@pytest.fixture(scope="module")
def picture():
    g = torch.Generator().manual_seed(3)
    return Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy())


def latent(pipe, prompt="a red cat", **kwargs):
    return pipe(prompt, progress=False, output_type="latent", **kwargs)


def count_calls(pipe, monkeypatch):
    """Record the time of every transformer call (one per CFG branch run)."""
    times = []
    forward = type(pipe.model).forward

    def recording(self, x, t, *args, **kwargs):
        times.append(round(float(t.flatten()[0]), 4))
        return forward(self, x, t, *args, **kwargs)

    monkeypatch.setattr(type(pipe.model), "forward", recording)
    return times


# ---------------------------------------------------------------------- generator=
def test_generator_equals_seed(pipe):
    expected = latent(pipe, seed=7)
    got = latent(pipe, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert not torch.equal(latent(pipe, seed=8), expected)  # the seed matters


def test_generator_list_gives_one_image_each(pipe):
    expected = latent(pipe, seed=11, num_images_per_prompt=2)
    gens = [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]
    got = latent(pipe, generator=gens, num_images_per_prompt=2)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    both = latent(pipe, ["a red cat", "a blue dog"], seed=3)
    got = latent(
        pipe, ["a red cat", "a blue dog"], generator=[torch.Generator().manual_seed(s) for s in (3, 4)]
    )
    torch.testing.assert_close(got, both, atol=0, rtol=0)
    images = pipe("a red cat", progress=False, generator=torch.Generator().manual_seed(2))
    assert "seed" not in images[0].info  # a generator's state is not a seed


def test_bad_generator_is_refused(pipe):
    with pytest.raises(ValueError, match="seed= or generator="):
        latent(pipe, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="one torch.Generator per image \\(2\\), got 1"):
        latent(pipe, num_images_per_prompt=2, generator=[torch.Generator()])
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        latent(pipe, generator=7)


# ---------------------------------------------------------------------- guidance interval
class BranchModel:
    """Stands in for the transformer (one image): the CFG branch k's velocity is z * (k + 1) + t, whether
    it runs as its own batch (``branch``) or as row k of one batch."""

    def __call__(self, z, t, condition=None, cache=None, branch=0, **_):
        rows = torch.arange(z.shape[0], dtype=z.dtype)[:, None, None, None]
        return z * (branch + rows + 1) + t[:, None, None, None]


@pytest.mark.parametrize("separate", [True, False])
def test_guidance_interval_velocity(separate):
    config = GenerationConfig(guidance_start=0.3, guidance_end=0.6, guidance_scale=3.0, use_kv_cache=False)
    conditions = [None] * 3 if separate else [None]
    velocity = guided_velocity(BranchModel(), conditions, 3, 16, config)
    z = torch.randn(1, 4, 2, 2)
    branches = [z * (k + 1) + 0.5 for k in range(3)]
    inside = velocity(z, torch.tensor([0.5]))
    torch.testing.assert_close(inside, combine(branches, 3.0, config.img_guidance_scale), atol=0, rtol=0)
    outside = velocity(z, torch.tensor([0.75]))
    torch.testing.assert_close(outside, z + 0.75, atol=0, rtol=0)  # the conditional branch alone
    assert not torch.allclose(inside, z + 0.5)


def test_guidance_interval_in_the_pipeline(pipe, monkeypatch):
    full = latent(pipe, seed=1)
    times = count_calls(pipe, monkeypatch)
    same = latent(pipe, seed=1, guidance_start=0.0, guidance_end=1.0)
    torch.testing.assert_close(same, full, atol=0, rtol=0)
    assert times == [0.0, 0.0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75]  # cond + uncond at each of 4 steps
    times.clear()
    narrow = latent(pipe, seed=1, guidance_start=0.5, guidance_end=1.0)
    assert times == [0.0, 0.25, 0.5, 0.5, 0.75, 0.75]  # the conditional branch only before t = 0.5
    assert not torch.equal(narrow, full)
    never = latent(pipe, seed=1, guidance_start=0.9, guidance_end=0.9)
    unguided = latent(pipe, seed=1, guidance_scale=1.0)  # cond-only = guidance 1 up to rounding
    torch.testing.assert_close(never, unguided, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="guidance_start=0.8 must be <= guidance_end=0.2"):
        latent(pipe, guidance_start=0.8, guidance_end=0.2)


# ---------------------------------------------------------------------- img2img strength
def edit(pipe, picture, **kwargs):
    return latent(pipe, EDIT, input_images=[picture], use_input_image_size_as_output=True, seed=5, **kwargs)


def test_strength_one_changes_nothing(pipe, picture):
    torch.testing.assert_close(edit(pipe, picture, strength=1.0), edit(pipe, picture), atol=0, rtol=0)


def test_strength_zero_returns_the_input(pipe, picture):
    pixels = pipe.processor.prepare_image(picture, 32)
    expected = pipe.codec.encode(pixels[None])
    got = edit(pipe, picture, strength=0.0)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    image = pipe(EDIT, [picture], progress=False, use_input_image_size_as_output=True, strength=0.0)[0]
    decoded = pipe(
        EDIT, [picture], progress=False, use_input_image_size_as_output=True, output_type="pt", strength=0.0
    )
    torch.testing.assert_close(decoded, pipe.codec.decode(expected).float(), atol=1e-5, rtol=1e-5)
    assert image.size == picture.size


def test_strength_in_between_skips_the_early_steps(pipe, picture, monkeypatch):
    full, none = edit(pipe, picture), edit(pipe, picture, strength=0.0)
    times = count_calls(pipe, monkeypatch)
    half = edit(pipe, picture, strength=0.5)
    assert sorted(set(times)) == [0.5, 0.75]  # steps starting before t = 1 - 0.5 are skipped
    assert not torch.equal(half, full) and not torch.equal(half, none)
    # closer to the input than a full run
    assert (half - none).abs().mean() < (full - none).abs().mean()
    times.clear()
    edit(pipe, picture, strength=0.5, sampler="dpmpp_2m")  # a truncated multistep schedule still runs
    assert sorted(set(times)) == [0.5, 0.75]


def test_strength_needs_a_matching_input(pipe, picture):
    with pytest.raises(ValueError, match="prompt 0 has none"):
        latent(pipe, strength=0.5)
    with pytest.raises(ValueError, match="use_input_image_size_as_output"):
        latent(pipe, EDIT, input_images=[picture.resize((16, 32))], strength=0.5)
