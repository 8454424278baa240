"""One Linear for every packed weight format: the weight stays in its storage form (fp8, int8, GGUF's
quantized blocks) and is dequantized to the input's dtype at each matmul (``PackedLinear``). On CPUs this
buys memory, not speed. Each format (``omnigen.weights.fp8``, ``omnigen.weights.quantize``'s native int8,
``omnigen.weights.ggml``) subclasses it with its ``dequantized_rows``.

On a CPU the weight is dequantized a few rows at a time (``CHUNK`` weights) into the output matrix: one
small temporary buffer, reused, instead of whole-matrix temporaries, whose allocation (page faults) cost
about as much as the arithmetic (GGUF Q8_0 at 3072 x 16384 into bf16: 0.48 s whole, 0.23 s in chunks, one
thread). The values are the same: every format's dequantization is elementwise per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHUNK = 2**20  # weights dequantized at a time on a CPU (a 4 MB float32 buffer)


class PackedLinear(nn.Linear):
    """A Linear whose ``weight`` parameter holds a packed form of the (out, in) matrix. Subclasses set
    ``out_features``/``in_features`` and implement ``dequantized_rows``; the buffers they add are named
    in ``packed_buffers`` (dropped, with the packing, by ``dequantized_state``). ``exportable``: whether
    ``omnigen export`` writes the layer from its dequantized weight (file formats) or refuses it (int8,
    a runtime quantization: export before quantizing)."""

    packed_buffers: tuple[str, ...] = ()
    exportable = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a float weight
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def dequantized_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``start:stop`` of the weight, dequantized to ``dtype``."""
        raise NotImplementedError

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        rows = max(1, CHUNK // max(1, self.in_features))
        if self.weight.device.type != "cpu" or rows >= self.out_features:
            return self.dequantized_rows(0, self.out_features, dtype)
        out = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.weight.device)
        for start in range(0, self.out_features, rows):
            stop = min(start + rows, self.out_features)
            out[start:stop] = self.dequantized_rows(start, stop, dtype)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Dequantize first: (x @ q^T) * scale would be the same math but can overflow in fp16.
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Set the submodule ``name`` (dotted) of ``root`` to ``module``."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def loaded_bias(linear: nn.Linear) -> torch.Tensor | None:
    """The bias of a Linear of a meta-built model, or None if it has none or it was not loaded."""
    return linear.bias if linear.bias is not None and not linear.bias.is_meta else None


def dequantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every exportable ``PackedLinear`` weight dequantized to float32 (its
    packing buffers dropped)."""
    state = model.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, PackedLinear) and m.exportable:
            state[f"{name}.weight"] = m.dequantized_weight(torch.float32)
            for buffer in m.packed_buffers:
                del state[f"{name}.{buffer}"]
    return state
