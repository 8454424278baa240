"""Small contract details of the reference that the larger equivalence tests only cover indirectly."""

from __future__ import annotations

import torch

from omnigen.config import RopeScaling, TransformerConfig
from omnigen.model.layers import RotaryEmbedding
from omnigen.model.vae import to_uint8
from omnigen.sampling.flow import interpolate, time_grid, velocity_target
from omnigen.text.processor import apply_template


def test_euler_grid_is_i_over_n():
    assert time_grid(4).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_flow_direction_noise_at_zero_data_at_one():
    x0, x1 = torch.zeros(1, 2), torch.ones(1, 2)
    assert torch.equal(interpolate(x0, x1, torch.tensor([0.0])), x0)
    assert torch.equal(interpolate(x0, x1, torch.tensor([1.0])), x1)
    assert torch.equal(velocity_target(x0, x1), x1 - x0)


def test_uint8_conversion_truncates_like_the_reference():
    pixels = torch.tensor([-1.0, -0.999, 0.0, 0.999, 1.0, 1.5]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    # (x * 0.5 + 0.5).clamp(0, 1) * 255, then .to(uint8) truncates: 0.0 -> 127 (127.5), 0.999 -> 254
    assert to_uint8(pixels)[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]


def test_prompt_template():
    assert apply_template("a cat") == (
        "<|user|>\nGenerate an image according to the following instructions\na cat<|end|>\n"
        "<|assistant|>\n<|diffusion|>"
    )


def test_rotary_long_factor_switch_is_per_row():
    scaling = RopeScaling((1.0, 2.0), (4.0, 8.0))
    config = TransformerConfig(
        hidden_size=8,
        intermediate_size=8,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        vocab_size=8,
        original_max_position_embeddings=10,
        max_position_embeddings=40,
        rope_scaling=scaling,
    )
    rotary = RotaryEmbedding(config)
    positions = torch.arange(6).repeat(2, 1)
    row_max = torch.tensor([9, 10])  # row 0: 10 positions (short factors), row 1: 11 (long)
    cos, sin = rotary(positions, row_max)
    short = rotary(positions[:1], row_max[:1])
    long = rotary(positions[1:], row_max[1:])
    assert torch.equal(cos[:1], short[0]) and torch.equal(cos[1:], long[0])
    assert not torch.allclose(cos[0], cos[1])
    inv_short = 1.0 / (torch.tensor([1.0, 2.0]) * 10000 ** (torch.arange(0, 4, 2).float() / 4))
    expected = torch.cat([5 * inv_short, 5 * inv_short]).cos() * rotary.magnitude
    torch.testing.assert_close(cos[0, 5], expected)
    assert (
        abs(rotary.magnitude - (1 + torch.log(torch.tensor(4.0)) / torch.log(torch.tensor(10.0))).sqrt())
        < 1e-6
    )
