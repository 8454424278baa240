"""FP8 (float8_e4m3fn) weights: kept at one byte per weight, computed through.

Checkpoints. A plain cast (2-D weights stored as float8_e4m3fn, no scales) and ComfyUI's scaled-fp8
convention are read: a ``scaled_fp8`` marker tensor (empty, of the fp8 dtype) in the state dict and, per
layer, ``<layer>.scale_weight`` (a per-tensor scale: weight = fp8 * scale_weight) and optionally
``<layer>.scale_input`` (for fp8 activations, which we do not use: read and dropped). The scale keys sit
beside the weight they scale under the file's own names, so both checkpoint layouts (ours/official and
diffusers, renamed through ``keymap``) resolve them the same way. ``scaled_state`` writes that
convention (``omnigen export --dtype float8_e4m3fn``): every Linear weight in fp8 with a per-tensor scale
amax / 448, every other floating tensor in bfloat16.

Compute. ``Fp8Linear`` keeps the fp8 weight and its scale and dequantizes to the input's dtype at the
matmul (``F.linear(x, w.to(dtype) * scale)``): memory, not speed, on CPUs and older GPUs. On GPUs with
FP8 matmuls (compute capability >= 8.9) ``accelerate`` moves the layers to torchao's
``Float8WeightOnlyConfig`` tensors instead (torchao requantizes per row; optional, imported lazily).
A fused qkv made of separately scaled to_q/to_k/to_v keeps one scale per row.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from omnigen.weights.packed import PackedLinear, loaded_bias, replace_module

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
MARKER = "scaled_fp8"
SCALE_WEIGHT = "scale_weight"
SCALE_INPUT = "scale_input"
FP8_CAPABILITY = (8, 9)


class Fp8Linear(PackedLinear):
    """A Linear with an fp8 weight (out, in) and a float32 scale: a scalar or one per row (out, 1)."""

    packed_buffers = ("weight_scale",)

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        if weight.dtype not in FP8_DTYPES or weight.dim() != 2:
            raise TypeError(f"Fp8Linear needs a 2-D fp8 weight, got {weight.dtype} {tuple(weight.shape)}")
        super().__init__(weight, bias)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_scale", scale.float())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        weight, scale = quantize_tensor(linear.weight.detach())
        return cls(weight, scale, linear.bias)

    def dequantized_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        scale = self.weight_scale if self.weight_scale.dim() == 0 else self.weight_scale[start:stop]
        return self.weight[start:stop].to(dtype) * scale.to(dtype)


def quantize_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scalar scale) with scale = amax / 448, so weight ~= fp8 * scale."""
    scale = (weight.abs().amax().float() / FP8_MAX).clamp_min(1e-12)
    return (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_fp8(model: nn.Module) -> str:
    """Every ``nn.Linear`` of ``model.llm.layers`` to fp8 in place (the ``--quantize fp8`` option); returns
    the path used: "torchao" on a GPU with FP8 matmuls, else "native" (``Fp8Linear``)."""
    from omnigen.weights import lora

    if lora.has_lora(model):
        raise ValueError("merge_lora() or unload_lora() before quantizing: a LoRA adapter is injected")
    layers = model.llm.layers
    targets = [(name, m) for name, m in layers.named_modules() if type(m) is nn.Linear]
    for name, linear in targets:
        replace_module(layers, name, Fp8Linear.from_linear(linear))
    return accelerate(model)


def has_fp8_matmul(device: torch.device | str) -> bool:
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_CAPABILITY


def accelerate(model: nn.Module) -> str:
    """On a GPU with FP8 matmuls (and torchao), each ``Fp8Linear`` becomes a Linear holding torchao's
    float8 weight-only tensor (in the model's compute dtype), one layer at a time; elsewhere nothing
    changes. Returns the path used."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Fp8Linear)]
    if not layers or not has_fp8_matmul(layers[0][1].weight.device):
        return "native"
    try:
        from torchao.quantization import Float8WeightOnlyConfig, quantize_
    except ImportError:
        logger.warning("torchao is not installed: fp8 layers dequantize at each matmul (pip install torchao)")
        return "native"
    dtype = compute_dtype(model)
    for name, layer in layers:
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight = nn.Parameter(layer.dequantized_weight(dtype), requires_grad=False)
        if layer.bias is not None:
            plain.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
        holder = nn.Sequential(plain)
        quantize_(holder, Float8WeightOnlyConfig(set_inductor_config=False))
        replace_module(model, name, holder[0])
    logger.info("%d fp8 linears run through torchao's float8 tensors", len(layers))
    return "torchao"


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating, non-fp8 parameters (bfloat16 when it has none)."""
    floating = (p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype not in FP8_DTYPES)
    return next(floating, torch.bfloat16)


# ------------------------------------------------------------------ checkpoints
def is_scale_key(key: str) -> bool:
    return key == MARKER or key.endswith((f".{SCALE_WEIGHT}", f".{SCALE_INPUT}"))


def scale_key(weight_key: str) -> str:
    return weight_key.removesuffix("weight") + SCALE_WEIGHT


def split_plan(plan: dict[str, tuple]) -> tuple[dict[str, tuple], dict[str, object]]:
    """(the plan without the scaled-fp8 keys, stored key -> StoredTensor of each ``scale_weight``).

    The plan maps our keys to stored parts; keys the keymap does not know (these) map to themselves."""
    scales = {parts[0].key: parts[0] for key, parts in plan.items() if key.endswith(f".{SCALE_WEIGHT}")}
    if any(is_scale_key(key) for key in plan):
        logger.info("scaled fp8 checkpoint: %d weight scales", len(scales))
    return {k: v for k, v in plan.items() if not is_scale_key(k)}, scales


def part_scale(parts: tuple, scales: dict[str, object], read) -> torch.Tensor:
    """The scale of a (possibly fused) fp8 tensor: a scalar, or one per row when its parts differ.
    ``read(stored)`` reads one StoredTensor; a part without a scale (a plain cast) has scale 1."""
    values = []
    for part in parts:
        stored = scales.get(scale_key(part.key))
        values.append(torch.ones(()) if stored is None else read(stored).float().reshape(()))
    if len(values) == 1 or all(torch.equal(v, values[0]) for v in values):
        return values[0]
    return torch.cat([v.expand(p.shape[0]) for v, p in zip(values, parts, strict=True)])[:, None]


def linear_weight_keys(model: nn.Module) -> set[str]:
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def install(model: nn.Module, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Swap each named Linear for an ``Fp8Linear`` of (fp8 weight, scale), keeping its loaded bias."""
    for key, (weight, scale) in weights.items():
        name = key.removesuffix(".weight")
        bias = loaded_bias(model.get_submodule(name))
        replace_module(model, name, Fp8Linear(weight, scale.to(weight.device), bias))


def scaled_state(state: dict[str, torch.Tensor], linear_keys: set[str]) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled-fp8 state dict: ``linear_keys`` in fp8 with a ``scale_weight`` each, the other
    floating tensors in bfloat16, and the ``scaled_fp8`` marker."""
    out: dict[str, torch.Tensor] = {MARKER: torch.empty(0, dtype=FP8)}
    for key, value in state.items():
        if key in linear_keys and value.dim() == 2:
            out[key], out[scale_key(key)] = quantize_tensor(value)
        else:
            out[key] = value.to(torch.bfloat16) if value.is_floating_point() else value
    return out
