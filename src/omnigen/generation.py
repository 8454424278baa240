"""``GenerationConfig``: every generation parameter, its default, allowed range, help text and scope.

The single home of the generation parameters. ``OmniGenPipeline`` holds one (the model folder's
``omnigen_generation.json``, this dataclass serialised) and validates a call's keyword overrides with
``GenerationConfig.replace``; the front ends (CLI ``generate``, ``batch`` request keys, the ``serve``
request schema, the ``demo`` controls, the ``eval`` flags) derive their parameters from ``fields()`` and
the metadata below, never from a list of their own.

Scopes (``Param.scope``):
- "request": what one caller of a shared front end (a service request, a batch line, a demo control) may set.
- "operator": memory and speed modes; the one who starts ``omnigen serve`` / ``demo`` / ``batch`` chooses
  them for everyone (command-line flags there), never a single request.
- "model": facts of the model folder (``trained_sizes``); set in ``omnigen_generation.json`` only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from omnigen.sampling.solvers import SOLVERS
from omnigen.util.checks import RULE, Rule, validate

logger = logging.getLogger(__name__)

GENERATION_FILE = "omnigen_generation.json"
OLD_GENERATION_FILE = "generation_config.json"  # our name before transformers' file of that name collided
SCOPES = ("request", "operator", "model")
# The default budget of condition tokens (prompt text + every input image) per request of ``omnigen serve``
# and line of ``omnigen batch``: three 1024 x 1024 inputs of OmniGen-v1 (3 x 4096) and a long prompt.
MAX_CONDITION_TOKENS = 16384
# Every numeric field has a finite range that real use never exceeds, so no front end can hand the model or
# Pillow a value that overflows (a blur radius of 2**31 crashed Pillow) or degenerates (guidance 1e308,
# time shift 5e-324). MAX_SIDE bounds pixel sides; the model's own largest size is usually smaller.
MAX_SIDE = 16384
MAX_MASK_BLUR = 1024  # pixels; Pillow's blur crashes the process on radii near 2**31 (sampling.inpaint too)
DEFAULT_NEGATIVE_PROMPT = (
    "low quality, jpeg artifacts, ugly, duplicate, morbid, mutilated, extra fingers, mutated hands, "
    "poorly drawn hands, poorly drawn face, mutation, deformed, blurry, dehydrated, bad anatomy, "
    "bad proportions, extra limbs, cloned face, disfigured, gross proportions, malformed limbs, "
    "missing arms, missing legs, extra arms, extra legs, fused fingers, too many fingers."
)
# ``GenerationConfig.preset``: the values a preset gives the fields its caller leaves unset (explicit
# values win). "fast": the fewest transformer evaluations that keep the default's accuracy (within 0.02 at
# <= 0.3x the time of 25 Euler steps), chosen with ``scripts/sampler_sweep.py`` on the shipped model
# (docs/sampler_sweep.json, 72 held-out samples): Heun at 6 evaluations, 0.333 strict vs 0.347 for 25
# Euler steps, at 0.25x the time (PSNR 31.9 dB against 50 Euler steps). Guidance from t = 0.25 on (none at
# the first evaluation, on pure noise): right on 2.8 points more held-out samples than Heun 6 with guidance
# everywhere (0.446 vs 0.418, paired over 1,120 samples, p < 0.001), level with 25 Euler steps (0.449,
# p = 0.66), at 16 evaluations instead of 18 for a one-image edit (``scripts/guidance_interval.py``,
# docs/guidance_interval.json).
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"sampler": "heun", "num_inference_steps": 6, "time_shift": None, "guidance_start": 0.25},
}


@dataclass(frozen=True)
class Param(Rule):
    """A field's ``Rule`` (its kind, range and choices: ``omnigen.util.checks``) plus what a front end
    needs to know about it."""

    help: str = ""
    scope: str = "request"
    aliases: tuple[str, ...] = ()  # extra command-line spellings, e.g. "--steps"
    label: str = ""  # the demo's label (default: the name in words)
    choice_flags: bool = False  # each choice is also a command-line switch of its own ("--fast")

    @property
    def python_type(self) -> type:
        return {"int": int, "float": float, "bool": bool, "str": str, "choice": str}.get(self.kind, tuple)


def _param(default: Any, kind: str, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={RULE: Param(kind, help=help, **kwargs)})


@dataclass(frozen=True)
class GenerationConfig:
    """Defaults of ``OmniGenPipeline.__call__`` (OmniGen-v1's own defaults unless a model folder says
    otherwise). Construction validates every field; model-dependent rules (multiples of the image patch,
    the largest size) are the model config's (``OmniGenConfig.check_image_size``)."""

    height: int = _param(1024, "int", "output height in pixels", low=1, high=MAX_SIDE, label="Height")
    width: int = _param(1024, "int", "output width in pixels", low=1, high=MAX_SIDE, label="Width")
    num_inference_steps: int = _param(
        50,
        "int",
        "velocity evaluations of the sampler",
        low=1,
        high=1000,
        aliases=("--steps",),
        label="Inference steps",
    )
    guidance_scale: float = _param(
        3.0, "float", "text guidance scale", low=0, high=100, aliases=("--guidance",), label="Guidance scale"
    )
    img_guidance_scale: float = _param(
        1.6,
        "float",
        "image guidance scale",
        low=0,
        high=100,
        aliases=("--img-guidance",),
        label="Image guidance scale",
    )
    use_img_guidance: bool = _param(True, "bool", "image guidance when the prompt has input images")
    guidance_start: float = _param(
        0.0,
        "float",
        "guidance applies from this time t of the flow (0 = noise; sampling.guidance)",
        low=0,
        high=1,
        label="Guidance from t",
    )
    guidance_end: float = _param(
        1.0,
        "float",
        "guidance applies until this time t (outside: the conditional branch alone, fewer evaluations)",
        low=0,
        high=1,
        label="Guidance until t",
    )
    negative_prompt: str = _param(
        DEFAULT_NEGATIVE_PROMPT, "str", "the unconditional branch's prompt", label="Negative prompt"
    )
    max_input_image_size: int = _param(
        1024,
        "int",
        "longer side input images are resized to",
        low=1,
        high=MAX_SIDE,
        label="Max input image size (longer side)",
    )
    use_input_image_size_as_output: bool = _param(
        False,
        "bool",
        "output size = the (resized) input image's size",
        aliases=("--use-input-size",),
        label="Use input image size as output (one input image; ignores height/width)",
    )
    seed: int | None = _param(
        None, "int", "noise seed; image k uses seed + k (None: random)", low=0, high=2**63 - 1, optional=True
    )
    num_images_per_prompt: int = _param(
        1, "int", "images per prompt", low=1, high=256, aliases=("--num-images",)
    )
    sampler: str = _param("euler", "choice", "ODE solver (omnigen.sampling.solvers)", choices=SOLVERS)
    time_shift: float | None = _param(
        None,
        "float",
        "time-grid shift s > 0 (flow.shift_time; None: no shift)",
        low=1e-3,
        high=1e3,
        low_open=True,
        optional=True,
    )
    preset: str | None = _param(
        None,
        "choice",
        "fill sampler, steps, time shift and guidance interval from generation.PRESETS where not given (None: no preset)",
        choices=tuple(PRESETS),
        optional=True,
        choice_flags=True,
    )
    mask_blur: int = _param(
        0, "int", "blur radius in pixels of an inpainting mask's edge", low=0, high=MAX_MASK_BLUR
    )
    strength: float = _param(
        1.0,
        "float",
        "img2img: start from the first input image noised to t = 1 - strength (1: from noise; sampling.img2img)",
        low=0,
        high=1,
        label="Strength (img2img denoise; 1 = from noise)",
    )
    step_cache_threshold: float | None = _param(
        None,
        "float",
        "skip layers at near-identical steps (omnigen.sampling.step_cache; None: off)",
        low=0,
        high=10,
        optional=True,
        aliases=("--step-cache",),
        label="Step cache threshold (0 = exact; 0.05-0.2 skips steps whose input barely changed)",
    )
    vae_tiling: bool = _param(False, "bool", "decode large images tile by tile")
    use_kv_cache: bool = _param(
        True, "bool", "prefill the condition once", scope="operator", label="KV cache"
    )
    offload_kv_cache: bool = _param(
        True,
        "bool",
        "keep the condition cache in host memory",
        scope="operator",
        label="Offload KV cache to CPU",
    )
    offload_model: bool = _param(
        False,
        "bool",
        "decoder layers visit the device one at a time",
        scope="operator",
        label="Offload model to CPU",
    )
    separate_cfg_infer: bool = _param(
        True,
        "bool",
        "run each CFG branch as its own batch",
        scope="operator",
        label="Separate CFG inference (less memory)",
    )
    mask_free_attention: bool = _param(
        True, "bool", "unpadded cached steps attend without a mask (exact)", scope="operator"
    )
    trained_sizes: tuple[int, ...] = _param(
        (), "sizes", "image sides the model was trained at (empty: any)", scope="model"
    )

    def __post_init__(self) -> None:
        validate(self)
        if self.guidance_start > self.guidance_end:
            raise ValueError(
                f"guidance_start={self.guidance_start} must be <= guidance_end={self.guidance_end}"
            )
        if self.trained_sizes and not self.use_input_image_size_as_output:
            for name in ("height", "width"):
                if getattr(self, name) not in self.trained_sizes:
                    raise ValueError(
                        f"{name}={getattr(self, name)}: this model was trained at sides "
                        f"{list(self.trained_sizes)} only (trained_sizes)"
                    )

    def replace(self, **overrides: Any) -> GenerationConfig:
        """This config with ``overrides`` (None = keep the default), validated; an unknown name is a
        TypeError. ``preset=`` here fills the preset's fields that ``overrides`` does not set (this
        config's own values of them are replaced: the preset is the caller's choice, the config the
        model's); a config that already carries a preset keeps its values."""
        unknown = sorted(set(overrides) - set(names()))
        if unknown:  # a TypeError, as Python's own for a call with an unknown keyword
            raise TypeError(
                f"unexpected keyword argument {unknown[0]!r}: not a generation parameter; allowed: {names()}"
            )
        return replace(self, **with_preset({k: v for k, v in overrides.items() if v is not None}))

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["trained_sizes"] = list(self.trained_sizes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "generation config") -> GenerationConfig:
        if not isinstance(data, dict):
            raise TypeError(f"{where} must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(names()))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; allowed: {names()}")
        try:
            return cls(**with_preset(data))
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}: {err}") from None

    @classmethod
    def load(cls, folder: str | Path) -> GenerationConfig:
        """The folder's ``omnigen_generation.json``; else our old ``generation_config.json`` (a
        transformers file of that name, which carries ``transformers_version``, is not ours and is
        ignored); else the defaults."""
        folder = Path(folder)
        for name in (GENERATION_FILE, OLD_GENERATION_FILE):
            path = folder / name
            if not path.is_file():
                continue
            data = json.loads(path.read_text())
            if name == OLD_GENERATION_FILE and isinstance(data, dict) and "transformers_version" in data:
                logger.debug("%s is transformers' generation config, not ours: ignored", path)
                continue
            return cls.from_dict(data, str(path))
        return cls()

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / GENERATION_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def with_preset(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with its preset's fields (``PRESETS``) added where ``values`` has no value of its own."""
    preset = param("preset").check("preset", values.get("preset"))
    return values if preset is None else {**PRESETS[preset], **values}


def param(name: str) -> Param:
    return _FIELDS[name].metadata[RULE]


def names(scope: str | None = None) -> list[str]:
    """Field names (of one scope, or all), in declaration order."""
    return [f.name for f in fields(GenerationConfig) if scope is None or param(f.name).scope == scope]


def default(name: str) -> Any:
    f = _FIELDS[name]
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


_FIELDS = {f.name: f for f in fields(GenerationConfig)}
