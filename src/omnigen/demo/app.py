"""Web UI: ``build_demo(pipeline) -> gr.Blocks`` and the ``omnigen demo`` subcommand.

This module owns the demo's controls (those of the original OmniGen app: prompt with image tags, three
image slots, then one control per request field of ``GenerationConfig``; the memory modes are
``omnigen demo`` flags; a brush on image 1 paints a mask, ``omnigen.sampling.inpaint``), turning their values
into one pipeline call (``run_generation``, testable without gradio), the live progress bar and the
clickable example gallery. Gradio is imported only inside the functions that need it, and nothing is
loaded or launched at import: the CLI builds the pipeline and launches the Blocks.
"""

from __future__ import annotations

import argparse
import html
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageChops

from omnigen import generation
from omnigen.demo.examples import MAX_INPUT_IMAGES, DemoExample, default_examples_dir, load_examples
from omnigen.util.checks import check_float, check_int

if TYPE_CHECKING:
    import gradio as gr

    from omnigen.pipeline import OmniGenPipeline

logger = logging.getLogger(__name__)

MAX_SEED = 2**31 - 1
IMAGE_SLOTS = tuple(f"image_{k}" for k in range(1, MAX_INPUT_IMAGES + 1))
# Element ids the browser test (and custom CSS) rely on; every control is "omnigen-" + its name.
ELEM_PROMPT, ELEM_GENERATE, ELEM_OUTPUT, ELEM_RESULT = (
    "omnigen-prompt",
    "omnigen-generate",
    "omnigen-output",
    "omnigen-result",
)


def _elem_id(name: str) -> str:
    return "omnigen-" + name.replace("_", "-")


def control_name(elem_id: str) -> str:
    """Inverse of the element id given to each control."""
    return elem_id.removeprefix("omnigen-").replace("-", "_")


StepFn = Callable[[int, int], None]
# Small images (the miniature model makes 16x16) are shown scaled up, with sharp pixels.
CSS = """
#omnigen-output img, [id^="omnigen-image-"] img {
    width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;
}
"""


@dataclass(frozen=True)
class DemoResult:
    image: Image.Image
    seed: int
    seconds: float

    @property
    def caption(self) -> str:
        return f"Seed used: {self.seed} · {self.image.width}x{self.image.height} px · {self.seconds:.1f} s"


def brush_mask(value: Any) -> Image.Image | None:
    """The strokes painted on image 1 (the layers of its editor, RGBA on a transparent background) as an
    'L' mask: painted = regenerate, untouched = keep exactly. None when nothing is painted."""
    if not isinstance(value, Mapping):
        return None
    layers = [layer for layer in value.get("layers") or [] if isinstance(layer, Image.Image)]
    if not layers:
        return None
    alpha = layers[0].convert("RGBA").getchannel("A")
    for layer in layers[1:]:
        alpha = ImageChops.lighter(alpha, layer.convert("RGBA").getchannel("A"))
    return alpha if alpha.getextrema()[1] > 0 else None


def collect_images(values: Mapping[str, Any]) -> list[Image.Image]:
    """The filled image slots in order; a filled slot after an empty one is an error (tags would shift).
    Image 1 may be its editor's value (a dict): its background is the image."""
    images: list[Image.Image] = []
    empty: str | None = None
    for slot in IMAGE_SLOTS:
        image = values.get(slot)
        if isinstance(image, Mapping):
            image = image.get("background")
        if image is None:
            empty = empty or slot
            continue
        if empty is not None:
            raise ValueError(
                f"{slot.replace('_', ' ')} is set but {empty.replace('_', ' ')} is empty: fill the image slots "
                "in order (<|image_1|> is the first slot)"
            )
        if not isinstance(image, Image.Image):
            raise TypeError(f"{slot} must be an image, got {type(image).__name__}")
        images.append(image.convert("RGB"))
    return images


# Request-scope fields of GenerationConfig the demo has no control for, and why (a test checks that every
# other field has one). The operator-scope memory modes are ``omnigen demo`` flags.
NOT_CONTROLS = {
    "seed": "its own Seed box with 'Randomize seed'",
    "num_images_per_prompt": "the demo shows one image",
    "preset": "its sampler and steps controls always send their values, which win over a preset",
}
# The UI ranges of the sliders (the allowed ranges are GenerationConfig's): (low, high, step).
SLIDERS = {
    "guidance_scale": (1.0, 5.0, 0.1),
    "img_guidance_scale": (1.0, 2.0, 0.1),
    "num_inference_steps": (1, 100, 1),
    "step_cache_threshold": (0.0, 0.5, 0.01),
    "mask_blur": (0, 16, 1),
}
SIDES = ("height", "width", "max_input_image_size")


def control_fields() -> list[str]:
    """The GenerationConfig fields with a demo control, in the config's order."""
    return [name for name in generation.names("request") if name not in NOT_CONTROLS]


