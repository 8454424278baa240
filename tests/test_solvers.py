"""Solvers (omnigen.sampling.solvers) and the time shift (omnigen.sampling.flow): exactness of Euler against today's sampler,
order of convergence on closed-form flows, equivalence with diffusers' schedulers, evaluation budgets,
the per-state projection hook (masks) and the step cache at two evaluations per step."""

from __future__ import annotations

import math

import pytest
import torch

from omnigen.sampling import solvers
from omnigen.sampling.euler import euler_sample
from omnigen.sampling.flow import interpolate, predict_data, resolution_shift, shift_time, time_grid
from omnigen.sampling.solvers import Schedule, plan, solve, step_kinds
from omnigen.sampling.step_cache import StepCache
from omnigen.text.collate import collate
from omnigen.text.processor import OmniGenProcessor


# ---------------------------------------------------------------------------------------- closed-form flows
def gaussian_flow(mean: float, std: float):
    """The exact rectified-flow velocity from N(0, 1) noise to an N(mean, std^2) target, and its solution.

    x_t = t x1 + (1 - t) x0 has variance V(t) = t^2 std^2 + (1 - t)^2; v(x, t) = E[x1 - x0 | x_t = x] =
    mean + (t std^2 - (1 - t)) / V(t) (x - t mean), whose trajectories are x(t) = t mean + sqrt(V(t)) x0,
    so x(1) = mean + std x0. Time-dependent and curved: a solver evaluating at the wrong t is caught."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        variance = t * t * std**2 + (1 - t) ** 2
        return mean + (t * std**2 - (1 - t)) / variance * (x - t * mean)

    return velocity, lambda x0: mean + std * x0


def linear_flow(a: float, b: float):
    """v(x, t) = a x + b: x(1) = (x0 + b / a) e^a - b / a."""
    return (lambda x, t: a * x + b), (lambda x0: (x0 + b / a) * math.exp(a) - b / a)


FLOWS = {"gaussian": gaussian_flow(0.5, 1.0), "linear": linear_flow(-1.5, 0.8)}


def budget(solver: str, steps: int) -> int:
    """Evaluations for ``steps`` steps (Heun with an odd budget: every step Heun but the last)."""
    return 2 * steps - 1 if solver == "heun" else steps


def global_error(solver: str, flow: str, steps: int, shift: float = 1.0) -> float:
    velocity, exact = FLOWS[flow]
    x0 = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    schedule = plan(solver, budget(solver, steps), shift)
    assert schedule.num_steps == steps
    return (solve(velocity, x0, schedule) - exact(x0)).abs().max().item()


# Halving the step divides the error by 2 (first order) or 4 (second order). DPM-Solver++(2M) on a grid
# uniform in t gets there slowly: its steps near t = 1 do not shrink in lambda = log(t / (1 - t)), so its
# error is O(log n / n^2) (the ratio is ~3.6 at 128 -> 256 steps; a wrong coefficient gives ~2).
ORDER_BOUNDS = {"euler": (1.8, 2.2), "heun": (3.6, 4.4), "dpmpp_2m": (3.0, 4.4)}


@pytest.mark.parametrize("flow", sorted(FLOWS))
@pytest.mark.parametrize("solver", solvers.SOLVERS)
def test_global_order_of_convergence(solver, flow):
    low, high = ORDER_BOUNDS[solver]
    ratio = global_error(solver, flow, 128) / global_error(solver, flow, 256)
    assert low < ratio < high, f"{solver} on the {flow} flow: error ratio {ratio:.2f} when halving the step"


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("shift", [0.5, 3.0])
def test_order_holds_on_shifted_grids(solver, shift):
    low, high = ORDER_BOUNDS[solver]
    ratio = global_error(solver, "gaussian", 64, shift) / global_error(solver, "gaussian", 128, shift)
    assert low < ratio < high


def test_dpmpp_2m_converges_on_a_shifted_grid():
    errors = [global_error("dpmpp_2m", "gaussian", k, 3.0) for k in (64, 128, 256)]
    assert errors[0] / errors[1] > 2.8 and errors[1] / errors[2] > 3.0


def local_error(kind: str, h: float, s: float = 0.5) -> float:
    """One step of ``kind`` from the exact state at s to s + h (2M: with the exact state at s - h)."""
    velocity, _ = gaussian_flow(0.3, 0.6)
    x0 = torch.linspace(-2, 2, 9, dtype=torch.float64)

    def state(t: float) -> tuple[torch.Tensor, torch.Tensor]:
        x = t * 0.3 + math.sqrt(t * t * 0.36 + (1 - t) ** 2) * x0
        return x, velocity(x, torch.tensor([t], dtype=torch.float64))

    x, v = state(s)
    step = x + h * v
    if kind == "heun":
        step = solvers.heun_step(x, v, velocity(step, torch.tensor([s + h], dtype=torch.float64)), h)
    if kind == "dpmpp_2m":
        xp, vp = state(s - h)
        step = step + solvers.dpmpp_2m_correction(
            predict_data(x, v, s), predict_data(xp, vp, s - h), s - h, s, s + h
        )
    return (step - state(s + h)[0]).abs().max().item()


@pytest.mark.parametrize("kind, order", [("euler", 2), ("heun", 3), ("dpmpp_2m", 3)])
def test_local_truncation_error_order(kind, order):
    """Away from the ends a p-th order step errs by O(h^(p+1)): halving h divides it by 2^(p+1)."""
    ratio = local_error(kind, 0.02) / local_error(kind, 0.01)
    assert 2**order * 0.85 < ratio < 2**order * 1.15, ratio


# ---------------------------------------------------------------------------------------- exactness
def old_euler_loop(velocity, z, num_steps, shift=1.0, callback=None):
    """The sampler's loop as it was before solvers existed (a frozen copy, the bit-for-bit reference)."""
    grid = time_grid(num_steps, shift)
    for i in range(num_steps):
        t = grid[i].item()
        z = z + (grid[i + 1] - grid[i]).item() * velocity(z, torch.full((z.shape[0],), t, device=z.device))
        if callback is not None:
            replaced = callback(i, t, z)
            if replaced is not None:
                z = replaced
    return z


