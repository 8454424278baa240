"""Both checkpoint layouts out (``omnigen.weights.export``): the diffusers layout loads in
``diffusers.OmniGenPipeline`` and its transformer equals ours row by row; both layouts load back in ours;
LoRA-merged and pixel-space models; atomic writes. The original package itself: test_export_original.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from diffusers.pipelines.omnigen import pipeline_omnigen
from diffusers.pipelines.omnigen import processor_omnigen as ref
from safetensors import safe_open

from conftest import make_tokenizer_backend, random_model, tiny_config, tiny_vae
from omnigen.cli.main import main
from omnigen.config import OmniGenConfig
from omnigen.generation import GenerationConfig
from omnigen.model import OmniGenModel
from omnigen.model.vae import AutoencoderKLCodec, IdentityCodec
from omnigen.pipeline import OmniGenPipeline
from omnigen.text.collate import collate
from omnigen.text.tokenizer import Tokenizer
from omnigen.util.atomic import atomic_folder
from omnigen.weights.keymap import diffusers_to_ours, ours_to_diffusers
from omnigen.weights.packed import dequantized_state
from omnigen.weights.quantize import quantize_int8
from test_reference import PROMPT, build_rows, encode, reference_row_velocity
from torchvision_shim import Transforms

FIXTURES = Path(__file__).parent / "fixtures"
DEFAULTS = GenerationConfig(
    height=32,
    width=32,
    num_inference_steps=2,
    max_input_image_size=32,
    negative_prompt="low quality , blurry",
)


def make_pipe(config: OmniGenConfig | None = None, seed: int = 0) -> OmniGenPipeline:
    config = config or tiny_config()
    return OmniGenPipeline(
        random_model(config, seed=seed),
        AutoencoderKLCodec(tiny_vae()),
        Tokenizer(make_tokenizer_backend()),
        DEFAULTS,
    )


def latents(pipe: OmniGenPipeline, prompt: str = "a red cat", images=None) -> torch.Tensor:
    return pipe(prompt, images, seed=3, progress=False, output_type="latent")


def weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def diffusers_pipeline_class(monkeypatch):
    """diffusers.OmniGenPipeline; its processor wants torchvision, which has no wheel beside CPU torch."""
    monkeypatch.setattr(ref, "transforms", Transforms, raising=False)
    monkeypatch.setattr(
        pipeline_omnigen, "OmniGenMultiModalProcessor", ref.OmniGenMultiModalProcessor, raising=False
    )
    return pipeline_omnigen.OmniGenPipeline


# ------------------------------------------------------------------------------------------ diffusers
@pytest.mark.parametrize("long_rope", [True, False])
def test_diffusers_layout_loads_in_diffusers_and_matches_per_cfg_row(
    tmp_path, rgb_image, diffusers_pipeline_class, long_rope
):
    config = tiny_config(long_rope=long_rope)
    pipe = make_pipe(config)
    folder = pipe.save_pretrained(tmp_path / "diffusers", layout="diffusers")
    theirs = diffusers_pipeline_class.from_pretrained(str(folder))
    assert type(theirs.transformer).__name__ == "OmniGenTransformer2DModel"
    assert type(theirs.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert theirs.vae_scale_factor == pipe.codec.downsample == 2
    assert weights_equal(theirs.vae, pipe.codec.vae)
    for text in (PROMPT, "low quality , blurry", "<|user|>\ngenerate an image<|end|>\n<|assistant|>"):
        assert theirs.tokenizer(text).input_ids == pipe.tokenizer.encode(text)

    prompts = build_rows(
        pipe.tokenizer, config, [rgb_image(32, 32, seed=1), rgb_image(48, 32, seed=2)], 32, 32
    )
    x, t, n = torch.randn(1, 4, 16, 16), torch.tensor([0.4]), config.num_image_tokens(32, 32)
    with torch.no_grad():
        for prompt in prompts:  # cond, uncond, img_cond
            lat = encode(prompt.pixel_values)
            want = reference_row_velocity(theirs.transformer, prompt, lat, x, t, n)
            got = pipe.model(x, t, condition=collate([prompt], [lat], config.transformer.pad_token_id))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    if long_rope:  # the rows cross the short context: diffusers' long factors came from our config.json
        assert (
            max(len(p.input_ids) for p in prompts) + 1 + n
            > config.transformer.original_max_position_embeddings
        )


def test_diffusers_layout_files_and_round_trip_through_our_loader(tmp_path, rgb_image):
    pipe = make_pipe()
    folder = pipe.save_pretrained(tmp_path / "d", layout="diffusers")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "OmniGenTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["tokenizer"][0] == "transformers"
    with safe_open(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "layers.0.self_attn.to_q.weight" in keys and "patch_embedding.pos_embed" in keys
    assert not any("qkv_proj" in k or k.startswith("llm.") for k in keys)
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    back = OmniGenPipeline.from_pretrained(folder)
    assert back.model.config == pipe.model.config  # latent_downsample from vae/config.json, not diffusers' 8
    assert weights_equal(back.model, pipe.model) and back.defaults == pipe.defaults
    images = [rgb_image()]
    torch.testing.assert_close(latents(back, "make it blue <img><|image_1|></img>", images),
                               latents(pipe, "make it blue <img><|image_1|></img>", images))  # fmt: skip


def test_fp8_export_in_the_diffusers_layout_loads_fp8_and_computes_its_dequantization(tmp_path):
    """``dtype=float8_e4m3fn`` in the diffusers layout: to_q/to_k/to_v (diffusers names) each in fp8 with
    its own ``scale_weight``; our loader keeps them fp8 (fused qkv, a scale per row) and computes exactly
    what a float32 model of the dequantized weights computes."""
    from omnigen.weights import fp8
    from omnigen.weights.checkpoint import build_model

    pipe = make_pipe()
    folder = pipe.save_pretrained(tmp_path / "d", layout="diffusers", dtype=fp8.FP8)
    with safe_open(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_slice("layers.0.self_attn.to_q.weight").get_dtype() == "F8_E4M3"
        assert {"scaled_fp8", "layers.0.self_attn.to_k.scale_weight"} <= set(f.keys())
        assert not any(k.startswith("llm.") or "qkv_proj" in k for k in f.keys())
    back = OmniGenPipeline.from_pretrained(folder, dtype=torch.float32)
    qkv = back.model.llm.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, fp8.Fp8Linear) and qkv.weight.dtype == fp8.FP8
    dense = build_model(back.model.config, {k: v.float() for k, v in dequantized_state(back.model).items()})
    want = latents(OmniGenPipeline(dense, back.codec, back.tokenizer, back.defaults))
    torch.testing.assert_close(latents(back), want, atol=1e-5, rtol=0)
    original = pipe.model.state_dict()
    for key, value in dense.state_dict().items():  # an approximation of the exported model
        assert (value - original[key].float()).abs().max() <= original[key].abs().max() / 16 + 1e-6, key


def test_key_map_is_one_table_read_both_ways():
    """ours -> diffusers -> ours is the identity on the full-size model's keys and shapes."""
    config = OmniGenConfig.load(FIXTURES / "omnigen_v1_config.json")
    with torch.device("meta"):
        state = OmniGenModel(config).state_dict()
    theirs = ours_to_diffusers(state, config)
    assert not any(k.startswith("llm.") or "qkv_proj" in k for k in theirs)
    back = diffusers_to_ours(theirs, config)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in state.items()}


