"""Runs the original ``omnigen`` 1.0.3 package (import name ``OmniGen``) for ``bench_pipeline.py``.

Executed by the python of a separate virtual environment that holds the original and its pins
(``benchmarks/setup_original.sh`` creates one); it imports nothing from our package.

    /work/venv-original/bin/python benchmarks/original_runner.py --model FOLDER [--threads 2]

``FOLDER`` is an OmniGen-v1 layout folder (config.json, model.safetensors with the original key names,
tokenizer files, ``vae/``) that the original's ``OmniGenPipeline.from_pretrained`` loads as it is. The
runner then reads JSON commands from stdin, one a line, each ``{"call": {...}, "latents_out": PATH}``
(``call``: keyword arguments of the original's ``__call__``), and answers each with one JSON line on
stdout: ``total_s`` (call start to the end of the VAE decode), ``sampling_s`` (call start to the start of
the decode: processor, input-image encode and the sampling loop), ``peak_sampling_mb`` /
``peak_total_mb`` (resident memory growth above the level at the call's start, polled every 5 ms, by the
start of the decode / by the end of the call, its conversion to PIL included), and,
with ``latents_out``, the final latents (the decode's input, scaled back to model space) written there as
safetensors. The first line is ``{"ready": {...versions...}}``. Everything the original prints goes to
stderr, so stdout carries only the protocol.

What the runner changes around the original, and why (none of its code is copied here):
- ``timm``: the original imports ``PatchEmbed, Attention, Mlp`` from ``timm.models.vision_transformer``
  and never uses them; a stub module provides the three names (they raise if ever instantiated).
- ``torchvision``: its processor uses ``transforms.Compose/Lambda/ToTensor/Normalize``; torchvision from
  PyPI does not import beside the torch 2.13 CPU wheel, so a shim with the same arithmetic provides them.
- ``is_torch_npu_available``: the original's pipeline calls this name without importing it, on a machine
  with neither CUDA nor MPS (a NameError on CPU); the runner defines it in that module (returns False).
- dtype: the original's pipeline casts the model to bfloat16 when it is built; the runner casts back to
  ``--dtype`` and reloads the checkpoint's tensors so the weights are the file's exactly, and passes
  ``dtype`` to every call.
- ``--posterior mean`` (default): input images are encoded to the VAE posterior mean (the original draws
  a sample from the global RNG), as our pipeline does, so outputs can be compared; ``sample`` keeps the
  original's draw. The cost is the same.
- ``"full_step0_attention": true`` in a command (a diagnostic for the output check, never timed): the
  original's cache, filled at step 0, hands the attention only the condition's keys, so at step 0 the
  output tokens do not attend to themselves or the time token; with this field the cache still stores
  only the condition but step 0 attends to the whole sequence, which is what an uncached step computes.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import sys
import time
import traceback
import types
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from peak_rss import PeakRSS  # benchmarks/, this script's folder


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    module.__dict__.update(attrs)
    return module


def _unused(name: str) -> type:
    def init(self, *args, **kwargs) -> None:
        raise NotImplementedError(f"timm stub: {name} is imported by OmniGen 1.0.3 but never used")

    return type(name, (), {"__init__": init})


class Compose:
    def __init__(self, transforms: list) -> None:
        self.transforms = list(transforms)

    def __call__(self, x):
        for transform in self.transforms:
            x = transform(x)
        return x


class Lambda:
    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, x):
        return self.fn(x)


class ToTensor:
    """PIL image -> (C, H, W) float in [0, 1], as torchvision's ``to_tensor`` computes it."""

    def __call__(self, image):
        import numpy as np
        import torch

        array = np.array(image, dtype=np.uint8, copy=True)
        if array.ndim == 2:
            array = array[:, :, None]
        tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        return tensor.to(dtype=torch.get_default_dtype()).div(255)


class Normalize:
    """``(x - mean) / std`` per channel, as torchvision's ``normalize`` computes it."""

    def __init__(self, mean, std, inplace: bool = False) -> None:
        self.mean, self.std, self.inplace = mean, std, inplace

    def __call__(self, tensor):
        import torch

        tensor = tensor if self.inplace else tensor.clone()
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        return tensor.sub_(mean).div_(std)


def install_import_shims() -> None:
    """The ``timm`` stub and the ``torchvision.transforms`` shim, unless the real packages are present.

    transformers and diffusers are imported first: they probe which optional packages exist when they
    are imported, and must not take the stubs for installed packages."""
    import importlib.util

    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    if importlib.util.find_spec("timm") is None:
        names = {n: _unused(n) for n in ("PatchEmbed", "Attention", "Mlp")}
        vit = _module("timm.models.vision_transformer", **names)
        models = _module("timm.models", vision_transformer=vit)
        sys.modules.update({"timm": _module("timm", models=models), "timm.models": models})
        sys.modules["timm.models.vision_transformer"] = vit
    if importlib.util.find_spec("torchvision") is None:
        transforms = _module(
            "torchvision.transforms", Compose=Compose, Lambda=Lambda, ToTensor=ToTensor, Normalize=Normalize
        )
        sys.modules["torchvision"] = _module("torchvision", transforms=transforms)
        sys.modules["torchvision.transforms"] = transforms


