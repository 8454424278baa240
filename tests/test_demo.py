"""The demo without a browser: building, the handler's logic and messages, the example gallery."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(1)
gr = pytest.importorskip("gradio")

from omnigen.demo import app as demo_module  # noqa: E402
from omnigen.demo.examples import FAMILIES, MAX_INPUT_IMAGES, load_examples, write_examples  # noqa: E402


def ui_values(pipe, **changes):
    """The values the UI sends for its initial state, with changes."""
    d = pipe.defaults
    values = dict(
        prompt="a red circle",
        image_1=None,
        image_2=None,
        image_3=None,
        height=float(d.height),  # sliders send floats
        width=float(d.width),
        guidance_scale=d.guidance_scale,
        img_guidance_scale=d.img_guidance_scale,
        num_inference_steps=float(d.num_inference_steps),
        seed=7,
        randomize_seed=False,
        negative_prompt=d.negative_prompt,
        max_input_image_size=float(d.max_input_image_size),
        use_input_image_size_as_output=False,
        use_img_guidance=True,
        guidance_start=d.guidance_start,
        guidance_end=d.guidance_end,
        strength=d.strength,
        sampler="euler",
        time_shift=None,
        step_cache_threshold=0.0,
        mask_blur=0.0,
        vae_tiling=False,
    )
    values.update(changes)
    return values


def test_import_is_light_and_subcommands_parse():
    code = "import sys, omnigen.demo.app, omnigen.serve.cli; print(sorted({'gradio', 'fastapi', 'uvicorn'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    import argparse

    from omnigen.serve import cli as serve_cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    demo_module.register(sub)
    serve_cli.register(sub)
    args = parser.parse_args(["demo", "--port", "1234", "--model", "x"])
    assert (args.func.__module__, args.port, args.host, args.model) == (
        "omnigen.demo.app",
        1234,
        "127.0.0.1",
        "x",
    )
    args = parser.parse_args(["serve", "--queue-size", "3", "--api-key", "k", "--max-steps", "9"])
    settings = serve_cli.settings_from_args(args)
    assert (settings.queue_size, settings.api_key, settings.max_steps, args.host) == (3, "k", 9, "127.0.0.1")


def test_build_demo_without_launching(pipeline):
    demo = demo_module.build_demo(pipeline)
    assert isinstance(demo, gr.Blocks)
    assert not demo.is_running
    config = demo.get_config_file()
    by_id = {c["props"].get("elem_id"): c for c in config["components"]}
    for elem in (
        demo_module.ELEM_PROMPT,
        demo_module.ELEM_GENERATE,
        demo_module.ELEM_OUTPUT,
        demo_module.ELEM_RESULT,
    ):
        assert elem in by_id, elem
    labels = {c["props"].get("label") for c in config["components"]}
    for label in ("Height", "Width", "Guidance scale", "Image guidance scale", "Inference steps", "Seed"):
        assert label in labels
    assert {"Randomize seed", "Sampler", "Negative prompt"} <= labels
    # the memory modes are `omnigen demo` flags, chosen for every user, not controls
    assert not {"KV cache", "Offload KV cache to CPU", "Offload model to CPU"} & labels
    assert sum(1 for c in config["components"] if c["type"] == "image") == MAX_INPUT_IMAGES
    assert by_id["omnigen-image-1"]["type"] == "imageeditor"  # the brush paints a mask on image 1
    assert "Mask blur" in labels
    height = next(c for c in config["components"] if c["props"].get("label") == "Height")["props"]
    assert (height["value"], height["step"]) == (
        pipeline.defaults.height,
        pipeline.model.config.image_multiple,
    )
    dataset = next(c for c in config["components"] if c["type"] == "dataset")
    assert len(dataset["props"]["samples"]) == len(load_examples())
    generate = [fn for fn in demo.fns.values() if fn.api_name == "generate"]
    assert len(generate) == 1 and generate[0].inputs_as_dict and generate[0].tracks_progress


def test_a_model_with_trained_sizes_offers_only_those_sizes(pipeline):
    from dataclasses import replace

    pipe = copy.copy(pipeline)
    pipe.defaults = replace(pipeline.defaults, height=16, width=16, trained_sizes=(16, 32))
    config = demo_module.build_demo(pipe).get_config_file()
    for label in ("Height", "Width"):
        props = next(c for c in config["components"] if c["props"].get("label") == label)["props"]
        assert [choice[1] for choice in props["choices"]] == [16, 32] and props["value"] == 16, props
        assert "trained at 16, 32 px only" in props["info"]
    arguments = demo_module.pipeline_arguments({"prompt": "a cat", "seed": 0, "height": 32, "width": 16})
    assert (arguments["height"], arguments["width"]) == (32, 16)


def test_run_generation_reports_progress_and_seed(pipeline):
    steps = []
    result = demo_module.run_generation(
        pipeline, ui_values(pipeline, seed=11), lambda i, n: steps.append((i, n))
    )
    n = pipeline.defaults.num_inference_steps
    assert steps == [(i, n) for i in range(1, n + 1)]
    assert result.seed == 11 and "Seed used: 11" in result.caption
    assert result.image.size == (pipeline.defaults.width, pipeline.defaults.height)
    (direct,) = pipeline("a red circle", seed=11, progress=False)
    assert result.image.tobytes() == direct.tobytes()


@pytest.mark.parametrize(
    ("sampler", "steps", "reported"),
    [
        ("euler", 6, [1, 2, 3, 4, 5, 6]),
        ("heun", 6, [1, 3, 5, 6]),  # 4 steps, 6 model evaluations: the bar used to stop at 4/6
        ("heun", 5, [2, 4, 5]),
        ("dpmpp_2m", 6, [1, 2, 3, 4, 5, 6]),
    ],
)
def test_progress_ends_at_its_total_for_every_sampler(pipeline, sampler, steps, reported):
    calls = []
    values = ui_values(pipeline, sampler=sampler, num_inference_steps=float(steps))
    demo_module.run_generation(pipeline, values, lambda done, total: calls.append((done, total)))
    assert calls == [(done, steps) for done in reported]


def test_progress_ends_at_its_total_with_the_fast_preset(pipeline):
    """The model's defaults carry the preset (Heun, 6 evaluations); the UI sends no sampler or steps."""
    fast = pipeline.with_defaults(preset="fast")
    values = {k: v for k, v in ui_values(fast).items() if k not in ("sampler", "num_inference_steps")}
    calls = []
    demo_module.run_generation(fast, values, lambda done, total: calls.append((done, total)))
    assert fast.defaults.sampler == "heun" and calls[-1] == (6, 6) and len(calls) == 4


