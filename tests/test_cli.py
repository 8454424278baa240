import subprocess
import sys

import numpy as np
from PIL import Image


def test_help_from_installed_package():
    out = subprocess.run(["omnigen", "--help"], capture_output=True, text=True, check=True).stdout
    assert "generate" in out
    out = subprocess.run(
        [sys.executable, "-m", "omnigen", "generate", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--img-guidance" in out


def test_generate_with_tiny_model_folder(model_folder, tmp_path, rgb_image):
    source = tmp_path / "in.png"
    rgb_image(40, 36).save(source)
    out = tmp_path / "out.png"
    proc = subprocess.run(
        [
            "omnigen",
            "generate",
            "make it blue <img><|image_1|></img>",
            "--image",
            str(source),
            "--model",
            str(model_folder),
            "-o",
            str(out),
            "--steps",
            "2",
            "--seed",
            "4",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (32, 32)


def test_generate_fast_equals_the_presets_settings(model_folder, tmp_path):
    from omnigen.cli import main
    from omnigen.generation import PRESETS

    fast = PRESETS["fast"]
    common = ["generate", "a red circle", "--model", str(model_folder), "--seed", "1"]
    assert main([*common, "--fast", "-o", str(tmp_path / "fast.png")]) == 0
    explicit = ["--sampler", fast["sampler"], "--steps", str(fast["num_inference_steps"])]
    if fast["time_shift"] is not None:
        explicit += ["--time-shift", str(fast["time_shift"])]
    assert main([*common, *explicit, "-o", str(tmp_path / "explicit.png")]) == 0
    assert main([*common, "-o", str(tmp_path / "default.png")]) == 0
    pixels = {
        name: np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("fast", "explicit", "default")
    }
    assert np.array_equal(pixels["fast"], pixels["explicit"])
    assert not np.array_equal(pixels["fast"], pixels["default"])


def test_generate_reports_bad_input_without_traceback(model_folder, tmp_path):
    proc = subprocess.run(
        [
            "omnigen",
            "generate",
            "a <img><|image_1|></img>",
            "--model",
            str(model_folder),
            "-o",
            str(tmp_path / "x.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "do not match 0 input image" in proc.stderr and "Traceback" not in proc.stderr
