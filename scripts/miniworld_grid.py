"""A grid of real outputs of a model on held-out miniature-world samples, one row per task family.

    python scripts/miniworld_grid.py OUT.png [--model PATH] [--per-family 2] [--scale 6]

Columns: up to three input images, the model's output, the ground truth. Few-shot rows show the
worked example's input and output first.
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image, ImageDraw

from omnigen.eval.miniworld import build_items
from omnigen.miniworld.world import generate
from omnigen.pipeline import OmniGenPipeline

FAMILIES = ("t2i", "edit", "subject", "condition", "cv", "few_shot")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out")
    parser.add_argument("--model", default=None)
    parser.add_argument("--per-family", type=int, default=2)
    parser.add_argument("--scale", type=int, default=6)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    pipe = OmniGenPipeline.from_pretrained(args.model)
    samples = generate(300, args.seed, "heldout", size=16)
    chosen = []
    for family in FAMILIES:
        chosen += [s for s in samples if s.task_type == family][: args.per_family]
    items = {item.index: item for item in build_items(chosen, seed=0) if item.variant == "main"}
    size, gap = 16 * args.scale, 4
    rows = []
    for index, sample in enumerate(chosen):
        item = items[index]
        output = np.asarray(pipe(item.prompt, item.images or None, seed=item.seed, progress=False)[0])
        inputs = list(item.images)[-3:]
        cells = (
            [np.full((16, 16, 3), 40, np.uint8)] * (3 - len(inputs)) + inputs + [output, sample.output_image]
        )
        row = Image.new("RGB", (5 * (size + gap) + 260, size + gap), (255, 255, 255))
        for k, cell in enumerate(cells):
            row.paste(Image.fromarray(cell).resize((size, size), Image.NEAREST), (k * (size + gap), 0))
        ImageDraw.Draw(row).text((5 * (size + gap) + 4, size // 2 - 6), sample.meta["task"], fill=(0, 0, 0))
        rows.append(row)
    grid = Image.new("RGB", (rows[0].width, len(rows) * rows[0].height), (255, 255, 255))
    for k, row in enumerate(rows):
        grid.paste(row, (0, k * row.height))
    grid.save(args.out)


if __name__ == "__main__":
    main()
