"""LoRA: adapters on the projections, peft's file format (ours and the original OmniGen's), merge/unmerge,
and LoRA training that changes nothing but the adapter."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import random_model, randomize_adapter, tiny_config, tiny_pipeline
from omnigen.text.collate import collate
from omnigen.text.processor import OmniGenProcessor
from omnigen.weights import lora
from test_training import PIXEL_MODEL, make_config, world  # noqa: F401 - `world` is a fixture

peft = pytest.importorskip("peft")
EDIT = "make it blue <img><|image_1|></img>"


@pytest.fixture(scope="module")
def inputs(tokenizer):
    """(x, t, condition) for the tiny model: an edit prompt with one input image."""
    config = tiny_config()
    g = torch.Generator().manual_seed(5)
    prompt = OmniGenProcessor(tokenizer, config, 32)(EDIT, [torch.rand(3, 32, 32, generator=g) * 2 - 1])
    condition = collate([prompt], [[torch.randn(4, 16, 16, generator=g)]], config.transformer.pad_token_id)
    return torch.randn(1, 4, 16, 16, generator=g), torch.tensor([0.4]), condition


def velocity(model, inputs):
    x, t, condition = inputs
    with torch.no_grad():
        return model(x, t, condition=condition)


def make_pipeline(tokenizer, seed=0):
    return tiny_pipeline(random_model(tiny_config(), seed), tokenizer, negative_prompt="blurry")


def generate(pipe):
    return pipe("a red cat", seed=1, progress=False, output_type="latent")


def test_add_lora_targets_the_projections_and_freezes_the_base(inputs):
    model = random_model(tiny_config())
    before = velocity(model, inputs)
    lora.add_lora(model, rank=4, alpha=8)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert len(trainable) == 2 * 4 * 2  # A and B x 4 projections x 2 layers
    assert all(".lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    torch.testing.assert_close(velocity(model, inputs), before, atol=0, rtol=0)  # B = 0 at start
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        lora.add_lora(model, rank=2, alpha=2)
    with pytest.raises(ValueError, match="match no module"):
        lora.add_lora(random_model(tiny_config()), rank=2, alpha=2, target_modules=["q_proj"])


def test_save_then_load_gives_the_same_outputs(inputs, tmp_path):
    model = random_model(tiny_config())
    base_out = velocity(model, inputs)
    lora.add_lora(model, rank=4, alpha=8)
    randomize_adapter(model)
    expected = velocity(model, inputs)
    assert (expected - base_out).abs().max() > 1e-3  # the adapter matters
    lora.save_lora(model, tmp_path / "adapter", base_model="some/base")

    keys = load_file(str(tmp_path / "adapter" / lora.WEIGHTS_NAME)).keys()
    assert "base_model.model.llm.layers.0.self_attn.qkv_proj.lora_A.weight" in keys
    assert "base_model.model.llm.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 16
    saved = json.loads((tmp_path / "adapter" / lora.CONFIG_NAME).read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 8 and saved["base_model_name_or_path"] == "some/base"

    fresh = random_model(tiny_config())
    lora.load_lora(fresh, tmp_path / "adapter")
    torch.testing.assert_close(velocity(fresh, inputs), expected, atol=0, rtol=0)
    lora.set_lora_scale(fresh, 0.0)
    torch.testing.assert_close(velocity(fresh, inputs), base_out, atol=0, rtol=0)
    lora.unload_lora(fresh)
    assert not lora.has_lora(fresh)
    torch.testing.assert_close(velocity(fresh, inputs), base_out, atol=0, rtol=0)


def test_original_omnigen_adapter_loads(inputs, tmp_path):
    """What the original OmniGen's train.py writes: get_peft_model(model, LoraConfig(target_modules=
    ["qkv_proj", "o_proj"], init_lora_weights="gaussian")) ... PeftModel.save_pretrained(folder)."""
    base = random_model(tiny_config())
    original = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["qkv_proj", "o_proj"]
        ),
    )
    randomize_adapter(original, seed=3)
    x, t, condition = inputs
    with torch.no_grad():
        expected = original(x, t, condition=condition)  # PeftModel passes the call through
    original.save_pretrained(str(tmp_path / "original"))
    keys = load_file(str(tmp_path / "original" / "adapter_model.safetensors")).keys()
    assert "base_model.model.llm.layers.0.self_attn.qkv_proj.lora_A.weight" in keys

    lora.load_lora(base, tmp_path / "original")
    got = velocity(base, inputs)
    assert (got - velocity(random_model(tiny_config()), inputs)).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)

    # ... and ours reads back with peft's own loader, as the original pipeline's merge_lora does
    lora.save_lora(base, tmp_path / "ours")
    reloaded = peft.PeftModel.from_pretrained(random_model(tiny_config()), str(tmp_path / "ours"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, t, condition=condition), expected, atol=1e-6, rtol=0)


def test_adapter_that_does_not_fit_is_refused(tmp_path):
    model = random_model(tiny_config())
    lora.add_lora(model, rank=4, alpha=4)
    lora.save_lora(model, tmp_path / "a")
    wider = tiny_config()
    from dataclasses import replace

    wider = replace(
        wider,
        transformer=replace(
            wider.transformer, hidden_size=64, intermediate_size=96, num_heads=8, num_kv_heads=8
        ),
    )
    with pytest.raises(Exception, match="size mismatch|does not fit"):
        lora.load_lora(random_model(wider), tmp_path / "a")
    (tmp_path / "a" / lora.WEIGHTS_NAME).rename(tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(ValueError, match="only safetensors"):
        lora.load_lora(random_model(tiny_config()), tmp_path / "a")


def test_pipeline_merge_equals_unmerged_and_unload_restores(tokenizer, inputs, tmp_path):
    pipe = make_pipeline(tokenizer)
    base_out, base_velocity = generate(pipe), velocity(pipe.model, inputs)
    donor = random_model(tiny_config())
    lora.add_lora(donor, rank=4, alpha=8)
    randomize_adapter(donor, scale=0.1)
    lora.save_lora(donor, tmp_path / "adapter")

    pipe.load_lora(tmp_path / "adapter")
    unmerged, unmerged_velocity = generate(pipe), velocity(pipe.model, inputs)
    assert (unmerged - base_out).abs().max() > 1e-3
    pipe.merge_lora()
    assert all(layer.merged for layer in lora.lora_layers(pipe.model).values())
    torch.testing.assert_close(velocity(pipe.model, inputs), unmerged_velocity, atol=1e-5, rtol=0)
    # two guided sampling steps amplify fp32 rounding of the merged weights a little
    torch.testing.assert_close(generate(pipe), unmerged, atol=1e-4, rtol=0)
    pipe.unmerge_lora()
    torch.testing.assert_close(velocity(pipe.model, inputs), unmerged_velocity, atol=1e-5, rtol=0)
    pipe.merge_lora()
    pipe.unload_lora()  # unmerges first: back to the base weights
    assert not lora.has_lora(pipe.model)
    torch.testing.assert_close(velocity(pipe.model, inputs), base_velocity, atol=1e-5, rtol=0)
    torch.testing.assert_close(generate(pipe), base_out, atol=1e-4, rtol=0)

    pipe.load_lora(tmp_path / "adapter", scale=0.5)
    half = velocity(pipe.model, inputs)
    # (the base went through merge + unmerge: fp32 rounding)
    torch.testing.assert_close(half, velocity(donor_at_scale(donor, 0.5), inputs), atol=1e-5, rtol=0)
    assert (half - unmerged_velocity).abs().max() > 1e-4 and (half - base_velocity).abs().max() > 1e-4


def donor_at_scale(model, scale):
    model = copy.deepcopy(model)
    lora.set_lora_scale(model, scale)
    return model


def test_lora_training_changes_only_the_adapter(world, tmp_path, monkeypatch):  # noqa: F811
    from omnigen.training import trainer

    captured = {}
    export = trainer._export_final

    def capture(config, model, *args):
        captured["model"] = model
        export(config, model, *args)

    monkeypatch.setattr(trainer, "_export_final", capture)
    root, _ = world
    # a random (non-zero head) base: a fresh model's zeroed head would give the adapter no gradient
    from omnigen.config import OmniGenConfig
    from omnigen.weights.checkpoint import save_model

    save_model(random_model(OmniGenConfig.from_dict(PIXEL_MODEL), scale=0.05), tmp_path / "base")
    config = make_config(
        root,
        tmp_path / "run",
        4,
        init_from=str(tmp_path / "base"),
        lora={"rank": 4, "alpha": 4},
        warmup_steps=0,
        ema_decay=0.5,
    )
    final = trainer.train(config, device="cpu")

    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    state = {k.replace(".base_layer", ""): v for k, v in captured["model"].state_dict().items()}
    adapter = {k: v for k, v in state.items() if ".lora_" in k}
    assert len(adapter) == 16 and set(state) - set(adapter) == set(base)
    for name in base:
        torch.testing.assert_close(state[name], base[name], atol=0, rtol=0, msg=name)
    assert all(v.abs().max() > 0 for k, v in adapter.items() if ".lora_B." in k)  # B starts at zero

    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000004"
    assert all(".lora_" in k for k in load_file(str(checkpoint / "model.safetensors")))
    assert (checkpoint / "adapter" / lora.WEIGHTS_NAME).is_file()
    adapter_config = json.loads((final / lora.CONFIG_NAME).read_text())
    assert adapter_config["base_model_name_or_path"] == str((tmp_path / "base").resolve())

    from omnigen.weights.checkpoint import load_model

    reloaded, _ = load_model(tmp_path / "base")
    lora.load_lora(reloaded, final)
    exported = load_file(str(final / lora.WEIGHTS_NAME))
    ema_b = exported["base_model.model.llm.layers.0.self_attn.qkv_proj.lora_B.weight"]
    last_b = adapter["llm.layers.0.self_attn.qkv_proj.lora_B.default.weight"]
    assert (ema_b - last_b).abs().max() > 0  # the export holds the EMA, not the last weights


def test_lora_training_resumes_exactly(world, tmp_path):  # noqa: F811
    """Stop at step 2 and resume == straight through, with LoRA dropout (reseeded per step)."""
    from omnigen.config import OmniGenConfig
    from omnigen.training.trainer import train
    from omnigen.weights.checkpoint import save_model

    root, _ = world
    save_model(random_model(OmniGenConfig.from_dict(PIXEL_MODEL), scale=0.05), tmp_path / "base")
    adapters = []
    for name, stop in (("straight", None), ("split", 2)):
        config = make_config(
            root,
            tmp_path / name,
            4,
            init_from=str(tmp_path / "base"),
            lora={"rank": 4, "alpha": 8, "dropout": 0.2, "target_modules": ["qkv_proj", "o_proj"]},
            drop_text=0.3,
        )
        if stop is not None:
            train(config, device="cpu", stop_after=stop)
            assert not (tmp_path / name / "final").exists()
        train(config, device="cpu")
        adapters.append(load_file(str(tmp_path / name / "final" / lora.WEIGHTS_NAME)))
    assert adapters[0].keys() == adapters[1].keys() and len(adapters[0]) == 8
    assert max((adapters[0][k] - adapters[1][k]).abs().max().item() for k in adapters[0]) <= 1e-6


def test_lora_settings_are_typed_validated_and_round_trip(world, tmp_path):  # noqa: F811
    from omnigen.training.config import LoraSettings, TrainConfig

    root, _ = world
    config = make_config(root, tmp_path / "run", 1, lora={"rank": 4, "target_modules": ["qkv_proj"]})
    assert config.lora == LoraSettings(rank=4, alpha=4, target_modules=("qkv_proj",), dropout=0.0)
    assert config.lora.arguments() == {"rank": 4, "alpha": 4, "target_modules": ("qkv_proj",), "dropout": 0.0}
    assert LoraSettings(rank=2).target_modules == lora.DEFAULT_TARGET_MODULES
    again = TrainConfig.from_dict(json.loads(config.to_json()))  # train_config.json / the torchrun test
    assert again == config
    for bad, message in (
        ({"rank": 0}, "lora.rank must be an int >= 1, got 0"),
        ({"rank": 2, "alpha": -1}, "lora.alpha must be a finite number > 0, got -1"),
        ({"rank": 2, "dropout": 1.0}, "lora.dropout must be a finite number >= 0 and < 1, got 1.0"),
        ({"rank": 2, "target_modules": []}, "lora.target_modules must be a non-empty list"),
        ({"rank": 2, "scale": 1}, "unknown lora keys \\['scale'\\]"),
        ({"alpha": 2}, "lora needs `rank`"),
        ([4], "lora must be a mapping"),
    ):
        with pytest.raises(ValueError, match=message):
            make_config(root, tmp_path / "run", 1, lora=bad)
    with pytest.raises(TypeError, match="lora.target_modules must be a list of str, got str 'qkv_proj'"):
        make_config(root, tmp_path / "run", 1, lora={"rank": 2, "target_modules": "qkv_proj"})


# ---------------------------------------------------------------------- stacks of adapters (--lora)
def saved_adapter(folder, seed, targets=lora.DEFAULT_TARGET_MODULES, config=None):
    donor = random_model(config or tiny_config())
    lora.add_lora(donor, rank=2, alpha=2, target_modules=targets)
    randomize_adapter(donor, seed=seed, scale=0.1)
    return lora.save_lora(donor, folder)


def test_parse_lora_arg():
    assert lora.parse_lora_arg("ads/style:0.5") == ("ads/style", 0.5)
    assert lora.parse_lora_arg("ads/style") == ("ads/style", 1.0)
    assert lora.parse_lora_arg("ads/v1:-1") == ("ads/v1", -1.0)
    assert lora.parse_lora_arg("C:\\ads\\style") == ("C:\\ads\\style", 1.0)  # a drive letter is path
    with pytest.raises(ValueError, match="between -100 and 100"):
        lora.parse_lora_arg("ads/style:500")
    with pytest.raises(ValueError, match="needs a path"):
        lora.parse_lora_arg("")


def test_stacked_adapters_sum_and_come_off_exactly(inputs, tmp_path):
    a = saved_adapter(tmp_path / "a", seed=1)
    b = saved_adapter(tmp_path / "b", seed=2, targets=("qkv_proj", "down_proj"))  # other targets
    model = random_model(tiny_config())
    base = velocity(model, inputs)
    assert lora.apply_loras(model, [(a, 1.0), (b, 0.5)])
    stacked = velocity(model, inputs)
    assert lora.adapter_names(model) == ["lora_0", "lora_1"]
    # the same as A merged into the weights with B on top
    reference = random_model(tiny_config())
    lora.load_lora(reference, a)
    lora.unload_lora(reference, merge=True)
    lora.load_lora(reference, b, scale=0.5)
    torch.testing.assert_close(stacked, velocity(reference, inputs), atol=1e-5, rtol=0)
    only_a = random_model(tiny_config())
    lora.apply_loras(only_a, [(a, 1.0)])
    assert (velocity(only_a, inputs) - stacked).abs().max() > 1e-4  # B contributes

    assert not lora.apply_loras(model, [(str(a), 1.0), (str(b), 0.5)])  # the same stack: nothing to do
    assert not lora.apply_loras(model, [(a, 1.0), (b, 0.0)])  # other scales: rescaled in place
    torch.testing.assert_close(velocity(model, inputs), velocity(only_a, inputs), atol=1e-6, rtol=0)
    assert lora.apply_loras(model, [(b, 0.5)])  # other folders: reloaded
    assert lora.current_stack(model) == ((str(b), 0.5),)
    assert lora.apply_loras(model, [])
    assert not lora.has_lora(model)
    torch.testing.assert_close(velocity(model, inputs), base, atol=0, rtol=0)  # base weights untouched


def test_failed_stack_leaves_no_adapter(tmp_path):
    a = saved_adapter(tmp_path / "a", seed=1)
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match="not a LoRA adapter folder"):
        lora.apply_loras(model, [(a, 1.0), (tmp_path / "missing", 1.0)])
    assert not lora.has_lora(model) and lora.current_stack(model) == ()


def every_parser(parser):
    import argparse

    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from every_parser(sub)


def test_every_model_loading_command_has_lora(tmp_path):
    from omnigen.cli.args import load_pipeline
    from omnigen.cli.main import build_parser

    loading = [p for p in every_parser(build_parser()) if "--model" in p._option_string_actions]
    names = {p.prog.split(" ", 1)[1] for p in loading}
    assert {"generate", "serve", "batch", "demo", "eval miniworld", "eval geneval"} <= names
    assert all("--lora" in p._option_string_actions for p in loading)

    from omnigen.pipeline import default_model_path
    from omnigen.weights.checkpoint import load_model

    shipped, _ = load_model(default_model_path())
    lora.add_lora(shipped, rank=2, alpha=2)
    randomize_adapter(shipped)
    lora.save_lora(shipped, tmp_path / "ad")
    args = build_parser().parse_args(
        [
            "generate",
            "x",
            "-o",
            str(tmp_path / "o.png"),
            "--lora",
            f"{tmp_path / 'ad'}:0.5",
            "--lora",
            str(tmp_path / "ad"),
        ]
    )
    pipe = load_pipeline(args)
    assert lora.current_stack(pipe.model) == ((str(tmp_path / "ad"), 0.5), (str(tmp_path / "ad"), 1.0))
