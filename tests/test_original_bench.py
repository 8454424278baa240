"""The original omnigen 1.0.3 contenders of benchmarks/bench_pipeline.py.

Fast: the torchvision shim computes our processor's pixels, the OmniGen-v1 folder the benchmark writes
holds our weights exactly, and ``--ours-extra`` is parsed or rejected clearly. Slow (needs the original's
venv from benchmarks/setup_original.sh; ``OMNIGEN_ORIGINAL_PYTHON`` or /work/venv-original): the original
package itself, run by benchmarks/original_runner.py on the benchmark's random weights, equals the exact
reference without its cache, and with its cache deviates only through its step-0 attention.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
ORIGINAL_PYTHON = os.environ.get("OMNIGEN_ORIGINAL_PYTHON", "/work/venv-original/bin/python")
TINY = ["--hidden", "192", "--layers", "2", "--heads", "2", "--size", "64", "--steps", "3", "--vae", "tiny"]


@pytest.fixture(scope="module")
def bench_modules():
    """(bench_pipeline, original_client, original_runner), imported from benchmarks/ as the scripts are."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_pipeline
        import original_client
        import original_runner

        yield bench_pipeline, original_client, original_runner
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_torchvision_shim_computes_our_processor_pixels(bench_modules, rgb_image):
    from omnigen.text.processor import to_tensor

    runner = bench_modules[2]
    image = rgb_image(width=48, height=32, seed=3)
    transform = runner.Compose(
        [
            runner.Lambda(lambda im: im),
            runner.ToTensor(),
            runner.Normalize([0.5] * 3, [0.5] * 3, inplace=True),
        ]
    )
    pixels = transform(image)
    assert pixels.shape == (3, 32, 48) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels, to_tensor(image), atol=1e-6, rtol=0)
    grey = runner.ToTensor()(image.convert("L"))  # one channel keeps its axis, as torchvision's does
    assert grey.shape == (1, 32, 48)


def test_original_folder_holds_our_weights_and_images(bench_modules, tmp_path):
    import json

    from omnigen.weights.checkpoint import load_model

    bench_pipeline, original_client, _ = bench_modules
    args = bench_pipeline.parse_args(["--hidden", "64", "--layers", "1", "--heads", "2", "--size", "32"])
    bench = bench_pipeline.Bench(args)
    paths = original_client.write_original_folder(bench.pipe, bench.images, tmp_path)
    loaded, layout = load_model(tmp_path)
    assert layout.kind == "official"
    expected = bench.model.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert [np.array(Image.open(p)).tolist() for p in paths] == [im.tolist() for im in bench.images]
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"]
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "vae" / "config.json").is_file()


def test_ours_extra_is_parsed_or_rejected_by_name(bench_modules):
    bench_pipeline = bench_modules[0]
    extras = bench_pipeline.extra_options(['fast={"num_inference_steps": 4}', "plain={}"])
    assert extras == {"ours (fast)": {"num_inference_steps": 4}, "ours (plain)": {}}
    for bad, words in (("fast", "not JSON"), ("fast=[1]", "JSON object"), ('={"a": 1}', "LABEL")):
        with pytest.raises(SystemExit, match=words):
            bench_pipeline.extra_options([bad])


@pytest.mark.slow
@pytest.mark.skipif(not Path(ORIGINAL_PYTHON).is_file(), reason="no venv with the original omnigen 1.0.3")
def test_original_package_equals_the_exact_reference(bench_modules):
    bench_pipeline, original_client, _ = bench_modules
    bench = bench_pipeline.Bench(bench_pipeline.parse_args(TINY))
    args = bench.args
    with original_client.OriginalSession(
        ORIGINAL_PYTHON, bench.pipe, bench.images, 2, args.size, args.steps
    ) as session:
        assert session.runner.info["omnigen"] == "1.0.3"
        for prompt, k in bench_pipeline.TASKS.values():
            exact = bench_pipeline.reference_sample(
                bench.ref,
                bench.pipe,
                prompt,
                bench.images[:k],
                args.size,
                args.steps,
                3.0,
                1.6,
                0,
                per_row=True,
            )[0]
            for separate in (True, False):
                call = session.task_call(prompt, k, separate)
                uncached = session.runner.call({**call, "use_kv_cache": False}).latents
                fixed = session.runner.call(call, full_step0_attention=True).latents
                cached = session.runner.call(call).latents
                torch.testing.assert_close(uncached, exact, atol=1e-4, rtol=0)
                torch.testing.assert_close(fixed, exact, atol=1e-4, rtol=0)
                assert (cached - exact).abs().max() > 1e-3  # its step-0 cache: what the README reports
