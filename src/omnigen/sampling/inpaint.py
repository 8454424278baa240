"""Masked (local) editing: regenerate only where a mask is white and keep every other pixel exactly.

This module owns the mask: reading and checking it (`load_mask`, `prepare_canvas_mask`), fitting it to
the canvas, feathering its seam (``mask_blur``), downsampling it to latent space, the per-step latent
blend (`MaskedEdit`), the final pixel composite (`CanvasMask.composite*`) and the outpainting helper
(`outpaint`). The pipeline only builds these objects and calls them; nothing here sees the model.

The **canvas** is the first input image of a prompt as the pipeline prepares it (resized to at most
``max_input_image_size`` and centre-cropped to a multiple of the model's image multiple); the output has
its size. The mask (white = regenerate, black = keep; grey = a soft mix) is resized to the input image
and goes through the same resize and crop, so it stays aligned with the canvas.

Sampling (``MaskedEdit.blend``, the ``project`` hook of ``omnigen.sampling.solvers.solve``): every state x at time t
becomes m x + (1 - m) (t x1_input + (1 - t) x0), with m the mask downsampled by the codec's factor (max
pooling: a latent cell holding any pixel to regenerate is free), x1_input the canvas's latents and x0 the
run's own noise (``omnigen.sampling.flow``'s convention, noise at t = 0). The kept region thus follows the input's
own flow path and the edit harmonises with it. At the end the decoded image is composited with the
canvas in pixel space with the (feathered) pixel mask, so every pixel where that mask is 0 is exactly the
canvas's: in uint8 for PIL outputs (``composite_image``), in the [-1, 1] tensor for tensor outputs
(``composite``).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageColor, ImageFilter, UnidentifiedImageError

from omnigen.generation import MAX_MASK_BLUR
from omnigen.model.vae import LatentCodec
from omnigen.sampling.flow import interpolate
from omnigen.text.processor import IMAGE_FORMATS, load_image, resize_and_crop, to_tensor
from omnigen.util.checks import check_float, check_int

logger = logging.getLogger(__name__)

MaskLike = Any  # PIL image, path, bytes, numpy array (H, W[, C]) or torch tensor ([C,] H, W)
MASK_KINDS = "a PIL image, a path, bytes, a numpy array (H, W[, C]) or a torch tensor ([C,] H, W)"


# --------------------------------------------------------------------------------------------------
# Reading and fitting a mask
# --------------------------------------------------------------------------------------------------


def _array_to_l(array: np.ndarray) -> Image.Image:
    """An 'L' image from an (H, W) / (H, W, C) array: bool, uint8, uint16 or float in [0, 1]."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or 0 in array.shape:
        raise TypeError(f"a mask array must be (H, W) or (H, W, 1|3|4), got shape {tuple(array.shape)}")
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = np.rint(array / 257.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(f"a float mask must hold values in [0, 1], got [{array.min()}, {array.max()}]")
        array = np.rint(array * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise TypeError(f"a mask array must be bool, uint8, uint16 or float in [0, 1], got {array.dtype}")
    if array.ndim == 2:
        return Image.fromarray(array)
    return _image_to_l(Image.fromarray(np.ascontiguousarray(array)))  # uint8 (H, W, 3|4): RGB or RGBA


def _image_to_l(image: Image.Image) -> Image.Image:
    """Luminance; where the image has an alpha channel, transparent counts as black (keep)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image)
        if image.mode == "I":
            array = array.astype(np.uint16 if array.max() > 255 else np.uint8)
        return _array_to_l(array if image.mode != "F" else array.astype(np.float32))
    if "A" in image.getbands() or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        luma = np.asarray(rgba.convert("L"), dtype=np.float64)
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float64)
        return Image.fromarray(np.rint(luma * alpha / 255.0).astype(np.uint8))
    return image.convert("L")


def load_mask(mask: MaskLike) -> Image.Image:
    """The mask as an 'L' image (255 = regenerate, 0 = keep), from any image mode, a path, bytes or an
    array (numpy channel-last, torch channel-first)."""
    if isinstance(mask, Image.Image):
        return _image_to_l(mask)
    if isinstance(mask, torch.Tensor):
        array = mask.detach().cpu()
        array = array.float() if array.is_floating_point() else array  # numpy has no bfloat16
        if array.ndim == 3 and array.shape[0] in (1, 3, 4):
            array = array.permute(1, 2, 0)
        return _array_to_l(array.numpy())
    if isinstance(mask, np.ndarray):
        return _array_to_l(mask)
    if isinstance(mask, bytes):
        source: io.BytesIO | Path = io.BytesIO(mask)
        name = "<bytes>"
    elif isinstance(mask, (str, Path)):
        source, name = Path(mask), str(mask)
        if not source.is_file():
            raise ValueError(f"mask not found: {name}")
    else:
        raise TypeError(f"mask must be {MASK_KINDS}, got {type(mask).__name__}")
    try:
        with Image.open(source, formats=IMAGE_FORMATS) as opened:
            opened.load()
            return _image_to_l(opened)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read mask {name}: {err}") from err


def check_aspect(mask_size: tuple[int, int], image_size: tuple[int, int]) -> None:
    """The mask (w, h) must have the image's (W, H) aspect ratio up to a pixel of rounding on each side."""
    (w, h), (width, height) = mask_size, image_size
    if abs(w * height - h * width) > max(width + height, w + h):
        raise ValueError(
            f"the mask is {w}x{h} but the image it applies to (the first input image) is {width}x{height}: "
            "their aspect ratios differ; give a mask of the image's shape"
        )


def check_blur(mask_blur: float) -> float:
    """A blur radius in pixels within [0, MAX_MASK_BLUR] (``GenerationConfig.mask_blur``'s range), as a
    float."""
    return check_float("mask_blur", mask_blur, 0, MAX_MASK_BLUR)


def feather(mask: Image.Image, mask_blur: float) -> Image.Image:
    """Gaussian blur of radius ``mask_blur`` pixels (0: unchanged). Symmetric about the edge: pixels just
    outside the mask are partly regenerated, just inside partly kept; where the result is 0, kept exactly."""
    return mask if mask_blur == 0 else mask.filter(ImageFilter.GaussianBlur(mask_blur))


@dataclass(frozen=True)
class CanvasMask:
    """A prompt's canvas (its first input image, prepared) and its mask in canvas pixels."""

    canvas: Image.Image  # RGB, the prepared first input image
    mask: torch.Tensor  # (H, W) float32 in [0, 1], feathered; 1 = regenerate

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the canvas, the output's size."""
        return self.canvas.height, self.canvas.width

    @property
    def pixels(self) -> torch.Tensor:
        """(3, H, W) canvas in [-1, 1], exactly the tensor the pipeline encodes for this image."""
        return to_tensor(self.canvas)

    def composite(self, output: torch.Tensor) -> torch.Tensor:
        """(3, H, W) output in [-1, 1] -> the canvas where the mask is 0, the output where it is 1."""
        canvas, m = self.pixels.to(output), self.mask.to(output)
        mixed = torch.where(m == 1, output, torch.lerp(canvas, output, m))
        return torch.where(m == 0, canvas, mixed)

    def composite_image(self, output: Image.Image) -> Image.Image:
        """The same in uint8: pixels where the mask is 0 are the canvas's bytes exactly."""
        canvas = np.asarray(self.canvas, dtype=np.float64)
        got = np.asarray(output.convert("RGB"), dtype=np.float64)
        m = self.mask.double().numpy()[..., None]
        mixed = np.where(m == 1, got, np.where(m == 0, canvas, np.rint(m * got + (1 - m) * canvas)))
        result = Image.fromarray(mixed.astype(np.uint8))
        result.info.update(output.info)
        return result


def prepare_canvas_mask(
    mask: MaskLike, image: Any, mask_blur: float, max_size: int, multiple: int
) -> CanvasMask:
    """Read and check ``mask`` for the input image ``image``, fit it to the prepared canvas and feather it.

    ``max_size`` and ``multiple`` are the processor's (``prepare_image``): the mask is resized to the image
    and then resized and cropped exactly like it."""
    blur = check_blur(mask_blur)
    picture = load_image(image)
    loaded = load_mask(mask)
    check_aspect(loaded.size, picture.size)
    if loaded.size != picture.size:
        loaded = loaded.resize(picture.size, resample=Image.BILINEAR)
    canvas = resize_and_crop(picture, max_size, multiple)
    fitted = resize_and_crop(loaded, max_size, multiple)
    if fitted.getextrema()[1] == 0:
        raise ValueError(
            "the mask is all black: nothing to edit (white marks the region to regenerate, black what to keep)"
        )
    feathered = np.asarray(feather(fitted, blur), dtype=np.float32) / 255.0
    if canvas.size != picture.size:
        logger.info("mask: the canvas is the input image prepared to %dx%d", *canvas.size)
    return CanvasMask(canvas, torch.from_numpy(feathered))


def prepare_masks(
    mask: MaskLike | Sequence[MaskLike | None] | None,
    images: Sequence[Sequence[Any]],
    mask_blur: float,
    max_size: int,
    multiple: int,
    per_prompt: bool,
) -> list[CanvasMask | None]:
    """One entry per prompt (``images[i]``: its input images). ``mask``: None, one mask for every prompt,
    or (``per_prompt``, a list of prompts) a list with a mask or None per prompt."""
    check_blur(mask_blur)
    if mask is None:
        return [None] * len(images)
    if per_prompt and isinstance(mask, (list, tuple)):
        if len(mask) != len(images):
            raise ValueError(f"with {len(images)} prompts, mask must be one mask or a list of {len(images)}")
        masks = list(mask)
    else:
        masks = [mask] * len(images)
    out = []
    for index, (one, imgs) in enumerate(zip(masks, images)):
        if one is not None and not imgs:
            where = f" (prompt {index})" if len(images) > 1 else ""
            raise ValueError(
                f"a mask needs an input image{where}: it applies to the first input image, the canvas"
            )
        out.append(None if one is None else prepare_canvas_mask(one, imgs[0], mask_blur, max_size, multiple))
    return out


def check_output_size(masks: Sequence[CanvasMask | None], height: int | None, width: int | None) -> None:
    """With a mask the output has the canvas's size; an explicit other height/width is an error (unless the
    call says ``use_input_image_size_as_output``, which ignores them)."""
    for m in masks:
        if m is not None and (height not in (None, m.size[0]) or width not in (None, m.size[1])):
            raise ValueError(
                f"with a mask the output has the canvas's size {m.size[0]}x{m.size[1]} (height x width), "
                f"got height={height}, width={width}; leave them unset (or use_input_image_size_as_output=True)"
            )


# --------------------------------------------------------------------------------------------------
# Latent space: the per-step blend
# --------------------------------------------------------------------------------------------------


def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(H, W) pixel mask -> (1, H / factor, W / factor): the largest value of each latent cell's pixels."""
    m = mask[None, None].float()
    return (m if factor == 1 else F.max_pool2d(m, factor))[0]


class MaskedEdit:
    """The latent blend of the masked rows of one sampling batch (rows without a mask are left alone)."""

    def __init__(self, rows: list[int], masks: torch.Tensor, latents: torch.Tensor) -> None:
        self.rows = rows  # batch rows with a mask
        self.masks = masks  # (R, 1, h, w) latent masks
        self.latents = latents  # (R, C, h, w) the canvases' latents, x1_input

    @classmethod
    def prepare(
        cls, canvas_masks: Sequence[CanvasMask | None], codec: LatentCodec, like: torch.Tensor
    ) -> MaskedEdit | None:
        """``canvas_masks[r]`` for batch row r (None: unmasked); ``like`` the noise (device, dtype). None
        when no row has a mask."""
        rows = [r for r, cm in enumerate(canvas_masks) if cm is not None]
        if not rows:
            return None
        chosen = [canvas_masks[r] for r in rows]
        encoded: dict[int, torch.Tensor] = {}
        for cm in chosen:
            if id(cm) not in encoded:  # the images of one prompt share one canvas
                encoded[id(cm)] = codec.encode(cm.pixels[None].to(like.device))[0].to(like)
        latents = torch.stack([encoded[id(cm)] for cm in chosen])
        masks = torch.stack([latent_mask(cm.mask, codec.downsample) for cm in chosen]).to(like)
        if masks.shape[-2:] != latents.shape[-2:] or latents.shape[1:] != like.shape[1:]:
            raise ValueError(
                f"mask latents {tuple(masks.shape[-2:])} / canvas latents {tuple(latents.shape[1:])} do not "
                f"match the sampled latents {tuple(like.shape[1:])}"
            )
        return cls(rows, masks, latents)

    def blend(self, x: torch.Tensor, t: float, noise: torch.Tensor) -> torch.Tensor:
        """m x + (1 - m) (t x1_input + (1 - t) x0) on the masked rows; exactly the input's path where m = 0."""
        out = x.clone()
        current = x[self.rows]
        known = interpolate(noise[self.rows], self.latents, torch.full((len(self.rows),), t, device=x.device))
        mixed = torch.where(self.masks == 1, current, torch.lerp(known, current, self.masks))
        out[self.rows] = torch.where(self.masks == 0, known, mixed)
        return out


# --------------------------------------------------------------------------------------------------
# Outpainting
# --------------------------------------------------------------------------------------------------


def outpaint(
    image: Any,
    left: int = 0,
    right: int = 0,
    top: int = 0,
    bottom: int = 0,
    fill: str | tuple[int, int, int] = (128, 128, 128),
    multiple: int = 1,
) -> tuple[Image.Image, Image.Image]:
    """Pad ``image`` by the given pixels on each side with ``fill`` (an RGB triple or a colour name) and
    return (padded image, mask): the mask is white over the padding. ``multiple`` > 1 grows the right and
    bottom padding until both sides are multiples of it (the pipeline centre-crops other sizes; 16 for
    OmniGen-v1, ``model.config.image_multiple``). The padded canvas is resized like any input image, so
    give the call a ``max_input_image_size`` that holds it to keep its resolution."""
    picture = load_image(image)
    pads = {"left": left, "right": right, "top": top, "bottom": bottom}
    left, right, top, bottom = (check_int(name, value, 0) for name, value in pads.items())
    multiple = check_int("multiple", multiple, 1)
    if left + right + top + bottom == 0:
        raise ValueError("outpaint needs some padding: left, right, top and bottom are all 0")
    try:
        colour = ImageColor.getrgb(fill) if isinstance(fill, str) else tuple(int(c) for c in fill)
    except (ValueError, TypeError) as err:
        raise ValueError(f"fill must be an RGB triple or a colour name, got {fill!r}") from err
    if len(colour) not in (3, 4) or not all(0 <= c <= 255 for c in colour):
        raise ValueError(f"fill must be an RGB triple of 0..255, got {fill!r}")
    width, height = picture.width + left + right, picture.height + top + bottom
    right += -width % multiple
    bottom += -height % multiple
    width, height = picture.width + left + right, picture.height + top + bottom
    padded = Image.new("RGB", (width, height), colour[:3])
    padded.paste(picture, (left, top))
    mask = Image.new("L", (width, height), 255)
    mask.paste(0, (left, top, left + picture.width, top + picture.height))
    return padded, mask