def test_pixel_space_model_gets_codec_json_in_original_and_is_refused_by_diffusers(tmp_path, caplog):
    pipe = OmniGenPipeline.from_pretrained()  # the shipped miniature model: identity codec, patch 4
    with pytest.raises(ValueError, match="pixel space .*IdentityCodec.*layout='original'"):
        pipe.save_pretrained(tmp_path / "d", layout="diffusers")
    assert not (tmp_path / "d").exists()
    with caplog.at_level(logging.WARNING, logger="omnigen.weights.export"):
        folder = pipe.save_pretrained(tmp_path / "o")
    assert "the original package cannot" in caplog.text and "IdentityCodec" in caplog.text
    assert (
        json.loads((folder / "codec.json").read_text())["type"] == "identity"
        and not (folder / "vae").exists()
    )
    back = OmniGenPipeline.from_pretrained(folder)
    assert isinstance(back.codec, IdentityCodec) and weights_equal(back.model, pipe.model)
    assert back.model.config == pipe.model.config and back.defaults == pipe.defaults
    for text in ("a red circle in the top left on a white background", ""):
        assert back.tokenizer.encode(text) == pipe.tokenizer.encode(text)


# ------------------------------------------------------------------------------------------ original
def test_original_layout_has_the_official_files_and_key_names(tmp_path, caplog):
    config = tiny_config(pos_embed_max_size=192)
    pipe = make_pipe(config)
    with caplog.at_level(logging.WARNING, logger="omnigen.weights.export"):
        folder = pipe.save_pretrained(tmp_path / "o")
    # patch 2, 4 channels, a 192 table, a VAE: what the original builds; only the tiny VAE's factor differs
    assert "this model has {'latent_downsample': 2}" in caplog.text
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert {"vae/config.json", "vae/diffusion_pytorch_model.safetensors"} <= names
    official = json.loads((FIXTURES / "omnigen_v1_checkpoint_keys.json").read_text())["keys"]
    layers = config.transformer.num_layers
    expected = {k for k in official if not k.startswith("llm.layers.") or int(k.split(".")[2]) < layers}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == expected
        assert list(f.get_slice("pos_embed").get_shape()) == [1, 192 * 192, 32]
    data = json.loads((folder / "config.json").read_text())
    assert data["model_type"] == "phi3" and set(data["rope_scaling"]) == {
        "type",
        "short_factor",
        "long_factor",
    }


