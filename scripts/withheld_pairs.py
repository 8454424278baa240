"""How often a model draws the colour-shape pairs that the compositional split holds out of training
(`WITHHELD_PAIRS`), per pair, over generation seeds 0..--seeds - 1, in two wordings:

- "plain": "a blue circle" (no cell, no background): right when exactly one object is drawn, with
  that colour and shape;
- "placed": "a blue circle in the <cell> on a <background> background", the cell and background
  turning with the seed (`omnigen.miniworld.text.placed_prompt`): right when the miniworld scorer finds
  the whole scene right (`scene_ok`).

    python scripts/withheld_pairs.py [--model FOLDER] [--seeds 8] [--out pairs.json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from omnigen.miniworld import text as mt
from omnigen.miniworld.score import decode_scene, scene_scores
from omnigen.miniworld.tasks import WITHHELD_PAIRS
from omnigen.pipeline import OmniGenPipeline


def plain_ok(image: np.ndarray, colour: str, shape: str) -> bool:
    _, cells = decode_scene(image)
    return len(cells) == 1 and [(o.colour, o.shape) for o in cells.values()] == [(colour, shape)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model folder (default: the shipped one)")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--out", default=None, help="write the counts as JSON here")
    args = parser.parse_args()
    pipe = OmniGenPipeline.from_pretrained(args.model)

    def draw(prompt: str, seed: int) -> np.ndarray:
        return np.asarray(pipe(prompt, seed=seed, progress=False)[0].convert("RGB"))

    results = {}
    for colour, shape in sorted(WITHHELD_PAIRS):
        plain = sum(plain_ok(draw(f"a {colour} {shape}", s), colour, shape) for s in range(args.seeds))
        right = 0
        for s in range(args.seeds):
            prompt, scene = mt.placed_prompt(colour, shape, s)
            right += bool(scene_scores(scene, draw(prompt, s))["scene_ok"])
        results[f"{colour} {shape}"] = {"plain": plain, "placed": right, "seeds": args.seeds}
        print(f"{colour} {shape}: plain {plain}/{args.seeds}, placed {right}/{args.seeds}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as file:
            json.dump({"model": args.model or "shipped", **results}, file, indent=1)


if __name__ == "__main__":
    main()
