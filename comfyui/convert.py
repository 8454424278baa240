"""ComfyUI's tensor conventions <-> what the OmniGen pipeline takes and returns.

ComfyUI: IMAGE is float (B, H, W, C) in [0, 1], C = 3; MASK is float (B, H, W) (or (H, W)) in [0, 1],
1 = the masked area. The pipeline takes PIL images (and a mask image: white = regenerate, black = keep)
and, with ``output_type="pt"``, returns (N, 3, H, W) pixels in [-1, 1].
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def _to_uint8(array: torch.Tensor) -> np.ndarray:
    return (array.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def image_to_pil(image: torch.Tensor, name: str) -> Image.Image:
    """One ComfyUI IMAGE (batch of 1) -> an RGB PIL image (exact for images loaded from 8-bit files)."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name} must be a ComfyUI IMAGE tensor, got {type(image).__name__}")
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"{name} must be an IMAGE of shape (B, H, W, C) with C in 1, 3, 4; got {tuple(image.shape)}"
        )
    if image.shape[0] != 1:
        raise ValueError(
            f"{name} holds a batch of {image.shape[0]} images; connect one image per input "
            "(use batch_size for several outputs)"
        )
    pixels = image[0, :, :, :3] if image.shape[-1] != 1 else image[0].expand(-1, -1, 3)
    return Image.fromarray(_to_uint8(pixels))  # (H, W, 3) uint8: RGB


def mask_to_pil(mask: torch.Tensor) -> Image.Image:
    """A ComfyUI MASK (1 = masked) -> a grey-scale mask image (white = regenerate, black = keep)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a ComfyUI MASK tensor, got {type(mask).__name__}")
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"mask must be a MASK of shape (1, H, W) or (H, W), got {tuple(mask.shape)}")
    return Image.fromarray(_to_uint8(mask))  # (H, W) uint8: L


def pixels_to_image(pixels: torch.Tensor) -> torch.Tensor:
    """Pipeline pixels (N, 3, H, W) in [-1, 1] -> a ComfyUI IMAGE (N, H, W, 3) float32 in [0, 1]."""
    return (pixels.float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).contiguous().cpu()
