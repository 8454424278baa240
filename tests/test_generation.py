"""GenerationConfig: validation, the model folder's file, the front ends derived from it, dtype, samplers."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from omnigen import generation
from omnigen.generation import GENERATION_FILE, OLD_GENERATION_FILE, GenerationConfig

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"guidance_scale": -1.0}, ["guidance_scale", "between 0 and 100", "-1.0"]),
        ({"guidance_scale": math.nan}, ["guidance_scale", "finite", "nan"]),
        ({"img_guidance_scale": math.inf}, ["img_guidance_scale", "finite", "inf"]),
        ({"num_inference_steps": 0}, ["num_inference_steps", "between 1 and 1000", "0"]),
        ({"height": -16}, ["height", "between 1 and 16384", "-16"]),
        ({"time_shift": 0.0}, ["time_shift", "> 0"]),
        ({"mask_blur": -2}, ["mask_blur", "between 0 and 1024", "-2"]),
        ({"sampler": "ddim"}, ["sampler", "'euler'", "'heun'", "'dpmpp_2m'", "ddim"]),
        ({"num_images_per_prompt": 1.5}, ["num_images_per_prompt", "int"]),
        ({"use_kv_cache": "yes"}, ["use_kv_cache", "true or false"]),
    ],
)
def test_bad_values_name_the_field_and_range(changes, words):
    with pytest.raises((ValueError, TypeError)) as info:
        GenerationConfig().replace(**changes)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_unknown_override_lists_the_allowed_names_and_none_keeps_the_default():
    with pytest.raises(
        TypeError, match="unexpected keyword argument 'guidance': not a generation parameter.*guidance_scale"
    ):
        GenerationConfig().replace(guidance=2.0)
    base = GenerationConfig(num_inference_steps=7)
    assert base.replace(num_inference_steps=None, guidance_scale=2).num_inference_steps == 7
    assert base.replace(guidance_scale=2).guidance_scale == 2.0 and isinstance(
        base.replace(guidance_scale=2).guidance_scale, float
    )


def test_trained_sizes_refuse_other_sizes():
    config = GenerationConfig(height=256, width=256, trained_sizes=(256, 512))
    assert config.replace(height=512).height == 512
    with pytest.raises(ValueError, match=r"width=384.*\[256, 512\].*trained_sizes"):
        config.replace(width=384)
    assert config.replace(use_input_image_size_as_output=True, width=384).width == 384


def test_pipeline_call_validates_through_the_config(pipeline):
    with pytest.raises(ValueError, match="guidance_scale must be a finite number between 0 and 100, got -1"):
        pipeline("a red circle", guidance_scale=-1.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'guidance'"):
        pipeline("a red circle", guidance=2.0)


def test_fast_preset_fills_its_fields_and_explicit_values_win():
    fast = generation.PRESETS["fast"]
    assert fast["num_inference_steps"] < GenerationConfig().num_inference_steps  # it is a fast preset
    model = GenerationConfig(num_inference_steps=25, time_shift=2.5, guidance_scale=2.0)  # a model's file
    cfg = model.replace(preset="fast")
    assert cfg.preset == "fast" and {k: getattr(cfg, k) for k in fast} == fast
    assert cfg.guidance_scale == 2.0  # fields outside the preset keep the model's value
    explicit = model.replace(preset="fast", num_inference_steps=13, sampler="heun")
    assert (explicit.num_inference_steps, explicit.sampler, explicit.time_shift) == (
        13,
        "heun",
        fast["time_shift"],
    )
    later = cfg.replace(num_inference_steps=30)  # a config carrying the preset keeps later explicit values
    assert later.num_inference_steps == 30 and later.sampler == fast["sampler"]
    assert model.replace(preset=None) == model  # None keeps the default, as for every field
    loaded = GenerationConfig.from_dict({"preset": "fast", "num_inference_steps": 7})
    assert loaded.num_inference_steps == 7 and loaded.sampler == fast["sampler"]
    assert GenerationConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="preset must be one of 'fast', got 'slow'"):
        model.replace(preset="slow")


def test_pipeline_preset_equals_its_settings(pipeline, rgb_image):
    fast = generation.PRESETS["fast"]
    kwargs = dict(input_images=[rgb_image()], seed=2, output_type="latent", progress=False)
    prompt = "<img><|image_1|></img> make it blue"
    preset = pipeline(prompt, preset="fast", **kwargs)
    assert torch.equal(preset, pipeline(prompt, **{**fast, **kwargs}))
    assert not torch.allclose(preset, pipeline(prompt, **kwargs), atol=1e-5)  # not the default
    mixed = pipeline(prompt, preset="fast", num_inference_steps=3, **kwargs)
    assert torch.equal(mixed, pipeline(prompt, **{**fast, "num_inference_steps": 3, **kwargs}))


def test_fast_switch_is_the_preset_flag(no_model):
    from omnigen.cli.args import generation_overrides

    parser = _subparser("generate")
    args = parser.parse_args(["a red circle", "--fast", "--steps", "5", "-o", "x.png"])
    overrides = generation_overrides(args)
    assert (overrides["preset"], overrides["num_inference_steps"]) == ("fast", 5)
    assert parser.parse_args(["a red circle", "--preset", "fast", "-o", "x.png"]).preset == "fast"
    assert parser.parse_args(["a red circle", "-o", "x.png"]).preset is None
    assert "--fast" in parser.format_help()


# ------------------------------------------------------------------------------------------ files


def test_file_round_trip_old_name_and_transformers_file(tmp_path):
    config = GenerationConfig(height=32, width=32, num_inference_steps=2, sampler="heun", trained_sizes=(32,))
    path = config.save(tmp_path)
    assert path.name == GENERATION_FILE == "omnigen_generation.json"
    assert GenerationConfig.load(tmp_path) == config

    old = tmp_path / "old"
    old.mkdir()
    (old / OLD_GENERATION_FILE).write_text(json.dumps({"num_inference_steps": 3, "negative_prompt": ""}))
    assert GenerationConfig.load(old) == GenerationConfig(num_inference_steps=3, negative_prompt="")

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / OLD_GENERATION_FILE).write_text(json.dumps({"transformers_version": "4.46", "max_length": 20}))
    assert GenerationConfig.load(hf) == GenerationConfig()

    (hf / GENERATION_FILE).write_text(json.dumps({"guidance_scale": -3}))
    with pytest.raises(ValueError, match="omnigen_generation.json: guidance_scale"):
        GenerationConfig.load(hf)


def test_shipped_model_folder_has_the_new_file():
    from omnigen.pipeline import default_model_path

    folder = default_model_path()
    assert (folder / GENERATION_FILE).is_file() and not (folder / OLD_GENERATION_FILE).exists()
    assert GenerationConfig.load(folder).height == 16


def test_training_config_checks_its_generation_section():
    from omnigen.training.config import TrainConfig

    fields = {
        "init_from": "unused-folder",
        "out_dir": "unused",
        "data": ["x.jsonl"],
        "stages": [{"resolution": 16, "steps": 1, "batch_size": 1, "lr": 1e-4}],
    }
    with pytest.raises(ValueError, match="generation: unknown keys \\['steps'\\]"):
        TrainConfig.from_dict({**fields, "generation": {"steps": 3}})
    with pytest.raises(ValueError, match="generation: guidance_scale"):
        TrainConfig.from_dict({**fields, "generation": {"guidance_scale": -1}})
    assert TrainConfig.from_dict({**fields, "generation": {"num_inference_steps": 3}}).generation == {
        "num_inference_steps": 3
    }


# ------------------------------------------------------------------------------------------ front ends


def _subparser(command: str, *path: str) -> argparse.ArgumentParser:
    from omnigen.cli.main import build_parser

    parser = build_parser()
    for name in (command, *path):
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions}


def test_every_front_end_has_every_field():
    """A new GenerationConfig field fails here until each front end has it (or says why not)."""
    from omnigen.batch.requests import KEYS
    from omnigen.demo import app as demo
    from omnigen.serve.inputs import GenerationRequest

    request, operator = set(generation.names("request")), set(generation.names("operator"))
    model_loading = {"model", "vae", "device", "dtype"}
    # generate: every request and operator field is a flag
    assert request | operator | model_loading <= _dests(_subparser("generate"))
    # batch: a request line's keys ("n" is num_images_per_prompt)
    assert (request | operator) - {"num_images_per_prompt"} <= set(KEYS) and "n" in KEYS
    assert model_loading <= _dests(_subparser("batch"))
    # serve: request fields in the schema, operator fields as flags
    assert request <= set(GenerationRequest.model_fields)
    assert operator | model_loading <= _dests(_subparser("serve"))
    # demo: a control per request field (but the ones it names), operator fields as flags
    assert set(demo.control_fields()) | set(demo.NOT_CONTROLS) == request
    assert operator | model_loading <= _dests(_subparser("demo"))
    # eval: every generating subcommand has the batch parameters (seed and n-samples are their own)
    own = {"miniworld": {"height", "width"}}  # miniworld: --size
    for name in ("miniworld", "geneval", "emu-edit", "dreambench", "control"):
        dests = _dests(_subparser("eval", name))
        missing = (request | operator) - {"num_images_per_prompt"} - own.get(name, set()) - dests
        assert not missing and model_loading <= dests, (name, missing)
    # ComfyUI: request fields are Generate's inputs (three under ComfyUI's own names), operator fields the
    # loader's
    comfy = _comfyui_inputs()
    names = sys.modules["omnigen-comfyui.fields"].INPUT_NAMES
    assert {names.get(name, name) for name in request} <= comfy["OmniGenGenerate"]
    assert operator | {"model", "model_path", "vae_path", "device", "dtype"} <= comfy["OmniGenLoader"]


def _comfyui_inputs() -> dict[str, set[str]]:
    """The input names of each ComfyUI node, the package loaded as ComfyUI loads it."""
    from comfy_harness import load_custom_node

    package = load_custom_node(Path(__file__).resolve().parents[1] / "comfyui", "omnigen-comfyui")
    return {
        key: {name for group in ("required", "optional") for name in cls.INPUT_TYPES().get(group, {})}
        for key, cls in package.NODE_CLASS_MAPPINGS.items()
    }


def test_help_shows_defaults():
    text = _subparser("generate").format_help()
    assert "OmniGen-v1: 50" in text and "OmniGen-v1: euler" in text and "default: auto" in text


# ------------------------------------------------------------------------------------------ CLI checks


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model (patched on the class, looked up at call
    time: a module attribute would leak into the modules that import it meanwhile)."""
    from omnigen import OmniGenPipeline

    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(OmniGenPipeline, "from_pretrained", staticmethod(refuse))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--guidance", "-1"], "guidance_scale must be a finite number between 0 and 100, got -1.0"),
        (["--guidance", "nan"], "guidance_scale must be a finite number between 0 and 100, got nan"),
        (["--steps", "0"], "num_inference_steps must be an int between 1 and 1000, got 0"),
        (["--height", "-32"], "height must be an int between 1 and 16384, got -32"),
        (["-o", "OUTDIR/"], "is a folder; give a file path"),
        (["-o", "OUTDIR/picture.xyz"], "unknown image extension '.xyz'"),
        (["-o", "OUTDIR/picture"], "unknown image extension '(none)'"),
    ],
)
def test_generate_rejects_bad_arguments_before_loading(argv, message, no_model, tmp_path, caplog):
    from omnigen.cli.main import main

    argv = [a.replace("OUTDIR", str(tmp_path)) for a in argv]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "out.png")]
    assert main(["generate", "a red circle", *argv]) == 2
    assert message in caplog.text


