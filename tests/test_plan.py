"""omnigen.plan: one call resolved once (sizes, masks, exact condition tokens, schedule) for every front end."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from omnigen.plan import CallPlan, plan_call
from omnigen.text.processor import resize_and_crop

torch.set_num_threads(1)
EDIT = "make it blue <img><|image_1|></img>"


@pytest.fixture(scope="module")
def shipped():
    from omnigen.pipeline import OmniGenPipeline, default_model_path

    if not (default_model_path() / "config.json").is_file():
        pytest.skip("the shipped miniature model is not there")
    return OmniGenPipeline.from_pretrained(None)


def test_plan_call_resolves_sizes_masks_tokens_and_seed(pipeline, rgb_image):
    d = pipeline.defaults
    call = plan_call(d, pipeline.model.config, pipeline.processor, "a red cat", seed=5, height=16, width=24)
    assert isinstance(call, CallPlan) and call.prompts == ("a red cat",) and call.seed == 5
    assert call.sizes == ((16, 24),) and call.masks == (None,) and call.config.height == 16
    assert call.condition_tokens == (len(pipeline.processor("a red cat").input_ids),)
    # one size per prompt, from each prompt's own input image (prepared as the processor prepares it)
    images = [[rgb_image(48, 40)], [rgb_image(24, 20)]]
    call = pipeline.plan([EDIT, EDIT], images, use_input_image_size_as_output=True, max_input_image_size=32)
    assert call.sizes == ((24, 32), (20, 24)) and call.batched and call.num_images == 2
    assert call.sizes[0] == resize_and_crop(images[0][0], 32, 4).size[::-1]
    # with a mask the output is the canvas
    mask = Image.new("L", (48, 40), 255)
    call = pipeline.plan(EDIT, [rgb_image(48, 40)], mask=mask, max_input_image_size=32)
    assert call.sizes == ((24, 32),) and call.masks[0].size == (24, 32)
    assert len({pipeline.plan("a cat").seed for _ in range(8)}) > 1  # no seed: a random one each call


def test_condition_tokens_are_exactly_the_prefill_rows(pipeline, rgb_image, tmp_path):
    """The plan's count (image headers only) equals the processed prompt the pipeline actually runs."""
    path = tmp_path / "wide.png"
    rgb_image(70, 33, seed=3).save(path)
    images = [rgb_image(50, 37, seed=1), str(path), rgb_image(8, 8, seed=2)]
    prompt = "put <img><|image_3|></img> and <img><|image_2|></img> on <img><|image_1|></img> now"
    for longest in (16, 32, 48):
        call = pipeline.plan(prompt, images, max_input_image_size=longest)
        pixels = [pipeline.processor.prepare_image(im, longest) for im in images]
        assert call.condition_tokens == (len(pipeline.processor(prompt, pixels).input_ids),), longest
    assert (
        pipeline.condition_tokens(prompt, [(50, 37), (70, 33), (8, 8)], 32)
        == (pipeline.plan(prompt, images, max_input_image_size=32).condition_tokens[0])
    )


@pytest.mark.parametrize(
    ("sampler", "steps", "num_steps", "progress"),
    [
        ("euler", 6, 6, (1, 2, 3, 4, 5, 6)),
        ("heun", 6, 4, (1, 3, 5, 6)),  # E H H E
        ("heun", 5, 3, (2, 4, 5)),  # H H E
        ("dpmpp_2m", 6, 6, (1, 2, 3, 4, 5, 6)),
    ],
)
def test_schedule_counts_evaluations_and_steps(pipeline, sampler, steps, num_steps, progress):
    call = pipeline.plan("a cat", sampler=sampler, num_inference_steps=steps)
    assert (call.num_evaluations, call.num_steps, call.progress) == (steps, num_steps, progress)
    seen = []
    pipeline(
        "a cat",
        sampler=sampler,
        num_inference_steps=steps,
        seed=1,
        progress=False,
        output_type="latent",
        callback_on_step_end=lambda _p, i, _t, _x: seen.append(i),
    )
    assert seen == list(range(call.num_steps))


