"""Loading in a dtype: the streaming loader's memory and dtypes, and module casts that keep the fp32 rotary
tables (a cast model must equal a model loaded in that dtype, also past position 4096)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from conftest import random_model, tiny_config
from omnigen.config import OmniGenConfig, TransformerConfig
from omnigen.model.layers import RotaryEmbedding
from omnigen.types import Condition
from omnigen.weights.checkpoint import load_model, save_model
from omnigen.weights.keymap import ours_to_diffusers

CASTS = {torch.bfloat16: lambda m: m.to(torch.bfloat16), torch.float16: lambda m: m.half()}


def long_context_config() -> OmniGenConfig:
    """The tiny model with OmniGen-v1's rotary lengths: long factors past 4096, scaling from 131072."""
    config = tiny_config(long_rope=False)
    return dataclasses.replace(
        config, transformer=dataclasses.replace(config.transformer, max_position_embeddings=131072)
    )


@pytest.mark.parametrize("dtype", list(CASTS), ids=["bf16", "fp16"])
def test_rotary_tables_stay_fp32_through_casts(dtype):
    config = long_context_config().transformer
    fp32 = RotaryEmbedding(config)
    cast = CASTS[dtype](RotaryEmbedding(config))
    assert all(
        getattr(cast, name).dtype == torch.float32 for name in ("base_freq", "short_factor", "long_factor")
    )
    positions = torch.arange(8192)[None]
    for got, want in zip(cast(positions, positions[:, -1]), fp32(positions, positions[:, -1]), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", list(CASTS), ids=["bf16", "fp16"])
def test_cast_model_equals_model_loaded_in_that_dtype(tmp_path, dtype):
    """``model.to(dtype)`` / ``.half()`` after an fp32 load == loading with ``dtype=``: bit-equal velocities
    on a condition of 4150 tokens (positions past 4096: the long rotary factors)."""
    config = long_context_config()
    save_model(random_model(config, scale=0.05), tmp_path)
    loaded, _ = load_model(tmp_path, dtype=dtype)
    cast = CASTS[dtype](load_model(tmp_path)[0])
    assert loaded.llm.rotary.base_freq.dtype == cast.llm.rotary.base_freq.dtype == torch.float32
    for (name, a), b in zip(loaded.state_dict().items(), cast.state_dict().values(), strict=True):
        assert a.dtype == b.dtype == dtype and torch.equal(a, b), name
    length = 4150
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.transformer.vocab_size, (1, length), generator=generator)
    condition = Condition(ids, torch.ones(1, length, dtype=torch.bool), [[]], [[]])
    x, t = torch.randn(1, 4, 4, 4, generator=generator), torch.tensor([0.3])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, condition=condition), cast(x, t, condition=condition))


def test_load_in_dtype_casts_every_floating_tensor(model_folder, model):
    loaded, _ = load_model(model_folder, dtype=torch.bfloat16)
    for name, value in model.state_dict().items():
        got = loaded.state_dict()[name]
        assert got.dtype == torch.bfloat16 and torch.equal(got, value.to(torch.bfloat16)), name
    assert loaded.llm.rotary.base_freq.dtype == torch.float32
    assert not any(p.is_meta for p in loaded.parameters())


def test_diffusers_and_sharded_layouts_stream_in_a_dtype(tmp_path, model, model_folder):
    """The diffusers layout (q/k/v fused on the fly) and a sharded official layout load in bf16 and give the
    same tensors as the single-file official layout."""
    import shutil

    expected = load_model(model_folder, dtype=torch.bfloat16)[0].state_dict()
    diffusers = tmp_path / "diffusers"
    (diffusers / "transformer").mkdir(parents=True)
    state = ours_to_diffusers(model.state_dict(), model.config)
    save_file(state, str(diffusers / "transformer" / "diffusion_pytorch_model.safetensors"))
    (diffusers / "transformer" / "config.json").write_text(json.dumps(model.config.to_diffusers_dict()))
    shutil.copytree(model_folder / "vae", diffusers / "vae")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((model_folder / "config.json").read_text())
    names = sorted(model.state_dict())
    weight_map = {}
    for shard, keys in (("model-1.safetensors", names[::2]), ("model-2.safetensors", names[1::2])):
        save_file({k: model.state_dict()[k].contiguous() for k in keys}, str(sharded / shard))
        weight_map.update(dict.fromkeys(keys, shard))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for folder in (diffusers, sharded):
        got = load_model(folder, dtype=torch.bfloat16)[0].state_dict()
        for name, value in expected.items():
            assert torch.equal(got[name], value), (folder.name, name)