def test_generate_rejects_an_unwritable_output_before_loading(no_model, tmp_path, caplog):
    import os

    from omnigen.cli.main import main

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that can write anywhere (root)")
        assert main(["generate", "a red circle", "-o", str(locked / "out.png")]) == 2
        assert "is not writable" in caplog.text
    finally:
        locked.chmod(0o700)


# ------------------------------------------------------------------------------------------ dtype


def test_dtype_resolution(monkeypatch):
    from omnigen.util.dtypes import resolve_dtype

    assert resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100 / T4
    assert resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16 and resolve_dtype(None, "cuda") is None
    assert resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16"):
        resolve_dtype("fp8", "cpu")


def test_from_pretrained_dtype(model_folder):
    from omnigen.pipeline import OmniGenPipeline

    assert next(OmniGenPipeline.from_pretrained(model_folder).model.parameters()).dtype == torch.float32
    pipe = OmniGenPipeline.from_pretrained(model_folder, dtype="bfloat16")
    assert next(pipe.model.parameters()).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ samplers


def test_euler_through_solvers_equals_the_old_integrator(pipeline, rgb_image, monkeypatch):
    """sampler="euler" without a shift is bit-equal to ``sampling.euler_sample`` (today's path)."""
    import omnigen.pipeline
    from omnigen.sampling.euler import euler_sample

    kwargs = dict(input_images=[rgb_image()], seed=3, output_type="latent", progress=False)
    prompt = "<img><|image_1|></img> make it blue"
    new = pipeline(prompt, **kwargs)

    def old(velocity, x, schedule, project=None, callback=None, progress=False):
        assert project is None  # no mask
        return euler_sample(velocity, x, schedule.num_steps, callback=callback)

    monkeypatch.setattr(omnigen.pipeline, "solve", old)
    assert torch.equal(new, pipeline(prompt, **kwargs))


