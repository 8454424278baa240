"""Classifier-free guidance combiners (pure functions).

Text + image guidance (OmniGen, after InstructPix2Pix):
    v = uncond + s_img * (img_cond - uncond) + s_txt * (cond - img_cond)
Text-only guidance (no input images):
    v = uncond + s_txt * (cond - uncond)
"""

from __future__ import annotations

import torch


def text_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


def text_image_guidance(
    cond: torch.Tensor, uncond: torch.Tensor, img_cond: torch.Tensor, scale: float, img_scale: float
) -> torch.Tensor:
    return uncond + img_scale * (img_cond - uncond) + scale * (cond - img_cond)


def combine(branches: list[torch.Tensor], scale: float, img_scale: float) -> torch.Tensor:
    """``branches`` = [cond, uncond] or [cond, uncond, img_cond] (the reference's row order)."""
    if len(branches) == 2:
        return text_guidance(branches[0], branches[1], scale)
    if len(branches) == 3:
        return text_image_guidance(branches[0], branches[1], branches[2], scale, img_scale)
    raise ValueError(f"expected 2 or 3 CFG branches, got {len(branches)}")
