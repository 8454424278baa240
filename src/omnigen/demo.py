"""Web UI: ``build_demo(pipeline) -> gr.Blocks`` and the ``omnigen demo`` subcommand.

This module owns the demo's controls (those of the original OmniGen app: prompt with image tags, three
image slots, size, guidance, steps, seed, cache/offload/CFG switches, input size), turning their values
into one pipeline call (``run_generation``, testable without gradio), the live progress bar and the
clickable example gallery. Gradio is imported only inside the functions that need it, and nothing is
loaded or launched at import: the CLI builds the pipeline and launches the Blocks.
"""

from __future__ import annotations

import argparse
import html
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from omnigen.demo_examples import MAX_INPUT_IMAGES, DemoExample, default_examples_dir, load_examples

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


def _as_int(name: str, value: Any, low: int = 1, high: int | None = None) -> int:
    """An integral number from a UI field (sliders send floats), or ValueError naming the field."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return value


def _as_float(name: str, value: Any) -> float:
    if (
        value is None
        or isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
    ):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def collect_images(values: Mapping[str, Any]) -> list[Image.Image]:
    """The filled image slots in order; a filled slot after an empty one is an error (tags would shift)."""
    images: list[Image.Image] = []
    empty: str | None = None
    for slot in IMAGE_SLOTS:
        image = values.get(slot)
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
        seed = _as_int("seed", values["seed"], 0, MAX_SEED)
    images = collect_images(values)
    # a negative threshold is the pipeline's to reject (StepCache's message)
    threshold = _as_float("step cache threshold", values.get("step_cache_threshold", 0.0))
    return dict(
        prompt=prompt.strip(),
        input_images=images or None,
        height=_as_int("height", values["height"]),
        width=_as_int("width", values["width"]),
        num_inference_steps=_as_int("inference steps", values["num_inference_steps"], 1, 1000),
        guidance_scale=_as_float("guidance scale", values["guidance_scale"]),
        img_guidance_scale=_as_float("image guidance scale", values["img_guidance_scale"]),
        negative_prompt=values.get("negative_prompt") or "",
        seed=seed,
        use_kv_cache=bool(values["use_kv_cache"]),
        offload_kv_cache=bool(values["offload_kv_cache"]),
        offload_model=bool(values["offload_model"]),
        separate_cfg_infer=bool(values["separate_cfg_infer"]),
        use_input_image_size_as_output=bool(values["use_input_image_size_as_output"]),
        max_input_image_size=_as_int("max input image size", values["max_input_image_size"]),
        step_cache_threshold=threshold or None,  # 0: every step runs every layer (exact)
    )


def run_generation(
    pipe: OmniGenPipeline, values: Mapping[str, Any], on_step: StepFn | None = None
) -> DemoResult:
    """One image for the UI's values. Bad values raise ValueError/TypeError with a user-facing message.

    ``on_step(done, total)`` is called after every sampling step (the progress bar).
    """
    kwargs = pipeline_arguments(values)
    if kwargs["use_input_image_size_as_output"] and not kwargs["input_images"]:
        raise ValueError("'Use input image size as output' needs an input image in slot 1")
    total = kwargs["num_inference_steps"]

    def step_end(_pipe: Any, step: int, _t: float, _latents: Any) -> None:
        if on_step is not None:
            on_step(step + 1, total)

    start = time.perf_counter()
    (image,) = pipe(**kwargs, callback_on_step_end=step_end, progress=False)
    return DemoResult(image, int(image.info.get("seed", kwargs["seed"])), time.perf_counter() - start)


def _controls(gr: Any, pipe: OmniGenPipeline) -> dict[str, Any]:
    """Every input control, keyed by the name `pipeline_arguments` reads."""
    d, config = pipe.defaults, pipe.model.config
    multiple, largest = config.image_multiple, config.max_image_size
    c: dict[str, Any] = {}
    c["prompt"] = gr.Textbox(
        label="Prompt",
        lines=3,
        placeholder="Refer to input images as <img><|image_1|></img>, <img><|image_2|></img>, ...",
        elem_id=_elem_id("prompt"),
    )
    with gr.Row():
        for k, slot in enumerate(IMAGE_SLOTS, start=1):
            c[slot] = gr.Image(
                label=f"<img><|image_{k}|></img>",
                type="pil",
                format="png",
                sources=["upload", "clipboard"],
                height=200,
                elem_id=_elem_id(slot),
            )
    with gr.Row():
        c["height"] = gr.Slider(
            multiple,
            largest,
            min(d.height, largest),
            step=multiple,
            label="Height",
            elem_id=_elem_id("height"),
        )
        c["width"] = gr.Slider(
            multiple, largest, min(d.width, largest), step=multiple, label="Width", elem_id=_elem_id("width")
        )
    c["guidance_scale"] = gr.Slider(
        1.0,
        max(5.0, d.guidance_scale),
        d.guidance_scale,
        step=0.1,
        label="Guidance scale",
        elem_id=_elem_id("guidance_scale"),
    )
    c["img_guidance_scale"] = gr.Slider(
        1.0,
        max(2.0, d.img_guidance_scale),
        d.img_guidance_scale,
        step=0.1,
        label="Image guidance scale",
        elem_id=_elem_id("img_guidance_scale"),
    )
    c["num_inference_steps"] = gr.Slider(
        1,
        max(100, d.num_inference_steps),
        d.num_inference_steps,
        step=1,
        label="Inference steps",
        elem_id=_elem_id("num_inference_steps"),
    )
    with gr.Row():
        c["seed"] = gr.Number(
            0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id=_elem_id("seed")
        )
        c["randomize_seed"] = gr.Checkbox(False, label="Randomize seed", elem_id=_elem_id("randomize_seed"))
    with gr.Accordion("Advanced", open=False):
        c["negative_prompt"] = gr.Textbox(
            d.negative_prompt, label="Negative prompt", lines=2, elem_id=_elem_id("negative_prompt")
        )
        c["max_input_image_size"] = gr.Slider(
            multiple,
            max(largest, d.max_input_image_size),
            d.max_input_image_size,
            step=multiple,
            label="Max input image size (longer side)",
            elem_id=_elem_id("max_input_image_size"),
        )
        c["use_input_image_size_as_output"] = gr.Checkbox(
            False,
            label="Use input image size as output (one input image; ignores height/width)",
            elem_id=_elem_id("use_input_image_size_as_output"),
        )
        with gr.Row():
            c["separate_cfg_infer"] = gr.Checkbox(
                True, label="Separate CFG inference (less memory)", elem_id=_elem_id("separate_cfg_infer")
            )
            c["use_kv_cache"] = gr.Checkbox(True, label="KV cache", elem_id=_elem_id("use_kv_cache"))
            c["offload_kv_cache"] = gr.Checkbox(
                True, label="Offload KV cache to CPU", elem_id=_elem_id("offload_kv_cache")
            )
            c["offload_model"] = gr.Checkbox(
                False, label="Offload model to CPU", elem_id=_elem_id("offload_model")
            )
        c["step_cache_threshold"] = gr.Slider(
            0.0,
            0.5,
            value=0.0,
            step=0.01,
            label="Step cache threshold (0 = exact; 0.05-0.2 skips steps whose input barely changed)",
            elem_id=_elem_id("step_cache_threshold"),
        )
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

        def on_generate(values: dict, progress: gr.Progress = gr.Progress()) -> tuple[Image.Image, str]:  # noqa: B008
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
                examples=[
                    [ex.prompt, *[str(p) for p in ex.images], *[None] * (MAX_INPUT_IMAGES - len(ex.images))]
                    for ex in examples
                ],
                inputs=[controls["prompt"], *[controls[slot] for slot in IMAGE_SLOTS]],
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
    p = sub.add_parser("demo", help="launch the web UI (gradio)")
    p.add_argument(
        "--model", default=None, help="model folder or hub id (default: the shipped miniature model)"
    )
    p.add_argument("--vae", default=None, help="VAE folder when the model folder has none")
    p.add_argument("--device", default="cpu")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import importlib.util

    from omnigen.pipeline import OmniGenPipeline

    if importlib.util.find_spec("gradio") is None:  # say so before the model loads
        raise ImportError("the demo needs gradio: pip install 'omnigen-unified[demo]'")
    pipe = OmniGenPipeline.from_pretrained(args.model, device=args.device, vae_path=args.vae)
    launch_demo(build_demo(pipe), host=args.host, port=args.port)
    return 0