def nonlinear_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    weight = torch.linspace(-1, 1, x.shape[1] ** 2).view(x.shape[1], x.shape[1])
    mixed = torch.einsum("bchw,cd->bdhw", x, weight)
    return torch.tanh(mixed) * (1 + t.view(-1, 1, 1, 1)) - torch.sin(3 * t).view(-1, 1, 1, 1) * x


@pytest.mark.parametrize("steps, shift", [(1, 1.0), (5, 1.0), (6, 1.0), (50, 1.0), (7, 3.0)])
def test_euler_is_todays_sampler_bit_for_bit(steps, shift):
    z = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(steps))
    calls = {"old": [], "solve": [], "euler_sample": []}

    def callback(name):
        def record(i, t, latent):
            calls[name].append((i, t))
            return latent * 0.5 if i == 1 else None

        return record

    want = old_euler_loop(nonlinear_velocity, z, steps, shift, callback("old"))
    got = solve(nonlinear_velocity, z, plan("euler", steps, shift), callback=callback("solve"))
    assert torch.equal(got, want)
    assert torch.equal(euler_sample(nonlinear_velocity, z, steps, shift, callback("euler_sample")), want)
    assert calls["solve"] == calls["old"] == calls["euler_sample"]


@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m"])
@pytest.mark.parametrize("n", [1, 2])
def test_tiny_budgets_are_euler(solver, n):
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    euler = solve(nonlinear_velocity, z, plan("euler", n))
    assert torch.equal(solve(nonlinear_velocity, z, plan(solver, n)), euler)


# ---------------------------------------------------------------------------------------- against diffusers
def flow_velocity_as_diffusers_output(x: torch.Tensor, t: float) -> torch.Tensor:
    """diffusers' flow models predict noise - data at sigma = 1 - t: the negative of our velocity."""
    return -gaussian_flow(0.4, 0.5)[0](x, torch.full((x.shape[0],), t))


@pytest.mark.parametrize("n, shift", [(4, 1.0), (9, 1.0), (12, 3.0)])
def test_dpmpp_2m_equals_diffusers_multistep_scheduler(n, shift):
    from diffusers import DPMSolverMultistepScheduler

    schedule = plan("dpmpp_2m", n, shift)
    scheduler = DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(n)
    scheduler.sigmas = 1 - schedule.grid  # sigma = 1 - t, ending at 0 (data)
    scheduler.set_begin_index(0)
    x0 = torch.randn(3, 16, generator=torch.Generator().manual_seed(n))
    x = x0
    for i, t in enumerate(schedule.evaluation_times):
        x = scheduler.step(flow_velocity_as_diffusers_output(x, t), scheduler.timesteps[i], x).prev_sample
    got = solve(gaussian_flow(0.4, 0.5)[0], x0, schedule)
    torch.testing.assert_close(got, x, atol=2e-6, rtol=0)
    assert (got - solve(gaussian_flow(0.4, 0.5)[0], x0, plan("euler", n, shift))).abs().max() > 1e-3