@pytest.mark.parametrize("separate", [True, False])
def test_other_samplers_run_with_the_cache_and_both_cfg_modes(pipeline, rgb_image, separate):
    kwargs = dict(
        input_images=[rgb_image()],
        seed=5,
        output_type="latent",
        progress=False,
        num_inference_steps=4,
        separate_cfg_infer=separate,
        use_kv_cache=True,
    )
    prompt = "<img><|image_1|></img> make it blue"
    euler = pipeline(prompt, **kwargs)
    for sampler in ("heun", "dpmpp_2m"):
        out = pipeline(prompt, sampler=sampler, **kwargs)
        assert out.shape == euler.shape and torch.isfinite(out).all()
        assert not torch.allclose(out, euler, atol=1e-5), sampler
        no_cache = pipeline(prompt, sampler=sampler, **{**kwargs, "use_kv_cache": False})
        torch.testing.assert_close(out, no_cache, atol=1e-4, rtol=1e-4)
    shifted = pipeline(prompt, time_shift=3.0, **kwargs)
    assert not torch.allclose(shifted, euler, atol=1e-5)


# ------------------------------------------------------------------------------------------ condition budget


def test_resized_size_matches_resize_and_crop(rgb_image):
    from omnigen.text.processor import resize_and_crop, resized_size

    for width, height, longest in [(40, 36, 32), (100, 30, 32), (130, 140, 32), (20, 24, 64), (33, 17, 16)]:
        image = rgb_image(width, height)
        assert resized_size(width, height, longest, 4) == resize_and_crop(image, longest, 4).size


