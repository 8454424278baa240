"""FP8 checkpoints (omnigen.weights.fp8): kept at one byte per Linear weight, computed through, read in
ComfyUI's scaled-fp8 convention in both layouts, written by ``omnigen export --dtype float8_e4m3fn``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from omnigen.cli.main import main
from omnigen.pipeline import OmniGenPipeline, default_model_path
from omnigen.weights import fp8
from omnigen.weights.checkpoint import WEIGHTS, build_model, load_model
from omnigen.weights.keymap import ours_to_diffusers
from omnigen.weights.packed import dequantized_state
from omnigen.weights.quantize import linear_weight_bytes


def linear_numel(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


@pytest.fixture(scope="module")
def shipped_fp8(tmp_path_factory):
    """The shipped model exported with ``omnigen export --dtype float8_e4m3fn``."""
    out = tmp_path_factory.mktemp("fp8") / "miniworld-fp8"
    assert main(["export", str(out), "--dtype", "float8_e4m3fn"]) == 0
    return out


def generate(pipe: OmniGenPipeline) -> torch.Tensor:
    return pipe("a red square", num_inference_steps=3, seed=0, output_type="pt")


def test_export_writes_the_scaled_fp8_convention(shipped_fp8):
    state = load_file(str(shipped_fp8 / WEIGHTS))
    reference, _ = load_model(default_model_path(), dtype=torch.float32)
    linears = fp8.linear_weight_keys(reference)
    assert state[fp8.MARKER].dtype == torch.float8_e4m3fn
    for key, value in reference.state_dict().items():
        if key in linears:
            scale = state[fp8.scale_key(key)]
            assert state[key].dtype == torch.float8_e4m3fn and scale.dtype == torch.float32, key
            assert scale.item() == pytest.approx(value.abs().max().item() / 448, rel=1e-6), key
            restored = state[key].float() * scale
            assert (restored - value).abs().max() <= value.abs().max() / 16, key  # e4m3: 3 mantissa bits
        elif value.is_floating_point() and key in state:
            assert state[key].dtype == torch.bfloat16, key


def test_fp8_file_loads_at_one_byte_per_linear_weight(shipped_fp8):
    model, _ = load_model(shipped_fp8, dtype=torch.float32)
    numel = linear_numel(model)
    kept = [m for m in model.modules() if isinstance(m, fp8.Fp8Linear)]
    assert kept and all(m.weight.dtype == torch.float8_e4m3fn for m in kept)
    assert all(type(m) is not nn.Linear for m in model.modules())  # every Linear kept in fp8
    fp8_bytes = linear_weight_bytes(model)  # weights + their scale buffers
    assert numel <= fp8_bytes <= numel * 1.01
    bf16, _ = load_model(default_model_path(), dtype=torch.bfloat16)
    assert linear_weight_bytes(bf16) == 2 * numel


def test_outputs_match_the_dequantized_model(shipped_fp8):
    """The fp8 model computes exactly what a float32 model built from its dequantized weights computes."""
    pipe = OmniGenPipeline.from_pretrained(shipped_fp8, dtype=torch.float32)
    state = dequantized_state(pipe.model)
    dense = build_model(pipe.model.config, {k: v.float() for k, v in state.items()})
    assert not any(isinstance(m, fp8.Fp8Linear) for m in dense.modules())
    got = generate(pipe)
    want = generate(OmniGenPipeline(dense, *_parts(pipe)))
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    # and it is an approximation of the shipped float32 model, not something else
    shipped = generate(OmniGenPipeline.from_pretrained(None, dtype=torch.float32))
    assert psnr(got, shipped) > 20


def test_round_trip_fp8_export_load_export(shipped_fp8, tmp_path):
    """An fp8-loaded model exports (dequantized) to float32 and fp8 again, and the fp8 file is the same."""
    again = tmp_path / "again"
    assert main(["export", str(again), "--model", str(shipped_fp8), "--dtype", "float8_e4m3fn"]) == 0
    first, second = load_file(str(shipped_fp8 / WEIGHTS)), load_file(str(again / WEIGHTS))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key].float(), second[key].float()), key
    dense = tmp_path / "dense"
    assert main(["export", str(dense), "--model", str(shipped_fp8), "--dtype", "float32"]) == 0
    loaded, _ = load_model(dense)
    assert not any(isinstance(m, fp8.Fp8Linear) for m in loaded.modules())
    reference, _ = load_model(shipped_fp8, dtype=torch.float32)
    for key, value in dequantized_state(reference).items():
        assert torch.equal(loaded.state_dict()[key], value.float()), key


def test_scaled_convention_per_layer_scales_plain_casts_and_scale_input(model_folder, model, tmp_path):
    """Hand-made files: a scaled layer (scale 0.25: values must be multiplied back), a plain-cast layer
    (no scale: scale 1), a ``scale_input`` (read and dropped), and an fp8 tensor that is not a Linear
    weight (dequantized to the compute dtype)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    scaled, plain = "llm.layers.0.mlp.down_proj.weight", "llm.layers.1.mlp.down_proj.weight"
    state[scaled] = (model.state_dict()[scaled] / 0.25).to(fp8.FP8)
    state[fp8.scale_key(scaled)] = torch.tensor(0.25)
    state[scaled.removesuffix("weight") + "scale_input"] = torch.tensor(1.0)
    state[plain] = model.state_dict()[plain].to(fp8.FP8)
    norm = "llm.norm.weight"
    state[norm] = model.state_dict()[norm].to(fp8.FP8)
    state[fp8.MARKER] = torch.empty(0, dtype=fp8.FP8)
    folder = tmp_path / "scaled"
    shutil.copytree(model_folder, folder)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS))
    loaded, _ = load_model(folder, dtype=torch.float32)
    for key, scale in ((scaled, 0.25), (plain, 1.0)):
        layer = loaded.get_submodule(key.removesuffix(".weight"))
        assert isinstance(layer, fp8.Fp8Linear) and layer.weight_scale.item() == scale
        assert torch.equal(layer.dequantized_weight(torch.float32), state[key].float() * scale)
    assert torch.equal(loaded.state_dict()[norm], state[norm].float())
    assert loaded.state_dict()[norm].dtype == torch.float32
    other = loaded.get_submodule("llm.layers.0.mlp.gate_up_proj")
    assert type(other) is nn.Linear and other.weight.dtype == torch.float32