def load_original(folder: Path, dtype_name: str, posterior: str):
    """The original's ``OmniGenPipeline.from_pretrained(folder)``, with the fixes the docstring lists."""
    import torch
    from safetensors.torch import load_file

    install_import_shims()
    import OmniGen.pipeline as original_pipeline
    from OmniGen import OmniGenPipeline

    if not hasattr(original_pipeline, "is_torch_npu_available"):
        original_pipeline.is_torch_npu_available = lambda: False
    pipe = OmniGenPipeline.from_pretrained(str(folder))
    dtype = getattr(torch, dtype_name)
    pipe.model.to(dtype)
    pipe.model.load_state_dict(load_file(str(folder / "model.safetensors")))  # undo the bf16 rounding
    if posterior == "mean":
        vae = pipe.vae

        def vae_encode(x, dtype):  # the original's vae_encode, mean not sample
            latents = vae.encode(x).latent_dist.mode()
            if vae.config.shift_factor is not None:
                latents = latents - vae.config.shift_factor
            return (latents * vae.config.scaling_factor).to(dtype)

        pipe.vae_encode = vae_encode
    return pipe, dtype


class DecodeProbe:
    """Wraps the VAE's ``decode``: when the sampling ended, the memory peak by then, and its input."""

    def __init__(self, vae) -> None:
        self.vae, self.inner = vae, vae.decode
        vae.decode = self
        self.rss: PeakRSS | None = None
        self.start = self.end = 0.0
        self.sampling_peak, self.latents = 0, None

    def __call__(self, latents, *args, **kwargs):
        self.start = time.perf_counter()
        self.sampling_peak = self.rss.peak if self.rss else 0
        config = self.vae.config
        shift = config.shift_factor if config.shift_factor is not None else 0.0
        self.latents = ((latents - shift) * config.scaling_factor).detach().clone()
        out = self.inner(latents, *args, **kwargs)
        self.end = time.perf_counter()
        return out


@contextmanager
def full_step0_attention() -> Iterator[None]:
    """Step 0 attends to the whole sequence; the cache still keeps only the condition (see docstring)."""
    from OmniGen.scheduler import OmniGenCache

    update = OmniGenCache.update

    def patched(self, key_states, value_states, layer_idx, cache_kwargs=None):
        filling = len(self.key_cache) == layer_idx
        cached = update(self, key_states, value_states, layer_idx, cache_kwargs)
        return (key_states, value_states) if filling else cached

    OmniGenCache.update = patched
    try:
        yield
    finally:
        OmniGenCache.update = update


def run_command(pipe, dtype, probe: DecodeProbe, command: dict) -> dict:
    import torch
    from safetensors.torch import save_file

    call = dict(command["call"])
    diagnostic = full_step0_attention() if command.get("full_step0_attention") else nullcontext()
    with diagnostic, PeakRSS() as rss:
        probe.rss = rss
        start = time.perf_counter()
        with torch.no_grad():
            pipe(**call, dtype=dtype)
    if probe.latents is None:
        raise RuntimeError("the original's call returned without decoding (no latents seen)")
    if command.get("latents_out"):
        save_file({"latents": probe.latents.float().contiguous()}, command["latents_out"])
    result = {
        "total_s": probe.end - start,
        "sampling_s": probe.start - start,
        "peak_sampling_mb": rss.mb(probe.sampling_peak),
        "peak_total_mb": rss.mb(rss.peak),
    }
    probe.latents = None
    return result


def versions(pipe) -> dict:
    from importlib.metadata import version

    import torch

    found = {name: version(name) for name in ("omnigen", "transformers", "diffusers", "accelerate", "peft")}
    return {
        **found,
        "torch": torch.__version__,
        "attention": pipe.model.llm.config._attn_implementation,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="OmniGen-v1 layout folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--posterior", choices=["mean", "sample"], default="mean")
    args = parser.parse_args()
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # the original's prints go to stderr
    sys.stdout = sys.stderr

    import torch

    torch.set_num_threads(args.threads)
    pipe, dtype = load_original(args.model, args.dtype, args.posterior)
    probe = DecodeProbe(pipe.vae)
    protocol.write(json.dumps({"ready": versions(pipe)}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = run_command(pipe, dtype, probe, json.loads(line))
        except Exception:  # reported to the parent, which raises with this text
            reply = {"error": traceback.format_exc()}
        protocol.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
