"""GGUF files (omnigen.weights.gguf_file, omnigen.weights.ggml): quantized Linear weights kept in their
GGML blocks and dequantized in torch at each matmul (checked bit for bit against the gguf package's numpy
``dequantize``), both key layouts, written by ``omnigen export --dtype q8_0``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from omnigen.cli.main import main
from omnigen.pipeline import OmniGenPipeline
from omnigen.weights import ggml, gguf_file, lora, packed
from omnigen.weights.checkpoint import build_model, load_model, resolve_layout
from omnigen.weights.keymap import ours_to_diffusers
from omnigen.weights.packed import dequantized_state
from omnigen.weights.quantize import linear_weight_bytes

gguf = pytest.importorskip("gguf")

from conftest import random_model, tiny_config, tiny_pipeline  # noqa: E402

# where each block type keeps its float16 scale(s), to make random blocks finite
F16_AT = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2)}
F16_AT.update({"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)})


def psnr(got: torch.Tensor, want: torch.Tensor) -> float:
    peak = want.abs().max().item()
    mse = (got.float() - want.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


@pytest.fixture(scope="module")
def pipe(tokenizer):
    return tiny_pipeline(random_model(tiny_config()), tokenizer, negative_prompt="low quality , blurry")


@pytest.fixture(scope="module")
def exported(pipe, tmp_path_factory):
    """The tiny pipeline written as Q8_0 and as Q4_0 (``save_pretrained(dtype="q8_0")``)."""
    root = tmp_path_factory.mktemp("gguf")
    return {q: pipe.save_pretrained(root / q, dtype=q) for q in ("q8_0", "q4_0")}


def latents(pipe: OmniGenPipeline) -> torch.Tensor:
    return pipe("a red cat", seed=3, progress=False, output_type="latent")


@pytest.mark.parametrize("qtype", sorted(ggml.BLOCKS))
def test_torch_dequantization_equals_gguf_numpy_bit_for_bit(qtype):
    kind = gguf.GGMLQuantizationType[qtype]
    block, size = ggml.BLOCKS[qtype]
    rng = np.random.default_rng(0)
    if qtype in map(str.upper, gguf_file.WRITE_TYPES):  # real quantized weights
        data = gguf.quants.quantize(rng.normal(0, 0.05, (6, 4 * block)).astype(np.float32), kind)
    else:  # gguf quantizes no K-type in python: random blocks with finite scales
        data = rng.integers(0, 256, (6, 2 * size), dtype=np.uint8)
        blocks = data.reshape(-1, size)
        for at in F16_AT[qtype]:
            blocks[:, at : at + 2] = rng.normal(0, 0.01, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    want = torch.from_numpy(gguf.quants.dequantize(data, kind))
    got = ggml.dequantize(torch.from_numpy(data.copy()), qtype, tuple(want.shape))
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert want.abs().max() > 0


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_a_layer_dequantizes_to_bf16_in_chunks_with_one_rounding(qtype, monkeypatch):
    """In bf16 a CPU layer dequantizes a few rows at a time: the same values as the float32 reference,
    rounded once, whatever the chunk (here 3 rows of 256 per chunk, 7 rows)."""
    block, size = ggml.BLOCKS[qtype]
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (7, size), dtype=np.uint8)
    for at in F16_AT[qtype]:
        data[:, at : at + 2] = rng.normal(0, 0.01, (7, 1)).astype(np.float16).view(np.uint8)
    layer = ggml.GgufLinear(torch.from_numpy(data), qtype, block, None)
    want = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]))
    monkeypatch.setattr(packed, "CHUNK", 3 * block)
    assert torch.equal(layer.dequantized_weight(torch.bfloat16), want.to(torch.bfloat16))
    assert torch.equal(layer.dequantized_weight(torch.float32), want)
    x = torch.randn(2, block, dtype=torch.bfloat16)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, want.to(torch.bfloat16)))


def test_every_packed_linear_dequantizes_in_chunks_as_a_whole(monkeypatch):
    """fp8 (a scale per row), native int8 and GGUF layers: chunks of 3 rows give the whole matrix's values."""
    from omnigen.weights.fp8 import Fp8Linear
    from omnigen.weights.quantize import Int8Linear

    dense = nn.Linear(64, 7, bias=True)
    fp8 = Fp8Linear(dense.weight.to(torch.float8_e4m3fn), torch.rand(7, 1) + 0.5, dense.bias)
    layers = [fp8, Int8Linear.from_linear(dense), gguf_file.packed_linear(dense, "q4_1")]
    x = torch.randn(2, 64)
    for layer in layers:
        whole = {d: layer.dequantized_weight(d) for d in (torch.float32, torch.bfloat16)}
        with monkeypatch.context() as patch:
            patch.setattr(packed, "CHUNK", 3 * 64)
            for dtype, want in whole.items():
                assert torch.equal(layer.dequantized_weight(dtype), want), (type(layer), dtype)
            assert torch.equal(layer(x), torch.nn.functional.linear(x, whole[torch.float32], layer.bias))


