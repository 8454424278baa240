"""Writing a pipeline as a model folder in either checkpoint layout: ``save_pretrained`` (the command
``omnigen export`` is ``omnigen.cli.export``).

- ``"original"``: the official OmniGen-v1 layout, which the original package's ``OmniGen.from_pretrained``
  reads: ``config.json`` (Phi-3 form; our image geometry in its ``omnigen`` section, which Phi3Config
  keeps as an unused attribute), ``model.safetensors`` (the official key names, which are ours, with the
  stored ``pos_embed``: the original loads strictly), the tokenizer files and ``vae/``. The original
  code hard-codes patch 2, 4 latent channels, a VAE factor of 8, a 192 x 192 position table and a
  256-dim time embedding (``ORIGINAL_GEOMETRY``); a model with other geometry (the shipped pixel-space miniature: no VAE, a
  ``codec.json`` instead) is still written in this layout, which our loader reads, with a warning that
  the original code cannot build it.
- ``"diffusers"``: ``model_index.json``, ``transformer/`` (keys renamed through ``keymap``, the same table
  the loader reads the other way), ``vae/``, ``tokenizer/``, ``scheduler/``: what
  ``diffusers.OmniGenPipeline.from_pretrained`` loads. It needs an ``AutoencoderKL`` codec; a pixel-space
  model is refused with a ``ValueError``.

Both layouts also get our ``omnigen_generation.json`` (ignored by the other loaders). Weights are written
with safetensors only, the whole folder atomically (``omnigen.util.atomic.atomic_folder``). A LoRA adapter must be
merged first (``pipe.merge_lora()``; it is folded into the plain weights); an int8-quantized model is refused.
``dtype=torch.float8_e4m3fn`` writes a scaled-fp8 checkpoint (``omnigen.weights.fp8.scaled_state``: Linear
weights in fp8 with a per-tensor scale, the rest in bfloat16) in either layout; a GGUF type name ("q8_0",
"q4_0", ...) writes ``model.gguf`` (``omnigen.weights.gguf_file.write``) in the original layout. A model
loaded from fp8 or GGUF is written from its dequantized weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from omnigen.config import OmniGenConfig
from omnigen.model import OmniGenModel
from omnigen.util.atomic import atomic_folder
from omnigen.util.dtypes import DTYPES
from omnigen.weights import fp8, gguf_file
from omnigen.weights.checkpoint import DIFFUSERS_WEIGHTS, WEIGHTS, check_state_dict
from omnigen.weights.keymap import ours_to_diffusers
from omnigen.weights.packed import dequantized_state

if TYPE_CHECKING:
    from omnigen.pipeline import OmniGenPipeline

logger = logging.getLogger(__name__)

LAYOUTS = ("original", "diffusers")
# What the original code builds whatever config.json says (its processor counts image tokens as
# pixels // 16 per side: VAE factor 8 x patch 2).
ORIGINAL_GEOMETRY = {
    "in_channels": 4,
    "patch_size": 2,
    "latent_downsample": 8,
    "pos_embed_max_size": 192,
    "time_embed_dim": 256,
}
# the names ``omnigen export --dtype`` takes: torch dtypes, and GGUF quantization types (kept as names)
EXPORT_DTYPES: dict[str, torch.dtype | str] = {
    **DTYPES,
    "float8_e4m3fn": fp8.FP8,
    **{name: name for name in gguf_file.WRITE_TYPES},
}
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}


def save_pretrained(
    pipe: OmniGenPipeline,
    folder: str | Path,
    layout: str = "original",
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``pipe`` to ``folder`` in ``layout`` ("original" or "diffusers"); returns the folder.

    ``dtype`` casts the transformer's floating-point weights (default: as they are); a GGUF type name
    ("q8_0", "q4_0", ...: ``gguf_file.WRITE_TYPES``) writes ``model.gguf`` instead of model.safetensors,
    Linear weights quantized, the rest as they are (original layout only). The VAE is written as it is.
    An existing non-empty ``folder`` is replaced only with ``overwrite``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if dtype is not None and dtype not in EXPORT_DTYPES.values():
        raise ValueError(
            f"dtype must be one of {sorted(EXPORT_DTYPES)} (torch dtypes, or GGUF type names) or None, got {dtype!r}"
        )
    scaled, gguf_type = dtype == fp8.FP8, dtype if isinstance(dtype, str) else None
    if gguf_type is not None and layout != "original":
        raise ValueError(
            f"a GGUF export ({gguf_type}) is written in the original layout only, not {layout!r}"
        )
    config = pipe.model.config
    if layout == "diffusers":
        transformer_config = diffusers_transformer_config(config)  # refuses what diffusers cannot hold
        if not hasattr(pipe.codec, "vae"):
            raise ValueError(
                "the diffusers layout needs an AutoencoderKL VAE, but this model runs in pixel space "
                f"({type(pipe.codec).__name__}), which diffusers.OmniGenPipeline cannot represent; "
                "use layout='original'"
            )
    else:
        _warn_if_not_original(config, pipe.codec)
    state = plain_state_dict(pipe.model, None if scaled or gguf_type else dtype)
    linear_keys = (
        {k.replace(".base_layer.", ".") for k in fp8.linear_weight_keys(pipe.model)}
        if scaled or gguf_type
        else None
    )
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        if gguf_type is not None:
            gguf_file.write(tmp / gguf_file.WEIGHTS, state, linear_keys, gguf_type)
        elif layout == "original":
            if linear_keys is not None:
                state = fp8.scaled_state(state, linear_keys)
            save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if layout == "original":
            config.save(tmp / "config.json")
            pipe.tokenizer.save(tmp)
        else:
            _write_diffusers(tmp, pipe, state, transformer_config, linear_keys)
        pipe.codec.save(tmp)
        pipe.defaults.save(tmp)
    logger.info("wrote %s (%s layout)", folder, layout)
    return Path(folder)


def plain_state_dict(model: OmniGenModel, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under the official key names, on the CPU, a merged LoRA adapter folded in."""
    from omnigen.weights import lora

    if any(not layer.merged for layer in lora.lora_layers(model).values()):
        raise ValueError("the model has an unmerged LoRA adapter: call merge_lora() first (or unload_lora())")
    state = {}
    for key, value in dequantized_state(model).items():
        if ".lora_" in key:
            continue  # a merged adapter's own tensors; its effect is in base_layer
        if type(value) is not torch.Tensor or not value.is_floating_point():
            raise ValueError(
                f"{key} is quantized ({type(value).__name__}, {value.dtype}); "
                "export the model before quantize_int8"
            )
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        state[key.replace(".base_layer.", ".")] = value.detach().contiguous().cpu()
    with torch.device("meta"):
        reference = OmniGenModel(model.config)
    check_state_dict(reference, state, "to export")
    return state


