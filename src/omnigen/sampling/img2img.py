"""img2img ``strength`` (diffusers' img2img ``strength``, ComfyUI's ``denoise``): start the flow from the
first input image instead of pure noise.

With noise at t = 0 and data at t = 1 (``omnigen.sampling.flow``), strength s starts at t0 = 1 - s: the
steps of the schedule that begin before t0 are skipped, and the first kept step starts from the input
image's latent x1 noised to its start time t, x_t = t x1 + (1 - t) x0 (x0: the image's seeded noise).
s = 1 keeps the whole schedule and starts from the noise (nothing changes); s = 0 skips every step and
returns the input latent (the input image, through the codec). As in diffusers, the kept steps are those of
the full schedule (strength 0.5 of 50 steps runs the last 25), not a new schedule squeezed into [t0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from omnigen.sampling.flow import interpolate
from omnigen.sampling.solvers import Schedule

TOLERANCE = 1e-6  # a grid point within this of 1 - strength counts as at it (float32 grid)


def first_kept_step(schedule: Schedule, strength: float) -> int:
    """The index of the first step that starts at or after t0 = 1 - strength (num_steps: none kept)."""
    t0 = 1.0 - strength
    starts = schedule.grid[:-1].tolist()
    return next((i for i, s in enumerate(starts) if s >= t0 - TOLERANCE), len(starts))


def truncate(schedule: Schedule, start: int) -> Schedule:
    """The steps from ``start`` on; a multistep (2M) step among the first two becomes Euler (it has no
    usable previous estimate, as at t = 0)."""
    kinds = list(schedule.kinds[start:])
    for i in range(min(2, len(kinds))):
        kinds[i] = "euler" if kinds[i] == "dpmpp_2m" else kinds[i]
    return Schedule(schedule.solver, schedule.grid[start:], tuple(kinds))


def start_from_image(
    noise: torch.Tensor, image_latents: torch.Tensor, schedule: Schedule, strength: float
) -> tuple[torch.Tensor, Schedule]:
    """(the starting state, the schedule of the kept steps). ``noise`` and ``image_latents``: (B, C, h, w)."""
    start = first_kept_step(schedule, strength)
    t = schedule.grid[start].item()
    x = interpolate(noise, image_latents.to(noise.device, noise.dtype), torch.tensor(t, dtype=noise.dtype))
    return x, truncate(schedule, start)


def check_start(strength: float, input_sizes: Sequence[tuple[int, int] | None], sizes: Sequence) -> None:
    """strength < 1 needs, per prompt, a first input image whose (resized) size is the output's.
    ``input_sizes``: per prompt, its first input image's (height, width) or None; ``sizes``: the outputs'."""
    if strength >= 1:
        return
    for k, (given, size) in enumerate(zip(input_sizes, sizes)):
        if given is None:
            raise ValueError(
                f"strength={strength} (img2img) starts from the first input image, but prompt {k} has none"
            )
        if tuple(given) != tuple(size):
            raise ValueError(
                f"strength={strength} (img2img): the output size {tuple(size)} must be the first input "
                f"image's (resized) size {tuple(given)}; set use_input_image_size_as_output=True"
            )