def test_step_cache_slider_reaches_the_pipeline(pipeline):
    assert demo_module.pipeline_arguments(ui_values(pipeline))["step_cache_threshold"] is None
    values = ui_values(pipeline, step_cache_threshold=0.2, num_inference_steps=6.0)
    assert demo_module.pipeline_arguments(values)["step_cache_threshold"] == 0.2
    result = demo_module.run_generation(pipeline, values)
    (direct,) = pipeline(
        "a red circle", seed=7, num_inference_steps=6, step_cache_threshold=0.2, progress=False
    )
    assert result.image.tobytes() == direct.tobytes()


def test_random_seed_is_the_seed_used(pipeline):
    values = ui_values(pipeline, randomize_seed=True, seed=None, height=16.0, width=24.0)
    result = demo_module.run_generation(pipeline, values)
    assert result.image.size == (24, 16)
    again = demo_module.run_generation(
        pipeline, {**values, "randomize_seed": False, "seed": float(result.seed)}
    )
    assert again.image.tobytes() == result.image.tobytes()


def test_input_images_and_input_size_as_output(pipeline, rgb_image):
    values = ui_values(
        pipeline,
        prompt="put <img><|image_2|></img> on <img><|image_1|></img>",
        image_1=rgb_image(24, 20, seed=1),
        image_2=rgb_image(16, 16, seed=2).convert("RGBA"),
        use_input_image_size_as_output=False,
    )
    assert demo_module.run_generation(pipeline, values).image.size == (32, 32)
    one = ui_values(pipeline, prompt="make it blue <img><|image_1|></img>", image_1=rgb_image(24, 20, seed=1))
    assert demo_module.run_generation(
        pipeline, {**one, "use_input_image_size_as_output": True}
    ).image.size == (24, 20)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompt": "   "}, "Enter a prompt"),
        ({"prompt": "make it blue <img><|image_1|></img>"}, "image tags do not match 0 input image(s)"),
        ({"image_2": "IMG"}, "image 2 is set but image 1 is empty"),
        ({"height": 30.0}, "output height must be a positive multiple of 4, got 30"),
        ({"width": 33.5}, "width must be an int, got 33.5"),
        ({"seed": None}, "Enter a seed"),
        ({"seed": -1}, "seed must be an int between 0 and"),
        ({"num_inference_steps": 0.0}, "num_inference_steps must be an int between 1 and 1000, got 0"),
        ({"guidance_scale": -1.0}, "guidance_scale must be a finite number between 0 and 100, got -1.0"),
        ({"use_input_image_size_as_output": True}, "needs an input image"),
        (
            {"step_cache_threshold": -0.1},
            "step_cache_threshold must be a finite number between 0 and 10, got -0.1",
        ),
    ],
)
def test_bad_inputs_give_clear_messages(pipeline, rgb_image, changes, message):
    if changes.get("image_2") == "IMG":
        changes = {**changes, "image_2": rgb_image()}
    with pytest.raises((ValueError, TypeError)) as info:
        demo_module.run_generation(pipeline, ui_values(pipeline, **changes))
    assert message in str(info.value)


