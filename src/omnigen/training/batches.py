"""From X2I samples to model-ready training batches, through the inference processor and ``collate``
(one code path for both). Images are decoded once and kept in memory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image

from omnigen.collate import collate
from omnigen.processor import OmniGenProcessor, load_image, to_tensor
from omnigen.training.sampling_data import ConditionDropout
from omnigen.training.x2i import X2ISample, compose_instruction
from omnigen.types import Condition
from omnigen.vae import LatentCodec


@dataclass
class TrainBatch:
    condition: Condition
    x1: torch.Tensor  # (B, C, h, w) target latents
    reference: torch.Tensor  # (B, C, h, w) the edited input's latents (zeros where none)
    has_reference: torch.Tensor  # (B,) bool
    weights: torch.Tensor  # (B,) sample weights


@lru_cache(maxsize=200_000)
def _square_pixels(path: str, resolution: int) -> torch.Tensor:
    """(3, R, R) in [-1, 1]: resize the short side to R, centre crop."""
    image = load_image(Path(path))
    scale = resolution / min(image.size)
    if scale != 1:
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, resample=Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    return to_tensor(image.crop((left, top, left + resolution, top + resolution)))


class BatchBuilder:
    def __init__(
        self,
        samples: list[X2ISample],
        processor: OmniGenProcessor,
        codec: LatentCodec,
        dropout: ConditionDropout,
        device: torch.device,
    ) -> None:
        self.samples = samples
        self.processor = processor
        self.codec = codec
        self.dropout = dropout
        self.device = device

    def __call__(
        self,
        indices: list[int],
        resolution: int,
        generators: torch.Generator | Sequence[torch.Generator],
    ) -> TrainBatch:
        """``generators``: one per sample (its dropout draw), or one shared by the whole batch."""
        if isinstance(generators, torch.Generator):
            generators = [generators] * len(indices)
        if len(generators) != len(indices):
            raise ValueError(f"got {len(generators)} generators for {len(indices)} samples")
        prompts, latents, targets, references, has_reference, weights = [], [], [], [], [], []
        for index, generator in zip(indices, generators, strict=True):
            sample = self.samples[index]
            instruction, paths = compose_instruction(sample)
            pixels = [_square_pixels(str(p), resolution) for p in paths]
            choice = self.dropout.sample(generator)
            instruction, kept = ConditionDropout.apply(instruction, pixels, choice)
            prompt = self.processor(instruction, kept)
            prompts.append(prompt)
            # the processor orders a prompt's pixels as their tags appear, matching its spans
            latents.append([self._encode(p) for p in prompt.pixel_values])
            target = self._encode(_square_pixels(str(sample.output_image), resolution))
            targets.append(target)
            is_edit = len(kept) == 1 and len(paths) == 1  # one input, same size as the target
            references.append(latents[-1][0] if is_edit else torch.zeros_like(target))
            has_reference.append(is_edit)
            weights.append(sample.weight)
        condition = collate(prompts, latents, self.processor.config.transformer.pad_token_id)
        return TrainBatch(
            condition=condition.to(self.device),
            x1=torch.stack(targets),
            reference=torch.stack(references),
            has_reference=torch.tensor(has_reference, device=self.device),
            weights=torch.tensor(weights, dtype=torch.float32, device=self.device),
        )

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(pixels[None].to(self.device))[0]
