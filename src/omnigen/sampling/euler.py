"""Sampling: seeded noise and the Euler integrator over the rectified-flow time grid.

``make_noise`` draws on a CPU generator and then moves the tensor, so a seed gives the same image on any
device. ``noise_generators`` turns a call's ``seed=`` or ``generator=`` (diffusers' convention: one
``torch.Generator``, drawn from image after image, or a list of one per image) into one generator per
image, so ``generator=torch.Generator().manual_seed(s)`` gives what ``seed=s`` gives.
``euler_sample`` integrates dz/dt = v(z, t) from t = 0 (noise) to t = 1 (data).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
    return draw_noise(shape, [torch.Generator().manual_seed(int(seed)) for seed in seeds], device, dtype)


def draw_noise(
    shape: tuple[int, ...],
    generators: Sequence[torch.Generator],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(len(generators), *shape): row i drawn from ``generators[i]`` (on that generator's device)."""
    rows = [torch.randn(shape, generator=g, device=g.device) for g in generators]
    return torch.stack([r.to(device) for r in rows]).to(dtype=dtype)


def noise_generators(
    generator: torch.Generator | Sequence[torch.Generator] | None, seed: int, count: int
) -> list[torch.Generator]:
    """One generator per image: ``generator`` (a single one shared, or a list of exactly ``count``), or,
    without one, CPU generators seeded ``seed``, ``seed + 1``, ... ."""
    if generator is None:
        return [torch.Generator().manual_seed(seed + k) for k in range(count)]
    if isinstance(generator, torch.Generator):
        return [generator] * count
    if not isinstance(generator, (list, tuple)) or not all(isinstance(g, torch.Generator) for g in generator):
        raise TypeError(f"generator must be a torch.Generator or a list of them, got {generator!r:.80}")
    if len(generator) != count:
        raise ValueError(
            f"generator: a list needs one torch.Generator per image ({count}), got {len(generator)}"
        )
    return list(generator)


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
