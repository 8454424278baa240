"""``KEY.latents.safetensors`` of a shard sample (``omnigen data shards --latents CODEC --resolution R``):
every image of the sample as the trainer's square mode sees it at resolution R (covered and centre
cropped to R x R, ``training.batches.fill_pixels``), encoded by the codec. Tensors are named like the
sample's image files (``in0``, ``out``, ``shot_in0``, ...); the metadata records the codec's fingerprint
(``training.latent_cache.codec_fingerprint``) and R. A streamed run uses them (``ShardBatchStream``) when
both match its codec and the stage's resolution, and encodes the images itself otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from omnigen.text.processor import load_image


@dataclass(frozen=True)
class LatentSpec:
    codec: object  # a LatentCodec
    fingerprint: str
    resolution: int


def load_codec(source: str, resolution: int) -> LatentSpec:
    """'identity' (pixel space, 3 channels) or a VAE folder, as the trainer builds it."""
    from omnigen.model.vae import AutoencoderKLCodec, IdentityCodec
    from omnigen.training.latent_cache import codec_fingerprint

    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"--resolution must be a positive int with --latents, got {resolution!r}")
    codec = IdentityCodec(channels=3) if source == "identity" else AutoencoderKLCodec.from_pretrained(source)
    return LatentSpec(codec, codec_fingerprint(codec, source), resolution)


@torch.no_grad()
def encode_sample(images: dict[str, bytes], spec: LatentSpec) -> bytes:
    """The safetensors bytes of every named image's latent at ``spec.resolution``."""
    from omnigen.training.batches import fill_pixels

    size = spec.resolution
    latents = {
        name: spec.codec.encode(fill_pixels(load_image(data), size, size)[None])[0].contiguous()
        for name, data in images.items()
    }
    return _sorted_header(
        save_tensors(latents, metadata={"codec": spec.fingerprint, "resolution": str(size)})
    )


def _sorted_header(data: bytes) -> bytes:
    """The same file with its JSON header's keys sorted: safetensors writes the metadata in a hash map's
    order, which differs from process to process, and shards are byte for byte deterministic."""
    length = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + length]), separators=(",", ":"), sort_keys=True).encode()
    if len(header) > length:
        raise ValueError(f"a sorted safetensors header grew from {length} to {len(header)} bytes")
    return data[:8] + header.ljust(length) + data[8 + length :]


def read_sample(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors by image name, metadata) of a ``KEY.latents.safetensors`` (the metadata sits in the JSON
    header after the 8-byte little-endian header length)."""
    length = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + length]).get("__metadata__", {})
    return load_tensors(data), metadata
