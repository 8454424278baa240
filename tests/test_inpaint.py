"""Masked editing (omnigen.sampling.inpaint): exact pixels outside the mask, the latent blend, mask input, outpaint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from omnigen.sampling.euler import euler_sample
from omnigen.sampling.flow import interpolate
from omnigen.sampling.inpaint import (
    CanvasMask,
    MaskedEdit,
    latent_mask,
    load_mask,
    outpaint,
    prepare_canvas_mask,
)
from omnigen.text.processor import to_tensor

EDIT = "make it blue <img><|image_1|></img>"


def run(pipeline, prompt, images=None, **kw):
    kw.setdefault("seed", 3)
    kw.setdefault("progress", False)
    kw.setdefault("num_inference_steps", 2)
    return pipeline(prompt, images, **kw)


def box_mask(width, height, box):
    """An 'L' mask, white inside (left, top, right, bottom)."""
    array = np.zeros((height, width), dtype=np.uint8)
    left, top, right, bottom = box
    array[top:bottom, left:right] = 255
    return Image.fromarray(array)


def kept(cm: CanvasMask) -> np.ndarray:
    return (cm.mask == 0).numpy()


# ---------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("separate_cfg_infer", [True, False])
@pytest.mark.parametrize("size", [(32, 32), (16, 24), (24, 32)])  # (width, height)
def test_pixels_outside_the_mask_are_the_inputs(pipeline, rgb_image, size, separate_cfg_infer):
    width, height = size
    image = rgb_image(width, height, seed=4)
    mask = box_mask(width, height, (4, 4, width // 2 + 2, height // 2))
    got = run(pipeline, EDIT, [image], mask=mask, separate_cfg_infer=separate_cfg_infer)[0]
    assert got.size == image.size
    out, source = np.asarray(got), np.asarray(image)
    outside = np.asarray(mask) == 0
    assert np.array_equal(out[outside], source[outside])
    assert (out[~outside] != source[~outside]).any(), "the masked region was not regenerated"
    if size != (16, 24):
        return
    # the same in the tensor output, against the tensor the pipeline encodes
    pixels = run(pipeline, EDIT, [image], mask=mask, separate_cfg_infer=separate_cfg_infer, output_type="pt")
    assert pixels.shape == (1, 3, height, width)
    assert torch.equal(
        pixels[0][:, torch.from_numpy(outside)], to_tensor(image)[:, torch.from_numpy(outside)]
    )


@pytest.fixture(scope="module")
def shipped():
    from omnigen.pipeline import OmniGenPipeline

    return OmniGenPipeline.from_pretrained(None)


@pytest.mark.parametrize("separate_cfg_infer", [True, False])
def test_shipped_model_changes_only_the_masked_cell(shipped, separate_cfg_infer):
    from omnigen.miniworld import scene as ms
    from omnigen.miniworld import world as mw

    sample = mw.generate(1, 0, "heldout", tasks=["edit/recolour"])[0]
    source = ms.Scene.from_dict(sample.meta["input_scenes"][0])
    changed = [o.cell for o in source.objects if o.to_dict() not in sample.meta["scene"]["objects"]]
    (cell,) = changed
    top, left = ms.cell_origin(cell, 16)
    c = ms.cell_size(16)
    mask = np.zeros((16, 16), dtype=bool)
    mask[top : top + c, left : left + c] = True
    kw = dict(seed=0, num_inference_steps=4, progress=False, separate_cfg_infer=separate_cfg_infer)
    source_pixels = sample.input_images[0]
    masked = np.asarray(shipped(sample.instruction, [source_pixels], mask=mask, **kw)[0])
    assert np.array_equal(masked[~mask], source_pixels[~mask])
    if separate_cfg_infer:
        free = np.asarray(shipped(sample.instruction, [source_pixels], **kw)[0])
        assert (free[~mask] != source_pixels[~mask]).any(), "the unmasked edit also regenerates the rest"


def test_no_mask_is_todays_sampler_bit_for_bit(pipeline, rgb_image, monkeypatch):
    """Without a mask the pipeline runs exactly the sampler it ran before masks (``euler_sample``)."""
    import omnigen.pipeline as module

    images = [rgb_image(seed=2)]
    got = run(pipeline, EDIT, images, output_type="latent")
    text_only = run(pipeline, "a red cat", output_type="latent")
    assert torch.equal(got, run(pipeline, EDIT, images, output_type="latent", mask=None, mask_blur=3))

    def todays_sampler(velocity, z, schedule, project, callback, progress):
        assert project is None
        return euler_sample(velocity, z, schedule.num_steps, callback=callback, progress=progress)

    monkeypatch.setattr(module, "solve", todays_sampler)
    assert torch.equal(run(pipeline, EDIT, images, output_type="latent"), got)
    assert torch.equal(run(pipeline, "a red cat", output_type="latent"), text_only)


@pytest.mark.parametrize("output_type", ["latent", "pil"])
def test_all_white_mask_equals_the_unmasked_edit(pipeline, rgb_image, output_type):
    image = rgb_image(24, 16, seed=5)
    white = Image.new("L", image.size, 255)
    masked = run(pipeline, EDIT, [image], mask=white, output_type=output_type)
    free = run(pipeline, EDIT, [image], use_input_image_size_as_output=True, output_type=output_type)
    if output_type == "pil":
        masked, free = np.asarray(masked[0]), np.asarray(free[0])
        assert np.array_equal(masked, free)
    else:
        assert torch.equal(masked, free)


def test_masks_per_prompt_leave_unmasked_rows_alone(pipeline, rgb_image):
    images = [[rgb_image(seed=1)], [rgb_image(seed=2)]]
    mask = box_mask(32, 32, (0, 0, 16, 16))
    both = run(pipeline, [EDIT, EDIT], images, mask=[mask, None], num_images_per_prompt=2)
    plain = run(pipeline, [EDIT, EDIT], images, num_images_per_prompt=2)
    outside = np.asarray(mask) == 0
    for image in both[:2]:
        assert np.array_equal(np.asarray(image)[outside], np.asarray(images[0][0])[outside])
    for a, b in zip(both[2:], plain[2:]):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert [image.info["seed"] for image in both] == [3, 4, 5, 6]


def test_the_canvas_is_the_prepared_first_image(pipeline, rgb_image):
    """A 30x26 image is centre-cropped to 28x24; its mask goes through the same crop."""
    image = rgb_image(30, 26, seed=6)
    mask = box_mask(30, 26, (0, 0, 15, 26))  # the left half
    cm = prepare_canvas_mask(mask, image, 0, 32, 4)
    assert cm.size == (24, 28)
    assert np.array_equal(kept(cm), np.asarray(mask)[1:25, 1:29] == 0)
    got = run(pipeline, EDIT, [image], mask=mask)[0]
    assert got.size == (28, 24)
    assert np.array_equal(np.asarray(got)[kept(cm)], np.asarray(cm.canvas)[kept(cm)])
    # a mask at another resolution of the same shape is resized to the image first
    small = box_mask(15, 13, (0, 0, 7, 13))
    assert prepare_canvas_mask(small, image, 0, 32, 4).size == (24, 28)


# ---------------------------------------------------------------------------------------- feathering
def test_mask_blur_feathers_and_keeps_the_zero_region_exact(pipeline, rgb_image):
    image = rgb_image(32, 32, seed=7)
    mask = box_mask(32, 32, (8, 8, 20, 20))
    sharp, soft = (prepare_canvas_mask(mask, image, blur, 32, 4) for blur in (0, 2))
    partial = (soft.mask > 0) & (soft.mask < 1)
    assert partial.sum() > 40 and kept(soft).sum() < kept(sharp).sum()
    assert torch.equal(sharp.mask, torch.from_numpy(np.array(mask)) / 255.0)
    got = np.asarray(run(pipeline, EDIT, [image], mask=mask, mask_blur=2)[0])
    source = np.asarray(image)
    assert np.array_equal(got[kept(soft)], source[kept(soft)])
    ring = partial.numpy() & (np.asarray(mask) == 0)  # outside the drawn mask, inside the feather
    assert (got[ring] != source[ring]).any()


def test_composite_mixes_soft_values():
    canvas = Image.new("RGB", (2, 1), (100, 100, 100))
    cm = CanvasMask(canvas, torch.tensor([[0.25, 1.0]]))
    out = cm.composite_image(Image.new("RGB", (2, 1), (200, 200, 200)))
    assert np.asarray(out)[0].tolist() == [[125] * 3, [200] * 3]
    pt = cm.composite(torch.ones(3, 1, 2))
    torch.testing.assert_close(pt[:, 0, 0], torch.full((3,), 0.25 + 0.75 * (100 / 255 * 2 - 1)))
    assert torch.equal(pt[:, 0, 1], torch.ones(3))


# ---------------------------------------------------------------------------------------- latent blend
def test_latent_mask_frees_every_cell_touched_by_the_mask():
    mask = torch.zeros(8, 8)
    mask[3, 5] = 1.0
    mask[6, 0] = 0.5
    got = latent_mask(mask, 2)
    assert got.shape == (1, 4, 4)
    want = torch.zeros(1, 4, 4)
    want[0, 1, 2], want[0, 3, 0] = 1.0, 0.5
    assert torch.equal(got, want)
    assert torch.equal(latent_mask(mask, 1)[0], mask)


class _ScaleCodec:
    downsample, channels = 2, 3

    def encode(self, pixels):
        return 2 * pixels[:, :, ::2, ::2]


def test_blend_follows_the_inputs_flow_path_outside_the_mask():
    canvas = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    m = torch.zeros(8, 8)
    m[:4, :4] = 1.0
    cm = CanvasMask(canvas, m)
    noise = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    edit = MaskedEdit.prepare([None, cm, cm], _ScaleCodec(), noise)
    x = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    x1 = 2 * cm.pixels[:, ::2, ::2]
    for t in (0.0, 0.4, 1.0):
        out = edit.blend(x, t, noise)
        known = interpolate(noise[1:], x1.expand(2, -1, -1, -1), torch.full((2,), t))
        assert torch.equal(out[0], x[0])  # unmasked row untouched
        assert torch.equal(out[1:, :, :2, :2], x[1:, :, :2, :2])  # inside: the sampler's state
        keep = torch.ones(4, 4, dtype=torch.bool)
        keep[:2, :2] = False
        assert torch.equal(out[1:][..., keep], known[..., keep])
    assert torch.equal(edit.blend(x, 1.0, noise)[1:][..., keep], x1.expand(2, -1, -1, -1)[..., keep])
    assert torch.equal(edit.blend(x, 0.0, noise)[1:][..., keep], noise[1:][..., keep])
    assert MaskedEdit.prepare([None, None], _ScaleCodec(), noise) is None


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m"])
def test_every_solver_ends_on_the_inputs_latents_outside_the_mask(solver):
    from omnigen.sampling.solvers import plan, solve

    canvas = Image.fromarray(np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    m = torch.zeros(8, 8)
    m[2:6, 4:] = 1.0
    noise = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    edit = MaskedEdit.prepare([CanvasMask(canvas, m)], _ScaleCodec(), noise)
    seen = []

    def velocity(x, t):  # a field that would pull everything towards 0.3
        seen.append(x.clone())
        return 0.3 - x

    got = solve(velocity, noise, plan(solver, 5), project=lambda x, t: edit.blend(x, t, noise))
    keep = latent_mask(m, 2)[0] == 0
    assert torch.equal(got[0][:, keep], edit.latents[0][:, keep])
    assert not torch.equal(got[0][:, ~keep], edit.latents[0][:, ~keep])
    assert len(seen) == 5


# ---------------------------------------------------------------------------------------- mask input
def test_masks_of_every_kind_read_the_same():
    array = np.zeros((6, 8), dtype=np.uint8)
    array[1:4, 2:5] = 255
    want = Image.fromarray(array)
    rgba = np.zeros((6, 8, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white everywhere, but only the stroke is opaque
    rgba[..., 3] = array
    kinds = [
        want,
        want.convert("1"),
        want.convert("RGB"),
        want.convert("P"),
        Image.fromarray(rgba),
        Image.fromarray(array.astype(np.uint16) * 257),
        array > 0,
        array,
        array / 255.0,
        np.repeat(array[..., None], 3, axis=2),
        torch.from_numpy(array > 0),
        torch.from_numpy(array / 255.0).float()[None],
        torch.from_numpy(array / 255.0).bfloat16(),
    ]
    for kind in kinds:
        assert np.array_equal(np.asarray(load_mask(kind)), array), type(kind)


def test_masks_from_paths_and_bytes(tmp_path):
    image = Image.new("L", (4, 4), 0)
    image.putpixel((1, 1), 255)
    image.save(tmp_path / "m.png")
    assert np.array_equal(np.asarray(load_mask(tmp_path / "m.png")), np.asarray(image))
    assert np.array_equal(np.asarray(load_mask((tmp_path / "m.png").read_bytes())), np.asarray(image))


@pytest.mark.parametrize(
    "mask, error, message",
    [
        (42, TypeError, "mask must be a PIL image"),
        ([Image.new("L", (32, 32), 255)], TypeError, "mask must be a PIL image"),
        ("no/such/mask.png", ValueError, "mask not found"),
        (b"not an image", ValueError, "cannot read mask"),
        (np.zeros((32, 32), dtype=np.int64), TypeError, "bool, uint8, uint16 or float"),
        (np.full((32, 32), 2.0), ValueError, r"values in \[0, 1\]"),
        (np.zeros((32, 32, 2), dtype=np.uint8), TypeError, r"\(H, W\) or \(H, W, 1\|3\|4\)"),
        (Image.new("L", (32, 32), 0), ValueError, "all black: nothing to edit"),
        (Image.new("L", (32, 24), 255), ValueError, "aspect ratios differ"),
        (Image.new("L", (16, 8), 255), ValueError, "aspect ratios differ"),
    ],
)
def test_bad_masks_raise_clear_errors(pipeline, rgb_image, mask, error, message):
    with pytest.raises(error, match=message):
        run(pipeline, EDIT, [rgb_image()], mask=mask)


def test_bad_mask_calls_raise_clear_errors(pipeline, rgb_image):
    white = Image.new("L", (32, 32), 255)
    with pytest.raises(ValueError, match="a mask needs an input image"):
        run(pipeline, "a red cat", mask=white)
    with pytest.raises(ValueError, match=r"needs an input image \(prompt 1\)"):
        run(pipeline, [EDIT, "a red cat"], [[rgb_image()], None], mask=white)
    with pytest.raises(ValueError, match="one mask or a list of 2"):
        run(pipeline, [EDIT, EDIT], [[rgb_image()], [rgb_image()]], mask=[white])
    with pytest.raises(ValueError, match="mask_blur must be an int between 0 and 1024"):
        run(pipeline, EDIT, [rgb_image()], mask=white, mask_blur=-1)
    with pytest.raises(ValueError, match="canvas's size 32x32"):
        run(pipeline, EDIT, [rgb_image()], mask=white, height=16)
    got = run(pipeline, EDIT, [rgb_image()], mask=white, height=16, use_input_image_size_as_output=True)
    assert got[0].size == (32, 32)
    # a tiny white spot of a large mask survives the resize; one pixel of rounding in the ratio is fine
    spot = box_mask(320, 320, (100, 100, 104, 104))
    assert prepare_canvas_mask(spot, rgb_image(), 0, 32, 4).mask.max() > 0
    assert prepare_canvas_mask(Image.new("L", (31, 32), 255), rgb_image(), 0, 32, 4).size == (32, 32)


# ---------------------------------------------------------------------------------------- outpainting
def test_outpaint_pads_and_masks_the_new_area(rgb_image):
    image = rgb_image(10, 6, seed=8)
    padded, mask = outpaint(image, left=3, right=1, top=2, fill="black")
    assert padded.size == mask.size == (14, 8)
    inner = np.asarray(padded)[2:8, 3:13]
    assert np.array_equal(inner, np.asarray(image))
    m = np.asarray(mask)
    assert set(np.unique(m)) == {0, 255}
    assert (m[2:8, 3:13] == 0).all() and (m == 255).sum() == 14 * 8 - 60
    assert (np.asarray(padded)[m == 255] == 0).all()
    padded, mask = outpaint(image, right=2, fill=(1, 2, 3), multiple=4)
    assert padded.size == (12, 8) and np.asarray(padded)[7, 11].tolist() == [1, 2, 3]
    assert (np.asarray(mask)[:6, :10] == 0).all() and (np.asarray(mask)[6:] == 255).all()


@pytest.mark.parametrize(
    "kw, message",
    [
        ({}, "needs some padding"),
        ({"left": -1}, "left must be an int >= 0, got -1"),
        ({"left": 2, "multiple": 0}, "multiple must be an int >= 1, got 0"),
        ({"left": 2, "fill": "no-such-colour"}, "fill must be an RGB triple"),
        ({"left": 2, "fill": (300, 0, 0)}, "fill must be an RGB triple"),
    ],
)
def test_outpaint_bad_arguments(rgb_image, kw, message):
    with pytest.raises(ValueError, match=message):
        outpaint(rgb_image(8, 8), **kw)


def test_outpaint_refuses_a_fractional_pad(rgb_image):
    with pytest.raises(TypeError, match="top must be an int >= 0, got 1.5"):
        outpaint(rgb_image(8, 8), top=1.5)


def test_outpainted_edit_keeps_the_original_exactly(pipeline, rgb_image):
    image = rgb_image(24, 24, seed=9)
    padded, mask = outpaint(image, left=4, right=4, top=8, multiple=4)
    got = run(pipeline, EDIT, [padded], mask=mask)[0]
    assert got.size == padded.size == (32, 32)
    assert np.array_equal(np.asarray(got)[8:32, 4:28], np.asarray(image))
    assert (np.asarray(got)[:8] != np.asarray(padded)[:8]).any()
