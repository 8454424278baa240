"""Stage-boundary data types: what the processor hands to the collator and the collator to the model.

Legend: B rows, Lc condition length, C latent channels, h/w latent size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

Span = tuple[int, int]  # [start, end) token positions of one input image inside a condition


@dataclass(frozen=True)
class ProcessedPrompt:
    """One prompt after templating, tag parsing and tokenisation (no padding, no batching).

    ``pixel_values`` are ordered as the image tags appear in the text and aligned with ``image_spans``.
    """

    input_ids: tuple[int, ...]
    image_spans: tuple[Span, ...]
    pixel_values: tuple[torch.Tensor, ...]  # each (3, H, W) in [-1, 1]

    def __post_init__(self) -> None:
        if len(self.image_spans) != len(self.pixel_values):
            raise ValueError(
                f"{len(self.image_spans)} image spans but {len(self.pixel_values)} images in a ProcessedPrompt"
            )


@dataclass
class Condition:
    """A left-padded batch of conditions: token ids, which are real, where the images go, their latents."""

    input_ids: torch.Tensor  # (B, Lc) long
    token_mask: torch.Tensor  # (B, Lc) bool, True for real tokens
    image_spans: list[list[Span]]  # per row, in padded coordinates
    image_latents: list[list[torch.Tensor]]  # per row, each (C, h, w), aligned with image_spans

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Condition:
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            token_mask=self.token_mask.to(device),
            image_latents=[[x.to(device=device, dtype=dtype) for x in row] for row in self.image_latents],
        )
