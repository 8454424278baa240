from __future__ import annotations

import pytest
import torch

from omnigen.model import masks
from omnigen.text.collate import collate
from omnigen.text.processor import OmniGenProcessor

EDIT = "make it blue <img><|image_1|></img>"


def run(pipeline, prompt, images=None, **kw):
    kw.setdefault("seed", 3)
    kw.setdefault("progress", False)
    kw.setdefault("output_type", "latent")
    return pipeline(prompt, images, **kw)


@pytest.mark.parametrize("with_image", [False, True])
def test_cache_equals_no_cache_and_batched_equals_separate(pipeline, rgb_image, with_image):
    images = [rgb_image()] if with_image else None
    prompt = EDIT if with_image else "a red cat"
    base = run(pipeline, prompt, images, use_kv_cache=False, separate_cfg_infer=True)
    for use_kv_cache in (True, False):
        for separate in (True, False):
            got = run(pipeline, prompt, images, use_kv_cache=use_kv_cache, separate_cfg_infer=separate)
            torch.testing.assert_close(
                got, base, atol=5e-5, rtol=1e-5
            )  # 3 steps of a random net: fp32 reordering only


def test_cached_step_equals_full_pass_every_step(model, tokenizer, rgb_image):
    """Our cache must give the uncached output at every t, step 0 included."""
    processor = OmniGenProcessor(tokenizer, model.config, 32)
    prompt = processor(EDIT, [rgb_image()])
    latents = [[torch.randn(4, 16, 16)]]
    condition = collate([prompt], latents, 3)
    n = model.config.num_image_tokens(32, 32)
    cache = model.prefill(condition, n)
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        for t in (0.0, 0.3, 0.9):
            tt = torch.tensor([t])
            torch.testing.assert_close(
                model(x, tt, cache=cache), model(x, tt, condition=condition), atol=1e-5, rtol=0
            )


def test_reference_bug_kv_cache_crop_at_step_zero(model, tokenizer, rgb_image):
    """Known bug of the original code we must not copy: at step 0 its cache path cropped the keys/values
    to the condition before attention, so the time token and output tokens did not attend to themselves.
    That output differs from the true one (which our cached path reproduces, test above)."""
    processor = OmniGenProcessor(tokenizer, model.config, 32)
    condition = collate([processor(EDIT, [rgb_image()])], [[torch.randn(4, 16, 16)]], 3)
    n = model.config.num_image_tokens(32, 32)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([0.0])
    with torch.no_grad():
        step, t_emb = model._step_embeddings(x, t)
        sequence = torch.cat([model.embed_condition(condition), step], dim=1)
        positions = masks.full_positions(condition.token_mask, n)
        mask = masks.full_mask(condition.token_mask, condition.image_spans, n)
        length = condition.input_ids.shape[1]
        mask[:, length:, length:] = False  # step tokens see only the condition (the bug)
        hidden = model.llm(sequence, model.llm.inputs(positions, positions[:, -1], mask))
        buggy = model._velocity(hidden, t_emb, 16, 16)
        right = model(x, t, condition=condition)
    assert (buggy - right).abs().max() > 1e-3


def test_batch_equals_single_calls(pipeline, rgb_image):
    prompts = ["a red cat", EDIT, "a blue <img><|image_2|></img> dog <img><|image_1|></img>"]
    images = [None, [rgb_image(seed=1)], [rgb_image(seed=2), rgb_image(seed=3)]]
    batch = run(pipeline, prompts, images, seed=10, separate_cfg_infer=False)
    for k, (p, imgs) in enumerate(zip(prompts, images)):
        single = run(pipeline, p, imgs, seed=10 + k, use_img_guidance=True)
        torch.testing.assert_close(
            batch[k : k + 1], single, atol=5e-5, rtol=1e-5
        )  # 3 steps of a random net: fp32 reordering only


