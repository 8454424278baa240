"""Command line: ``omnigen generate | train | data | eval``. The only place that configures logging."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger("omnigen")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    from omnigen.cli.args import add_generation_args, add_model_args

    p = sub.add_parser("generate", help="generate an image from a prompt (and input images)")
    p.add_argument("prompt", help="the instruction; reference input images as <img><|image_1|></img>, ...")
    p.add_argument(
        "--image", action="append", default=[], metavar="PATH", help="input image (repeat, in order)"
    )
    p.add_argument(
        "-o",
        "--output",
        default="output.png",
        help="output image path: .png, .jpg, .webp, ... (default: output.png)",
    )
    p.add_argument("--seed", type=int, default=0, help="noise seed; image k uses seed + k (default: 0)")
    p.add_argument(
        "--mask",
        metavar="PATH",
        help="inpainting mask for the first --image (white = regenerate, black = keep); the output has "
        "that image's size and every pixel outside the mask is kept exactly",
    )
    p.add_argument(
        "--outpaint",
        metavar="L,R,T,B",
        help="pad the first --image by LEFT,RIGHT,TOP,BOTTOM pixels and generate only the padding",
    )
    p.add_argument(
        "--parallel",
        choices=["cfg", "sequence"],
        default=None,
        help="one image over the processes of `torchrun --nproc-per-node N` (gloo on CPU, NCCL on "
        "cuda:LOCAL_RANK); rank 0 writes the output. cfg: each rank runs its own guidance branches (N = 2 "
        "or 3); sequence: each rank runs a share of every step's output tokens and attention heads (N "
        "divides the heads)",
    )
    add_model_args(p)
    add_generation_args(p, skip=("seed",))
    p.set_defaults(func=_run_generate)


def check_output_path(output: str, count: int = 1) -> list[Path]:
    """The files ``-o`` will be written to, checked before anything is generated: a file name (not a
    folder) with an extension Pillow can write, in a folder that exists (or can be made) and is writable."""
    import os

    from PIL import Image

    out = Path(output)
    if output.endswith(("/", os.sep)) or out.is_dir():
        raise ValueError(f"-o {output!r} is a folder; give a file path such as {out / 'image.png'}")
    writable = sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE)
    if out.suffix.lower() not in writable:
        raise ValueError(
            f"-o {output!r}: unknown image extension {out.suffix or '(none)'!r}; use one of .png, .jpg, .webp, "
            f"... ({len(writable)} known)"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"-o {output!r}: cannot create its folder {out.parent}: {err.strerror}") from None
    paths = [out] if count == 1 else [out.with_name(f"{out.stem}_{k}{out.suffix}") for k in range(count)]
    for path in paths:
        if path.exists() and not os.access(path, os.W_OK):
            raise ValueError(f"-o {output!r}: {path} is not writable")
        if not path.exists():  # try it: permissions alone miss read-only and virtual file systems
            try:
                path.open("xb").close()
            except OSError as err:
                raise ValueError(f"-o {output!r}: cannot write {path}: {err.strerror}") from None
            path.unlink()
    return paths


def check_mask_args(mask: str | None, pads: str | None, images: list[str]) -> tuple[int, ...] | None:
    """``--mask`` / ``--outpaint`` checked before the model loads; the outpaint padding (L, R, T, B)."""
    if mask is None and pads is None:
        return None
    option = "--mask" if mask is not None else "--outpaint"
    if mask is not None and pads is not None:
        raise ValueError("give --mask or --outpaint, not both (--outpaint makes its own mask)")
    if not images:
        raise ValueError(f"{option} needs an input image (--image PATH): it applies to the first one")
    if pads is not None:
        parts = pads.split(",")
        if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"--outpaint {pads!r}: give LEFT,RIGHT,TOP,BOTTOM pixels, e.g. 0,8,0,0")
        return tuple(int(p) for p in parts)
    from omnigen.sampling.inpaint import check_aspect, load_mask
    from omnigen.text.processor import load_image

    loaded = load_mask(mask)
    check_aspect(loaded.size, load_image(images[0]).size)
    if loaded.getextrema()[1] == 0:
        raise ValueError(
            f"--mask {mask}: the mask is all black: nothing to edit (white marks what to regenerate)"
        )
    return None


def _run_generate(args: argparse.Namespace) -> int:
    """One process, or with ``--parallel`` one rank of torchrun's (only rank 0 writes)."""
    import os

    from omnigen.batch.cli import init_distributed
    from omnigen.cli.args import generation_overrides, load_pipeline
    from omnigen.plan import check_prompts

    check_prompts([args.prompt])  # the call's own rule, before the model loads
    overrides = generation_overrides(args) | {"seed": args.seed}
    writer = args.parallel is None or os.environ.get("RANK", "0") == "0"
    count = overrides.get("num_images_per_prompt", 1)
    paths = check_output_path(args.output, count) if writer else []
    pads = check_mask_args(args.mask, args.outpaint, args.image)
    ctx = init_distributed(args.device) if args.parallel is not None else None
    try:
        pipe = load_pipeline(args, None if ctx is None else ctx.device)
        inputs, mask = list(args.image), args.mask
        if pads is not None:
            from omnigen.sampling.inpaint import outpaint

            multiple = pipe.model.config.image_multiple
            inputs[0], mask = outpaint(inputs[0], *pads, multiple=multiple)
        images = pipe(
            args.prompt, input_images=inputs or None, mask=mask, parallel=args.parallel, **overrides
        )
    finally:
        if ctx is not None:
            ctx.close()
    for path, image in zip(paths, images if writer else [], strict=True):
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
    from omnigen.cli.export import register as register_export
    from omnigen.cli.vocab import register as register_vocab
    from omnigen.data.cli import register as register_data
    from omnigen.demo.app import register as register_demo
    from omnigen.eval.cli import register as register_eval
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
        register_vocab,
    ]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if hasattr(args, "device"):  # every command's --device, resolved once (omnigen.cli.args)
            from omnigen.cli.args import resolve_device

            args.device = resolve_device(args.device)
        return args.func(args)
    except (ValueError, TypeError, ImportError, FloatingPointError) as err:
        logger.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