def _value(name: str, value: Any) -> Any:
    """A UI value as the config's type (sliders send floats; an empty box is None = the default)."""
    param = generation.param(name)
    if name == "step_cache_threshold" and value == 0:
        return None  # 0 on the slider: every step runs every layer (exact)
    if value is None or (isinstance(value, str) and param.kind != "str" and not value.strip()):
        return None
    if param.kind == "int":
        return check_int(name, value)
    if param.kind == "float":
        return check_float(name, value)
    if param.kind == "bool":
        return bool(value)
    return value


def pipeline_arguments(values: Mapping[str, Any]) -> dict[str, Any]:
    """The UI's values (keyed by control name) -> keyword arguments of OmniGenPipeline.__call__."""
    prompt = values.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(
            "Enter a prompt. Refer to input images as <img><|image_1|></img>, <img><|image_2|></img>, ..."
        )
    if values.get("randomize_seed"):
        seed = random.randint(0, MAX_SEED)
    elif values.get("seed") is None:
        raise ValueError("Enter a seed, or tick 'Randomize seed'")
    else:
        seed = check_int("seed", values["seed"], 0, MAX_SEED)
    images = collect_images(values)
    kwargs = {name: _value(name, values.get(name)) for name in control_fields() if name in values}
    if "negative_prompt" in kwargs:
        kwargs["negative_prompt"] = kwargs["negative_prompt"] or ""
    mask = brush_mask(values.get(IMAGE_SLOTS[0]))
    if mask is not None:  # the output is image 1's canvas: the size sliders do not apply
        kwargs = {k: v for k, v in kwargs.items() if k not in ("height", "width")} | {"mask": mask}
    return dict(prompt=prompt.strip(), input_images=images or None, seed=seed, **kwargs)


def run_generation(
    pipe: OmniGenPipeline, values: Mapping[str, Any], on_step: StepFn | None = None
) -> DemoResult:
    """One image for the UI's values. Bad values raise ValueError/TypeError with a user-facing message.

    ``on_step(done, total)`` is called after every sampling step (the progress bar): ``done`` model
    evaluations of ``total`` (the call's plan, ``omnigen.plan``: a Heun step makes two), ending at total.
    """
    kwargs = pipeline_arguments(values)
    if kwargs.get("use_input_image_size_as_output") and not kwargs["input_images"]:
        raise ValueError("'Use input image size as output' needs an input image in slot 1")
    call = pipe.plan(**kwargs)

    def step_end(_pipe: Any, step: int, _t: float, _latents: Any) -> None:
        if on_step is not None:
            on_step(call.progress[step], call.num_evaluations)

    start = time.perf_counter()
    (image,) = pipe(**kwargs, callback_on_step_end=step_end, progress=False)
    return DemoResult(image, int(image.info.get("seed", kwargs["seed"])), time.perf_counter() - start)


def _field_control(gr: Any, name: str, pipe: OmniGenPipeline) -> Any:
    """The control of one GenerationConfig field, from its metadata and the model's default."""
    param, value = generation.param(name), getattr(pipe.defaults, name)
    config = pipe.model.config
    label = param.label or name.replace("_", " ").capitalize()
    common = {"label": label, "info": param.help, "elem_id": _elem_id(name)}
    if param.kind == "bool":
        return gr.Checkbox(value, **common)
    if param.kind == "choice":
        return gr.Dropdown(list(param.choices), value=value, **common)
    if param.kind == "str":
        return gr.Textbox(value, lines=2, **common)
    trained = pipe.defaults.trained_sizes
    if name in ("height", "width") and trained:  # any other size is refused: offer only these
        info = f"{param.help.rstrip('.')}. This model was trained at {', '.join(map(str, trained))} px only."
        return gr.Dropdown(list(trained), value=value, **(common | {"info": info}))
    if name in SIDES:
        multiple, largest = config.image_multiple, config.max_image_size
        top = largest if name != "max_input_image_size" else max(largest, value)
        return gr.Slider(multiple, top, min(value, top), step=multiple, **common)
    if name in SLIDERS:
        low, high, step = SLIDERS[name]
        return gr.Slider(low, max(high, value or low), value or low, step=step, **common)
    return gr.Number(value, precision=0 if param.kind == "int" else None, minimum=param.low, **common)


