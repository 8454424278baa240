"""GGML's quantized blocks (the tensors of GGUF files), dequantized in torch, and the Linear that keeps
them packed (``GgufLinear``).

A quantized row of ``in`` weights is ``in / block`` blocks of ``block_bytes`` each, every block holding its
own float16 scale(s) and packed integers (ggml's ``ggml-quants.c`` layouts; the ``gguf`` package's numpy
``dequantize`` is the reference the tests compare with, bit for bit). Dequantization here runs in torch,
in float32, on the weight's device, at each matmul: on CPUs this buys memory, not speed. Types:

- Q8_0: 32 weights = f16 d + 32 int8 q; w = d * q (8.5 bits per weight).
- Q4_0: 32 weights = f16 d + 16 bytes of 4-bit q (low nibbles = weights 0-15, high = 16-31); w = d * (q - 8).
- Q4_1: f16 d, f16 m + 16 bytes; w = d * q + m. Q5_0 / Q5_1: as Q4_0 / Q4_1 with a fifth bit per weight
  from a 32-bit mask (bit j for weight j); Q5_0 centres at 16.
- Q4_K / Q5_K: 256 weights = f16 d, f16 dmin, 12 bytes of eight 6-bit scales and mins, (Q5_K: 32 bytes
  of fifth bits), 128 bytes of nibbles; w = d * sc * q - dmin * m per 32 weights.
- Q6_K: 256 weights = 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, f16 d;
  w = d * scale * (q - 32) per 16 weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from omnigen.weights.packed import PackedLinear, loaded_bias, replace_module

# name -> (weights per block, bytes per block)
BLOCKS: dict[str, tuple[int, int]] = {
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}
FLOATS: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}
SUPPORTED = (*FLOATS, *BLOCKS)


def check_type(qtype: str, what: str) -> None:
    """ValueError naming ``qtype`` and the supported types unless omnigen can read it."""
    if qtype not in SUPPORTED:
        raise ValueError(
            f"{what} is stored as GGML type {qtype}, which omnigen cannot dequantize; supported types: "
            f"{', '.join(SUPPORTED)}"
        )


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at bytes ``start:start+2`` of each block, as float32 (n, 1). (Every block size and
    scale offset is even, so the strided bytes view as float16 in place.)"""
    return blocks[:, start : start + 2].view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 2k): the low nibbles, then the high ones."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _bits(mask: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 8k) bits, little-endian (bit j of the mask is element j)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return ((mask[:, :, None] >> shifts) & 1).reshape(mask.shape[0], -1)


# In place where the math allows (one float32 buffer per call: large allocations cost page faults), in
# the reference's order of operations, so the results stay bit for bit the reference's.
def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].view(torch.int8).float().mul_(_f16(b, 0))


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return _nibbles(b[:, 2:]).float().sub_(8).mul_(_f16(b, 0))


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _nibbles(b[:, 4:]).float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 6:]) | (_bits(b[:, 2:6]) << 4)
    return q.float().sub_(16).mul_(_f16(b, 0))


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:]) | (_bits(b[:, 4:8]) << 4)
    return q.float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins, each (n, 8)."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mins


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 128) bytes -> (n, 8, 32): per 32 bytes, the low nibbles then the high ones."""
    qs = qs.reshape(qs.shape[0], 4, 1, 32)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(qs.shape[0], 8, 32)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mins = _k_scales(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mins.float()).reshape(n, 8, 1)
    return _k_nibbles(b[:, 16:]).float().mul_(d).sub_(dm).reshape(n, 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mins = _k_scales(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mins.float()).reshape(n, 8, 1)
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 1, 8, 1)
    high = ((b[:, 16:48].reshape(n, 1, 1, 32) >> shifts) & 1).reshape(n, 8, 32)
    q = _k_nibbles(b[:, 48:]) | (high << 4)
    return q.float().mul_(d).sub_(dm).reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b, 208) * scales).reshape(n, 16, 1)
    ql = b[:, :128].reshape(n, 2, 1, 64)
    ql = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(n, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1)
    qh = ((b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 0x03).reshape(n, 8, 32)
    return (ql | (qh << 4)).reshape(n, 16, 16).float().sub_(32).mul_(d).reshape(n, 256)


DEQUANTIZE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


def packed_shape(shape: tuple[int, ...], qtype: str) -> tuple[int, ...]:
    """The byte shape of a tensor of ``shape`` stored as ``qtype`` (rows of whole blocks)."""
    block, size = BLOCKS[qtype]
    if shape[-1] % block:
        raise ValueError(f"a {qtype} row holds whole blocks of {block} weights; rows of {shape[-1]} do not")
    return (*shape[:-1], shape[-1] // block * size)


def dequantize(packed: torch.Tensor, qtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """``packed`` (uint8 bytes, any shape holding whole blocks) as a float32 tensor of ``shape``."""
    check_type(qtype, "a tensor")
    if qtype in FLOATS:
        return packed.contiguous().view(FLOATS[qtype]).reshape(shape).float()
    _, size = BLOCKS[qtype]
    return DEQUANTIZE[qtype](packed.reshape(-1, size)).reshape(shape)


class GgufLinear(PackedLinear):
    """A Linear whose weight stays in GGML's quantized blocks: uint8 (out, bytes per row), dequantized to
    the input's dtype at each matmul."""

    def __init__(self, weight: torch.Tensor, qtype: str, in_features: int, bias: torch.Tensor | None) -> None:
        if qtype not in BLOCKS or weight.dtype != torch.uint8 or weight.dim() != 2:
            raise TypeError(
                f"GgufLinear needs 2-D uint8 blocks of one of {', '.join(BLOCKS)}, "
                f"got {qtype} {weight.dtype} {tuple(weight.shape)}"
            )
        if packed_shape((weight.shape[0], in_features), qtype) != tuple(weight.shape):
            raise ValueError(f"{tuple(weight.shape)} bytes are not {qtype} rows of {in_features} weights")
        super().__init__(weight, bias)
        self.qtype = qtype
        self.out_features, self.in_features = weight.shape[0], in_features

    def dequantized_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        # through float32: the reference's values, then one rounding to ``dtype``
        part = self.weight[start:stop]
        return dequantize(part, self.qtype, (part.shape[0], self.in_features)).to(dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qtype={self.qtype}"


def install(model: nn.Module, key: str, packed: torch.Tensor, qtype: str) -> None:
    """Swap the Linear whose weight is ``key`` (of a meta-built model) for a ``GgufLinear`` of ``packed``,
    keeping its loaded bias."""
    name = key.removesuffix(".weight")
    linear = model.get_submodule(name)
    replace_module(model, name, GgufLinear(packed, qtype, linear.in_features, loaded_bias(linear)))