def test_q8_0_export_loads_packed_at_about_1_06_bytes_per_weight(exported, pipe):
    folder = exported["q8_0"]
    assert (folder / gguf_file.WEIGHTS).is_file() and not (folder / "model.safetensors").exists()
    reader = gguf.GGUFReader(str(folder / gguf_file.WEIGHTS))
    arch = reader.get_field("general.architecture")
    assert bytes(arch.parts[arch.data[-1]]).decode() == gguf_file.ARCH
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["llm.layers.0.self_attn.qkv_proj.weight"] == "Q8_0"
    assert types["llm.norm.weight"] == "F32"  # not a Linear: as stored
    model, _ = load_model(folder, dtype=torch.float32)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, ggml.GgufLinear) and m.weight.dtype == torch.uint8 for m in linears)
    numel = sum(m.out_features * m.in_features for m in linears)
    assert linear_weight_bytes(model) == numel * 34 // 32  # 1.0625 bytes per weight
    assert linear_weight_bytes(pipe.model) == 4 * numel  # the float32 original


# measured: Q8_0 56.5 dB on the weights, 42.7 dB on the latents; Q4_0 32.3 and 18.4 dB
@pytest.mark.parametrize("qtype, min_state_psnr, min_psnr", [("q8_0", 50.0, 35.0), ("q4_0", 28.0, 14.0)])
def test_outputs_equal_own_dequantization_and_approach_the_original(
    exported, pipe, qtype, min_state_psnr, min_psnr
):
    loaded = OmniGenPipeline.from_pretrained(exported[qtype], dtype=torch.float32)
    state = dequantized_state(loaded.model)
    dense = build_model(loaded.model.config, state)
    assert not any(isinstance(m, ggml.GgufLinear) for m in dense.modules())
    got = latents(loaded)
    assert torch.equal(got, latents(OmniGenPipeline(dense, loaded.codec, loaded.tokenizer, loaded.defaults)))
    original = pipe.model.state_dict()
    worst = min(psnr(state[k], original[k]) for k in state if k.endswith("proj.weight"))
    assert min_state_psnr < worst < 80  # quantized, and close
    assert psnr(got, latents(pipe)) > min_psnr


def test_diffusers_names_prefix_fused_qkv_and_a_gguf_file_path(model_folder, pipe, tmp_path):
    """A community-style file: diffusers' names behind ComfyUI's prefix, to_q/to_k/to_v quantized apart
    (fused into one packed qkv), a quantized non-Linear tensor (dequantized at load), beside config.json."""
    folder = tmp_path / "community"
    folder.mkdir()
    for item in model_folder.iterdir():
        if item.name != "model.safetensors":
            (folder / item.name).symlink_to(item)
    model = pipe.model
    state = {k: v.detach() for k, v in model.state_dict().items()}
    quantized = {k for k in state if k.endswith("proj.weight") or k == "llm.embed_tokens.weight"}
    renamed = ours_to_diffusers(state, model.config)
    names = set(ours_to_diffusers({k: state[k] for k in quantized}, model.config))
    prefixed = {gguf_file.PREFIX + k: v for k, v in renamed.items()}
    gguf_file.write(folder / "omnigen-Q5_1.gguf", prefixed, {gguf_file.PREFIX + k for k in names}, "q5_1")
    assert resolve_layout(folder).weights_name == "omnigen-Q5_1.gguf"
    loaded, layout = load_model(folder / "omnigen-Q5_1.gguf", dtype=torch.float32)
    assert layout.root == folder
    qkv = loaded.llm.layers[1].self_attn.qkv_proj
    assert isinstance(qkv, ggml.GgufLinear) and qkv.qtype == "Q5_1"
    parts = [renamed[f"layers.1.self_attn.to_{n}.weight"] for n in "qkv"]
    kind = gguf.GGMLQuantizationType.Q5_1
    want = [gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), kind), kind) for p in parts]
    assert torch.equal(qkv.dequantized_weight(torch.float32), torch.from_numpy(np.concatenate(want)))
    embed = loaded.llm.embed_tokens.weight
    assert embed.dtype == torch.float32 and 20 < psnr(embed, state["llm.embed_tokens.weight"]) < 80
    (folder / "second.gguf").symlink_to(folder / "omnigen-Q5_1.gguf")
    with pytest.raises(ValueError, match="several GGUF files"):
        resolve_layout(folder)


