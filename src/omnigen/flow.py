"""Rectified flow, OmniGen's direction: noise x0 at t = 0, data x1 at t = 1.

    x_t = t * x1 + (1 - t) * x0,        velocity target v = x1 - x0.

The single home of this convention: training (``interpolate``, ``velocity_target``, ``sample_t``) and
sampling (``time_grid``) both import it from here.
"""

from __future__ import annotations

import torch


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t for t of shape (B,)."""
    t = t.view(-1, *([1] * (x1.dim() - 1))).to(x1.dtype)
    return t * x1 + (1 - t) * x0


def velocity_target(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    return x1 - x0


def sample_t(
    batch: int, generator: torch.Generator, distribution: str = "uniform", mean: float = 0.0, std: float = 1.0
) -> torch.Tensor:
    """(B,) training times: "uniform" on [0, 1] or "logit_normal" (sigmoid of N(mean, std))."""
    if distribution == "uniform":
        return torch.rand(batch, generator=generator)
    if distribution == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(batch, generator=generator))
    raise ValueError(f"unknown t distribution {distribution!r}; allowed: 'uniform', 'logit_normal'")


def time_grid(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """(num_steps + 1,) Euler grid from 0 to 1; t_i = i / n for the reference's default shift of 1.

    A shift s != 1 maps t -> t / (t + s - s t) (the reference scheduler's time-shifting factor).
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_steps!r}")
    t = torch.linspace(0, 1, num_steps + 1)
    return t / (t + shift - shift * t)
