"""Runs the original OmniGen package (1.0.3, VectorSpaceLab) on a folder we exported: in its own process,
with the versions it pins (transformers 4.45.2, diffusers 0.30.3) first on the path — see
``scripts/install_original_omnigen.sh`` and ``tests/test_export_original.py``.

python original_omnigen_runner.py FOLDER INPUTS.safetensors OUT.safetensors IMAGE PROMPT NEGATIVE

Loads FOLDER with the original ``OmniGenPipeline.from_pretrained`` (model, processor = AutoTokenizer,
``vae/``), builds the CFG rows with its processor (separate CFG) and runs its fp32 ``OmniGen.forward``
on each row with the x, t and input-image latent in INPUTS. Writes each row's ids and output to OUT.
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types

import diffusers.loaders  # noqa: F401 - before the stubs: diffusers and transformers probe packages at import
import torch
import transformers
from safetensors.torch import load_file, save_file

from torchvision_shim import Transforms


def _stub(name: str, **attrs) -> None:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    sys.modules[name] = module


def main(folder: str, inputs_path: str, out_path: str, image: str, prompt: str, negative: str) -> None:
    # torchvision has no wheel beside CPU torch 2.13; timm (which needs it) is imported for three names the
    # original never uses.
    _stub("torchvision", transforms=Transforms)
    sys.modules["torchvision.transforms"] = Transforms
    for name in ("timm", "timm.models"):
        _stub(name)
    _stub("timm.models.vision_transformer", PatchEmbed=None, Attention=None, Mlp=None)
    import OmniGen.pipeline as original_pipeline
    from OmniGen import OmniGen, OmniGenPipeline

    original_pipeline.is_torch_npu_available = lambda: False  # 1.0.3 calls it unimported on CPU-only hosts
    pipe = OmniGenPipeline.from_pretrained(folder)  # the original entry point
    model = OmniGen.from_pretrained(folder).eval()  # fp32: the pipeline casts its own copy to bf16
    inputs = load_file(inputs_path)
    height, width = inputs["size"].tolist()
    data = pipe.processor(
        [prompt], [[image]], height=height, width=width, negative_prompt=negative, separate_cfg_input=True
    )
    out = {}
    with torch.no_grad():
        for k in range(len(data["input_ids"])):
            latents = [inputs["latent"][None]] if data["input_image_sizes"][k] else None
            velocity = model(
                inputs["x"],
                inputs["t"],
                data["input_ids"][k],
                latents,
                data["input_image_sizes"][k],
                data["attention_mask"][k],
                data["position_ids"][k],
                return_past_key_values=False,
            )
            out[f"velocity_{k}"] = velocity.contiguous()
            out[f"ids_{k}"] = data["input_ids"][k].contiguous()
    info = {
        "transformers": transformers.__version__,
        "vae": type(pipe.vae).__name__,
        "vae_blocks": len(pipe.vae.config.block_out_channels),
        "rows": len(data["input_ids"]),
    }
    save_file(out, out_path, metadata={"info": json.dumps(info)})


if __name__ == "__main__":
    main(*sys.argv[1:7])
