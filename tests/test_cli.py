import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
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
    from omnigen.cli.main import main
    from omnigen.generation import PRESETS

    fast = PRESETS["fast"]
    common = ["generate", "a red circle", "--model", str(model_folder), "--seed", "1"]
    assert main([*common, "--fast", "-o", str(tmp_path / "fast.png")]) == 0
    explicit = ["--sampler", fast["sampler"], "--steps", str(fast["num_inference_steps"])]
    if fast["time_shift"] is not None:
        explicit += ["--time-shift", str(fast["time_shift"])]
    explicit += ["--guidance-start", str(fast.get("guidance_start", 0.0))]
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


def _generate(model_folder, tmp_path, *extra):
    return subprocess.run(
        ["omnigen", "generate", "make it blue <img><|image_1|></img>", "--model", str(model_folder)]
        + ["-o", str(tmp_path / "out.png"), "--steps", "2", *extra],
        capture_output=True,
        text=True,
    )


def test_generate_with_a_mask_keeps_the_pixels_outside_it(model_folder, tmp_path, rgb_image):
    import numpy as np

    source = rgb_image(32, 32, seed=2)
    source.save(tmp_path / "in.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[4:20, 8:24] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    proc = _generate(
        model_folder, tmp_path, "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png")
    )
    assert proc.returncode == 0, proc.stderr
    out, src = np.asarray(Image.open(tmp_path / "out.png")), np.asarray(source)
    assert out.shape == src.shape
    assert np.array_equal(out[mask == 0], src[mask == 0])
    assert (out[mask > 0] != src[mask > 0]).any()


def test_generate_outpaint_keeps_the_original(model_folder, tmp_path, rgb_image):
    import numpy as np

    source = rgb_image(16, 32, seed=3)
    source.save(tmp_path / "in.png")
    proc = _generate(model_folder, tmp_path, "--image", str(tmp_path / "in.png"), "--outpaint", "8,8,0,0")
    assert proc.returncode == 0, proc.stderr
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert out.shape == (32, 32, 3)
    assert np.array_equal(out[:, 8:24], np.asarray(source))


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_image", "--mask needs an input image"),
        ("missing", "mask not found"),
        ("not_an_image", "cannot read mask"),
        ("black", "all black"),
        ("aspect", "aspect ratios differ"),
        ("bad_pads", "LEFT,RIGHT,TOP,BOTTOM"),
    ],
)
def test_generate_bad_mask_is_a_clear_error_before_loading(tmp_path, rgb_image, case, message):
    rgb_image(32, 32).save(tmp_path / "in.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    Image.new("L", (32, 32), 0).save(tmp_path / "black.png")
    Image.new("L", (32, 16), 255).save(tmp_path / "wide.png")
    image = [] if case == "no_image" else ["--image", str(tmp_path / "in.png")]
    mask = {"missing": "nope.png", "not_an_image": "junk.png", "black": "black.png", "aspect": "wide.png"}
    if case == "bad_pads":
        extra = ["--outpaint", "8,8"]
    else:
        extra = ["--mask", str(tmp_path / mask.get(case, "black.png"))]
    # a model folder that does not exist: the mask must be checked before any model is loaded
    proc = _generate(tmp_path / "no-model", tmp_path, *image, *extra)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def _model_parsers(parser, path=()):
    """(command path, parser) of every (sub)command that loads a model for inference (--device and --dtype: not train, export)."""
    import argparse

    found = []
    options = {s for a in parser._actions for s in a.option_strings}
    if {"--device", "--dtype"} <= options:
        found.append((path, parser))
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _model_parsers(sub, (*path, name))
    return found


def test_quantize_and_memory_flags_on_every_front_end():
    from omnigen.cli.args import MEMORY_PRESETS
    from omnigen.cli.main import build_parser
    from omnigen.weights.quantize import QUANTIZE_CHOICES

    parsers = _model_parsers(build_parser())
    tops = {path[0] for path, _ in parsers}
    assert {"generate", "serve", "batch", "demo", "eval"} <= tops, tops
    for path, p in parsers:
        options = {s: a for a in p._actions for s in a.option_strings}
        assert tuple(options["--quantize"].choices) == QUANTIZE_CHOICES, path
        assert tuple(options["--memory"].choices) == tuple(MEMORY_PRESETS), path
        assert "memory, not speed" in options["--quantize"].help


def _namespace(**changes):
    import argparse

    base = {"model": None, "vae": None, "device": "cpu", "dtype": "float32", "quantize": None, "memory": None}
    return argparse.Namespace(**(base | changes))


@pytest.mark.parametrize(
    "quantize, layer",
    [("int8", None), ("fp8", "Fp8Linear"), ("nf4", "Linear4bit"), ("none", "Linear")],
)
def test_quantize_flag_quantizes_the_decoder(quantize, layer):
    from omnigen.cli.args import load_pipeline
    from omnigen.weights.quantize import linear_weight_bytes

    if quantize == "nf4":
        pytest.importorskip("bitsandbytes")
    plain = linear_weight_bytes(load_pipeline(_namespace()).model.llm.layers)
    pipe = load_pipeline(_namespace(quantize=quantize))
    proj = pipe.model.llm.layers[0].mlp.down_proj
    if layer is not None:
        assert type(proj).__name__ == layer
    else:  # int8: torchao's tensor or the native Int8Linear
        assert proj.weight.dtype == torch.int8 or "Int8" in type(proj.weight).__name__
    if quantize != "nf4":  # bitsandbytes' packed weight is not a plain tensor to count
        expected = {"none": 1, "int8": 1 / 4, "fp8": 1 / 4}[quantize]
        assert linear_weight_bytes(pipe.model.llm.layers) == pytest.approx(
            plain * expected, rel=0.05
        )  # + scales
    image = pipe("a red square", num_inference_steps=2, seed=0)[0]
    assert image.size == (pipe.defaults.width, pipe.defaults.height)


def test_memory_presets_set_the_switches_and_an_explicit_quantize_wins():
    from omnigen.cli.args import MEMORY_PRESETS, load_pipeline

    for preset, (kind, offload_model, offload_kv_cache, separate) in MEMORY_PRESETS.items():
        pipe = load_pipeline(_namespace(memory=preset))
        d = pipe.defaults
        assert (d.offload_model, d.offload_kv_cache, d.separate_cfg_infer) == (
            offload_model,
            offload_kv_cache,
            separate,
        ), preset
        proj = pipe.model.llm.layers[0].mlp.down_proj  # int8: torchao's weight tensor or Int8Linear
        quantized = type(proj) is not torch.nn.Linear or type(proj.weight) is not torch.nn.Parameter
        assert quantized == (kind != "none"), preset
    pipe = load_pipeline(_namespace(memory="minimal", quantize="fp8"))
    assert type(pipe.model.llm.layers[0].mlp.down_proj).__name__ == "Fp8Linear"
    assert pipe.defaults.offload_model


def test_generate_with_memory_minimal_and_bad_quantize(tmp_path):
    from omnigen.cli.main import main

    out = tmp_path / "minimal.png"
    assert main(["generate", "a red square", "--memory", "minimal", "--steps", "2", "-o", str(out)]) == 0
    assert Image.open(out).size[0] > 0
    with pytest.raises(SystemExit) as err:
        main(["generate", "a red square", "--quantize", "int4", "-o", str(out)])
    assert err.value.code == 2


def test_quantize_errors_name_the_options(monkeypatch):
    from omnigen.pipeline import OmniGenPipeline
    from omnigen.weights.quantize import quantize

    model = OmniGenPipeline.from_pretrained(None).model
    with pytest.raises(ValueError, match="none, int8, fp8, nf4"):
        quantize(model, "int4")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ValueError, match="nf4 needs bitsandbytes.*int8 or fp8"):
        quantize(model, "nf4")


