"""Prompt processing: the chat template, ``<img><|image_k|></img>`` parsing, image resize/crop, and the
expansion of each image into its number of latent tokens. One prompt in, one ``ProcessedPrompt`` out;
no padding or batching here (that is ``collate``). Also builds the three CFG branches.

Follows the original OmniGen processor's semantics (VectorSpaceLab/OmniGen ``processor.py``):
the text is split at the image tags, each chunk tokenised separately and its BOS dropped for every
chunk but the first, images ordered as their tags appear.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from omnigen.config import OmniGenConfig
from omnigen.text.tags import BARE_TAG_PATTERN, image_tag, validate_image_tags
from omnigen.text.tokenizer import TextTokenizer
from omnigen.types import ProcessedPrompt
from omnigen.util.checks import check_int

USER = "<|user|>\n"
PREAMBLE = "Generate an image according to the following instructions\n"
END = "<|end|>\n"
ASSISTANT = "<|assistant|>\n<|diffusion|>"
PLACEHOLDER_ID = 0  # ids inside an image span are never embedded; the value is irrelevant
# The only formats a user's image file or upload is decoded as (CLI inputs, batch lines, service uploads,
# masks): Pillow's other plugins (EPS through Ghostscript, ...) never see untrusted bytes.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


def apply_template(prompt: str) -> str:
    return f"{USER}{PREAMBLE}{prompt}{END}{ASSISTANT}"


def load_image(image: Image.Image | str | Path | np.ndarray) -> Image.Image:
    """An RGB PIL image from a PIL image, a path, raw bytes or an HxWx3 uint8 array."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return _array_image(image)
    source, name = _source(image)
    try:
        with Image.open(source, formats=IMAGE_FORMATS) as opened:
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read input image {name}: {err}") from err


def image_size(image: Image.Image | str | Path | np.ndarray) -> tuple[int, int]:
    """(width, height) of an input image as ``load_image`` reads it; a file's header only is read."""
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, np.ndarray):
        return _array_image(image).size
    source, name = _source(image)
    try:
        with Image.open(source) as opened:
            return opened.size
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read input image {name}: {err}") from err


def _array_image(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise TypeError(f"array images must be HxW or HxWx3 uint8, got {array.dtype} {array.shape}")
    return Image.fromarray(array).convert("RGB")


def _source(image: bytes | str | Path) -> tuple[io.BytesIO | Path, str]:
    """What ``Image.open`` reads for bytes or a path, and the name errors use."""
    if isinstance(image, bytes):
        return io.BytesIO(image), "<bytes>"
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise ValueError(f"input image not found: {image}")
        return Path(image), str(image)
    raise TypeError(
        f"input images must be PIL images, paths, bytes or uint8 arrays, got {type(image).__name__}"
    )


def resized_size(width: int, height: int, max_size: int, multiple: int) -> tuple[int, int]:
    """(width, height) that ``resize_and_crop`` gives an image of this size, without touching pixels."""
    while min(width, height) >= 2 * max_size:
        width, height = width // 2, height // 2
    if max(width, height) > max_size:
        scale = max_size / max(width, height)
        width, height = round(width * scale), round(height * scale)
    return width - width % multiple, height - height % multiple


def resize_and_crop(image: Image.Image, max_size: int, multiple: int) -> Image.Image:
    """Halve with a box filter while the short side is ≥ 2·max_size, scale (bicubic) so the long side is
    at most max_size, then centre-crop each side down to a multiple of ``multiple``."""
    while min(image.size) >= 2 * max_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    if max(image.size) > max_size:
        scale = max_size / max(image.size)
        image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    width, height = image.size
    if width < multiple or height < multiple:
        raise ValueError(f"input image of {width}x{height} is smaller than the minimum {multiple}x{multiple}")
    left, top = (width % multiple) // 2, (height % multiple) // 2
    return image.crop((left, top, left + width - width % multiple, top + height - height % multiple))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float in [-1, 1]."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return array * 2.0 - 1.0


@dataclass(frozen=True)
class CfgPrompts:
    """The (instruction, images) of each CFG branch for one sample."""

    cond: tuple[str, list]
    uncond: tuple[str, list]
    img_cond: tuple[str, list] | None


def cfg_prompts(instruction: str, images: list, negative_prompt: str, use_img_cfg: bool) -> CfgPrompts:
    """Condition, unconditional (the negative prompt, no images) and image-only condition (just the tags)
    — the last is the negative prompt for a sample without images, as in the reference."""
    uncond = (negative_prompt, [])
    img_cond = None
    if use_img_cfg:
        img_cond = (" ".join(image_tag(k + 1) for k in range(len(images))), images) if images else uncond
    return CfgPrompts(cond=(instruction, images), uncond=uncond, img_cond=img_cond)


class OmniGenProcessor:
    def __init__(
        self, tokenizer: TextTokenizer, config: OmniGenConfig, max_input_image_size: int = 1024
    ) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.max_input_image_size = self.check_max_input_image_size(max_input_image_size)

    def check_max_input_image_size(self, value: int) -> int:
        config = self.config
        return check_int("max_input_image_size", value, config.image_multiple, config.max_image_size)

    def prepare_image(
        self, image: Image.Image | str | Path | np.ndarray, max_size: int | None = None
    ) -> torch.Tensor:
        max_size = self.check_max_input_image_size(max_size or self.max_input_image_size)
        return to_tensor(resize_and_crop(load_image(image), max_size, self.config.image_multiple))

    def __call__(
        self,
        instruction: str,
        images: Sequence = (),
        max_input_image_size: int | None = None,
        template: bool = True,
    ) -> ProcessedPrompt:
        if not isinstance(instruction, str):
            raise TypeError(f"prompt must be a str, got {type(instruction).__name__}")
        images = list(images or [])
        order = validate_image_tags(instruction, len(images))
        pixels = [
            img if isinstance(img, torch.Tensor) else self.prepare_image(img, max_input_image_size)
            for img in images
        ]
        pixels = [pixels[k - 1] for k in order]
        text = apply_template(instruction) if template else instruction
        chunks = BARE_TAG_PATTERN.split(text)[::2]  # split() also returns the captured numbers; drop them
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        bos = self.tokenizer.bos_token_id
        for index, chunk in enumerate(chunks):
            chunk_ids = self.tokenizer.encode(chunk)
            if index > 0 and chunk_ids and chunk_ids[0] == bos:
                chunk_ids = chunk_ids[1:]
            ids.extend(chunk_ids)
            if index < len(pixels):
                size = self.config.num_image_tokens(*pixels[index].shape[-2:])
                spans.append((len(ids), len(ids) + size))
                ids.extend([PLACEHOLDER_ID] * size)
        return ProcessedPrompt(tuple(ids), tuple(spans), tuple(pixels))
