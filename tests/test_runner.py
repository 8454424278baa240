"""The runner (``omnigen.model.runner``): runtime state lives on it, never on the model's modules."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import random_model, tiny_config, tiny_pipeline
from omnigen.model.layers import GatedMLP
from omnigen.model.offload import offload_layers
from omnigen.model.placement import place_layers, place_model
from omnigen.model.runner import PLAIN, Runner
from omnigen.sampling.guidance import guided_velocity
from omnigen.text.collate import collate
from omnigen.text.processor import OmniGenProcessor
from test_training import make_config, world  # noqa: F401 (`world` is a fixture)

EDIT = "make it blue <img><|image_1|></img>"


def module_state(model: torch.nn.Module) -> dict:
    """Per module: its attributes (by identity) and the names of its parameters, buffers and children."""
    state = {}
    for name, module in model.named_modules():
        attrs = {k: id(v) for k, v in vars(module).items() if not k.startswith("_")}
        slots = {k: sorted(getattr(module, k)) for k in ("_parameters", "_buffers", "_modules")}
        state[name] = (attrs, slots)
    return state


def edit_condition(model, tokenizer, rgb_image):
    processor = OmniGenProcessor(tokenizer, model.config, 32)
    latents = [[torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(1))]]
    return collate([processor(EDIT, [rgb_image()])], latents, 3)


def test_placing_and_offloading_leave_no_attributes_on_the_modules(tokenizer):
    model = random_model(tiny_config())
    pipe = tiny_pipeline(model, tokenizer)
    before = module_state(model)
    runner = place_model(model, torch.device("cpu"), PLAIN, offload_layers=True)
    assert runner.offloaded is not None
    assert module_state(model) == before
    assert place_layers(model, ["cpu", "cpu"]).devices == (torch.device("cpu"),) * 2
    assert module_state(model) == before
    for options in (dict(offload_model=True, offload_kv_cache=True), dict(step_cache_threshold=0.5), {}):
        pipe("a red cat", progress=False, output_type="latent", seed=0, **options)
        assert module_state(model) == before, options
    pipe.place_layers(["cpu", "cpu"]).to("cpu")
    assert module_state(model) == before


def test_one_model_runs_under_two_runners_with_equal_outputs(tokenizer, rgb_image):
    model = random_model(tiny_config())
    condition = edit_condition(model, tokenizer, rgb_image)
    offloaded = Runner(offloaded=offload_layers(model.llm.layers))
    split = Runner(devices=(torch.device("cpu"),) * len(model.llm.layers))
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([0.4])
    n = model.config.num_image_tokens(32, 32)
    with torch.no_grad():
        plain = model(x, t, condition=condition)
        cache = model.prefill(condition, n)
        step = model(x, t, cache=cache)
        for runner in (offloaded, split, PLAIN):  # plain again: the offloaded run left nothing behind
            assert torch.equal(model(x, t, condition=condition, runner=runner), plain)
            for offload_cache in (False, True):
                other = model.prefill(condition, n, runner, offload_cache=offload_cache)
                assert all(
                    torch.equal(a, b) for kv, kw in zip(cache.layers, other.layers) for a, b in zip(kv, kw)
                )
                assert torch.equal(model(x, t, cache=other, runner=runner), step)


def test_runner_checks_it_fits_the_model(model):
    x = torch.randn(1, 3, model.config.transformer.hidden_size)
    positions = torch.arange(3)[None]
    inputs = model.llm.inputs(positions, positions[:, -1], None)
    with pytest.raises(ValueError, match="places 3 layers but the model has 2"):
        model.llm(x, inputs, Runner(devices=(torch.device("cpu"),) * 3))


def test_checkpointing_runner_recomputes_layers_with_the_same_gradients(tokenizer, rgb_image, monkeypatch):
    model = random_model(tiny_config()).train()
    condition = edit_condition(model, tokenizer, rgb_image)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([0.3])
    calls = []
    mlp = GatedMLP.forward  # a class-level spy: module hooks do not see checkpoint's recomputation
    monkeypatch.setattr(GatedMLP, "forward", lambda self, h: calls.append(1) or mlp(self, h))
    runs = []
    for runner in (PLAIN, Runner(checkpoint=True)):
        model.zero_grad()
        calls.clear()
        model(x, t, condition=condition, runner=runner).square().mean().backward()
        runs.append(([p.grad.clone() for p in model.parameters() if p.grad is not None], len(calls)))
    (plain, plain_calls), (checked, checked_calls) = runs
    layers = len(model.llm.layers)
    assert (plain_calls, checked_calls) == (layers, 2 * layers), "checkpointing reruns each layer in backward"
    assert len(plain) == len(checked) and all(torch.equal(a, b) for a, b in zip(plain, checked))
    with torch.no_grad():
        calls.clear()
        model(x, t, condition=condition, runner=Runner(checkpoint=True))
    assert len(calls) == layers, "no checkpointing without grad"


def test_the_sampler_stores_the_step_inputs_and_the_model_only_reads_them(
    model, tokenizer, rgb_image, monkeypatch
):
    from omnigen.generation import GenerationConfig

    condition = edit_condition(model, tokenizer, rgb_image)
    n = model.config.num_image_tokens(32, 32)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        cache = model.prefill(condition, n)
        want = model(x, t, cache=cache)
        assert cache.step_inputs == {}, "the model never stores into the cache it is handed"
        config = GenerationConfig(separate_cfg_infer=True, use_img_guidance=False)
        captured = []
        original = model.prefill
        monkeypatch.setattr(
            model, "prefill", lambda *a, **k: captured.append(original(*a, **k)) or captured[-1]
        )
        guided_velocity(model, [condition, condition], 2, n, config)(x, t)
        assert all(list(c.step_inputs) == [(n, 2)] for c in captured), "stored once per cache and batch"
        rotary = []
        hook = model.llm.rotary.register_forward_hook(lambda *args: rotary.append(1))
        got = model(x, t, cache=captured[0])
        hook.remove()
    assert rotary == [], "a stored step input is read, not rebuilt"
    assert torch.equal(got, want)


def test_pipeline_runner_keeps_the_split_and_the_fp16_guard(tokenizer):
    model = random_model(tiny_config())
    pipe = tiny_pipeline(model, tokenizer)
    pipe.runner = dataclasses.replace(pipe.runner, fp16_guard=False)
    pipe.place_layers(["cpu", "cpu"])
    pipe("a red cat", progress=False, output_type="latent", offload_model=True)
    assert pipe.runner.offloaded is not None and pipe.runner.devices == (torch.device("cpu"),) * 2
    assert pipe.with_defaults(seed=1).runner is pipe.runner
    pipe.to("cpu")
    assert pipe.runner == Runner(fp16_guard=False)


def test_training_runs_its_layers_through_the_runs_runner(world, tmp_path, monkeypatch):  # noqa: F811
    """``gradient_checkpointing`` reaches the layers through ``Run.runner`` (not an attribute of the
    model) and takes the same steps."""
    import json

    import omnigen.model.runner as runner_module
    from omnigen.training.trainer import train

    root, _ = world
    checkpointed = []
    original = runner_module.checkpoint
    monkeypatch.setattr(
        runner_module, "checkpoint", lambda *a, **k: checkpointed.append(1) or original(*a, **k)
    )
    curves = {}
    for flag in (False, True):
        checkpointed.clear()
        stage = {"resolution": 16, "steps": 2, "batch_size": 3, "lr": 3e-3}
        out = tmp_path / str(flag)
        train(make_config(root, out, 2, stages=[stage], gradient_checkpointing=flag), device="cpu")
        curves[flag] = [json.loads(x)["loss"] for x in (out / "loss.jsonl").read_text().splitlines()]
        assert bool(checkpointed) == flag
    assert len(curves[False]) == 2
    assert max(abs(a - b) for a, b in zip(curves[False], curves[True])) <= 1e-6, curves
