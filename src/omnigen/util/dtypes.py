"""The weight dtypes a user may name, and the one meaning of "auto".

The single home of the dtype names: the ``--dtype`` flags of every command, ``omnigen export``, the
ComfyUI loader and ``OmniGenPipeline.from_pretrained`` all read ``DTYPES`` / ``DTYPE_CHOICES`` and
``resolve_dtype`` from here. Whether a CPU runs bfloat16 fast is asked of ``omnigen.util.cpu``.
"""

from __future__ import annotations

import torch

from omnigen.util import cpu

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO = "auto"
DTYPE_CHOICES = (AUTO, *DTYPES)
CPU_BF16_MIN_WIDTH = 1024  # below it the matmuls are too small for bfloat16 to pay on a CPU
AUTO_HELP = (
    "auto = bfloat16 on CUDA, float16 where it has no bfloat16; on a CPU bfloat16 for models at least "
    f"{CPU_BF16_MIN_WIDTH} wide when the CPU has native bfloat16 (AMX/AVX512-BF16) and a probe finds it "
    "faster, else float32; OMNIGEN_CPU_BF16=0/1 forces float32/bfloat16 on a CPU"
)


def resolve_dtype(
    dtype: str | torch.dtype | None, device: torch.device | str, width: int | None = None
) -> torch.dtype | None:
    """The weights' dtype for ``dtype`` on ``device`` for a model of hidden size ``width``.

    "auto" is bfloat16 on CUDA (float16 where the card has no bfloat16; fp16 weights then run with the
    fp32 residual stream of ``Transformer.fp16_guard``). On a CPU ``OMNIGEN_CPU_BF16=1`` / ``=0`` forces
    bfloat16 / float32; otherwise it is bfloat16 when ``width`` is known and at least
    ``CPU_BF16_MIN_WIDTH`` and ``omnigen.util.cpu.bf16_is_fast()`` (native bfloat16 in the CPU's flags,
    confirmed by a cached matmul probe), else float32: small or unknown-width models and CPUs without
    bfloat16 units stay in float32. Other devices get float32. A name of
    ``DTYPES`` or a torch dtype is itself; None keeps the stored dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == AUTO:
        kind = torch.device(device).type
        if kind == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if kind != "cpu":
            return torch.float32
        forced = cpu.forced_bf16()
        if forced is not None:
            return torch.bfloat16 if forced else torch.float32
        wide = width is not None and width >= CPU_BF16_MIN_WIDTH
        return torch.bfloat16 if wide and cpu.bf16_is_fast() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)} or a torch dtype, got {dtype!r}")
    return DTYPES[dtype]
