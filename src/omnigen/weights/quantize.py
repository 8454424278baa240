"""Weight-only quantization of the decoder's linear layers (``quantize``: none, int8, fp8, nf4), and the
byte counts to check it. fp8 is ``omnigen.weights.fp8``; nf4 is bitsandbytes' ``Linear4bit`` (optional:
``pip install 'omnigen-unified[nf4]'``; its CPU backend runs it, slowly). On CPUs these formats buy
memory, not speed.

Weight-only int8 quantization of the decoder's linear layers, and the byte counts to check it.

The scheme: symmetric, one scale per output channel (row), weights only; activations and the matmul stay
in the compute dtype. The decoder's four projections per layer hold ~99% of OmniGen-v1's weights, so
their memory drops ~4x from fp32 (~2x from bf16/fp16). Embeddings, the time MLPs and the output head
are left as they are. Two backends:

- ``"torchao"``: torchao's ``Int8WeightOnlyConfig`` through ``quantize_`` (its ``Int8Tensor`` weight runs
  on torch's int8-weight matmul kernels where they exist). torchao has no runtime requirements and
  installs beside the CPU torch wheel with ``pip install torchao`` (0.18 checked with torch 2.13); it
  is optional and imported lazily. We pass ``set_inductor_config=False`` so nothing global changes.
- ``"native"``: ``Int8Linear`` below, an ``nn.Linear`` whose int8 weight is dequantized in ``forward``
  (``W = q * scale``, then an ordinary matmul): saves memory, not time.

``"auto"`` (the default) takes torchao when it imports, else the native one. Quantize after merging or
unloading a LoRA adapter, not before.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from omnigen.weights.packed import PackedLinear

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torchao", "native")
QUANTIZE_CHOICES = ("none", "int8", "fp8", "nf4")
QUANTIZE_HELP = (
    "weight-only quantization of the decoder's linear layers: none, int8 (torchao or native), fp8 "
    "(float8_e4m3fn; fp8 matmuls on GPUs of compute capability >= 8.9), nf4 (4-bit, needs bitsandbytes). "
    "On CPUs these buy memory, not speed"
)


def quantize(model: nn.Module, kind: str) -> str:
    """Quantize ``model.llm.layers``' linears in place as ``kind`` (one of ``QUANTIZE_CHOICES``); returns
    the backend used ("" for none)."""
    if kind not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {kind!r}")
    if kind == "int8":
        return quantize_int8(model)
    if kind == "fp8":
        from omnigen.weights import fp8

        return fp8.quantize_fp8(model)
    if kind == "nf4":
        return quantize_nf4(model)
    return ""


def quantize_nf4(model: nn.Module) -> str:
    """bitsandbytes' 4-bit NormalFloat ``Linear4bit`` for every decoder Linear (compute in the weights'
    dtype). bitsandbytes >= 0.48 runs it on CPU too (a torch fallback: slow)."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ValueError(
            "--quantize nf4 needs bitsandbytes (pip install 'omnigen-unified[nf4]'); "
            "without it use --quantize int8 or fp8"
        ) from err
    from omnigen.weights import lora

    if lora.has_lora(model):
        raise ValueError("merge_lora() or unload_lora() before quantizing: a LoRA adapter is injected")
    layers = model.llm.layers
    for name, linear in [(n, m) for n, m in layers.named_modules() if type(m) is nn.Linear]:
        weight = linear.weight.detach()
        new = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=weight.dtype,
            quant_type="nf4",
            device="meta",
        )
        new.weight = bnb.nn.Params4bit(weight.to("cpu"), requires_grad=False, quant_type="nf4")
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(layers.get_submodule(parent_name), child, new.to(weight.device))
    logger.info("decoder linears quantized to nf4 (bitsandbytes)")
    return "bitsandbytes"


class Int8Linear(PackedLinear):
    """A Linear with an int8 weight (out, in) and an fp scale per output row."""

    packed_buffers = ("weight_scale",)
    exportable = False  # a runtime quantization: export the model before quantizing

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(weight, bias)  # int8
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_scale", scale)  # (out,)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        weight = linear.weight.detach()
        scale = (weight.abs().amax(dim=1).float() / 127.0).clamp_min(1e-12)  # (out,)
        quantized = torch.round(weight.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(quantized, scale.to(weight.dtype), linear.bias)

    def dequantized_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        return self.weight[start:stop].to(dtype) * self.weight_scale[start:stop].to(dtype)[:, None]


def quantize_int8(model: nn.Module, backend: str = "auto") -> str:
    """Quantize every plain ``nn.Linear`` of ``model.llm.layers`` (an ``OmniGenModel``) in place; returns the
    backend used (fp8 layers of an fp8 checkpoint are left as they are). The state-dict keys stay the same, the weights' storage changes."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    from omnigen.weights import lora

    if lora.has_lora(model):
        raise ValueError("merge_lora() or unload_lora() before quantizing: a LoRA adapter is injected")
    layers = model.llm.layers
    if backend == "auto":
        backend = "torchao" if _torchao_available() else "native"
    if backend == "torchao":
        try:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
        except ImportError as err:
            raise ImportError("the torchao backend needs torchao: pip install torchao") from err
        # plain Linears only: layers loaded in fp8 (``fp8.Fp8Linear``) are one byte already and stay so
        only_plain = lambda module, fqn: type(module) is nn.Linear  # noqa: E731
        quantize_(layers, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=only_plain)
    else:
        targets = [(name, m) for name, m in layers.named_modules() if type(m) is nn.Linear]
        for name, linear in targets:
            parent_name, _, child = name.rpartition(".")
            setattr(layers.get_submodule(parent_name), child, Int8Linear.from_linear(linear))
    logger.info("decoder linears quantized to int8 (%s)", backend)
    return backend


def _torchao_available() -> bool:
    try:
        import torchao.quantization  # noqa: F401
    except Exception:  # a broken install (e.g. a torch mismatch) means "not available"
        return False
    return True


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Storage bytes of a tensor, summing the inner tensors of a wrapper subclass (torchao's Int8Tensor)."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None:
        names, _ = flatten()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names if getattr(tensor, name) is not None)
    return tensor.numel() * tensor.element_size()


def linear_weight_bytes(module: nn.Module) -> int:
    """Bytes of the weights (and int8 scales) of every Linear in ``module``, biases excluded."""
    total = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            total += tensor_bytes(m.weight)
            scale = getattr(m, "weight_scale", None)
            total += 0 if scale is None else tensor_bytes(scale)
    return total