def test_gradio_handler_turns_bad_input_into_gr_error(pipeline):
    demo = demo_module.build_demo(pipeline, examples=[])
    (fn,) = [fn for fn in demo.fns.values() if fn.api_name == "generate"]
    names = {block: demo_module.control_name(block.elem_id) for block in fn.inputs}
    good = ui_values(pipeline)
    assert sorted(names.values()) == sorted(good)
    values = {block: good[name] for block, name in names.items()}
    calls = []
    image, caption = fn.fn(values, progress=lambda *a, **k: calls.append(a))
    assert image.size == (32, 32) and caption.startswith("Seed used: 7 ")
    assert calls[-1][0] == (pipeline.defaults.num_inference_steps,) * 2
    values[next(b for b, name in names.items() if name == "prompt")] = "<img><|image_1|></img> blue"
    with pytest.raises(gr.Error, match="image tags do not match"):
        fn.fn(values, progress=lambda *a, **k: None)


def test_examples_cover_every_family_and_match_the_generator(tmp_path):
    examples = load_examples()
    assert {ex.family for ex in examples} == set(FAMILIES)
    assert all(len(ex.images) <= MAX_INPUT_IMAGES and all(p.is_file() for p in ex.images) for ex in examples)
    assert any(len(ex.images) == 2 for ex in examples) and any(len(ex.images) == 3 for ex in examples)
    # The shipped copy is what write_examples draws (same prompts, same pixels).
    fresh = write_examples(tmp_path, picks={n: (ex.sample, ex.seed) for n, ex in enumerate(examples)})
    assert [(e.prompt, e.task) for e in fresh] == [(e.prompt, e.task) for e in examples]
    for new, old in zip(fresh, examples):
        assert [p.read_bytes() for p in new.images] == [p.read_bytes() for p in old.images]
    assert json.loads((tmp_path / "examples.json").read_text())[0]["family"] == "text-to-image"


