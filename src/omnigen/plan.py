"""One generation call, resolved once: ``plan_call(...) -> CallPlan``.

The single home of what a call *is* before any work happens: its validated ``GenerationConfig``, its
prompts (an empty or whitespace-only prompt is refused), each prompt's output size (explicit
height/width, the input image's prepared size with ``use_input_image_size_as_output``, or the mask's
canvas), the masks, the exact condition tokens of each prompt (the processor's own tokenisation of the
text and the token count of every input image at its prepared size) and the sampling schedule (how
many model evaluations and steps, so callbacks and progress bars know their count).

Every front end resolves a call here: ``OmniGenPipeline.__call__`` (and ``OmniGenPipeline.plan``), the
service's request checks (``omnigen.serve.inputs``), batch lines (``omnigen.batch.params``) and the demo's
progress bar (``omnigen.demo.app``). Planning opens input images' headers only (a mask's canvas is
prepared in full); no model runs.

Errors are ValueError/TypeError naming the value; each carries ``field`` (the parameter at fault:
"prompt", "images", "mask", "height", ...) so the service can say which field of a request it was.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from omnigen.config import OmniGenConfig
from omnigen.generation import GenerationConfig
from omnigen.sampling import img2img
from omnigen.sampling.inpaint import CanvasMask, MaskLike, check_output_size, prepare_masks
from omnigen.sampling.solvers import EVALUATIONS_PER_STEP, Schedule, plan
from omnigen.sampling.step_cache import StepCache
from omnigen.text.processor import OmniGenProcessor, image_size, resized_size


@dataclass(frozen=True, eq=False)
class CallPlan:
    """Everything one call will do, fixed and checked before it starts (one entry per prompt)."""

    config: GenerationConfig  # the defaults with the call's overrides, validated
    prompts: tuple[str, ...]
    images: tuple[tuple[Any, ...], ...]  # each prompt's input images, as the caller gave them
    sizes: tuple[tuple[int, int], ...]  # (height, width) of each prompt's output
    masks: tuple[CanvasMask | None, ...]  # each prompt's mask on its canvas (its first input image)
    condition_tokens: tuple[int, ...]  # tokens of each prompt's conditional row (text + input images)
    schedule: Schedule  # the solver's steps (one sampling run; a call runs one per distinct size)
    seed: int  # image k of the call (prompt-major) uses seed + k
    negative_tokens: int | None = None  # tokens of the call's own negative prompt (None: the model's)

    @property
    def budget_tokens(self) -> tuple[int, ...]:
        """What a condition-token budget counts per prompt: its conditional row plus the call's own
        negative prompt (the model's default one is the operator's choice, and short)."""
        return tuple(tokens + (self.negative_tokens or 0) for tokens in self.condition_tokens)

    @property
    def num_evaluations(self) -> int:
        """Model (velocity) evaluations of one sampling run: ``num_inference_steps``."""
        return self.schedule.num_evaluations

    @property
    def num_steps(self) -> int:
        """Solver steps of one sampling run: the calls of ``callback_on_step_end`` (Heun's steps cost two
        evaluations, so with Heun there are fewer steps than evaluations)."""
        return self.schedule.num_steps

    @property
    def progress(self) -> tuple[int, ...]:
        """Evaluations done after each step (what a progress bar shows after step i; the last entry is
        ``num_evaluations``)."""
        done, out = 0, []
        for kind in self.schedule.kinds:
            done += EVALUATIONS_PER_STEP[kind]
            out.append(done)
        return tuple(out)

    @property
    def num_images(self) -> int:
        return len(self.prompts) * self.config.num_images_per_prompt

    @property
    def batched(self) -> bool:
        """More than one prompt (a list was given)."""
        return len(self.prompts) > 1


@contextmanager
def _about(field: str) -> Iterator[None]:
    """Tag a ValueError/TypeError raised inside with the parameter at fault (if it has none yet)."""
    try:
        yield
    except (ValueError, TypeError) as err:
        if getattr(err, "field", None) is None:
            err.field = field  # type: ignore[attr-defined]
        raise


def normalise(prompt: Any, input_images: Any) -> tuple[list[str], list[list]]:
    """(prompts, each prompt's images) from a call's ``prompt`` (str or list of str) and ``input_images``
    (None; for one prompt a list of images or one image; for a list, a list of lists)."""
    if isinstance(prompt, str):
        prompts = [prompt]
        if input_images is not None and not isinstance(input_images, (list, tuple)):
            input_images = [input_images]
        return prompts, [list(input_images or [])]
    if not (isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt)):
        raise TypeError(f"prompt must be a str or a non-empty list of str, got {prompt!r:.80}")
    prompts = list(prompt)
    if input_images is None:
        return prompts, [[] for _ in prompts]
    if not isinstance(input_images, (list, tuple)) or len(input_images) != len(prompts):
        raise ValueError(
            f"with {len(prompts)} prompts, input_images must be a list of {len(prompts)} lists (or None)"
        )
    return prompts, [list(x or []) for x in input_images]


def check_prompts(prompts: Sequence[str]) -> None:
    """The rule for every front end: a prompt must say something (an empty or whitespace-only prompt
    would sample an unconditioned image)."""
    for index, text in enumerate(prompts):
        if not text.strip():
            where = f"prompt[{index}]" if len(prompts) > 1 else "prompt"
            raise ValueError(
                f"{where} is empty ({text!r}): describe the image to generate; refer to input images "
                "as <img><|image_1|></img>, ..."
            )


def prepared_sizes(images: Sequence[Any], longest: int, multiple: int) -> list[tuple[int, int]]:
    """(width, height) of each input image after the processor's resize and crop (headers only)."""
    out = []
    for image in images:
        width, height = image_size(image)
        size = resized_size(width, height, longest, multiple)
        if min(size) < multiple:
            raise ValueError(
                f"input image of {width}x{height} is smaller than {multiple}x{multiple} once resized to "
                f"max_input_image_size={longest}"
            )
        out.append(size)
    return out


def count_condition_tokens(processor: OmniGenProcessor, prompt: str, sizes: Sequence[tuple[int, int]]) -> int:
    """Tokens of the conditional row of ``prompt`` with input images of the prepared ``sizes`` (width,
    height): the processor's tokenisation, each image's span counted at its size (stand-ins, no pixels)."""
    stand_ins = [torch.zeros(1).expand(3, h, w) for w, h in sizes]  # shapes only, no memory
    return len(processor(prompt, stand_ins).input_ids)


def check_output(
    cfg: GenerationConfig, model_config: OmniGenConfig, size: tuple[int, int], source: str
) -> None:
    """The output size rule for every size a call can get: the model's (a positive multiple of its image
    multiple, at most its largest side) and the model folder's ``trained_sizes``. ``source``: where the
    size came from, for the message."""
    height, width = size
    model_config.check_image_size(height, width, "output")
    sides = cfg.trained_sizes
    if sides and (height not in sides or width not in sides):
        raise ValueError(
            f"output {height}x{width} (height x width, {source}): this model was trained at sides "
            f"{list(sides)} only (trained_sizes); use an input of that shape or set height and width"
        )


def plan_call(
    defaults: GenerationConfig,
    model_config: OmniGenConfig,
    processor: OmniGenProcessor,
    prompt: str | Sequence[str],
    input_images: Any = None,
    mask: MaskLike | Sequence[MaskLike | None] | None = None,
    **overrides: Any,
) -> CallPlan:
    """Resolve and check one call of ``OmniGenPipeline`` (its arguments, the pipeline's ``defaults``,
    model config and processor). ``overrides``: fields of ``GenerationConfig`` (None keeps the default)."""
    cfg = defaults.replace(**overrides)
    prompts, images = normalise(prompt, input_images)
    with _about("prompt"):
        check_prompts(prompts)
    with _about("max_input_image_size"):
        processor.check_max_input_image_size(cfg.max_input_image_size)
    with _about("images"):
        if cfg.use_input_image_size_as_output and any(len(x) != 1 for x in images):
            raise ValueError("use_input_image_size_as_output needs exactly one input image per prompt")
        multiple = model_config.image_multiple
        inputs = [prepared_sizes(imgs, cfg.max_input_image_size, multiple) for imgs in images]
    with _about("prompt"):
        tokens = tuple(count_condition_tokens(processor, p, s) for p, s in zip(prompts, inputs, strict=True))
    with _about("negative_prompt"):
        negative = overrides.get("negative_prompt")
        negative_tokens = count_condition_tokens(processor, negative, []) if negative else None
    with _about("step_cache_threshold"):
        if cfg.step_cache_threshold is not None:
            StepCache(cfg.step_cache_threshold, cfg.num_inference_steps)  # validates the threshold
    with _about("num_inference_steps"):
        schedule = plan(cfg.sampler, cfg.num_inference_steps, cfg.time_shift or 1.0)
    with _about("mask"):
        masks = prepare_masks(
            mask, images, cfg.mask_blur, cfg.max_input_image_size, multiple, not isinstance(prompt, str)
        )
        if not cfg.use_input_image_size_as_output:
            check_output_size(masks, overrides.get("height"), overrides.get("width"))
    sizes = tuple(_output_size(cfg, model_config, m, s) for m, s in zip(masks, inputs))
    with _about("strength"):
        img2img.check_start(cfg.strength, [(s[0][1], s[0][0]) if s else None for s in inputs], sizes)
    seed = random.randrange(2**31) if cfg.seed is None else cfg.seed
    return CallPlan(
        cfg,
        tuple(prompts),
        tuple(map(tuple, images)),
        sizes,
        tuple(masks),
        tokens,
        schedule,
        seed,
        negative_tokens,
    )


def _output_size(
    cfg: GenerationConfig, model_config: OmniGenConfig, mask: CanvasMask | None, inputs: list[tuple[int, int]]
) -> tuple[int, int]:
    """One prompt's output (height, width): the mask's canvas, else the input image's prepared size
    (``use_input_image_size_as_output``), else height x width; the last two checked by ``check_output``.
    A canvas is the prepared input image itself (a model size by construction); it is not held to
    ``trained_sizes``, so masked edits and outpainting of other shapes stay possible."""
    if mask is not None:
        return mask.size  # the prepared first input image: a multiple of the image multiple by construction
    if cfg.use_input_image_size_as_output:
        width, height = inputs[0]
        with _about("use_input_image_size_as_output"):
            check_output(cfg, model_config, (height, width), "the input image's size")
        return height, width
    try:
        check_output(cfg, model_config, (cfg.height, cfg.width), "height and width")
    except (ValueError, TypeError) as err:
        err.field = "width" if str(err).startswith("output width") else "height"  # type: ignore[attr-defined]
        raise
    return cfg.height, cfg.width
