"""Rectified flow, OmniGen's direction: noise x0 at t = 0, data x1 at t = 1.

    x_t = t * x1 + (1 - t) * x0,        velocity target v = x1 - x0.

The single home of this convention: training (``interpolate``, ``velocity_target``, ``sample_t``) and
sampling (``time_grid``, ``shift_time``, ``predict_data``, ``log_snr``) all import it from here.

In the diffusion notation x_t = alpha_t * data + sigma_t * noise this path has alpha_t = t and
sigma_t = 1 - t: the noise level sigma of SD3 / diffusers' flow schedulers is 1 - t, and their "data at
sigma = 0" is our t = 1.
"""

from __future__ import annotations

import math

import torch

from omnigen.util.checks import check_float, check_int


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t for t of shape (B,)."""
    t = t.view(-1, *([1] * (x1.dim() - 1))).to(x1.dtype)
    return t * x1 + (1 - t) * x0


def velocity_target(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    return x1 - x0


def predict_data(x: torch.Tensor, v: torch.Tensor, t: float) -> torch.Tensor:
    """The data estimate x1_hat = x_t + (1 - t) v of a state x at time t with velocity v.

    (In OmniGen's names the noise is x0, so x0_hat = x_t - t v is the *noise* estimate; DPM-Solver++'s
    "data prediction" is x1_hat.)"""
    return x + (1 - t) * v


def log_snr(t: float) -> float:
    """lambda(t) = log(alpha_t / sigma_t) = log(t / (1 - t)); -inf at t = 0 (noise), +inf at t = 1 (data)."""
    if t <= 0:
        return -math.inf
    if t >= 1:
        return math.inf
    return math.log(t / (1 - t))


def sample_t(
    batch: int, generator: torch.Generator, distribution: str = "uniform", mean: float = 0.0, std: float = 1.0
) -> torch.Tensor:
    """(B,) training times: "uniform" on [0, 1] or "logit_normal" (sigmoid of N(mean, std))."""
    if distribution == "uniform":
        return torch.rand(batch, generator=generator)
    if distribution == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(batch, generator=generator))
    raise ValueError(f"unknown t distribution {distribution!r}; allowed: 'uniform', 'logit_normal'")


def check_shift(shift: float) -> float:
    """A time shift must be a finite number > 0 (1 = no shift); returns it as a float."""
    return check_float("time_shift", shift, 0, low_open=True)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t -> t / (t + s - s t): SD3's timestep shift in OmniGen's direction.

    SD3 (Esser et al. 2024, eq. 23) and diffusers' FlowMatchEulerDiscreteScheduler shift the noise level
    sigma -> s sigma / (1 + (s - 1) sigma); with sigma = 1 - t this is exactly the map above, which is also
    the reference OmniGen scheduler's ``time_shifting_factor`` and OmniGen2's schedule. s > 1 spends more
    steps near the noise (t = 0). It fixes 0 and 1 for every s, and s = 1 is the reference's own
    (unshifted) formula, kept as written so the default grid stays bit-equal to the reference's."""
    return t / (t + shift - shift * t)


def resolution_shift(latent_height: int, latent_width: int) -> float:
    """OmniGen2's resolution-dependent shift: s = sqrt(latent H * W) / 40 (1 at 320 x 320 pixels, 3.2 at
    1024 x 1024 for a VAE that downsamples by 8), from its schedulers' ``dynamic_time_shift``."""
    return math.sqrt(latent_height * latent_width) / 40


def time_grid(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """(num_steps + 1,) float32 step boundaries from 0 to 1: t_i = i / n mapped by ``shift_time``.

    With the default shift of 1 this is the reference scheduler's grid bit for bit. That grid is computed
    as t / (t + 1 - t), so a few of its interior points sit 1 float32 ulp (6e-8) away from i / n; we keep
    it for bit-equality with the reference and with every sampler run before solvers existed.
    """
    num_steps = check_int("num_inference_steps", num_steps, 1)
    return shift_time(torch.linspace(0, 1, num_steps + 1), check_shift(shift))