def test_pick_examples_keeps_what_the_model_still_gets_right():
    """scripts/pick_example_seeds.py's rule: an example stays (sample and images) when it is right at its
    documented seed or one of seeds 0..keep_seeds - 1; only the wrong ones are re-picked."""
    import dataclasses

    from omnigen.demo.examples import Pick, pick_examples

    shipped = load_examples()
    pair, move = 6, 3  # pair: right only at seed 9; move: never right, re-picked at sample 3 + 207, seed 1
    changed = [dataclasses.replace(shipped[0], prompt="a red square")] + shipped[1:]  # no longer drawn
    calls = []

    def check(n, example, seed):
        calls.append((n, example.sample, seed))
        if n == pair:
            return seed == 9
        if n == move:
            return example.sample == 7 + move + 200 and seed == 1
        return example.sample in (None, shipped[n].sample) and seed == shipped[n].seed

    picks = pick_examples(check, changed, samples=4, seeds=4, keep_seeds=16)
    others = [n for n in range(len(shipped)) if n not in (0, pair, move)]
    assert [picks[n] for n in others] == [
        Pick(shipped[n].sample, shipped[n].seed, True, [True]) for n in others
    ]
    seeds = list(dict.fromkeys([shipped[pair].seed, *range(16)]))  # the documented seed first
    assert picks[pair] == Pick(shipped[pair].sample, 9, True, [s == 9 for s in seeds[: seeds.index(9) + 1]])
    assert [c[2] for c in calls if c[0] == pair] == seeds[: seeds.index(9) + 1]
    assert (picks[move].sample, picks[move].seed, picks[move].kept) == (210, 1, False)
    assert len(picks[move].tried) == 16 + 4 + 4 + 2
    # Example 0's prompt was changed, so write_examples no longer draws it: re-picked from sample 7 on.
    assert picks[0] == Pick(
        7, shipped[0].seed, False, [s == shipped[0].seed for s in range(shipped[0].seed + 1)]
    )
    assert all(pick.sample is not None for pick in picks)
    # With nothing to keep, every example is re-picked from the first sample.
    fresh = pick_examples(lambda n, example, seed: True)
    assert [(p.sample, p.seed, p.kept) for p in fresh] == [(7 + n, 0, False) for n in range(len(shipped))]


def test_every_example_runs(pipeline):
    from PIL import Image

    for ex in load_examples():
        slots = {f"image_{k}": Image.open(p) for k, p in enumerate(ex.images, start=1)}
        values = ui_values(pipeline, prompt=ex.prompt, num_inference_steps=1.0, **slots)
        result = demo_module.run_generation(pipeline, values)
        assert result.image.size == (32, 32), ex.label


def test_examples_with_the_shipped_model():
    from omnigen.pipeline import OmniGenPipeline, default_model_path

    if not (default_model_path() / "config.json").is_file():
        pytest.skip("the shipped miniature model is not there yet")
    from PIL import Image

    pipe = OmniGenPipeline.from_pretrained(None)
    for ex in load_examples():
        slots = {f"image_{k}": Image.open(p) for k, p in enumerate(ex.images, start=1)}
        result = demo_module.run_generation(pipe, ui_values(pipe, prompt=ex.prompt, **slots))
        assert result.image.size == (pipe.defaults.width, pipe.defaults.height), ex.label


def test_demo_subcommand_wiring(model_folder, monkeypatch):
    import argparse

    seen = {}
    monkeypatch.setattr(demo_module, "launch_demo", lambda demo, **kwargs: seen.update(demo=demo, **kwargs))
    parser = argparse.ArgumentParser()
    demo_module.register(parser.add_subparsers())
    args = parser.parse_args(["demo", "--model", str(model_folder), "--port", "7999", "--host", "0.0.0.0"])
    assert args.func(args) == 0
    assert isinstance(seen["demo"], gr.Blocks) and (seen["host"], seen["port"]) == ("0.0.0.0", 7999)
    steps = next(
        c
        for c in seen["demo"].get_config_file()["components"]
        if c["props"].get("label") == "Inference steps"
    )
    assert steps["props"]["value"] == 2  # the model folder's omnigen_generation.json


