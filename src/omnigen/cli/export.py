"""``omnigen export``: a model folder in (optionally with a LoRA adapter merged), a folder out in the
official OmniGen-v1 or the diffusers layout (``omnigen.weights.export.save_pretrained``)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from omnigen.weights.export import EXPORT_DTYPES, LAYOUTS, save_pretrained


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a model folder in the official OmniGen-v1 or the diffusers layout"
    )
    p.add_argument("out", help="folder to write (must not exist or be empty, unless --overwrite)")
    p.add_argument(
        "--model", default=None, help="model folder or hub id (default: the shipped miniature model)"
    )
    p.add_argument("--vae", default=None, help="VAE folder when the model folder has none")
    p.add_argument("--layout", choices=LAYOUTS, default="original", help="default: original")
    p.add_argument("--lora", default=None, metavar="PATH", help="LoRA adapter folder to merge in first")
    p.add_argument("--lora-scale", type=float, default=1.0, help="adapter scale when merging (default: 1)")
    p.add_argument(
        "--dtype",
        choices=sorted(EXPORT_DTYPES),
        default=None,
        help="weight dtype to write (default: as stored); float8_e4m3fn writes a scaled-fp8 file "
        "(Linear weights at one byte with a per-tensor scale, the rest bfloat16; ComfyUI's convention); "
        "q8_0, q4_0, q4_1, q5_0, q5_1 write model.gguf (Linear weights in GGML blocks, the rest as stored; "
        "original layout; needs the gguf package). The model then loads at fewer bytes per weight; on "
        "CPUs these formats buy memory, not speed",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    export(
        args.out,
        model=args.model,
        layout=args.layout,
        lora=args.lora,
        lora_scale=args.lora_scale,
        vae=args.vae,
        dtype=None if args.dtype is None else EXPORT_DTYPES[args.dtype],
        overwrite=args.overwrite,
    )
    return 0


def export(
    out: str | Path,
    model: str | Path | None = None,
    layout: str = "original",
    lora: str | Path | None = None,
    lora_scale: float = 1.0,
    vae: str | Path | None = None,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
) -> Path:
    """Load ``model`` (with ``lora`` merged at ``lora_scale``: merged in fp32, written in the stored dtype
    unless ``dtype`` is given: a torch dtype or a GGUF type name) and write it to ``out`` in ``layout``."""
    from omnigen.pipeline import OmniGenPipeline
    from omnigen.weights import lora as lora_lib
    from omnigen.weights.fp8 import compute_dtype

    if layout not in LAYOUTS:  # before loading anything
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    pipe = OmniGenPipeline.from_pretrained(model, vae_path=vae, dtype=None)  # as stored
    stored = compute_dtype(pipe.model)  # a packed (fp8, GGUF) model: its float tensors' dtype
    if lora is not None:
        if stored != torch.float32:  # merge at full precision
            pipe = OmniGenPipeline.from_pretrained(model, vae_path=vae, dtype=torch.float32)
        pipe.load_lora(lora, scale=lora_scale)
        lora_lib.unload_lora(pipe.model, merge=True)
    return save_pretrained(pipe, out, layout=layout, dtype=dtype or stored, overwrite=overwrite)
