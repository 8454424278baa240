"""Command line: ``omnigen generate | train | data | eval``. The only place that configures logging."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger("omnigen")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate an image from a prompt (and input images)")
    p.add_argument("prompt", help="the instruction; reference input images as <img><|image_1|></img>, ...")
    p.add_argument(
        "--image", action="append", default=[], metavar="PATH", help="input image (repeat, in order)"
    )
    p.add_argument(
        "--model", default=None, help="model folder or hub id (default: the shipped miniature model)"
    )
    p.add_argument("--vae", default=None, help="VAE folder when the model folder has none")
    p.add_argument("-o", "--output", default="output.png", help="output PNG path (default: output.png)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="Euler steps")
    p.add_argument("--guidance", type=float, default=None, help="text guidance scale")
    p.add_argument("--img-guidance", type=float, default=None, help="image guidance scale")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1, help="images for the prompt (-o gets _k suffixes)")
    p.add_argument("--use-input-size", action="store_true", help="output size = the input image's size")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from omnigen.pipeline import OmniGenPipeline

    pipe = OmniGenPipeline.from_pretrained(args.model, device=args.device, vae_path=args.vae)
    images = pipe(
        args.prompt,
        input_images=args.image or None,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        img_guidance_scale=args.img_guidance,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        num_images_per_prompt=args.num_images,
        use_input_image_size_as_output=args.use_input_size,
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}_{k}{out.suffix}")
        image.save(path)
        logger.info("wrote %s (%dx%d, seed %s)", path, image.width, image.height, image.info.get("seed"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnigen", description="OmniGen: unified image generation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list:
    """Subcommands defined next to the code they run (their heavy imports happen only when run)."""
    from omnigen.batch.cli import register as register_batch
    from omnigen.data.cli import register as register_data
    from omnigen.demo import register as register_demo
    from omnigen.eval.cli import register as register_eval
    from omnigen.export import register as register_export
    from omnigen.serve.cli import register as register_serve
    from omnigen.training.cli import register as register_train

    return [
        register_train,
        register_data,
        register_demo,
        register_serve,
        register_batch,
        register_eval,
        register_export,
    ]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ValueError, TypeError, ImportError) as err:
        logger.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