def test_original_layout_round_trip_and_dtype(tmp_path, rgb_image):
    pipe = make_pipe()
    back = OmniGenPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "o"))
    assert weights_equal(back.model, pipe.model) and back.defaults == pipe.defaults
    assert weights_equal(back.codec.vae, pipe.codec.vae)
    torch.testing.assert_close(latents(back), latents(pipe))
    half = pipe.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    with safe_open(str(half / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    kept = OmniGenPipeline.from_pretrained(half, dtype=None)  # None: the stored dtype
    assert next(kept.model.parameters()).dtype == torch.bfloat16
    # the default, dtype="auto", is float32 on the CPU whatever the file holds
    assert next(OmniGenPipeline.from_pretrained(half).model.parameters()).dtype == torch.float32


# ------------------------------------------------------------------------------------------ LoRA, CLI
def test_export_merges_a_lora_adapter(tmp_path):
    from omnigen.weights import lora

    source = make_pipe().save_pretrained(tmp_path / "base")
    pipe = OmniGenPipeline.from_pretrained(source)
    lora.add_lora(pipe.model, rank=4, alpha=8, target_modules=["qkv_proj", "down_proj"])
    with torch.no_grad():
        for name, p in pipe.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # a trained-looking adapter (B starts at zero)
    lora.save_lora(pipe.model, tmp_path / "adapter")
    with pytest.raises(ValueError, match="unmerged LoRA"):
        pipe.save_pretrained(tmp_path / "x")
    lora.set_lora_scale(pipe.model, 0.5)
    with_adapter = latents(pipe)
    argv = ["export", str(tmp_path / "merged"), "--model", str(source), "--layout", "diffusers"]
    assert main([*argv, "--lora", str(tmp_path / "adapter"), "--lora-scale", "0.5"]) == 0
    merged = OmniGenPipeline.from_pretrained(tmp_path / "merged")
    assert not lora.has_lora(merged.model)
    torch.testing.assert_close(latents(merged), with_adapter, atol=1e-4, rtol=1e-4)  # merge reorders
    assert (latents(merged) - latents(OmniGenPipeline.from_pretrained(source))).abs().max() > 1e-3
    pipe.merge_lora()  # a merged adapter is folded into the plain weights
    assert weights_equal(
        OmniGenPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "m2")).model, merged.model
    )


def test_cli_export_errors(tmp_path, caplog):
    assert main(["export", str(tmp_path / "d"), "--layout", "diffusers"]) == 2  # shipped: pixel space
    assert "pixel space" in caplog.text and not (tmp_path / "d").exists()
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "x"), "--layout", "onnx"])


def test_bad_arguments_and_quantized_models_are_refused(tmp_path):
    pipe = make_pipe()
    with pytest.raises(ValueError, match="layout must be one of"):
        pipe.save_pretrained(tmp_path / "x", layout="onnx")
    with pytest.raises(ValueError, match="dtype must be one of.*float8_e4m3fn"):
        pipe.save_pretrained(tmp_path / "x", dtype=torch.int8)
    for backend in ("native", "torchao"):
        pipe = make_pipe()
        quantize_int8(pipe.model, backend=backend)
        with pytest.raises(ValueError, match="quantized"):
            pipe.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ atomicity
def test_writes_are_atomic(tmp_path, monkeypatch):
    pipe = make_pipe()
    target = pipe.save_pretrained(tmp_path / "model")
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    with pytest.raises(ValueError, match="not empty.*overwrite"):
        pipe.save_pretrained(target)

    def fail(folder):
        assert any(Path(folder).iterdir())  # the weights are already in the temporary folder
        raise OSError("disk full")

    monkeypatch.setattr(pipe.codec, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        pipe.save_pretrained(target, overwrite=True)
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before  # old folder untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left
    monkeypatch.undo()
    pipe.save_pretrained(target, overwrite=True, layout="diffusers")
    assert (target / "model_index.json").is_file() and not (target / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_folder_into_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with atomic_folder(tmp_path / "empty") as tmp:
        (tmp / "a.txt").write_text("a")
    assert (tmp_path / "empty" / "a.txt").read_text() == "a"
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        with atomic_folder(tmp_path / "file"):
            pass


def test_tokenizer_save_keeps_its_config(tmp_path):
    import transformers

    folder = tmp_path / "plain"
    folder.mkdir()
    Tokenizer(make_tokenizer_backend()).save(folder)  # no config read: a minimal one is written
    back = Tokenizer.from_file(folder)
    auto = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in (PROMPT, "low quality , blurry", ""):
        assert back.encode(text) == auto(text).input_ids
    source = tmp_path / "src"
    source.mkdir()
    make_tokenizer_backend().save(str(source / "tokenizer.json"))
    config = '{"tokenizer_class": "LlamaTokenizer", "add_bos_token": false, "custom": 1}'
    (source / "tokenizer_config.json").write_text(config)
    out = tmp_path / "out"
    out.mkdir()
    original = Tokenizer.from_file(source)
    original.save(out)
    assert (out / "tokenizer_config.json").read_text() == config
    assert Tokenizer.from_file(out).encode(PROMPT) == original.encode(PROMPT)
    assert original.encode(PROMPT)[0] != original.bos_token_id  # add_bos_token false survived the trip
