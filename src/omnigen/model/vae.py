"""Latent codecs: pixels in [-1, 1] <-> the latents the transformer sees (scaling and shift included).

- ``AutoencoderKLCodec`` wraps diffusers' ``AutoencoderKL`` (the SDXL VAE for OmniGen-v1).
  Input images are encoded to the posterior *mean*, not a sample: the result is then a function of the
  image alone (the same for every CFG branch, every batch composition and every device), while the
  reference draws a separate sample from the global RNG for each CFG row. The SDXL posterior's std is
  tiny next to its mean, so the difference is far below what the model resolves.
- ``IdentityCodec`` is pixel space (downsample 1), used by the shipped miniature model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch


class LatentCodec(Protocol):
    downsample: int
    channels: int

    def encode(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def to(self, device: torch.device | str) -> LatentCodec: ...


class IdentityCodec:
    """Pixel space: latents are the pixels themselves, optionally scaled."""

    def __init__(self, channels: int = 3, scale: float = 1.0) -> None:
        self.channels = channels
        self.downsample = 1
        self.scale = scale

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scale

    def to(self, device: torch.device | str) -> IdentityCodec:
        return self

    def save(self, folder: str | Path) -> None:
        spec = {"type": "identity", "channels": self.channels, "scale": self.scale}
        (Path(folder) / "codec.json").write_text(json.dumps(spec))


class AutoencoderKLCodec:
    def __init__(self, vae) -> None:  # diffusers.AutoencoderKL, imported lazily
        self.vae = vae.eval().requires_grad_(False)
        config = vae.config
        self.scaling = float(config.scaling_factor)
        self.shift = None if getattr(config, "shift_factor", None) is None else float(config.shift_factor)
        self.channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.memory_format = torch.contiguous_format

    def channels_last(self, enabled: bool = True) -> AutoencoderKLCodec:
        """Run the VAE's convolutions in channels-last layout (NHWC): faster oneDNN/cuDNN kernels on many
        machines (measured here: SDXL decoder at 256x256 on CPU about 1.2x); equal up to float rounding."""
        self.memory_format = torch.channels_last if enabled else torch.contiguous_format
        self.vae.to(memory_format=self.memory_format)
        return self

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> AutoencoderKLCodec:
        try:
            from diffusers import AutoencoderKL
        except ImportError as err:
            raise ImportError("the VAE needs diffusers: pip install 'omnigen-unified[hf]'") from err
        return cls(AutoencoderKL.from_pretrained(str(path), **kwargs))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(self._input(pixels)).latent_dist.mode()
        if self.shift is not None:
            latents = latents - self.shift
        return latents * self.scaling

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = self._input(latents) / self.scaling
        if self.shift is not None:
            latents = latents + self.shift
        return self.vae.decode(latents).sample.contiguous()

    def to(self, device: torch.device | str) -> AutoencoderKLCodec:
        self.vae.to(device)
        return self

    def save(self, folder: str | Path) -> None:
        self.vae.save_pretrained(str(Path(folder) / "vae"))


def load_codec(folder: str | Path) -> LatentCodec | None:
    """The codec saved in a model folder: ``codec.json`` (identity) or a ``vae/`` subfolder; else None."""
    folder = Path(folder)
    spec_path = folder / "codec.json"
    if spec_path.is_file():
        spec = json.loads(spec_path.read_text())
        if spec.get("type") != "identity":
            raise ValueError(f"{spec_path}: unknown codec type {spec.get('type')!r}; allowed: 'identity'")
        return IdentityCodec(channels=int(spec.get("channels", 3)), scale=float(spec.get("scale", 1.0)))
    if (folder / "vae" / "config.json").is_file():
        return AutoencoderKLCodec.from_pretrained(folder / "vae")
    return None


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, truncating like the reference's ``.to(uint8)``."""
    return ((pixels.float() * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


@contextmanager
def tiled_decoding(codec: LatentCodec, enabled: bool) -> Iterator[None]:
    """Turn on diffusers' tiled decoding for the duration of a decode, then restore the VAE's setting
    (no effect for a codec without a tiled decoder)."""
    vae = getattr(codec, "vae", None)
    if not enabled or vae is None or not hasattr(vae, "use_tiling"):
        yield
        return
    before = vae.use_tiling
    vae.use_tiling = True
    try:
        yield
    finally:
        vae.use_tiling = before
