"""The training objective: rectified-flow velocity MSE with OmniGen's edit weighting.

For a target latent x1, noise x0 ~ N(0, I) and t ~ p(t) (see ``omnigen.flow``):

    x_t = t x1 + (1 - t) x0,   v = x1 - x0,   loss_b = sum_i w_i (f(x_t, t, c)_i - v_i)^2 / sum_i w_i

Edit weighting (paper Sec. 3): when a sample has a reference input latent x_in of the target's size
(an edit), pixels that the edit changes are up-weighted so copying the input cannot win:

    w_i = edit_weight   if mean_channels |x1 - x_in|_i > edit_threshold
    w_i = 1             otherwise (and for samples without a reference)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from omnigen.flow import interpolate, sample_t, velocity_target
from omnigen.model import OmniGenModel
from omnigen.types import Condition


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


def flow_matching_loss(
    model: OmniGenModel,
    condition: Condition,
    x1: torch.Tensor,
    generator: torch.Generator | Sequence[torch.Generator],
    t_distribution: str = "logit_normal",
    reference: torch.Tensor | None = None,
    has_reference: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
    edit_weight: float = 1.0,
    edit_threshold: float = 0.1,
    normalizer: float | None = None,
) -> LossOutput:
    """x1 (B, C, H, W) target latents; noise and t drawn on the CPU, then moved.

    ``generator``: one for the batch (t for all rows, then all the noise), or one per row (row b draws
    its t, then its noise, from generator b; a row's draws then do not depend on the rest of the batch).
    ``normalizer``: divide the weighted sum by this instead of the batch's weight sum, e.g. the weight
    sum of a global batch split over micro-batches and ranks.
    """
    batch = x1.shape[0]
    if isinstance(generator, torch.Generator):
        t = sample_t(batch, generator, t_distribution)
        x0 = torch.randn(x1.shape, generator=generator)
    else:
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch}")
        draws = [(sample_t(1, g, t_distribution), torch.randn(x1.shape[1:], generator=g)) for g in generator]
        t = torch.cat([d[0] for d in draws])
        x0 = torch.stack([d[1] for d in draws])
    t, x0 = t.to(x1.device), x0.to(x1.device, x1.dtype)
    xt = interpolate(x0, x1, t)
    prediction = model(xt, t, condition=condition).float()
    target = velocity_target(x0, x1).float()
    if has_reference is None:
        has_reference = torch.zeros(batch, dtype=torch.bool, device=x1.device)
    weights = edit_weights(
        x1.float(),
        None if reference is None else reference.float(),
        has_reference,
        edit_weight,
        edit_threshold,
    )
    squared = ((prediction - target) ** 2).mean(dim=1, keepdim=True) * weights
    per_sample = squared.flatten(1).sum(1) / weights.flatten(1).sum(1)
    if sample_weights is None:
        sample_weights = torch.ones_like(per_sample)
    total = sample_weights.sum() if normalizer is None else normalizer
    loss = (per_sample * sample_weights).sum() / total
    return LossOutput(loss=loss, per_sample=per_sample.detach(), t=t.detach())
