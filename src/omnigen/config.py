"""Typed model configuration: the Phi-3 shaped transformer plus OmniGen's image parts.

Owns every size the rest of the code derives from (head dim, tokens per image, image multiple).
Reads and writes the official OmniGen-v1 ``config.json`` (Phi-3 form, unknown fields ignored) and the
diffusers ``OmniGenTransformer2DModel`` config. Must not import torch modules or touch files at import.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from omnigen.util.checks import check_int, option, validate

# Field names of our extra section inside a Phi-3 style config.json.
OMNIGEN_SECTION = "omnigen"


@dataclass(frozen=True)
class RopeScaling:
    """Phi-3 "su" (a.k.a. "longrope") scaling: per-frequency divisors for short and long contexts."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    type: str = option("su", "rope scaling kind", choices=("su", "longrope"))

    def __post_init__(self) -> None:
        validate(self, prefix="rope_scaling.")
        if len(self.short_factor) != len(self.long_factor):
            raise ValueError(
                f"rope_scaling short_factor ({len(self.short_factor)}) and long_factor "
                f"({len(self.long_factor)}) must have the same length"
            )


@dataclass(frozen=True)
class TransformerConfig:
    """The decoder stack (Phi-3 shaped)."""

    hidden_size: int = option(3072, low=1)
    intermediate_size: int = option(8192, low=1)
    num_layers: int = option(32, low=1)
    num_heads: int = option(32, low=1)
    num_kv_heads: int = option(32, low=1)
    vocab_size: int = option(32064, low=1)
    rms_norm_eps: float = option(1e-5, low=0, low_open=True)
    rope_theta: float = option(10000.0, low=0, low_open=True)
    max_position_embeddings: int = option(131072, low=1)
    original_max_position_embeddings: int = option(4096, low=1)
    rope_scaling: RopeScaling | None = None
    pad_token_id: int = option(32000, low=0)

    def __post_init__(self) -> None:
        validate(self)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None and len(self.rope_scaling.short_factor) != self.head_dim // 2:
            raise ValueError(
                f"rope_scaling factors must have head_dim/2 = {self.head_dim // 2} entries, "
                f"got {len(self.rope_scaling.short_factor)}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class OmniGenConfig:
    """Everything the model needs: the transformer plus the latent/patch geometry.

    ``latent_downsample`` is the codec's spatial factor (8 for the SDXL VAE, 1 for pixel space), so an
    H x W image becomes (H / latent_downsample / patch_size) * (W / ...) tokens.
    """

    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    in_channels: int = option(4, low=1)
    patch_size: int = option(2, low=1)
    latent_downsample: int = option(8, low=1)
    pos_embed_max_size: int = option(192, low=1)
    pos_embed_base_size: int = option(64, low=1)
    time_embed_dim: int = option(256, low=2)

    def __post_init__(self) -> None:
        validate(self)
        if self.time_embed_dim % 2:
            raise ValueError(f"time_embed_dim must be even, got {self.time_embed_dim}")

    @property
    def image_multiple(self) -> int:
        """Image sides must be multiples of this (VAE factor x patch size; 16 for OmniGen-v1)."""
        return self.latent_downsample * self.patch_size

    @property
    def max_image_size(self) -> int:
        """Largest image side the position table covers."""
        return self.pos_embed_max_size * self.image_multiple

    def num_image_tokens(self, height: int, width: int) -> int:
        """Tokens for an image of ``height`` x ``width`` pixels."""
        return (height // self.image_multiple) * (width // self.image_multiple)

    def check_image_size(self, height: int, width: int, what: str = "image") -> None:
        m = self.image_multiple
        for name, value in (("height", height), ("width", width)):
            value = check_int(f"{what} {name}", value, m, self.max_image_size)
            if value % m:
                raise ValueError(f"{what} {name} must be a positive multiple of {m}, got {value}")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Phi-3 style dict (what the official config.json holds) plus an ``omnigen`` section."""
        t = self.transformer
        out: dict[str, Any] = {
            "model_type": "phi3",
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "vocab_size": t.vocab_size,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "max_position_embeddings": t.max_position_embeddings,
            "original_max_position_embeddings": t.original_max_position_embeddings,
            "rope_scaling": None if t.rope_scaling is None else asdict(t.rope_scaling),
            "pad_token_id": t.pad_token_id,
        }
        extra = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "transformer"}
        out[OMNIGEN_SECTION] = extra
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OmniGenConfig:
        """Reads a Phi-3 ``config.json`` (official OmniGen-v1) or our own; unused fields are ignored."""
        required = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
        )
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"config is missing required Phi-3 fields {missing}")
        scaling = data.get("rope_scaling")
        rope = None
        if scaling is not None:
            kind = scaling.get("type") or scaling.get("rope_type")
            if kind not in ("su", "longrope"):
                raise ValueError(f"unsupported rope_scaling type {kind!r}; allowed: 'su', 'longrope'")
            rope = RopeScaling(tuple(scaling["short_factor"]), tuple(scaling["long_factor"]), kind)
        transformer = TransformerConfig(
            hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"],
            num_layers=data["num_hidden_layers"],
            num_heads=data["num_attention_heads"],
            num_kv_heads=data.get("num_key_value_heads") or data["num_attention_heads"],
            vocab_size=data["vocab_size"],
            rms_norm_eps=data.get("rms_norm_eps", 1e-5),
            rope_theta=data.get("rope_theta", 10000.0),
            max_position_embeddings=data.get("max_position_embeddings", 131072),
            original_max_position_embeddings=data.get("original_max_position_embeddings", 4096),
            rope_scaling=rope,
            pad_token_id=data.get("pad_token_id") if data.get("pad_token_id") is not None else 32000,
        )
        extra = dict(data.get(OMNIGEN_SECTION) or {})
        allowed = {f.name for f in fields(cls)} - {"transformer"}
        unknown = sorted(set(extra) - allowed)
        if unknown:
            raise ValueError(
                f"unknown keys {unknown} in config section {OMNIGEN_SECTION!r}; allowed: {sorted(allowed)}"
            )
        return cls(transformer=transformer, **extra)

    @classmethod
    def from_diffusers_dict(cls, data: dict[str, Any]) -> OmniGenConfig:
        """Reads a diffusers ``OmniGenTransformer2DModel`` config.json."""
        scaling = data.get("rope_scaling")
        rope = (
            None
            if scaling is None
            else RopeScaling(tuple(scaling["short_factor"]), tuple(scaling["long_factor"]))
        )
        transformer = TransformerConfig(
            hidden_size=data.get("hidden_size", 3072),
            intermediate_size=data.get("intermediate_size", 8192),
            num_layers=data.get("num_layers", 32),
            num_heads=data.get("num_attention_heads", 32),
            num_kv_heads=data.get("num_key_value_heads", 32),
            vocab_size=data.get("vocab_size", 32064),
            rms_norm_eps=data.get("rms_norm_eps", 1e-5),
            rope_theta=data.get("rope_base", 10000.0),
            max_position_embeddings=data.get("max_position_embeddings", 131072),
            original_max_position_embeddings=data.get("original_max_position_embeddings", 4096),
            rope_scaling=rope,
            pad_token_id=data.get("pad_token_id", 32000),
        )
        return cls(
            transformer=transformer,
            in_channels=data.get("in_channels", 4),
            patch_size=data.get("patch_size", 2),
            pos_embed_max_size=data.get("pos_embed_max_size", 192),
            time_embed_dim=data.get("time_step_dim", 256),
        )

    def to_diffusers_dict(self) -> dict[str, Any]:
        t = self.transformer
        return {
            "in_channels": self.in_channels,
            "patch_size": self.patch_size,
            "hidden_size": t.hidden_size,
            "rms_norm_eps": t.rms_norm_eps,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "intermediate_size": t.intermediate_size,
            "num_layers": t.num_layers,
            "pad_token_id": t.pad_token_id,
            "vocab_size": t.vocab_size,
            "max_position_embeddings": t.max_position_embeddings,
            "original_max_position_embeddings": t.original_max_position_embeddings,
            "rope_base": t.rope_theta,
            "rope_scaling": None
            if t.rope_scaling is None
            else {
                "short_factor": list(t.rope_scaling.short_factor),
                "long_factor": list(t.rope_scaling.long_factor),
            },
            "pos_embed_max_size": self.pos_embed_max_size,
            "time_step_dim": self.time_embed_dim,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> OmniGenConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)


def omnigen_v1_config() -> OmniGenConfig:
    """OmniGen-v1 (3.8B) without its rope factors; use ``OmniGenConfig.load`` on the real config.json."""
    return OmniGenConfig(transformer=TransformerConfig())
