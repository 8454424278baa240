"""The training objective: rectified-flow velocity MSE with OmniGen's edit weighting, generalised.

For a target latent x1, noise x0 ~ N(0, I) and t ~ p(t) (see ``omnigen.sampling.flow``):

    x_t = t x1 + (1 - t) x0,   v = x1 - x0,   loss_b = sum_i w_i (f(x_t, t, c)_i - v_i)^2 / sum_i w_i

Per-pixel weights w_i (``pixel_weights``) multiply two factors, each 1 when switched off:

- Edit weighting (paper Sec. 3): when a sample has a reference input latent x_in of the target's size
  (an edit), pixels that the edit changes are up-weighted so copying the input cannot win:
  ``edit_weight`` where mean_channels |x1 - x_in|_i > ``edit_threshold``.
- Foreground weighting, the same idea without a reference: pixels that differ from the target's own
  background are up-weighted, so a flat background cannot dominate the loss. The background is the
  per-channel median of the target (a flat backdrop covers most of the image in the miniature world and
  in many product shots); ``foreground_weight`` where mean_channels |x1 - median(x1)|_i >
  ``foreground_threshold``, grown by ``foreground_dilate`` pixels (a (2k+1)^2 max-pool) so the seam
  around an object counts too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from omnigen.model import OmniGenModel
from omnigen.model.runner import PLAIN, Runner
from omnigen.sampling.flow import interpolate, sample_t, velocity_target
from omnigen.training.batches import TrainBatch
from omnigen.training.config import LossSettings


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor  # scalar: sum of per_sample * sample weights / (their sum or the given normalizer)
    per_sample: torch.Tensor  # (B,) detached
    t: torch.Tensor  # (B,)


def edit_weights(
    x1: torch.Tensor,
    reference: torch.Tensor | None,
    has_reference: torch.Tensor,
    edit_weight: float,
    threshold: float,
) -> torch.Tensor:
    """(B, 1, H, W) per-pixel weights; 1 where nothing changed or no reference."""
    weights = torch.ones_like(x1[:, :1])
    if reference is None or edit_weight == 1.0:
        return weights
    changed = (x1 - reference).abs().mean(dim=1, keepdim=True) > threshold
    changed = changed & has_reference.view(-1, 1, 1, 1)
    return torch.where(changed, torch.full_like(weights, edit_weight), weights)


def foreground_mask(x1: torch.Tensor, threshold: float, dilate: int = 0) -> torch.Tensor:
    """(B, 1, H, W) bool: pixels whose channel-mean distance to the per-channel median exceeds
    ``threshold``, dilated by ``dilate`` pixels."""
    background = x1.flatten(2).median(dim=2).values[:, :, None, None]  # (B, C, 1, 1)
    mask = (x1 - background).abs().mean(dim=1, keepdim=True) > threshold
    if dilate > 0:
        mask = F.max_pool2d(mask.float(), 2 * dilate + 1, stride=1, padding=dilate) > 0
    return mask


def pixel_weights(
    x1: torch.Tensor, reference: torch.Tensor | None, has_reference: torch.Tensor, settings: LossSettings
) -> torch.Tensor:
    """(B, 1, H, W): edit weights times foreground weights (module docstring)."""
    weights = edit_weights(x1, reference, has_reference, settings.edit_weight, settings.edit_threshold)
    if settings.foreground_weight != 1.0:
        foreground = foreground_mask(x1, settings.foreground_threshold, settings.foreground_dilate)
        weights = weights * torch.where(foreground, settings.foreground_weight, 1.0)
    return weights


def flow_matching_loss(
    model: OmniGenModel,
    batch: TrainBatch,
    generator: torch.Generator | Sequence[torch.Generator],
    settings: LossSettings,
    normalizer: float | None = None,
    max_tokens: int | None = None,
    runner: Runner = PLAIN,
) -> LossOutput:
    """The batch's loss; noise and t drawn on the CPU, then moved.

    ``generator``: one for the batch (t for all rows, then all the noise), or one per row (row b draws
    its t, then its noise, from generator b; a row's draws then do not depend on the rest of the batch).
    ``normalizer``: divide the weighted sum by this instead of the batch's weight sum, e.g. the weight
    sum of a global batch split over micro-batches and ranks.
    ``max_tokens``: run the model on rows packed up to this many tokens (``omnigen.model.packing``).
    ``runner``: how the decoder layers run (e.g. with gradient checkpointing; ``omnigen.model.runner``).
    """
    x1 = batch.x1
    size = x1.shape[0]
    if isinstance(generator, torch.Generator):
        t = sample_t(size, generator, settings.t_distribution)
        x0 = torch.randn(x1.shape, generator=generator)
    else:
        if len(generator) != size:
            raise ValueError(f"got {len(generator)} generators for a batch of {size}")
        draws = [
            (sample_t(1, g, settings.t_distribution), torch.randn(x1.shape[1:], generator=g))
            for g in generator
        ]
        t = torch.cat([d[0] for d in draws])
        x0 = torch.stack([d[1] for d in draws])
    t, x0 = t.to(x1.device), x0.to(x1.device, x1.dtype)
    xt = interpolate(x0, x1, t)
    prediction = model(xt, t, condition=batch.condition, runner=runner, max_tokens=max_tokens).float()
    target = velocity_target(x0, x1).float()
    has_reference = batch.has_reference
    if has_reference is None:
        has_reference = torch.zeros(size, dtype=torch.bool, device=x1.device)
    reference = None if batch.reference is None else batch.reference.float()
    weights = pixel_weights(x1.float(), reference, has_reference, settings)
    squared = ((prediction - target) ** 2).mean(dim=1, keepdim=True) * weights
    per_sample = squared.flatten(1).sum(1) / weights.flatten(1).sum(1)
    sample_weights = batch.weights.to(per_sample)
    total = sample_weights.sum() if normalizer is None else normalizer
    loss = (per_sample * sample_weights).sum() / total
    return LossOutput(loss=loss, per_sample=per_sample.detach(), t=t.detach())