def test_fast_preset_plans_heun_at_six_evaluations(pipeline):
    call = pipeline.plan("a cat", preset="fast")
    assert call.config.sampler == "heun" and (call.num_evaluations, call.num_steps) == (6, 4)


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompt_is_refused_in_python(pipeline, prompt):
    with pytest.raises(ValueError, match=r"prompt is empty") as info:
        pipeline(prompt, seed=0, progress=False)
    assert info.value.field == "prompt"
    with pytest.raises(ValueError, match=r"prompt\[1\] is empty"):
        pipeline(["a cat", prompt], seed=0, progress=False)


def test_empty_prompt_is_refused_by_the_cli(tmp_path, caplog, monkeypatch):
    """Exit 2 with the message (it used to exit 0 with a random image), before the model loads."""
    from omnigen import OmniGenPipeline
    from omnigen.cli.main import main

    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the prompt was checked")

    # on the class, looked up at call time (a module attribute would leak into modules imported meanwhile)
    monkeypatch.setattr(OmniGenPipeline, "from_pretrained", staticmethod(refuse))
    out = tmp_path / "out.png"
    for prompt in ("", "  "):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            code = main(["generate", prompt, "-o", str(out), "--steps", "1"])
        assert code == 2 and "prompt is empty" in caplog.text
    assert not out.exists()


def test_empty_prompt_is_refused_by_batch(pipeline):
    from omnigen.batch.params import resolve_params
    from omnigen.batch.requests import Request

    with pytest.raises(ValueError, match="prompt is empty"):
        resolve_params(pipeline, Request("a", "  ", (), 1, 0))


def test_input_size_as_output_goes_through_the_size_check(shipped, rgb_image):
    """A 512x384 input on a model trained at 16 px only would come out 16x12: refused like 16x12 is."""
    with pytest.raises(ValueError, match=r"\[16\] only \(trained_sizes\)"):
        shipped(EDIT, [rgb_image(16, 12)], height=12, width=16, progress=False)  # the explicit refusal
    with pytest.raises(
        ValueError, match=r"output 12x16 .*input image.*\[16\] only \(trained_sizes\)"
    ) as info:
        shipped(EDIT, [rgb_image(512, 384)], use_input_image_size_as_output=True, progress=False)
    assert info.value.field == "use_input_image_size_as_output"
    call = shipped.plan(EDIT, [rgb_image(512, 512)], use_input_image_size_as_output=True)
    assert call.sizes == ((16, 16),)


def test_input_size_as_output_is_refused_by_batch_and_service(pipeline, rgb_image, tmp_path):
    import base64
    import io
    from dataclasses import replace

    from fastapi.testclient import TestClient

    from omnigen.batch.params import resolve_params
    from omnigen.batch.requests import Request
    from omnigen.serve.app import create_app
    from omnigen.serve.settings import ServeSettings

    trained = pipeline.with_defaults()
    trained.defaults = replace(pipeline.defaults, trained_sizes=(32,))
    rgb_image(48, 36).save(tmp_path / "in.png")
    request = Request("a", EDIT, (str(tmp_path / "in.png"),), 1, 0, {"use_input_image_size_as_output": True})
    with pytest.raises(ValueError, match=r"output 24x32 .*\[32\] only"):
        resolve_params(trained, request)
    assert (resolve_params(pipeline, request)["height"], resolve_params(pipeline, request)["width"]) == (
        24,
        32,
    )
    buffer = io.BytesIO()
    rgb_image(48, 36).save(buffer, format="PNG")
    body = {
        "prompt": EDIT,
        "images": [base64.b64encode(buffer.getvalue()).decode()],
        "use_input_image_size_as_output": True,
    }
    with TestClient(create_app(trained, ServeSettings())) as client:
        response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "use_input_image_size_as_output" and "[32] only" in error["message"]