@pytest.mark.slow
def test_omnigen_demo_command_serves_the_page(model_folder, tmp_path):
    import os
    import urllib.request

    from live import free_port, live_process

    port = free_port()
    command = ["omnigen", "demo", "--model", str(model_folder), "--port", str(port)]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}

    def ready():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2) as response:
            return json.loads(response.read())

    with live_process(command, tmp_path / "demo.log", ready, env=env) as config:
        assert config["title"] == "OmniGen"
        assert any(c["props"].get("elem_id") == demo_module.ELEM_GENERATE for c in config["components"])


def editor_value(image, box=None, size=None):
    """What image 1's editor sends: the background and one RGBA layer, transparent but for `box`."""
    from PIL import Image

    layer = Image.new("RGBA", size or image.size, (0, 0, 0, 0))
    if box is not None:
        layer.paste((255, 255, 255, 255), box)
    return {"background": image.convert("RGBA"), "layers": [layer], "composite": image.convert("RGBA")}


def test_brush_mask_keeps_every_pixel_outside_it(pipeline, rgb_image):
    import numpy as np

    source = rgb_image(32, 32, seed=5)
    box = (6, 4, 22, 18)
    values = ui_values(
        pipeline, prompt="make it blue <img><|image_1|></img>", image_1=editor_value(source, box), height=16.0
    )
    kwargs = demo_module.pipeline_arguments(values)
    assert "height" not in kwargs and kwargs["mask"].mode == "L"  # the output is the canvas
    result = demo_module.run_generation(pipeline, values)
    out, src = np.asarray(result.image), np.asarray(source)
    keep = np.ones((32, 32), dtype=bool)
    keep[box[1] : box[3], box[0] : box[2]] = False
    assert result.image.size == (32, 32)
    assert np.array_equal(out[keep], src[keep]) and (out[~keep] != src[~keep]).any()
    (direct,) = pipeline(
        "make it blue <img><|image_1|></img>", [source], mask=kwargs["mask"], seed=7, progress=False
    )
    assert result.image.tobytes() == direct.tobytes()
    # the blur control reaches the pipeline: a feathered seam changes pixels just outside the box
    blurred = demo_module.run_generation(pipeline, {**values, "mask_blur": 3.0})
    assert (np.asarray(blurred.image)[keep] != src[keep]).any()
    # nothing painted: today's unmasked edit
    plain = demo_module.run_generation(pipeline, {**values, "image_1": editor_value(source), "height": 32.0})
    (unmasked,) = pipeline("make it blue <img><|image_1|></img>", [source], seed=7, progress=False)
    assert plain.image.tobytes() == unmasked.tobytes()


def test_bad_brush_masks_give_clear_messages(pipeline, rgb_image):
    source = rgb_image(32, 32, seed=5)
    values = ui_values(pipeline, prompt="make it blue <img><|image_1|></img>")
    wide = editor_value(source, (0, 0, 8, 8), size=(32, 16))
    with pytest.raises(ValueError, match="aspect ratios differ"):
        demo_module.run_generation(pipeline, {**values, "image_1": wide})
    with pytest.raises(ValueError, match="mask_blur must be an int between 0 and 1024"):
        demo_module.run_generation(
            pipeline, {**values, "image_1": editor_value(source, (0, 0, 8, 8)), "mask_blur": -1.0}
        )
    demo = demo_module.build_demo(pipeline, examples=[])
    (fn,) = [fn for fn in demo.fns.values() if fn.api_name == "generate"]
    names = {block: demo_module.control_name(block.elem_id) for block in fn.inputs}
    inputs = {block: {**values, "image_1": wide}[name] for block, name in names.items()}
    with pytest.raises(gr.Error, match="aspect ratios differ"):
        fn.fn(inputs, progress=lambda *a, **k: None)