PEAK_SCRIPT = """
import sys, torch
from omnigen.weights.checkpoint import load_model
torch.set_num_threads(1)
with torch.device("meta"):  # the first meta-device op imports ~75 MB of torch; a constant, not the file
    torch.empty(1) + 1
def rss(field):  # kB in /proc/self/status; VmHWM is this process's peak (ru_maxrss keeps the parent's)
    line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024
base = rss("VmRSS")
model, _ = load_model(sys.argv[1], dtype=torch.bfloat16)
print("GROWTH", rss("VmHWM") - base, sum(t.numel() * t.element_size() for t in model.state_dict().values()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_streaming_load_peaks_far_below_the_file(tmp_path):
    """fp32 -> bf16 load of a 100 MB checkpoint in a fresh process: resident memory grows by the bf16 model
    plus about one tensor (a loader that reads the whole file first grows by the file plus the copy)."""
    transformer = TransformerConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_layers=24,
        num_heads=4,
        num_kv_heads=4,
        vocab_size=4096,
        pad_token_id=0,
    )
    config = OmniGenConfig(transformer, pos_embed_max_size=16)
    torch.manual_seed(0)
    save_model(random_model(config, scale=0.02), tmp_path)
    file_bytes = (tmp_path / "model.safetensors").stat().st_size
    assert file_bytes > 90e6
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PEAK_SCRIPT), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    growth, model_bytes = (int(x) for x in out.split("GROWTH")[1].split())
    assert model_bytes == pytest.approx(file_bytes / 2, rel=0.01)
    # a loader that reads the whole file first grows by the file plus the bf16 copy (1.5x the file); this
    # one by the copy (0.5x) plus the modules the load imports on first use, which vary by 10-25 MB between
    # runs (61-79 MB measured on this 102 MB file): the bound sits between the two
    assert growth < file_bytes, (growth / 2**20, file_bytes / 2**20)


def test_a_config_that_does_not_describe_its_weights_fails_before_the_model_is_built(tmp_path, monkeypatch):
    """config.json saying num_hidden_layers: 1000000 (or another MLP size) over a small file: a
    CheckpointError from the headers, and no model of the config's size is ever built."""
    from omnigen.weights import checkpoint
    from omnigen.weights.checkpoint import CheckpointError

    save_model(random_model(tiny_config()), tmp_path / "m")
    built = []
    real = checkpoint.OmniGenModel

    def guarded(config):
        built.append(config.transformer.num_layers)
        if config.transformer.num_layers > 100:
            raise AssertionError(f"built a model of the config's size: {config.transformer}")
        return real(config)

    monkeypatch.setattr(checkpoint, "OmniGenModel", guarded)
    data = json.loads((tmp_path / "m" / "config.json").read_text())
    layers = data["num_hidden_layers"]
    for key, value, message in (
        (
            "num_hidden_layers",
            1_000_000,
            f"num_hidden_layers=1000000 but the weights hold layers 0 to {layers - 1}",
        ),
        ("num_hidden_layers", layers - 1, f"unexpected keys: llm.layers.{layers - 1}."),
        ("intermediate_size", 1_000_000, "shape mismatches: .*mlp"),
    ):
        (tmp_path / "m" / "config.json").write_text(json.dumps({**data, key: value}))
        with pytest.raises(CheckpointError, match=message):
            load_model(tmp_path / "m")
    assert built and max(built) <= 1  # only the one-layer model the headers are checked against


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load_naming_the_tensor_and_file(tmp_path, value):
    from safetensors.torch import load_file

    from omnigen.pipeline import OmniGenPipeline
    from omnigen.weights.checkpoint import CheckpointError

    save_model(random_model(tiny_config()), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    state["llm.layers.1.mlp.down_proj.weight"][3, 5] = value
    save_file(state, str(weights))
    expected = f"{weights}: tensor 'llm.layers.1.mlp.down_proj.weight' holds NaN or infinite values"
    with pytest.raises(CheckpointError, match=expected.replace(".", r"\.")):
        load_model(tmp_path / "m")
    with pytest.raises(CheckpointError, match="llm.layers.1.mlp.down_proj.weight"):
        OmniGenPipeline.from_pretrained(tmp_path / "m", device="cpu")


def test_weights_that_overflow_the_load_dtype_are_refused(tmp_path):
    from safetensors.torch import load_file

    from omnigen.weights.checkpoint import CheckpointError

    save_model(random_model(tiny_config()), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    state["final_layer.linear.weight"][0, 0] = 1e6  # finite in fp32, inf in fp16
    save_file(state, str(weights))
    assert load_model(tmp_path / "m")[0] is not None
    with pytest.raises(CheckpointError, match="'final_layer.linear.weight'.*once cast to torch.float16"):
        load_model(tmp_path / "m", dtype=torch.float16)
