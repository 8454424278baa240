"""Left padding of processed prompts into one ``Condition`` batch (spans shifted by each row's padding)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from omnigen.types import Condition, ProcessedPrompt


def collate(
    prompts: Sequence[ProcessedPrompt],
    image_latents: Sequence[Sequence[torch.Tensor]],
    pad_token_id: int,
) -> Condition:
    """``image_latents[i]`` are the latents of ``prompts[i].pixel_values`` in the same order."""
    if len(prompts) != len(image_latents):
        raise ValueError(f"{len(prompts)} prompts but {len(image_latents)} latent lists")
    length = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    token_mask = torch.zeros(len(prompts), length, dtype=torch.bool)
    spans = []
    for row, prompt in enumerate(prompts):
        pad = length - len(prompt.input_ids)
        ids[row, pad:] = torch.tensor(prompt.input_ids, dtype=torch.long)
        token_mask[row, pad:] = True
        spans.append([(start + pad, end + pad) for start, end in prompt.image_spans])
    return Condition(ids, token_mask, spans, [list(latents) for latents in image_latents])
