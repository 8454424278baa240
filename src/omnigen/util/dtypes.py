"""The weight dtypes a user may name, and the one meaning of "auto".

The single home of the dtype names: the ``--dtype`` flags of every command, ``omnigen export``, the
ComfyUI loader and ``OmniGenPipeline.from_pretrained`` all read ``DTYPES`` / ``DTYPE_CHOICES`` and
``resolve_dtype`` from here.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO = "auto"
DTYPE_CHOICES = (AUTO, *DTYPES)
AUTO_HELP = "auto = bfloat16 on CUDA, float16 where it has no bfloat16, float32 elsewhere"


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str) -> torch.dtype | None:
    """The weights' dtype for ``dtype`` on ``device``: "auto" is bfloat16 on CUDA (float16 where the card
    has no bfloat16; fp16 weights then run with the fp32 residual stream of ``Transformer.fp16_guard``)
    and float32 elsewhere; a name of ``DTYPES`` or a torch dtype is itself; None keeps the
    stored dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == AUTO:
        if torch.device(device).type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)} or a torch dtype, got {dtype!r}")
    return DTYPES[dtype]