def _controls(gr: Any, pipe: OmniGenPipeline) -> dict[str, Any]:
    """Every input control, keyed by the name `pipeline_arguments` reads."""
    c: dict[str, Any] = {}
    c["prompt"] = gr.Textbox(
        label="Prompt",
        lines=3,
        placeholder="Refer to input images as <img><|image_1|></img>, <img><|image_2|></img>, ...",
        elem_id=_elem_id("prompt"),
    )
    with gr.Row():
        for k, slot in enumerate(IMAGE_SLOTS, start=1):
            common = dict(type="pil", format="png", sources=["upload", "clipboard"], elem_id=_elem_id(slot))
            if k > 1:
                c[slot] = gr.Image(label=f"<img><|image_{k}|></img>", height=200, **common)
                continue
            c[slot] = gr.ImageMask(  # paint to regenerate only there (every other pixel is kept exactly)
                label="<img><|image_1|></img> (brush: edit only there)",
                brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed", default_size=2),  # its alpha is read
                layers=False,
                transforms=(),
                height=260,
                scale=2,
                **common,
            )
    main = ("height", "width", "guidance_scale", "img_guidance_scale", "num_inference_steps")
    for name in main:
        c[name] = _field_control(gr, name, pipe)
    with gr.Row():
        c["seed"] = gr.Number(
            0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id=_elem_id("seed")
        )
        c["randomize_seed"] = gr.Checkbox(False, label="Randomize seed", elem_id=_elem_id("randomize_seed"))
    with gr.Accordion("Advanced", open=False):
        for name in control_fields():
            if name not in main:
                c[name] = _field_control(gr, name, pipe)
    return c


def build_demo(pipe: OmniGenPipeline, examples: list[DemoExample] | None = None) -> gr.Blocks:
    """The demo for a ready pipeline (nothing is launched). ``examples`` default: the shipped gallery."""
    try:
        import gradio as gr
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the demo needs gradio: pip install 'omnigen-unified[demo]'") from err
    examples = load_examples() if examples is None else examples

    with gr.Blocks(title="OmniGen", analytics_enabled=False) as demo:
        gr.Markdown(
            "# OmniGen\nOne model for text-to-image, editing, subject-driven generation, visual conditions, "
            "computer-vision tasks and few-shot prompts. Put images in the slots and refer to them in the "
            "prompt as `<img><|image_1|></img>`, `<img><|image_2|></img>`, ..."
        )
        with gr.Row():
            with gr.Column():
                controls = _controls(gr, pipe)
                button = gr.Button("Generate", variant="primary", elem_id=ELEM_GENERATE)
            with gr.Column():
                output = gr.Image(
                    label="Output",
                    type="pil",
                    format="png",
                    interactive=False,
                    height=420,
                    elem_id=ELEM_OUTPUT,
                )
                result = gr.Textbox(label="Result", interactive=False, elem_id=ELEM_RESULT)

        def on_generate(values: dict, progress: gr.Progress = gr.Progress()) -> tuple[Image.Image, str]:
            settings = {name: values[component] for name, component in controls.items()}
            progress(0, desc="starting")
            try:
                out = run_generation(
                    pipe, settings, lambda done, total: progress((done, total), desc="sampling")
                )
            except (ValueError, TypeError) as err:  # bad input: the message, no traceback
                raise gr.Error(
                    html.escape(str(err)), duration=None, title="Invalid input", print_exception=False
                ) from err
            except Exception as err:
                logger.exception("generation failed")
                message = html.escape(f"{type(err).__name__}: {err}")
                raise gr.Error(
                    message, duration=None, title="Generation failed", print_exception=False
                ) from err
            return out.image, out.caption

        gr.on(
            triggers=[button.click, controls["prompt"].submit],
            fn=on_generate,
            inputs=set(controls.values()),
            outputs=[output, result],
            api_name="generate",
            concurrency_limit=1,
        )
        if examples:
            gr.Examples(
                examples=[  # each example brings its documented seed (examples.json)
                    [ex.prompt, *[str(p) for p in ex.images], *[None] * (MAX_INPUT_IMAGES - len(ex.images))]
                    + [ex.seed, False]
                    for ex in examples
                ],
                inputs=[
                    controls["prompt"],
                    *[controls[slot] for slot in IMAGE_SLOTS],
                    controls["seed"],
                    controls["randomize_seed"],
                ],
                example_labels=[ex.label for ex in examples],
                examples_per_page=len(examples),
                label="Examples (click one, then Generate)",
                cache_examples=False,
            )
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo


def launch_demo(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, **kwargs: Any) -> Any:
    """Launch with the example images servable and the demo's CSS; extra kwargs go to ``Blocks.launch``."""
    allowed = [str(default_examples_dir()), *kwargs.pop("allowed_paths", [])]
    kwargs.setdefault("css", CSS)
    return demo.launch(server_name=host, server_port=port, allowed_paths=allowed, **kwargs)


# ---------------------------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    from omnigen.cli.args import add_generation_args, add_model_args

    p = sub.add_parser("demo", help="launch the web UI (gradio)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="(default: 7860)")
    g = p.add_argument_group("memory modes (for every user of the demo)")
    add_generation_args(g, scopes=("operator",))
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import importlib.util

    from omnigen.cli.args import generation_overrides, load_pipeline

    if importlib.util.find_spec("gradio") is None:  # say so before the model loads
        raise ImportError("the demo needs gradio: pip install 'omnigen-unified[demo]'")
    modes = generation_overrides(args, generation.names("operator"))
    pipe = load_pipeline(args).with_defaults(**modes)
    launch_demo(build_demo(pipe), host=args.host, port=args.port)
    return 0
