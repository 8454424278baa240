"""Sampling: seeded noise and the Euler integrator over the rectified-flow time grid.

``make_noise`` draws on a CPU generator and then moves the tensor, so a seed gives the same image on any
device. ``euler_sample`` integrates dz/dt = v(z, t) from t = 0 (noise) to t = 1 (data).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from omnigen.sampling.flow import time_grid

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, float, torch.Tensor], "torch.Tensor | None"]


def make_noise(
    shape: tuple[int, ...],
    seeds: list[int],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(len(seeds), *shape): row i from a CPU generator seeded with ``seeds[i]``, so a batch equals its
    rows generated one at a time."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)


def euler_sample(
    velocity: VelocityFn,
    z: torch.Tensor,
    num_steps: int,
    shift: float = 1.0,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """z <- z + (t_{i+1} - t_i) v(z, t_i) for i = 0..n-1. ``callback(i, t_i, z)`` may return a new z."""
    grid = time_grid(num_steps, shift)
    for i in tqdm(range(num_steps), disable=not progress, desc="sampling", leave=False):
        t = grid[i].item()
        z = z + (grid[i + 1] - grid[i]).item() * velocity(z, torch.full((z.shape[0],), t, device=z.device))
        if callback is not None:
            replaced = callback(i, t, z)
            if replaced is not None:
                z = replaced
    return z