@pytest.mark.parametrize("n, shift", [(5, 1.0), (13, 1.0), (9, 3.0)])
def test_heun_equals_diffusers_flow_match_heun(n, shift):
    from diffusers import FlowMatchHeunDiscreteScheduler

    schedule = plan("heun", n, shift)
    steps = schedule.num_steps
    sigmas = 1 - schedule.grid
    scheduler = FlowMatchHeunDiscreteScheduler()
    scheduler.set_timesteps(steps)
    scheduler.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
    starts = sigmas[:-1] * 1000
    scheduler.timesteps = torch.cat([starts[:1], starts[1:].repeat_interleave(2)])
    scheduler.set_begin_index(0)
    assert len(scheduler.timesteps) == n
    x0 = torch.randn(3, 16, generator=torch.Generator().manual_seed(n))
    x = x0
    for timestep, t in zip(scheduler.timesteps, schedule.evaluation_times, strict=True):
        x = scheduler.step(flow_velocity_as_diffusers_output(x, t), timestep, x).prev_sample
    torch.testing.assert_close(solve(gaussian_flow(0.4, 0.5)[0], x0, schedule), x, atol=2e-6, rtol=0)


# ---------------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("solver", solvers.SOLVERS)
def test_budget_is_exactly_the_number_of_evaluations(solver):
    for n in range(1, 26):
        schedule = plan(solver, n)
        times: list[float] = []

        def velocity(x, t, times=times):
            times.append(t[0].item())
            return torch.zeros_like(x)

        solve(velocity, torch.zeros(1, 2), schedule)
        assert len(times) == schedule.num_evaluations == n
        assert times == schedule.evaluation_times
        assert all(t < 1 for t in times), "no evaluation at the data itself"
        assert (
            schedule.grid[0] == 0 and schedule.grid[-1] == 1 and len(schedule.grid) == schedule.num_steps + 1
        )


def test_step_kinds_spell_out_the_budget_rules():
    assert step_kinds("heun", 5) == ("heun", "heun", "euler")
    assert step_kinds("heun", 6) == ("euler", "heun", "heun", "euler")
    assert step_kinds("heun", 3) == ("heun", "euler")
    assert step_kinds("dpmpp_2m", 6) == ("euler", "euler", "dpmpp_2m", "dpmpp_2m", "dpmpp_2m", "euler")
    assert step_kinds("dpmpp_2m", 3) == ("euler",) * 3
    assert plan("heun", 6).evaluation_times == [0.0, 0.25, 0.5, 0.5, 0.75, 0.75]  # E, H (2), H (2), E


