"""Command-line arguments shared by every entry point: the model-loading flags (``--model``, ``--vae``,
``--device``, ``--dtype``, ``--quantize``, ``--memory``, ``--lora``) and the generation flags, derived from
``omnigen.generation.GenerationConfig``.

The single home of these flags; ``generate``, ``serve``, ``demo``, ``batch`` and every ``eval`` subcommand
add them from here. The pipeline is imported by ``load_pipeline`` only.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from omnigen import generation
from omnigen.generation import GenerationConfig
from omnigen.util.dtypes import AUTO, AUTO_HELP, DTYPE_CHOICES
from omnigen.weights.quantize import QUANTIZE_CHOICES, QUANTIZE_HELP, quantize

# --memory presets: (quantize, offload_model, offload_kv_cache, separate_cfg_infer). Explicit --quantize and
# generation flags (--offload-model, ...) win over the preset.
MEMORY_PRESETS = {
    "fast": ("none", False, False, False),
    "balanced": ("none", False, False, True),
    "low": ("int8", False, True, True),
    "minimal": ("int8", True, True, True),
}
MEMORY_HELP = (
    "memory preset: fast = no quantization, all CFG branches in one batch; balanced = one CFG branch "
    "at a time; low = + int8 weights, KV cache offloaded to the CPU; minimal = + decoder layers "
    "offloaded to the CPU between uses (default: the model's settings, no quantization). Measured on a "
    "CPU, OmniGen-v1 in bfloat16, 256x256: fast about 7.8 GB, balanced 7.6 GB, low and minimal 4.4 GB "
    "(minimal saves more only on a GPU; see docs/formats.md)"
)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="model folder or hub id (default: the shipped miniature model)"
    )
    p.add_argument("--vae", default=None, help="VAE folder when the model folder has none (default: none)")
    add_device_arg(p)
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=AUTO,
        help=f"weights' dtype (default: {AUTO_HELP})",
    )
    p.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default=None,
        help=f"{QUANTIZE_HELP} (default: none, or the --memory preset's)",
    )
    p.add_argument("--memory", choices=tuple(MEMORY_PRESETS), default=None, help=MEMORY_HELP)
    add_lora_arg(p)


def add_lora_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="a LoRA adapter folder (peft format) and its scale (default 1); repeat to stack several",
    )


DEVICES = "auto (CUDA when available, else CPU), cpu, cuda, cuda:K or mps"


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """``--device``, the same default for every command; ``omnigen.cli.main`` resolves it (``resolve_device``)
    before the command runs."""
    p.add_argument("--device", default="auto", help=f"{DEVICES} (default: auto)")


def resolve_device(value: str | None) -> str:
    """``--device`` as a torch device string that this machine has; ValueError naming the value otherwise."""
    import torch

    name = (value or "auto").strip().lower()
    kind, colon, index = name.partition(":")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if kind == "cuda" and (not colon or index.isdigit()):
        if not torch.cuda.is_available():
            why = (
                "this torch was built without CUDA"
                if torch.version.cuda is None
                else "no CUDA GPU is visible"
            )
            raise ValueError(f"--device {value!r}: {why}; use --device cpu or auto")
        count = torch.cuda.device_count()
        if colon and int(index) >= count:
            raise ValueError(
                f"--device {value!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
            )
        return name
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(
                f"--device {value!r}: MPS (Apple GPU) is not available here; use --device cpu or auto"
            )
        return name
    raise ValueError(f"--device {value!r}: unknown device; use {DEVICES}")


def load_pipeline(args: argparse.Namespace, device: str | None = None):  # avoids importing torch here
    """The pipeline of ``--model/--vae/--dtype`` on ``device`` (default: ``--device``)."""
    from omnigen.pipeline import OmniGenPipeline

    target = resolve_device(device or args.device)
    pipe = OmniGenPipeline.from_pretrained(args.model, device=target, dtype=args.dtype, vae_path=args.vae)
    preset = getattr(args, "memory", None)
    kind, offload_model, offload_kv_cache, separate = MEMORY_PRESETS.get(preset, ("none", None, None, None))
    kind = getattr(args, "quantize", None) or kind
    if kind != "none":
        quantize(pipe.model, kind)
    if preset is not None:
        pipe = pipe.with_defaults(
            offload_model=offload_model, offload_kv_cache=offload_kv_cache, separate_cfg_infer=separate
        )
    apply_lora_args(pipe, args)
    return pipe


def apply_lora_args(pipe, args: argparse.Namespace) -> None:
    """Load the ``--lora PATH[:SCALE]`` adapters (``omnigen.weights.lora.apply_loras``), if any."""
    if getattr(args, "lora", None):
        from omnigen.weights import lora

        lora.apply_loras(pipe.model, [lora.parse_lora_arg(text) for text in args.lora])


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_generation_args(
    p: argparse.ArgumentParser, scopes: Iterable[str] = ("request", "operator"), skip: Iterable[str] = ()
) -> list[str]:
    """A flag per field of ``GenerationConfig`` in ``scopes`` (but ``skip``), each defaulting to None =
    the model's default; returns the field names added. Values are checked by the config, not here."""
    skip, added = set(skip), []
    defaults = GenerationConfig()
    for name in generation.names():
        param = generation.param(name)
        if param.scope not in scopes or name in skip:
            continue
        shown = getattr(defaults, name)
        shown = "" if name == "negative_prompt" else f"; OmniGen-v1: {shown}"
        help_text = f"{param.help} (default: the model's{shown})"
        options: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        if param.kind == "bool":
            options["action"] = argparse.BooleanOptionalAction
        elif param.kind == "choice":
            options["choices"] = param.choices
        else:
            options["type"] = param.python_type
            options["metavar"] = param.kind.upper()
        p.add_argument(flag(name), *param.aliases, **options)
        if param.choice_flags:  # "--fast" = "--preset fast"
            for choice in param.choices:
                p.add_argument(
                    flag(choice),
                    dest=name,
                    action="store_const",
                    const=choice,
                    help=f"= {flag(name)} {choice}",
                )
        added.append(name)
    return added


def generation_overrides(args: argparse.Namespace, names: Iterable[str] | None = None) -> dict[str, Any]:
    """The generation flags the user gave (the others are None), checked against the config's ranges."""
    wanted = generation.names() if names is None else list(names)
    overrides = {k: getattr(args, k) for k in wanted if getattr(args, k, None) is not None}
    GenerationConfig().replace(**overrides)  # a bad value fails here, before any model is loaded
    return overrides
