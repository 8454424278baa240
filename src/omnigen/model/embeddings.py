"""OmniGen's image and time parts around the decoder: patch embeddings, the 2-D sin-cos table,
timestep embedders and the adaLN final layer.

Legend: B batch, C latent channels, H/W latent size, P patch, N tokens, D hidden.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) float64 positions -> (M, dim) [sin | cos] table (MAE/DiT convention)."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.reshape(-1).double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int, base_size: int) -> torch.Tensor:
    """(grid_size**2, dim) table, row-major over the grid.

    The first half of the channels encodes the column index, the second half the row index (the
    order the released OmniGen-v1 table uses).
    """
    if dim % 4:
        raise ValueError(f"hidden size must be divisible by 4 for the 2-D sin-cos table, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float32) / (grid_size / base_size)
    cols, rows = torch.meshgrid(coords, coords, indexing="xy")  # each (grid, grid)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


def cropped_pos_embed(table: torch.Tensor, max_size: int, height: int, width: int) -> torch.Tensor:
    """Centre crop of the (1, max_size**2, D) table to a (1, height*width, D) grid (heights in patches)."""
    if height > max_size or width > max_size:
        raise ValueError(
            f"image of {height}x{width} patches exceeds the position table's {max_size}x{max_size}"
        )
    top, left = (max_size - height) // 2, (max_size - width) // 2
    grid = table.reshape(1, max_size, max_size, -1)[:, top : top + height, left : left + width, :]
    return grid.reshape(1, height * width, -1)


class PatchEmbed(nn.Module):
    """Conv with kernel = stride = P, flattened to tokens (one per P x P latent patch)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.proj(latents).flatten(2).transpose(1, 2)  # (B, N, D)


def timestep_frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) t in [0, 1] -> (B, dim) [cos | sin] embedding (no x1000: OmniGen feeds t as is)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_dim: int) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(timestep_frequencies(t, self.frequency_dim).to(dtype))  # (B, D)


class FinalLayer(nn.Module):
    """LayerNorm (no affine) -> adaLN shift/scale from the time embedding -> linear to P*P*C."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(t_emb).chunk(2, dim=1)  # (B, D) each
        x = self.norm_final(x) * (1 + scale[:, None]) + shift[:, None]
        return self.linear(x)  # (B, N, P*P*C)


def unpatchify(x: torch.Tensor, height: int, width: int, patch_size: int) -> torch.Tensor:
    """(B, N, P*P*C) -> (B, C, H, W) with per-token order (p, q, c)."""
    p = patch_size
    batch = x.shape[0]
    x = x.reshape(batch, height // p, width // p, p, p, -1)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(batch, -1, height, width)
