import subprocess
import sys

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
