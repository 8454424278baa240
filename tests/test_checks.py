"""omnigen.util.checks: the one validator (a field's annotation and Rule), and the configs that use it."""

from __future__ import annotations

import dataclasses
import math

import pytest

from omnigen.util.checks import Rule, check_choice, check_float, check_int, option, validate


@dataclasses.dataclass(frozen=True)
class Settings:
    steps: int = option(10, "steps", low=1, high=100)
    rate: float = option(0.5, "a rate", low=0, high=1, high_open=True)
    scale: float | None = option(None, "a positive scale", low=0, low_open=True)
    mode: str = option("fast", "how", choices=("fast", "slow"))
    flag: bool = option(False, "a switch")
    sizes: tuple[int, ...] = option((), "sides", kind="sizes")
    names: list[str] = option(help="names", factory=list)

    def __post_init__(self) -> None:
        validate(self, prefix="settings.")


def test_good_values_pass_and_are_normalised():
    s = Settings(steps=3.0, rate=0, scale=2, mode="slow", flag=True, sizes=[16, 32], names=["a"])
    assert s.steps == 3 and type(s.steps) is int  # a UI slider's 3.0
    assert s.rate == 0.0 and type(s.rate) is float and s.scale == 2.0 and type(s.scale) is float
    assert s.sizes == (16, 32) and s.mode == "slow" and s.flag is True
    assert Settings().scale is None and Settings(steps=100).steps == 100


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"steps": 0}, ValueError, "settings.steps must be an int between 1 and 100, got 0"),
        ({"steps": 101}, ValueError, "settings.steps must be an int between 1 and 100, got 101"),
        ({"steps": 2.5}, TypeError, "settings.steps must be an int between 1 and 100, got 2.5"),
        ({"steps": True}, TypeError, "settings.steps must be an int between 1 and 100, got True"),
        ({"steps": "3"}, TypeError, "settings.steps must be an int between 1 and 100, got '3'"),
        ({"steps": None}, TypeError, "settings.steps must be an int between 1 and 100, got None"),
        ({"steps": math.inf}, TypeError, "settings.steps must be an int between 1 and 100, got inf"),
        ({"rate": math.nan}, ValueError, "settings.rate must be a finite number >= 0 and < 1, got nan"),
        ({"rate": math.inf}, ValueError, "settings.rate must be a finite number >= 0 and < 1, got inf"),
        ({"rate": 1.0}, ValueError, "settings.rate must be a finite number >= 0 and < 1, got 1.0"),
        ({"rate": -0.1}, ValueError, "settings.rate must be a finite number >= 0 and < 1, got -0.1"),
        ({"rate": False}, TypeError, "settings.rate must be a finite number >= 0 and < 1, got False"),
        ({"scale": 0}, ValueError, "settings.scale must be a finite number > 0, got 0"),
        ({"scale": "big"}, TypeError, "settings.scale must be a finite number > 0 or None, got 'big'"),
        ({"mode": "medium"}, ValueError, "settings.mode must be one of 'fast', 'slow', got 'medium'"),
        ({"flag": 1}, TypeError, "settings.flag must be true or false, got 1"),
        ({"sizes": [16, 0]}, ValueError, r"settings.sizes\[1\] must be an int >= 1, got 0"),
        ({"sizes": 16}, TypeError, "settings.sizes must be a list of positive ints, got 16"),
        ({"names": ["a", 2]}, TypeError, r"settings.names must be a list of str, got list \['a', 2\]"),
    ],
)
def test_bad_values_name_the_field_the_value_and_what_is_allowed(changes, error, message):
    with pytest.raises(error, match=f"^{message}$"):
        Settings(**changes)


def test_the_single_value_checks_follow_the_same_rules():
    assert check_int("n", 4.0, 1) == 4
    with pytest.raises(TypeError, match="n must be an int >= 1, got True"):
        check_int("n", True, 1)
    with pytest.raises(ValueError, match="n must be an int <= 3, got 4"):
        check_int("n", 4, high=3)
    assert check_float("x", 2, 0, low_open=True) == 2.0
    with pytest.raises(ValueError, match="x must be a finite number > 0, got -inf"):
        check_float("x", -math.inf, 0, low_open=True)
    with pytest.raises(ValueError, match="x must be a finite number, got nan"):
        check_float("x", math.nan)
    with pytest.raises(ValueError, match="c must be one of 'a', 'b', got 'z'"):
        check_choice("c", "z", ("a", "b"))
    with pytest.raises(ValueError, match="Rule kind must be one of"):
        Rule("integer")
    assert Rule("int", 1).describe() == "an int >= 1"
    assert Rule("float", 0, 1, low_open=True).describe() == "a finite number > 0 and <= 1"


def test_the_configs_declare_their_fields_with_the_validator():
    """Every field of the model, generation and training configs is checked by ``validate``: a bad value
    of any of them fails naming the field (the rule is not restated by hand in the config)."""
    from omnigen.config import OmniGenConfig, TransformerConfig
    from omnigen.generation import GenerationConfig
    from omnigen.training.config import LoraSettings, Stage

    for cls, base in (
        (TransformerConfig, {}),
        (OmniGenConfig, {}),
        (GenerationConfig, {}),
        (Stage, {"resolution": 16, "steps": 1, "batch_size": 1, "lr": 0.1}),
        (LoraSettings, {"rank": 2}),
    ):
        for f in dataclasses.fields(cls):
            if f.name in ("transformer", "rope_scaling", "negative_prompt", "target_modules"):
                continue
            for bad in ("x", math.nan, -1) + (() if f.type == "bool" else (True,)):  # taken by no field
                with pytest.raises(
                    (TypeError, ValueError), match=f"^(stage |lora.)?{f.name} must be .*, got "
                ):
                    cls(**{**base, f.name: bad})


def test_a_training_config_field_out_of_range_is_named(tmp_path):
    from omnigen.training.config import TrainConfig

    base = {
        "data": ["x.jsonl"],
        "out_dir": "o",
        "model": {"a": 1},
        "stages": [{"resolution": 16, "steps": 1, "batch_size": 1, "lr": 0.1}],
    }
    assert TrainConfig.from_dict(base).grad_accum == 1
    for name, bad, message in (
        ("grad_accum", 0, "grad_accum must be an int >= 1, got 0"),
        ("keep_checkpoints", 0, "keep_checkpoints must be an int >= 1, got 0"),
        ("warmup_steps", -1, "warmup_steps must be an int >= 0, got -1"),
        ("clip_grad", math.inf, "clip_grad must be a finite number >= 0, got inf"),
        ("drop_both", 1.5, "drop_both must be a finite number between 0 and 1, got 1.5"),
        ("precision", "fp8", "precision must be one of 'fp32', 'bf16', 'fp16', got 'fp8'"),
        ("grow_layers", 0, "grow_layers must be an int >= 1, got 0"),
    ):
        with pytest.raises(ValueError, match=message):
            TrainConfig.from_dict({**base, "init_from": "m", name: bad})
