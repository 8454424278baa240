"""The original-layout export loads in the original OmniGen package (1.0.3) and its forward equals ours.

The original pins transformers 4.45.2 and diffusers 0.30.3, which cannot share an environment with ours,
so ``scripts/install_original_omnigen.sh`` installs them (without dependencies) into a folder that goes
first on the path of a child process only (``tests/original_omnigen_runner.py``). Marked ``original``:
``python -m pytest -m original`` (``.ci/run`` does both). The folder: ``$OMNIGEN_ORIGINAL_ENV`` or
``.original-omnigen`` in the repository.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import make_tokenizer_backend, random_model, tiny_config
from omnigen.generation import GenerationConfig
from omnigen.model.vae import AutoencoderKLCodec
from omnigen.pipeline import OmniGenPipeline
from omnigen.text.collate import collate
from omnigen.text.processor import OmniGenProcessor, cfg_prompts
from omnigen.text.tokenizer import Tokenizer

pytestmark = pytest.mark.original

TESTS = Path(__file__).parent
ENV = Path(os.environ.get("OMNIGEN_ORIGINAL_ENV", TESTS.parent / ".original-omnigen"))
PROMPT = "a red cat left of <img><|image_1|></img> photo"
NEGATIVE = "low quality , blurry"


def vae_8x() -> AutoencoderKL:
    """A tiny VAE with the SDXL VAE's factor 8: the original's processor counts image tokens as
    pixels // 16 per side (VAE 8 x patch 2), hard-coded."""
    torch.manual_seed(0)
    blocks = 4
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        block_out_channels=[4] * blocks,
        latent_channels=4,
        norm_num_groups=2,
        layers_per_block=1,
    ).eval()


def test_original_package_loads_the_export_and_matches_per_cfg_row(tmp_path):
    if not (ENV / ".complete").is_file():
        pytest.fail(
            f"the original package is not installed in {ENV}: run scripts/install_original_omnigen.sh"
        )
    # The original builds patch 2, 4 channels and a 192 x 192 table; the short "original" context (64) is
    # crossed by these rows, so the Phi-3 long factors of our config.json are in use on both sides.
    config = tiny_config(latent_downsample=8, pos_embed_max_size=192)
    tokenizer = Tokenizer(make_tokenizer_backend())
    pipe = OmniGenPipeline(random_model(config), AutoencoderKLCodec(vae_8x()), tokenizer, GenerationConfig())
    folder = pipe.save_pretrained(tmp_path / "model", layout="original")
    image = tmp_path / "input.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 32, 3), dtype=np.uint8)).save(image)

    processor = OmniGenProcessor(tokenizer, config, max_input_image_size=1024)
    pixels = [processor.prepare_image(Image.open(image))]
    branches = cfg_prompts(PROMPT, pixels, NEGATIVE, use_img_cfg=True)
    rows = [processor(PROMPT, pixels), processor(*branches.uncond), processor(*branches.img_cond)]
    latent = torch.nn.functional.avg_pool2d(pixels[0][None], 8)[0].repeat(2, 1, 1)[:4] * 0.7  # (4, 6, 4)
    size = 128  # 16 x 16 latent, 64 output tokens
    x, t = torch.randn(1, 4, size // 8, size // 8), torch.tensor([0.3])
    inputs = tmp_path / "inputs.safetensors"
    save_file(
        {"x": x, "t": t, "latent": latent.contiguous(), "size": torch.tensor([size, size])}, str(inputs)
    )

    out = tmp_path / "out.safetensors"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ENV), str(TESTS)])}
    command = [sys.executable, str(TESTS / "original_omnigen_runner.py"), str(folder), str(inputs), str(out)]
    proc = subprocess.run(
        [*command, str(image), PROMPT, NEGATIVE], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with safe_open(str(out), "pt") as f:
        info = json.loads(f.metadata()["info"])
        theirs = {k: f.get_tensor(k) for k in f.keys()}
    assert info["transformers"] == "4.45.2" and info["rows"] == 3  # cond, uncond, img_cond
    assert info["vae"] == "AutoencoderKL" and info["vae_blocks"] == 4  # vae/ loaded by the original
    n = config.num_image_tokens(size, size)
    assert max(len(r.input_ids) for r in rows) + 1 + n > config.transformer.original_max_position_embeddings
    with torch.no_grad():
        for k, row in enumerate(rows):
            assert theirs[f"ids_{k}"][0].tolist() == list(row.input_ids)  # AutoTokenizer 4.45 on our files
            lat = [latent] if row.image_spans else []
            ours = pipe.model(x, t, condition=collate([row], [lat], config.transformer.pad_token_id))
            torch.testing.assert_close(ours, theirs[f"velocity_{k}"], atol=1e-5, rtol=0)
