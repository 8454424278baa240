"""The Phi-3 decoder block written natively: RMSNorm, su-scaled rotary, fused-qkv attention, gated MLP.

Legend: B batch, L query length, S key length, D hidden, H heads, K kv heads, E head dim.
Attention goes through ``F.scaled_dot_product_attention`` with a boolean mask (True = may attend), or
with no mask at all for a sampling step whose condition has no padding (see ``Attention.forward``).

Blocks compute in their weights' dtype but accept a wider residual stream: with fp16 weights the
runner keeps the residual stream in fp32 (see ``Runner.fp16_guard``), so each sublayer's input
is cast down to the weights' dtype after its RMSNorm and its output is added in fp32.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from omnigen.config import TransformerConfig

if TYPE_CHECKING:
    from omnigen.model.ulysses import TokenSplit

KV = tuple[torch.Tensor, torch.Tensor]
FP16_MAX = torch.finfo(torch.float16).max
TABLES = ("base_freq", "short_factor", "long_factor")  # the rotary tables, fp32 buffers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    """Phi-3 rotary embedding with optional "su"/longrope scaling.

    The long factors are used for a row whose largest position + 1 exceeds
    ``original_max_position_embeddings``; the choice is made per row, so left-padded CFG rows of
    different lengths each get the positions they would get alone. cos/sin are scaled by
    sqrt(1 + ln(max / original) / ln(original)) when scaling is on.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.original_max = config.original_max_position_embeddings
        for name, value in self._tables().items():
            self.register_buffer(name, value, persistent=False)
        ratio = config.max_position_embeddings / config.original_max_position_embeddings
        scaling = config.rope_scaling
        self.magnitude = 1.0
        if scaling is not None and ratio > 1.0:
            self.magnitude = math.sqrt(
                1 + math.log(ratio) / math.log(config.original_max_position_embeddings)
            )

    def _tables(self) -> dict[str, torch.Tensor]:
        """The fp32 tables, computed on the CPU."""
        dim, scaling = self.config.head_dim, self.config.rope_scaling
        exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        ones = torch.ones(dim // 2)
        short = ones if scaling is None else torch.tensor(scaling.short_factor, dtype=torch.float32)
        long = ones if scaling is None else torch.tensor(scaling.long_factor, dtype=torch.float32)
        return {"base_freq": self.config.rope_theta**exponent, "short_factor": short, "long_factor": long}

    def materialize(self, device: torch.device | str) -> None:
        """Recompute the (non-persistent) fp32 tables on ``device``, e.g. after building on the meta device.

        They are computed on the CPU and then moved, so every device gets the same bits."""
        for name, value in self._tables().items():
            setattr(self, name, value.to(device))

    def _apply(self, fn, recurse: bool = True):  # nn.Module's signature
        """Module casts (``.to(dtype)``, ``.half()``, ``.bfloat16()``) move the tables but keep them fp32.

        The frequencies must stay fp32 whatever the weights' dtype: in bf16, ``base_freq`` alone is off by
        up to 0.4%, which at position ~8000 turns into angles off by whole radians. Loading in a dtype
        and casting a loaded model therefore give the same tables (and bit-equal outputs)."""
        super()._apply(fn, recurse)
        if self.base_freq.dtype != torch.float32:
            if self.base_freq.device.type == "meta":  # nothing to recompute yet: ``materialize`` will
                for name in TABLES:
                    setattr(self, name, getattr(self, name).float())
            else:
                self.materialize(self.base_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor, row_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, L); row_max (B,) the largest position of each full row. Returns cos, sin (B, L, E)."""
        use_long = (row_max + 1 > self.original_max)[:, None]  # (B, 1)
        factors = torch.where(use_long, self.long_factor, self.short_factor)  # (B, E/2)
        inv_freq = 1.0 / (factors * self.base_freq)  # (B, E/2)
        freqs = position_ids.float()[:, :, None] * inv_freq[:, None, :]  # (B, L, E/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (B, L, E)
        return emb.cos() * self.magnitude, emb.sin() * self.magnitude


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, E); cos/sin (B, L, E). Rotate-half convention (Phi-3 / Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    out = x.float() * cos[:, None] + rotated.float() * sin[:, None]
    return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        qkv_out = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_out, bias=False)  # rows [q; k; v]
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        past: KV | None = None,
        split: TokenSplit | None = None,
    ) -> tuple[torch.Tensor, KV]:
        """x (B, L, D); mask (B, L, S) bool with S = past length + L. Returns output and this call's (k, v).

        ``past`` (Bc, K, Lc, E) may have fewer rows than x: each serves B // Bc consecutive rows of x.

        ``mask=None`` is a sampling step without padding: the first query (the time token) sees the cached
        keys and itself, every other query (the output tokens) sees every key. That is two mask-free SDPA
        calls (one query, then L - 1 queries), which fused kernels (flash attention) can take.

        ``split`` (sequence parallel, ``omnigen.model.ulysses``): x is this rank's slice of the step's
        tokens, ``past`` this rank's heads; the attention runs on every token for this rank's heads.
        """
        batch, length, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, E)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, L, E)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        new_kv = (k, v)
        if split is not None:
            q, k, v = split.to_heads(q, k, v)  # every token, this rank's heads
        if past is not None:
            k, v = _prepend(past[0], k), _prepend(past[1], v)  # (B, K, S, E)
        if self.num_kv_heads != self.num_heads:
            repeat = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if mask is None:
            visible = k.shape[2] - q.shape[2] + 1  # the cached keys and the time token's own
            first = F.scaled_dot_product_attention(q[:, :, :1], k[:, :, :visible], v[:, :, :visible])
            out = torch.cat([first, F.scaled_dot_product_attention(q[:, :, 1:], k, v)], dim=2)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])  # (B, H, L, E)
        if split is not None:
            out = split.to_tokens(out)  # this rank's tokens, every head
        out = out.transpose(1, 2).reshape(batch, length, q_size)
        return self.o_proj(out), new_kv


def _prepend(past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """[past | new] along the keys: past (Bc, K, Lc, E), new (B, K, L, E) -> (B, K, Lc + L, E).

    Each past row serves B // Bc consecutive rows of ``new``: it is broadcast (``expand``, a view) into
    the concatenation, so the only copy is the concatenation itself, as with one past row per row."""
    rows = past.shape[0]
    if rows == new.shape[0]:
        return torch.cat([past.to(new.dtype), new], dim=2)
    new = new.unflatten(0, (rows, new.shape[0] // rows))  # (Bc, copies, K, L, E)
    past = past.to(new.dtype)[:, None].expand(-1, new.shape[1], -1, -1, -1)  # (Bc, copies, K, Lc, E)
    return torch.cat([past, new], dim=3).flatten(0, 1)


class GatedMLP(nn.Module):
    """down(silu(gate) * up) with fused [gate; up] rows."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        if hidden.dtype == torch.float16:  # an overflow here would turn into inf - inf = NaN in down_proj
            hidden = hidden.clamp(-FP16_MAX, FP16_MAX)
        return self.down_proj(hidden)


class Block(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        past: KV | None = None,
        split: TokenSplit | None = None,
    ) -> tuple[torch.Tensor, KV]:
        """x (B, L, D) in the weights' dtype or wider (an fp32 residual stream); returned in x's dtype.
        ``split``: a sequence-parallel step (``Attention.forward``)."""
        dtype = self.input_layernorm.weight.dtype
        attn, kv = self.self_attn(self.input_layernorm(x).to(dtype), rope, mask, past, split)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x).to(dtype))
        return x, kv