def test_diffusers_layout_scaled_fp8_with_separately_scaled_qkv(model_folder, model, tmp_path):
    """diffusers names: to_q/to_k/to_v each with its own scale fuse into one qkv_proj with a scale per row."""
    theirs = ours_to_diffusers(model.state_dict(), model.config)
    linears = set(
        ours_to_diffusers({k: model.state_dict()[k] for k in fp8.linear_weight_keys(model)}, model.config)
    )
    state = fp8.scaled_state(theirs, linears)
    q, k = "layers.0.self_attn.to_q.weight", "layers.0.self_attn.to_k.weight"
    assert state[fp8.scale_key(q)] != state[fp8.scale_key(k)]
    folder = tmp_path / "diffusers"
    (folder / "transformer").mkdir(parents=True)
    save_file(state, str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    (folder / "transformer" / "config.json").write_text(json.dumps(model.config.to_diffusers_dict()))
    shutil.copytree(model_folder / "vae", folder / "vae")
    loaded, layout = load_model(folder, dtype=torch.float32)
    assert layout.kind == "diffusers"
    qkv = loaded.llm.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, fp8.Fp8Linear) and qkv.weight_scale.shape == (qkv.out_features, 1)
    rows = model.llm.layers[0].self_attn.qkv_proj.weight.shape[0]
    assert qkv.weight.shape[0] == rows
    restored = torch.cat(
        [state[n].float() * state[fp8.scale_key(n)] for n in (q, k, q.replace("to_q", "to_v"))]
    )
    assert torch.equal(qkv.dequantized_weight(torch.float32), restored)
    want = model.llm.layers[0].self_attn.qkv_proj.weight
    assert (restored - want).abs().max() <= want.abs().max() / 16


