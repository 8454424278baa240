"""Tiny fixtures: a word-level tokenizer, a 2-layer OmniGen, a 4-channel AutoencoderKL, model folders."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMNIGEN_TEST_THREADS", "2")))


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op threads set to ``count`` inside the block, restored after.

    CPU kernels are not batch-invariant across threads: PyTorch's CPU flash attention (2.13, AVX512)
    gives a (row, head) a result that depends on which thread computed it (last-bit differences at some
    key lengths, e.g. 15 or 17), and a batch of 1 row splits its heads over the threads differently than
    a batch of 3. So outputs of different batch layouts are equal bit for bit only at one thread.
    Test modules that set the thread count at import change it for the whole session, so a test that
    needs one thread says so with this (or the ``one_thread`` fixture) instead of relying on that."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """The test runs at one intra-op thread (``torch_threads``): bit-for-bit comparisons across batch
    layouts need it."""
    with torch_threads(1):
        yield


WORDS = (
    "generate an image according to the following instructions a red blue green circle square cat dog "
    "photo of make it in the style put on left right low quality blurry , . < > img / | image _ 1 2 3"
).split()
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|end|>", "<|assistant|>", "<|diffusion|>"]


def make_tokenizer_backend():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(set(WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    backend.add_special_tokens(SPECIALS)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return backend


@pytest.fixture(scope="session")
def tokenizer():
    from omnigen.text.tokenizer import Tokenizer

    return Tokenizer(make_tokenizer_backend())


def tiny_config(long_rope: bool = True, **overrides):
    from omnigen.config import OmniGenConfig, RopeScaling, TransformerConfig

    head_dim = 8
    g = torch.Generator().manual_seed(1)
    scaling = RopeScaling(
        tuple((1 + torch.rand(head_dim // 2, generator=g)).tolist()),
        tuple((1 + 8 * torch.rand(head_dim // 2, generator=g)).tolist()),
    )
    transformer = TransformerConfig(
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        vocab_size=len(SPECIALS) + len(set(WORDS)),
        pad_token_id=3,
        # a short "original" context so real prompts cross it and exercise the long factors
        original_max_position_embeddings=64 if long_rope else 4096,
        max_position_embeddings=4096,
        rope_scaling=scaling,
    )
    fields = dict(
        transformer=transformer, in_channels=4, patch_size=2, latent_downsample=2, pos_embed_max_size=16
    )
    fields.update(overrides)
    return OmniGenConfig(**fields)


def random_model(config, seed: int = 0, scale: float = 0.2):
    """A model whose weights are all random (non-zero head), so every part influences the output."""
    from omnigen.model import OmniGenModel

    torch.manual_seed(seed)
    model = OmniGenModel(config)
    model.initialize_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, scale)
    return model.eval()


def randomize_adapter(model, seed: int = 0, scale: float = 0.2) -> None:
    """Non-zero LoRA A and B (B starts at zero), so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def save_random_adapters(make_model, folder, names) -> list:
    """One random rank-2 adapter (alpha 2, scale 0.3, seeded by its index) per name, saved at
    ``folder / name``, each on a fresh ``make_model()``. Returns their paths."""
    from omnigen.weights import lora

    for seed, name in enumerate(names):
        model = make_model()
        lora.add_lora(model, rank=2, alpha=2)
        randomize_adapter(model, seed, scale=0.3)
        lora.save_lora(model, folder / name)
    return [folder / name for name in names]


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 8],
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
    ).eval()


@pytest.fixture(scope="session")
def config():
    return tiny_config()


@pytest.fixture(scope="session")
def model(config):
    return random_model(config)


def tiny_pipeline(model, tokenizer, **defaults):
    """An ``OmniGenPipeline`` over ``model`` with ``tiny_vae()``; its ``GenerationConfig`` is 32x32, 2 steps,
    inputs of at most 32 pixels, with ``defaults`` overriding any field."""
    from omnigen.generation import GenerationConfig
    from omnigen.model.vae import AutoencoderKLCodec
    from omnigen.pipeline import OmniGenPipeline

    fields = dict(height=32, width=32, num_inference_steps=2, max_input_image_size=32) | defaults
    return OmniGenPipeline(model, AutoencoderKLCodec(tiny_vae()), tokenizer, GenerationConfig(**fields))


@pytest.fixture(scope="session")
def pipeline(model, tokenizer):
    return tiny_pipeline(model, tokenizer, num_inference_steps=3, negative_prompt="low quality , blurry")


@pytest.fixture
def rgb_image():
    def make(width: int = 32, height: int = 32, seed: int = 0):
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(seed)
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))

    return make


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory, model, tokenizer):
    """An official-layout folder (config.json, model.safetensors, tokenizer.json, vae/)."""
    from omnigen.generation import GenerationConfig
    from omnigen.weights.checkpoint import save_model

    folder = tmp_path_factory.mktemp("tiny-omnigen")
    save_model(model, folder)
    tokenizer.save(folder)
    tiny_vae().save_pretrained(str(folder / "vae"))
    GenerationConfig(
        height=32, width=32, num_inference_steps=2, max_input_image_size=32, negative_prompt="blurry"
    ).save(folder)
    return folder


def tiny_clip_dino_folders(folder):
    """A tiny random CLIP (text + vision, with its processor) and a tiny ViT as DINO, saved under `folder`
    as transformers folders: (clip_dir, dino_dir)."""
    import json

    import transformers

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=8,
    )
    clip_dir = folder / "clip"
    transformers.CLIPModel(config).save_pretrained(clip_dir)
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(clip_dir)
    dino_dir = folder / "dino"
    vit = transformers.ViTConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    transformers.ViTModel(vit, add_pooling_layer=False).save_pretrained(dino_dir)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(dino_dir)
    return clip_dir, dino_dir
