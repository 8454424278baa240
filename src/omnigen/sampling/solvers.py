"""ODE solvers for sampling: Euler, Heun and DPM-Solver++(2M), in OmniGen's flow direction.

The convention is ``omnigen.sampling.flow``'s: noise at t = 0, data at t = 1, x_t = t x1 + (1 - t) x0, and the
model's velocity v(x, t) estimates x1 - x0. Sampling integrates dx/dt = v(x, t) from t = 0 to t = 1 over
the step boundaries t_0 = 0 < ... < t_k = 1 of ``flow.time_grid`` (i / k, optionally time-shifted).

This module owns the integrators only: it sees a velocity function and never the model, the CFG
branches, the caches or the mask. ``plan(solver, num_evaluations, shift)`` turns a budget into a
``Schedule`` (the grid and the kind of each step); ``solve(velocity, x, schedule)`` runs it.

**The budget is n velocity (transformer) evaluations**, not steps. Step kinds:

- "euler": one evaluation, x <- x + (t - s) v(x, s) (s, t the step's start and end).
- "heun": two, Heun's (trapezoidal) predictor-corrector: x~ = x + (t - s) v(x, s), then
  x <- x + (t - s) (v(x, s) + v(x~, t)) / 2.
- "dpmpp_2m": one, reusing the data estimate of the previous evaluation (below).

How each solver spends n evaluations:

- ``euler``: n Euler steps (today's sampler, bit for bit).
- ``heun``: as in k-diffusion / EDM and diffusers, the step that ends at t = 1 is Euler (a corrector
  there would evaluate at the data itself). Odd n: (n + 1) / 2 steps, Heun then a last Euler step
  (5 evaluations = H H E). Even n: n / 2 + 1 steps whose first step is Euler too (6 = E H H E), so no
  evaluation happens at t = 1 and every budget is spent exactly. n = 1 or 2 equals Euler.
- ``dpmpp_2m``: n steps; the first two and the last are Euler (see below), so n <= 3 equals Euler.

DPM-Solver++(2M) in flow form. With alpha_t = t, sigma_t = 1 - t and lambda = log(alpha / sigma), the
data-prediction ODE has the exact solution (DPM-Solver++, Lu et al. 2022, arXiv:2211.01095, eq. 9)

    x_t = (sigma_t / sigma_s) x_s + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda D(lambda) dlambda,

where D = x1_hat = x + (1 - t) v (``flow.predict_data``; note x0_hat = x - t v is the *noise* estimate in
OmniGen's names). Holding D constant over the step gives (sigma_t/sigma_s) x_s + (t - s)/(1 - s) D_s,
which is exactly the Euler step x_s + (t - s) v_s. 2M extrapolates D linearly in lambda from the
previous evaluation at s' < s (the paper's Algorithm 2, "midpoint" form D_s + (D_s - D_s') / (2r)):

    x_t = x_s + (t - s) v_s + (t - s) / (1 - s) * (D_s - D_s') / (2 r),
    r = (lambda_s - lambda_s') / (lambda_t - lambda_s).

The step to t = 1 (lambda = +inf) is first order ("lower_order_final" with a zero final sigma), and so
is the step after t = 0: there lambda_s' = -inf, r = inf and the term vanishes, which diffusers and
OmniGen2 also compute. Derived from the paper and checked against diffusers' DPMSolverMultistepScheduler
(``algorithm_type="dpmsolver++"``, ``prediction_type="flow_prediction"``, ``solver_type="midpoint"``,
sigma = 1 - t: ``multistep_dpm_solver_second_order_update``), OmniGen2's
``schedulers/scheduling_dpmsolver_multistep.py`` (the same solver in OmniGen's direction,
x0_pred = sample + sigma v), and k-diffusion's ``sample_dpmpp_2m`` / ``sample_heun``; the tests compare
with diffusers and show each solver's order on closed-form flows.

Hooks, for the pipeline (step cache, KV cache, CFG and masks live in its velocity function):

- ``velocity(x, t)``: t is a (B,) tensor on x's device; called exactly ``schedule.num_evaluations``
  times, at ``schedule.evaluation_times`` in order (a time can repeat: Heun's corrector and the next
  step's first evaluation share t_{i+1}).
- ``project(x, t) -> x`` (optional): applied to every state the solver forms, with that state's time:
  the start (t = 0), Heun's predictor x~ (before it is evaluated) and each step's result, the final one
  at t = 1. Every state handed to ``velocity`` has been projected at its own time.
- ``callback(i, t_i, x)`` (optional) after step i, with the step's start time (the sampler's existing
  callback contract); it may return a replacement x. It runs after ``project``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from omnigen.sampling.euler import StepCallback, VelocityFn
from omnigen.sampling.flow import log_snr, predict_data, time_grid
from omnigen.util.checks import check_int

SOLVERS = ("euler", "heun", "dpmpp_2m")
EVALUATIONS_PER_STEP = {"euler": 1, "heun": 2, "dpmpp_2m": 1}

ProjectFn = Callable[[torch.Tensor, float], torch.Tensor]  # (state, its time) -> state


@dataclass(frozen=True, eq=False)
class Schedule:
    """What one sampling run does, fixed before it starts."""

    solver: str
    grid: torch.Tensor  # (k + 1,) float32 step boundaries, grid[0] = 0, grid[k] = 1
    kinds: tuple[str, ...]  # per step: "euler", "heun" or "dpmpp_2m"

    def __post_init__(self) -> None:
        if len(self.grid) != len(self.kinds) + 1 or set(self.kinds) - set(EVALUATIONS_PER_STEP):
            raise ValueError(
                f"a schedule needs one kind per step, each one of {sorted(EVALUATIONS_PER_STEP)}"
            )
        if "dpmpp_2m" in self.kinds[:2] + self.kinds[-1:]:
            raise ValueError("the first two steps and the last are first order (no usable previous estimate)")

    @property
    def num_steps(self) -> int:
        return len(self.kinds)

    @property
    def num_evaluations(self) -> int:
        return sum(EVALUATIONS_PER_STEP[kind] for kind in self.kinds)

    @property
    def evaluation_times(self) -> list[float]:
        """The time of each velocity evaluation, in order."""
        times = []
        for i, kind in enumerate(self.kinds):
            times.append(self.grid[i].item())
            if kind == "heun":
                times.append(self.grid[i + 1].item())
        return times


def step_kinds(solver: str, num_evaluations: int) -> tuple[str, ...]:
    """The kind of each step for a budget of ``num_evaluations`` (module docstring)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown sampler {solver!r}; allowed: {', '.join(map(repr, SOLVERS))}")
    n = check_int("num_inference_steps (the number of evaluations)", num_evaluations, 1)
    if solver == "euler" or n <= 2:
        return ("euler",) * n
    if solver == "heun":
        if n % 2:
            return ("heun",) * ((n - 1) // 2) + ("euler",)
        return ("euler",) + ("heun",) * ((n - 2) // 2) + ("euler",)
    return ("euler",) * min(n - 1, 2) + ("dpmpp_2m",) * (n - 3) + ("euler",)


def plan(solver: str, num_evaluations: int, shift: float = 1.0) -> Schedule:
    """The schedule of ``solver`` with exactly ``num_evaluations`` velocity evaluations on the grid
    shifted by ``shift`` (``flow.shift_time``; 1 = the reference grid)."""
    kinds = step_kinds(solver, num_evaluations)
    return Schedule(solver, time_grid(len(kinds), shift), kinds)


def heun_step(x: torch.Tensor, v: torch.Tensor, v_next: torch.Tensor, dt: float) -> torch.Tensor:
    """x + dt (v(x, s) + v(x~, t)) / 2."""
    return x + dt * (0.5 * (v + v_next))


def dpmpp_2m_correction(
    data: torch.Tensor, previous_data: torch.Tensor, s_prev: float, s: float, t: float
) -> torch.Tensor:
    """The 2M term added to the Euler step from s to t: (t - s)/(1 - s) * (D_s - D_s') / (2r)."""
    lam_prev, lam_s, lam_t = log_snr(s_prev), log_snr(s), log_snr(t)
    r = (lam_s - lam_prev) / (lam_t - lam_s)
    return ((t - s) / (1 - s) / (2 * r)) * (data - previous_data)


def solve(
    velocity: VelocityFn,
    x: torch.Tensor,
    schedule: Schedule,
    project: ProjectFn | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate from ``schedule.grid[0]`` = 0 (x: the noise) to 1 and return the final state."""
    grid = schedule.grid
    bar = tqdm(total=schedule.num_evaluations, disable=not progress, desc="sampling", leave=False)

    def evaluate(state: torch.Tensor, t: float) -> torch.Tensor:
        bar.update(1)
        return velocity(state, torch.full((state.shape[0],), t, device=state.device))

    if project is not None:
        x = project(x, grid[0].item())
    previous = None  # (time, data estimate) of the last step's first evaluation, for 2M
    with bar:
        for i, kind in enumerate(schedule.kinds):
            s, t = grid[i].item(), grid[i + 1].item()
            dt = (grid[i + 1] - grid[i]).item()
            v = evaluate(x, s)
            step = x + dt * v  # Euler, written as the sampler always did (bit-equal)
            if kind == "heun":
                predicted = step if project is None else project(step, t)
                step = heun_step(x, v, evaluate(predicted, t), dt)
            data = predict_data(x, v, s) if schedule.solver == "dpmpp_2m" else None
            if kind == "dpmpp_2m":
                step = step + dpmpp_2m_correction(data, previous[1], previous[0], s, t)
            previous = None if data is None else (s, data)
            x = step if project is None else project(step, t)
            if callback is not None:
                replaced = callback(i, s, x)
                if replaced is not None:
                    x = replaced
    return x