def test_condition_tokens_is_the_prefill_length(pipeline, rgb_image):
    prompt = "<img><|image_1|></img> and <img><|image_2|></img> side by side"
    images = [rgb_image(40, 36), rgb_image(24, 64)]
    real = pipeline.processor(prompt, images, 32)
    assert pipeline.condition_tokens(prompt, [im.size for im in images], 32) == len(real.input_ids)
    assert pipeline.condition_tokens(prompt, [im.size for im in images], 16) < len(real.input_ids)


def test_service_refuses_a_condition_over_the_budget(pipeline, rgb_image):
    import base64
    import io

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from omnigen.serve.app import create_app
    from omnigen.serve.settings import ServeSettings

    buffer = io.BytesIO()
    rgb_image(32, 32).save(buffer, format="PNG")
    body = {
        "prompt": "<img><|image_1|></img> make it blue",
        "images": [base64.b64encode(buffer.getvalue()).decode()],
        "num_inference_steps": 1,
        "response_format": "b64_json",
    }
    tokens = pipeline.condition_tokens(body["prompt"], [(32, 32)])
    with TestClient(create_app(pipeline, ServeSettings(max_condition_tokens=tokens - 1))) as client:
        response = client.post("/v1/images/generations", json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["limit"] == "max_condition_tokens" and f"{tokens} condition tokens" in error["message"]
        assert f"max_condition_tokens is {tokens - 1}" in error["message"]
        assert client.get("/v1/models").json()["data"][0]["limits"]["max_condition_tokens"] == tokens - 1
    with TestClient(create_app(pipeline, ServeSettings(max_condition_tokens=tokens))) as client:
        assert client.post("/v1/images/generations", json=body).status_code == 200


def test_batch_refuses_a_condition_over_the_budget(pipeline, rgb_image, tmp_path):
    from omnigen.batch import read_requests, run_batch

    rgb_image(40, 36).save(tmp_path / "in.png")
    lines = [
        {"id": "small", "prompt": "a red circle", "num_inference_steps": 1},
        {
            "id": "big",
            "prompt": "<img><|image_1|></img> blue",
            "input_images": ["in.png"],
            "num_inference_steps": 1,
        },
    ]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    requests, bad = read_requests(tmp_path / "r.jsonl")
    assert not bad
    budget = pipeline.condition_tokens(requests[1].prompt, [(40, 36)]) - 1
    report = run_batch(pipeline, requests, tmp_path / "out", max_condition_tokens=budget, progress=False)
    assert report.generated == 1 and [b.line for b in report.bad_lines] == [2]
    assert f"the budget max_condition_tokens is {budget}" in report.bad_lines[0].reason
