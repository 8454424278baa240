"""Masked vs unmasked edits of one object on held-out miniature-world samples (issue 16, part 1).

    python scripts/masked_edit_accuracy.py [--n 48] [--model PATH] [--steps N] [--mask-blur 0] [--json OUT]

Samples: the "heldout" split restricted to the edit kinds that change one object in one grid cell
(recolour, remove, add, resize). The mask is that object's cell (the scene model's grid: 3x3 cells of
5 px at 16x16). Each sample is edited twice with the same seed: with the mask and without it.

Reported per run and per kind:
- strict: the miniworld scorer's "correct" (the right scene and >= 90 % of the untouched pixels kept);
- in-mask: the scorer on the ground truth with the output's masked cell pasted in, so only what the
  model drew inside the mask counts (for a masked edit this equals strict);
- changed outside: the share of pixels outside the mask that differ from the input image (0 for a
  masked edit, by construction);
- preserve: the scorer's palette accuracy on the pixels the edit leaves unchanged.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from omnigen.eval.common import format_table
from omnigen.miniworld import scene as ms
from omnigen.miniworld import world as mw
from omnigen.miniworld.score import score_sample
from omnigen.pipeline import OmniGenPipeline

KINDS = ("edit/recolour", "edit/remove", "edit/add", "edit/resize")


def touched_cells(meta: dict) -> set[int]:
    """Grid cells whose content differs between the input scene and the target scene."""
    before = {o.cell: o for o in ms.Scene.from_dict(meta["input_scenes"][0]).objects}
    after = {o.cell: o for o in ms.Scene.from_dict(meta["scene"]).objects}
    return {cell for cell in set(before) | set(after) if before.get(cell) != after.get(cell)}


def cell_mask(cells: set[int], size: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    c = ms.cell_size(size)
    for cell in cells:
        top, left = ms.cell_origin(cell, size)
        mask[top : top + c, left : left + c] = True
    return mask


def run(
    pipe: OmniGenPipeline,
    samples: list[mw.Sample],
    masks: list[np.ndarray],
    use_mask: bool,
    seed: int,
    batch: int,
    **call: Any,
) -> list[np.ndarray]:
    """Outputs in sample order; sample i uses noise seed ``seed + i`` in both runs."""
    outputs = []
    for start in tqdm(range(0, len(samples), batch), desc="masked" if use_mask else "unmasked"):
        chunk = samples[start : start + batch]
        images = pipe(
            [s.instruction for s in chunk],
            input_images=[[s.input_images[0]] for s in chunk],
            mask=list(masks[start : start + batch]) if use_mask else None,
            seed=seed + start,
            progress=False,
            **call,
        )
        outputs += [np.asarray(image.convert("RGB")) for image in images]
    return outputs


def score(sample: mw.Sample, mask: np.ndarray, output: np.ndarray) -> dict:
    target = sample.output_image
    strict = score_sample(sample.meta, output, target)
    pasted = np.where(mask[..., None], output, target)
    changed = (output != sample.input_images[0]).any(-1)
    return {
        "task": sample.meta["task"],
        "strict": float(strict["correct"]),
        "in_mask": float(score_sample(sample.meta, pasted, target)["correct"]),
        "changed_outside": float(changed[~mask].mean()),
        "preserve": float(strict["preserve_acc"]),
    }


def summary_rows(records: dict[str, list[dict]]) -> list[tuple]:
    rows = []
    for group in ("all", *KINDS):
        row: list = [group, sum(group in ("all", r["task"]) for r in records["masked"])]
        for name in ("masked", "unmasked"):
            chosen = [r for r in records[name] if group in ("all", r["task"])]
            for key in ("strict", "in_mask", "changed_outside", "preserve"):
                row.append(float(np.mean([r[key] for r in chosen])) if chosen else None)
        rows.append(tuple(row))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=48, help="held-out samples")
    parser.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    parser.add_argument("--data-seed", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="noise seed of sample 0")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--mask-blur", type=float, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None, help="write the summary and records here")
    args = parser.parse_args()

    pipe = OmniGenPipeline.from_pretrained(args.model)
    samples = mw.generate(args.n, args.data_seed, "heldout", size=16, tasks=KINDS)
    masks = [cell_mask(touched_cells(s.meta), s.meta["image_size"]) for s in samples]
    call = {"mask_blur": args.mask_blur}
    if args.steps is not None:
        call["num_inference_steps"] = args.steps
    records, seconds = {}, {}
    for name, use_mask in (("masked", True), ("unmasked", False)):
        start = time.perf_counter()
        outputs = run(pipe, samples, masks, use_mask, args.seed, args.batch_size, **call)
        seconds[name] = time.perf_counter() - start
        records[name] = [score(s, m, out) for s, m, out in zip(samples, masks, outputs)]
    headers = ["kind", "n"] + [
        f"{run} {key}"
        for run in ("masked", "unmasked")
        for key in ("strict", "in-mask", "changed outside", "preserve")
    ]
    print(
        f"{args.n} held-out samples (data seed {args.data_seed}), noise seed {args.seed}, "
        f"mask = the edited object's cell, mask_blur {args.mask_blur}; "
        f"time masked {seconds['masked']:.1f} s, unmasked {seconds['unmasked']:.1f} s"
    )
    print(format_table(headers, summary_rows(records), digits=3))
    if args.json is not None:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "records": records}, indent=1)
        )


if __name__ == "__main__":
    main()