def _main_error(argv, caplog, capsys) -> str:
    """``main(argv)`` in-process: exit 2 with one error line and no traceback; returns that line."""
    import logging

    from omnigen.cli.main import main

    with caplog.at_level(logging.INFO, logger="omnigen"):
        assert main(argv) == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None, errors
    assert "Traceback" not in capsys.readouterr().err
    message = errors[0].getMessage()
    assert "\n" not in message
    return message


def _device_defaults(parser, prefix="") -> dict[str, str]:
    """The --device default of every (sub)command under ``parser``."""
    import argparse

    found = {}
    for action in parser._actions:
        if "--device" in action.option_strings:
            found[prefix.strip()] = action.default
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_device_defaults(sub, f"{prefix} {name}"))
    return found


def test_every_command_with_a_device_flag_defaults_to_auto():
    from omnigen.cli.main import build_parser

    defaults = _device_defaults(build_parser())
    assert {"generate", "demo", "serve", "batch", "train"} <= {key.split()[0] for key in defaults}
    assert set(defaults.values()) == {"auto"}, defaults


def test_auto_device_is_cuda_exactly_when_available(monkeypatch):
    import torch

    from omnigen.cli.args import resolve_device

    for available, expected in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        assert resolve_device("auto") == expected


@pytest.mark.parametrize(
    "device, cuda, message",
    [
        ("cuda", False, "--device 'cuda': this torch was built without CUDA"),
        ("cuda:3", True, "--device 'cuda:3': this machine has 1 CUDA GPU(s)"),
        ("tpu", False, "--device 'tpu': unknown device; use auto"),
        ("cuda:x", False, "--device 'cuda:x': unknown device"),
    ],
)
def test_an_unusable_device_is_one_line_naming_it(
    tmp_path, monkeypatch, caplog, capsys, device, cuda, message
):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.version, "cuda", "12.1" if cuda else None)
    argv = ["generate", "a red circle", "--device", device, "-o", str(tmp_path / "x.png")]
    assert message in _main_error(argv, caplog, capsys)
    assert message in _main_error(
        ["train", "--config", "x.yaml", "--device", device], caplog.clear() or caplog, capsys
    )


def test_bad_train_config_output_and_seed_are_one_line_naming_the_value(tmp_path, caplog, capsys):
    missing = str(tmp_path / "missing.yaml")
    assert f"--config {missing!r}: no such file" in _main_error(
        ["train", "--config", missing], caplog, capsys
    )
    caplog.clear()
    common = ["generate", "a red circle", "--model", str(tmp_path / "no-model")]
    if Path("/proc").is_dir():
        message = _main_error([*common, "-o", "/proc/x.png"], caplog, capsys)
        assert "-o '/proc/x.png': cannot write /proc/x.png" in message
        caplog.clear()
    huge = str(2**64)
    message = _main_error([*common, "--seed", huge, "-o", str(tmp_path / "x.png")], caplog, capsys)
    assert "seed" in message and huge in message and str(2**63 - 1) in message
    assert not (tmp_path / "x.png").exists()