def test_num_images_per_prompt_uses_consecutive_seeds(pipeline):
    both = run(pipeline, "a red cat", num_images_per_prompt=2, seed=5)
    torch.testing.assert_close(both[1:], run(pipeline, "a red cat", seed=6), atol=5e-5, rtol=1e-5)
    assert (both[0] - both[1]).abs().max() > 1e-3


def test_pil_output_and_seed_reported(pipeline, rgb_image):
    kw = dict(seed=7, progress=False, use_input_image_size_as_output=True, max_input_image_size=48)
    images = pipeline(EDIT, [rgb_image(48, 32)], **kw)
    assert images[0].size == (48, 32) and images[0].mode == "RGB"
    assert images[0].info["seed"] == 7
    again = pipeline(EDIT, [rgb_image(48, 32)], **kw)
    assert list(again[0].getdata()) == list(images[0].getdata())


def test_mixed_output_sizes_need_pil(pipeline, rgb_image):
    kw = dict(seed=7, progress=False, use_input_image_size_as_output=True, max_input_image_size=48)
    prompts, inputs = [EDIT, EDIT], [[rgb_image(48, 32)], [rgb_image(32, 32)]]
    with pytest.raises(ValueError, match=r"output sizes differ.*\(32, 32\).*\(32, 48\)"):
        pipeline(prompts, inputs, output_type="pt", **kw)
    sizes = [image.size for image in pipeline(prompts, inputs, **kw)]
    assert sizes == [(48, 32), (32, 32)]


def test_callback_can_replace_latents(pipeline):
    seen = []

    def callback(pipe, step, t, latents):
        seen.append((step, t))
        return torch.zeros_like(latents) if step == 1 else None

    out = run(pipeline, "a red cat", num_inference_steps=2, callback_on_step_end=callback)
    assert seen == [(0, 0.0), (1, 0.5)]
    assert torch.count_nonzero(out) == 0


def test_offload_paths_give_same_result(pipeline):
    base = run(pipeline, "a red cat")
    got = run(pipeline, "a red cat", offload_model=True, offload_kv_cache=True)
    torch.testing.assert_close(got, base, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt="a <img><|image_1|></img> cat"), "do not match 0 input image"),
        (dict(prompt="a cat", images=["x"]), "missing"),
        (dict(prompt="<img><|image_1|></img> <img><|image_1|></img>", images=["a", "b"]), "duplicated"),
        (dict(prompt="<img><|image_2|></img>", images=["a"]), "out of range"),
        (dict(prompt="a <|image_1|> cat", images=["a"]), "without the <img>"),
        (dict(prompt=" \n "), "prompt is empty"),
        (dict(prompt=["a cat", ""]), r"prompt\[1\] is empty"),
        (dict(prompt="a cat", height=30), "multiple of 4"),
        (dict(prompt="a cat", width=4096), "output width must be an int between"),
        (dict(prompt="a cat", num_inference_steps=0), "num_inference_steps"),
        (dict(prompt="a cat", num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(prompt=["a", "b"], images=[["x"]]), "list of 2 lists"),
        (dict(prompt="<img><|image_1|></img>", images=["/no/such/file.png"]), "not found"),
    ],
)
def test_bad_inputs_raise_clear_errors(pipeline, kwargs, message, rgb_image, tmp_path):
    prompt = kwargs.pop("prompt")
    images = kwargs.pop("images", None)
    if images:
        images = [
            [rgb_image() if x in ("a", "b", "x") else x for x in imgs]
            if isinstance(imgs, list)
            else (rgb_image() if imgs in ("a", "b", "x") else imgs)
            for imgs in images
        ]
    with pytest.raises(ValueError, match=message):
        run(pipeline, prompt, images, **kwargs)


def test_corrupt_image_file(pipeline, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="cannot read input image .*bad.png"):
        run(pipeline, EDIT, [str(bad)])


def test_wrong_types(pipeline):
    with pytest.raises(TypeError, match="prompt"):
        run(pipeline, 42)
    with pytest.raises(TypeError, match="seed"):
        run(pipeline, "a cat", seed="x")