def test_quantize_fp8_keeps_one_byte_and_stays_close():
    """``--quantize fp8`` on a float model: Fp8Linear decoder layers, ~1 byte per weight, close outputs."""
    from omnigen.weights.quantize import quantize

    model, _ = load_model(default_model_path(), dtype=torch.float32)
    before = linear_weight_bytes(model.llm.layers)
    pipe = OmniGenPipeline(model, *_parts(OmniGenPipeline.from_pretrained(None, dtype=torch.float32)))
    want = generate(pipe)
    assert quantize(model, "fp8") == "native"
    after = linear_weight_bytes(model.llm.layers)
    assert before / 4 <= after <= before / 4 * 1.01
    assert psnr(generate(pipe), want) > 25


def _parts(pipe: OmniGenPipeline):
    return pipe.codec, pipe.tokenizer, pipe.defaults, pipe.device


def test_fp8_linear_refuses_a_float_weight():
    with pytest.raises(TypeError, match="fp8 weight"):
        fp8.Fp8Linear(torch.zeros(2, 2), torch.tensor(1.0), None)


def test_formats_doc_commands_run(tmp_path):
    """docs/formats.md's commands (the benchmark's --quick mode) run and print both tables."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from readme_blocks import RUN_LANGUAGES, read_blocks, shell_commands

    root = Path(__file__).resolve().parents[1]
    blocks = [
        b for b in read_blocks((root / "docs" / "formats.md").read_text()) if b.language in RUN_LANGUAGES
    ]
    commands = [c.text for b in blocks if b.marker != "skip" for c in shell_commands(b)]
    bench = [c for c in commands if "bench_formats" in c]
    assert bench and all("--quick" in c for c in bench)
    (tmp_path / "benchmarks").symlink_to(
        root / "benchmarks"
    )  # relative paths work, nothing lands in the repo
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    for command in commands:
        command = command.replace("python ", f"{sys.executable} ", 1)
        proc = subprocess.run(
            command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        if "bench_formats" in command:
            for fmt in ("bf16", "fp32", "int8", "fp8", "q8_0", "q4_0"):
                assert f"| {fmt} |" in proc.stdout
    assert (tmp_path / "fp8.png").is_file() and (tmp_path / "q8.png").is_file()


def test_torchao_float8_path_where_fp8_matmuls_exist(shipped_fp8, monkeypatch):
    """The GPU path (compute capability >= 8.9) swaps each Fp8Linear for a Linear holding torchao's
    Float8Tensor; torchao's tensor also runs on CPU, so the swap is checked here as if on such a GPU."""
    pytest.importorskip("torchao")
    native, _ = load_model(shipped_fp8, dtype=torch.bfloat16)
    monkeypatch.setattr(fp8, "has_fp8_matmul", lambda device: True)
    fast, _ = load_model(shipped_fp8, dtype=torch.bfloat16)
    proj = fast.llm.layers[0].mlp.down_proj
    assert type(proj) is nn.Linear and type(proj.weight).__name__ == "Float8Tensor"
    assert not any(isinstance(m, fp8.Fp8Linear) for m in fast.modules())
    assert linear_weight_bytes(fast) <= linear_numel(fast) * 1.1  # one byte + a scale per row
    pipes = [OmniGenPipeline(m, *_parts(OmniGenPipeline.from_pretrained(None))) for m in (native, fast)]
    want = native.llm.layers[0].mlp.down_proj.dequantized_weight(torch.float32)
    got = proj.weight.dequantize().float()  # requantized per row from the per-tensor fp8 values
    assert (got - want).abs().max() <= want.abs().max() / 16
    assert psnr(generate(pipes[1]), generate(pipes[0])) > 25  # two fp8 roundings; bf16 vs fp32 is ~40


@pytest.mark.parametrize("backend", ["torchao", "native"])
def test_int8_on_an_fp8_checkpoint_leaves_the_fp8_layers(shipped_fp8, backend):
    """``--memory low`` (int8) on an fp8 file: its fp8 layers stay fp8 (torchao would fail on them)."""
    from omnigen.weights.quantize import quantize_int8

    if backend == "torchao":
        pytest.importorskip("torchao")
    model, _ = load_model(shipped_fp8, dtype=torch.float32)
    before = linear_weight_bytes(model.llm.layers)
    quantize_int8(model, backend=backend)
    assert all(
        isinstance(m, fp8.Fp8Linear) for m in model.llm.layers[0].modules() if isinstance(m, nn.Linear)
    )
    assert linear_weight_bytes(model.llm.layers) == before