def diffusers_transformer_config(config: OmniGenConfig) -> dict:
    """``OmniGenTransformer2DModel``'s config.json. diffusers always applies Phi-3 "su" scaling, so a
    model without rope scaling is written with factors of 1 (exact while max == original positions)."""
    import diffusers

    data = config.to_diffusers_dict()
    t = config.transformer
    if data["rope_scaling"] is None:
        if t.max_position_embeddings > t.original_max_position_embeddings:
            raise ValueError(
                "diffusers scales rotary cos/sin whenever max_position_embeddings "
                f"({t.max_position_embeddings}) > original_max_position_embeddings "
                f"({t.original_max_position_embeddings}), which this model without rope_scaling does not"
            )
        ones = [1.0] * (t.head_dim // 2)
        data["rope_scaling"] = {"short_factor": ones, "long_factor": ones}
    return {"_class_name": "OmniGenTransformer2DModel", "_diffusers_version": diffusers.__version__, **data}


def _write_diffusers(
    tmp: Path, pipe: OmniGenPipeline, state: dict, transformer_config: dict, linear_keys: set | None
) -> None:
    """``linear_keys`` (our names): write those weights in scaled fp8 under their diffusers names."""
    version = transformer_config["_diffusers_version"]
    (tmp / "transformer").mkdir()
    config = pipe.model.config
    diffusers_state = ours_to_diffusers(state, config)
    if linear_keys is not None:
        linears = {k: state[k] for k in linear_keys if k in state}  # renamed (and qkv split) the same way
        diffusers_state = fp8.scaled_state(diffusers_state, set(ours_to_diffusers(linears, config)))
    save_file(diffusers_state, str(tmp / "transformer" / DIFFUSERS_WEIGHTS), metadata={"format": "pt"})
    _write_json(tmp / "transformer" / "config.json", transformer_config)
    (tmp / "scheduler").mkdir()
    _write_json(tmp / "scheduler" / "scheduler_config.json", {**SCHEDULER, "_diffusers_version": version})
    (tmp / "tokenizer").mkdir()
    pipe.tokenizer.save(tmp / "tokenizer")
    tokenizer_class = json.loads((tmp / "tokenizer" / "tokenizer_config.json").read_text()).get(
        "tokenizer_class", "PreTrainedTokenizerFast"
    )
    index = {
        "_class_name": "OmniGenPipeline",
        "_diffusers_version": version,
        "scheduler": ["diffusers", SCHEDULER["_class_name"]],
        "tokenizer": ["transformers", tokenizer_class],
        "transformer": ["diffusers", transformer_config["_class_name"]],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    _write_json(tmp / "model_index.json", index)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def _warn_if_not_original(config: OmniGenConfig, codec) -> None:  # a LatentCodec
    differ = {k: getattr(config, k) for k, v in ORIGINAL_GEOMETRY.items() if getattr(config, k) != v}
    if not hasattr(codec, "vae"):
        differ["codec"] = type(codec).__name__
    if differ:
        logger.warning(
            "writing the original layout, but the original OmniGen code hard-codes %s and an SDXL-type VAE; "
            "this model has %s: omnigen loads the folder, the original package cannot",
            ORIGINAL_GEOMETRY,
            differ,
        )
