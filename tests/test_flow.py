"""omnigen.sampling.flow: OmniGen's rectified-flow convention (noise x0 at t = 0, data x1 at t = 1)."""

from __future__ import annotations

import math

import pytest
import torch

from omnigen.sampling import flow


def pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)


def test_interpolate_has_noise_at_0_and_data_at_1_per_row():
    x0, x1 = pair()
    t = torch.tensor([0.0, 1.0, 0.25])
    xt = flow.interpolate(x0, x1, t)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], x1[1])
    torch.testing.assert_close(xt[2], 0.25 * x1[2] + 0.75 * x0[2])


def test_velocity_target_is_the_time_derivative_of_the_path():
    x0, x1 = pair(1)
    v = flow.velocity_target(x0, x1)
    torch.testing.assert_close(v, x1 - x0)
    t, h = torch.full((3,), 0.4, dtype=torch.float64), 1e-3
    x0, x1 = x0.double(), x1.double()
    derivative = (flow.interpolate(x0, x1, t + h) - flow.interpolate(x0, x1, t - h)) / (2 * h)
    torch.testing.assert_close(derivative, v.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.9])
def test_predict_data_recovers_the_data_from_the_true_velocity(t):
    x0, x1 = pair(2)
    xt = flow.interpolate(x0, x1, torch.full((3,), t))
    torch.testing.assert_close(flow.predict_data(xt, flow.velocity_target(x0, x1), t), x1)


def test_time_grid_runs_from_noise_to_data_and_is_monotone():
    for steps in (1, 7, 50):
        grid = flow.time_grid(steps)
        assert grid.shape == (steps + 1,) and grid.dtype == torch.float32
        assert grid[0] == 0 and grid[-1] == 1 and bool((grid.diff() > 0).all())
        # i / n, up to the float32 rounding of the reference formula t / (t + 1 - t)
        torch.testing.assert_close(grid, torch.arange(steps + 1) / steps, rtol=0, atol=2.5e-7)


def test_time_shift_moves_steps_towards_the_noise_and_keeps_the_ends():
    plain, shifted = flow.time_grid(10), flow.time_grid(10, shift=3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and bool((shifted.diff() > 0).all())
    assert bool((shifted[1:-1] < plain[1:-1]).all())  # s > 1: more of the grid near t = 0
    assert bool((flow.time_grid(10, shift=0.5)[1:-1] > plain[1:-1]).all())
    # SD3's shift of the noise level sigma = 1 - t: sigma -> s sigma / (1 + (s - 1) sigma)
    sigma = 1 - plain.double()
    torch.testing.assert_close(1 - shifted.double(), 3 * sigma / (1 + 2 * sigma), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("shift", "error"),
    [(0, ValueError), (-1.0, ValueError), (math.inf, ValueError), (math.nan, ValueError)]
    + [(True, TypeError), ("2", TypeError)],
)
def test_bad_shifts_are_refused(shift, error):
    with pytest.raises(error, match=f"time_shift must be a finite number > 0, got {shift!r}"):
        flow.time_grid(4, shift=shift)


@pytest.mark.parametrize(
    ("steps", "error"), [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)]
)
def test_bad_step_counts_are_refused(steps, error):
    with pytest.raises(error, match=f"num_inference_steps must be an int >= 1, got {steps!r}"):
        flow.time_grid(steps)


def test_log_snr_and_resolution_shift():
    assert flow.log_snr(0.0) == -math.inf and flow.log_snr(1.0) == math.inf and flow.log_snr(0.5) == 0
    assert flow.log_snr(0.8) == pytest.approx(math.log(4))
    values = [flow.log_snr(t) for t in (0.1, 0.3, 0.6, 0.9)]
    assert values == sorted(values)
    assert flow.resolution_shift(128, 128) == pytest.approx(3.2)  # 1024 x 1024 with an 8x VAE
    assert flow.resolution_shift(40, 40) == 1.0


def test_training_times():
    g = torch.Generator().manual_seed(0)
    uniform = flow.sample_t(4000, g)
    assert 0 <= uniform.min() and uniform.max() <= 1 and abs(uniform.mean().item() - 0.5) < 0.02
    logit = flow.sample_t(4000, torch.Generator().manual_seed(0), "logit_normal", mean=1.0, std=0.5)
    assert abs(logit.median().item() - 1 / (1 + math.exp(-1.0))) < 0.02
    again = flow.sample_t(4000, torch.Generator().manual_seed(0), "logit_normal", mean=1.0, std=0.5)
    assert torch.equal(logit, again)
    with pytest.raises(ValueError, match="unknown t distribution 'beta'"):
        flow.sample_t(2, g, "beta")
