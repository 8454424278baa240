from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omnigen.config import OmniGenConfig
from omnigen.model import OmniGenModel
from omnigen.pipeline import OmniGenPipeline
from omnigen.weights.checkpoint import CheckpointError, load_model, save_model
from omnigen.weights.keymap import ours_to_diffusers

FIXTURES = Path(__file__).parent / "fixtures"


def test_full_size_model_has_the_official_keys_and_shapes():
    config = OmniGenConfig.load(FIXTURES / "omnigen_v1_config.json")
    reference = json.loads((FIXTURES / "omnigen_v1_checkpoint_keys.json").read_text())
    with torch.device("meta"):
        model = OmniGenModel(config)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == reference["keys"]
    assert model.num_parameters() == reference["num_parameters_excluding_pos_embed"] == 3_762_072_592


def test_official_config_fields_and_longrope_spelling():
    data = json.loads((FIXTURES / "omnigen_v1_config.json").read_text())
    config = OmniGenConfig.from_dict(data)
    assert config.transformer.rope_scaling.type == "su" and config.num_image_tokens(1024, 1024) == 4096
    data["rope_scaling"] = {**data["rope_scaling"], "type": None, "rope_type": "longrope"}
    data.pop("model_type")
    data["some_future_field"] = 1
    assert OmniGenConfig.from_dict(data).transformer.rope_scaling.type == "longrope"


def test_round_trip_official_layout(model_folder, model):
    loaded, layout = load_model(model_folder)
    assert layout.kind == "official"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_diffusers_layout_loads_through_key_map(tmp_path, model, model_folder):
    transformer = tmp_path / "transformer"
    transformer.mkdir()
    save_file(
        ours_to_diffusers(model.state_dict(), model.config),
        str(transformer / "diffusion_pytorch_model.safetensors"),
    )
    (transformer / "config.json").write_text(json.dumps(model.config.to_diffusers_dict()))
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text((model_folder / "tokenizer.json").read_text())
    import shutil

    shutil.copytree(model_folder / "vae", tmp_path / "vae")
    loaded, layout = load_model(tmp_path)
    assert layout.kind == "diffusers"
    # the diffusers config has no latent_downsample: the VAE's factor is the default 8; ours is 2
    diffusers_config = loaded.config
    assert diffusers_config.transformer == model.config.transformer
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_pipeline_from_pretrained_folder(model_folder, rgb_image):
    pipe = OmniGenPipeline.from_pretrained(model_folder)
    assert pipe.defaults.num_inference_steps == 2 and pipe.defaults.negative_prompt == "blurry"
    images = pipe("make it blue <img><|image_1|></img>", [rgb_image()], seed=1, progress=False)
    assert images[0].size == (32, 32)


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape"])
def test_mismatched_checkpoint_names_the_keys(tmp_path, model_folder, damage):
    import shutil

    folder = tmp_path / "damaged"
    shutil.copytree(model_folder, folder)
    state = load_file(str(folder / "model.safetensors"))
    if damage == "missing":
        state.pop("llm.layers.1.mlp.down_proj.weight")
        expected = "missing keys: llm.layers.1.mlp.down_proj.weight"
    elif damage == "unexpected":
        state["llm.layers.9.extra.weight"] = torch.zeros(2)
        expected = "unexpected keys: llm.layers.9.extra.weight"
    else:
        state["final_layer.linear.bias"] = torch.zeros(5)
        expected = r"final_layer.linear.bias: checkpoint \(5,\) vs model \(16,\)"
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=expected):
        load_model(folder)


def test_bad_folders(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="neither an OmniGen folder"):
        load_model(tmp_path)


def test_save_is_safetensors_only(tmp_path, model):
    save_model(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