def test_an_unsupported_type_is_refused_by_name(model_folder, pipe, tmp_path):
    folder = tmp_path / "q2k"
    folder.mkdir()
    for item in model_folder.iterdir():
        if item.name != "model.safetensors":
            (folder / item.name).symlink_to(item)
    writer = gguf.GGUFWriter(path=None, arch=gguf_file.ARCH)
    for key, value in pipe.model.state_dict().items():
        writer.add_tensor(key, value.detach().float().numpy())
    kind = gguf.GGMLQuantizationType.Q2_K
    writer.add_tensor("extra.weight", np.zeros((4, 84), dtype=np.uint8), raw_dtype=kind)
    writer.write_header_to_file(path=str(folder / "model.gguf"))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        ValueError, match=r"'extra.weight' is stored as GGML type Q2_K.*supported types: .*Q8_0"
    ):
        load_model(folder)


def test_lora_on_gguf_weights_adds_to_the_output_and_merging_is_refused(exported):
    loaded = OmniGenPipeline.from_pretrained(exported["q8_0"], dtype=torch.float32)
    layer = loaded.model.llm.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    base = layer(x)
    lora.add_lora(loaded.model, rank=2, alpha=2)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    adapted = loaded.model.llm.layers[0].mlp.down_proj
    a, b = adapted.lora_A["default"], adapted.lora_B["default"]
    assert isinstance(adapted.get_base_layer(), ggml.GgufLinear)
    assert torch.allclose(adapted(x), base + b(a(x)), atol=1e-6)
    assert not torch.allclose(adapted(x), base, atol=1e-3)
    with pytest.raises(ValueError, match="cannot merge a LoRA adapter into .*GgufLinear"):
        lora.merge_lora(loaded.model)
    with pytest.raises(ValueError, match="packed"):
        lora.unload_lora(loaded.model, merge=True)
    lora.unload_lora(loaded.model)
    assert torch.equal(loaded.model.llm.layers[0].mlp.down_proj(x), base)


def test_cli_export_reexport_and_refusals(exported, pipe, tmp_path):
    q4 = tmp_path / "q4"
    assert main(["export", str(q4), "--model", str(exported["q8_0"]), "--dtype", "q4_0"]) == 0
    model, _ = load_model(q4)
    assert {m.qtype for m in model.modules() if isinstance(m, ggml.GgufLinear)} == {"Q4_0"}
    dense = tmp_path / "dense"
    assert main(["export", str(dense), "--model", str(exported["q8_0"]), "--dtype", "float32"]) == 0
    back, _ = load_model(dense)
    reference, _ = load_model(exported["q8_0"], dtype=torch.float32)
    for key, value in dequantized_state(reference).items():
        assert torch.equal(back.state_dict()[key], value), key
    with pytest.raises(ValueError, match="original layout only"):
        pipe.save_pretrained(tmp_path / "d", layout="diffusers", dtype="q8_0")
    with pytest.raises(ValueError, match="dtype must be one of.*q4_0"):
        pipe.save_pretrained(tmp_path / "d", dtype="q3_k")
    with pytest.raises(TypeError, match="GgufLinear needs"):
        ggml.GgufLinear(torch.zeros(2, 34), "Q8_0", 32, None)
    with pytest.raises(ValueError, match="not Q8_0 rows of 64"):
        ggml.GgufLinear(torch.zeros(2, 34, dtype=torch.uint8), "Q8_0", 64, None)
    assert not (tmp_path / "d").exists()