@pytest.mark.parametrize(
    "args, message",
    [
        (("ddim", 6), "unknown sampler 'ddim'; allowed: 'euler', 'heun', 'dpmpp_2m'"),
        (("heun", 0), "num_inference_steps (the number of evaluations) must be an int >= 1, got 0"),
        (("heun", 2.5), "must be an int >= 1, got 2.5"),
        (("euler", True), "must be an int >= 1, got True"),
        (("euler", 4, 0.0), "time_shift must be a finite number > 0"),
        (("euler", 4, -2), "got -2"),
        (("euler", 4, float("nan")), "got nan"),
        (("euler", 4, float("inf")), "got inf"),
        (("euler", 4, "3"), "got '3'"),
    ],
)
def test_bad_plans_raise_clear_errors(args, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
        plan(*args)


def test_hand_made_schedules_are_checked():
    with pytest.raises(ValueError, match="one kind per step"):
        Schedule("euler", time_grid(3), ("euler", "euler"))
    with pytest.raises(ValueError, match="one kind per step"):
        Schedule("euler", time_grid(2), ("euler", "rk4"))
    with pytest.raises(ValueError, match="first two steps and the last are first order"):
        Schedule("dpmpp_2m", time_grid(3), ("euler", "dpmpp_2m", "euler"))


# ---------------------------------------------------------------------------------------- time shift
def test_unshifted_grid_is_the_reference_formula_bit_for_bit():
    for n in range(1, 61):
        t = torch.linspace(0, 1, n + 1)
        reference = t / (t + 1 - 1 * t)  # the reference scheduler, time_shifting_factor = 1
        assert torch.equal(time_grid(n), reference) and torch.equal(time_grid(n, 1.0), reference)
        assert (time_grid(n) - t).abs().max() <= 6e-8  # at most one float32 ulp from i / n
        assert torch.equal(plan("euler", n, 1.0).grid, time_grid(n))


@pytest.mark.parametrize("shift", [0.5, 3.0, 6.0])
def test_shift_is_sd3s_in_omnigens_direction(shift):
    grid = time_grid(20, shift)
    sigma = 1 - torch.linspace(0, 1, 21, dtype=torch.float64)
    sd3 = shift * sigma / (1 + (shift - 1) * sigma)  # SD3 / diffusers: shifted noise level
    torch.testing.assert_close(grid.double(), 1 - sd3, atol=1e-6, rtol=0)
    assert grid[0] == 0 and grid[-1] == 1 and bool((grid.diff() > 0).all())
    unshifted = torch.linspace(0, 1, 21)
    assert bool((grid[1:-1] < unshifted[1:-1]).all()) == (shift > 1)  # s > 1: more steps near the noise
    assert torch.equal(shift_time(torch.tensor([0.0, 1.0]), shift), torch.tensor([0.0, 1.0]))


def test_resolution_shift_is_omnigen2s_rule():
    assert resolution_shift(40, 40) == 1.0  # 320 x 320 pixels
    assert resolution_shift(128, 128) == pytest.approx(3.2)  # 1024 x 1024


# ---------------------------------------------------------------------------------------- hooks: masks
@pytest.mark.parametrize("solver", solvers.SOLVERS)
def test_project_hook_sees_every_state_at_its_own_time(solver):
    """A mask's rule: at every evaluation the region outside the mask is t x1_input + (1 - t) x0."""
    velocity, _ = gaussian_flow(0.2, 0.7)
    x0 = torch.randn(2, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x1_input = torch.randn(2, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    keep = torch.arange(10) >= 6  # outside the mask
    projected, evaluated = [], []

    def project(x, t):
        projected.append(t)
        known = interpolate(x0, x1_input, torch.full((2,), t))
        return torch.where(keep, known, x)

    def recording_velocity(x, t):
        known = interpolate(x0, x1_input, t.double())
        assert torch.equal(x[:, keep], known[:, keep]), "a state was evaluated before being projected"
        evaluated.append(t[0].item())
        return velocity(x, t)

    schedule = plan(solver, 7)
    got = solve(recording_velocity, x0, schedule, project=project)
    assert torch.equal(got[:, keep], x1_input[:, keep])
    assert evaluated == schedule.evaluation_times
    heun_predictions = [schedule.grid[i + 1].item() for i, k in enumerate(schedule.kinds) if k == "heun"]
    assert sorted(projected) == sorted([0.0, *schedule.grid[1:].tolist(), *heun_predictions])
    # the field acts per element, so the region inside the mask is unaffected by the projection
    assert torch.equal(got[:, ~keep], solve(velocity, x0, schedule)[:, ~keep])


# ---------------------------------------------------------------------------------------- caches
@pytest.fixture
def condition(model, tokenizer, rgb_image):
    processor = OmniGenProcessor(tokenizer, model.config, 32)
    prompt = processor("make it blue <img><|image_1|></img>", [rgb_image()])
    return collate([prompt], [[torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(0))]], 3)


def model_velocity(model, condition, use_kv_cache: bool, step_cache: StepCache | None):
    n = model.config.num_image_tokens(16, 16)
    cache = model.prefill(condition, n) if use_kv_cache else None

    def velocity(x, t):
        if step_cache is not None:
            step_cache.begin_step()
        return model(x, t, condition=None if use_kv_cache else condition, cache=cache, step_cache=step_cache)

    return velocity


@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m"])
@torch.no_grad()
def test_kv_cache_and_step_cache_work_at_every_evaluation(model, condition, solver):
    """The step cache is sized by evaluations (``schedule.num_evaluations``) and decides per evaluation."""
    schedule: Schedule = plan(solver, 7)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    exact = solve(model_velocity(model, condition, True, None), z, schedule)
    uncached = solve(model_velocity(model, condition, False, None), z, schedule)
    torch.testing.assert_close(exact, uncached, atol=1e-5, rtol=0)

    every = StepCache(0.0, schedule.num_evaluations)
    got = solve(model_velocity(model, condition, True, every), z, schedule)
    torch.testing.assert_close(got, exact, atol=1e-6, rtol=0)
    assert every.computed == [True] * schedule.num_evaluations

    skipping = StepCache(0.5, schedule.num_evaluations)
    approx = solve(model_velocity(model, condition, True, skipping), z, schedule)
    assert len(skipping.computed) == schedule.num_evaluations
    assert skipping.computed[0] and skipping.computed[-1], "the first and last evaluations always run"
    assert 2 <= skipping.num_computed < schedule.num_evaluations
    assert torch.isfinite(approx).all() and (approx - exact).abs().max() > 0
