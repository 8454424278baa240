"""Samplers x time shifts x evaluation budgets on held-out miniature-world samples (issue 16, part 2).

    python scripts/sampler_sweep.py [--n 120] [--model PATH] [--threads 1] [--json OUT] [--plot OUT.png]

For every sampler (``omnigen.sampling.solvers.SOLVERS``), time shift (``--shifts``; "none" = the unshifted grid;
``flow.shift_time``: s > 1 spends more steps near the noise, s < 1 near the data) and budget of
transformer evaluations (``--budgets``; the budget is ``num_inference_steps``, which ``solvers.plan``
spends exactly, so Heun runs about budget / 2 steps), on the "heldout" split (data seed ``--data-seed``),
sample i with noise seed ``seed + i``:

- strict: the miniworld scorer's "correct", averaged (the few-shot tasks' no-example twins are not run);
- psnr: mean PSNR (dB, capped at 100) against the 50-step Euler output of the same sample and seed;
- seconds: wall time of the whole run (torch pinned to ``--threads``; the load average is recorded);
- rel_time: seconds / the 25-step Euler run's.

Also Euler at 25 steps with step caching (``--cache-thresholds``), measured the same way.

Resumable: with ``--json OUT`` every finished row is written at once, and a rerun with the same OUT and
settings skips the rows already there (``--fresh`` starts over). The 50-step reference outputs are kept
beside it (OUT with suffix ``.reference.npz``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from omnigen.eval.common import format_table
from omnigen.eval.miniworld import MAIN, build_items, generate
from omnigen.miniworld import world as mw
from omnigen.miniworld.score import psnr, score_sample
from omnigen.pipeline import OmniGenPipeline
from omnigen.sampling.solvers import SOLVERS

REFERENCE_STEPS = 50
BASELINE_STEPS = 25
COLOURS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]
METRICS = {"strict": "strict accuracy (miniworld heldout)", "psnr": "PSNR (dB) against 50-step Euler"}


class _CacheCounter(logging.Handler):
    """Counts the steps the step cache ran in full (the pipeline logs them per run)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.computed = self.total = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("step cache:"):
            self.computed += record.args[0]
            self.total += record.args[1]


def run_config(pipe, samples, items, args, **call: Any) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Outputs in sample order, strict accuracy, wall time and load average of one setting."""
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    outputs = generate(pipe, items, args.size, args.batch_size, progress=False, **call)
    seconds = time.perf_counter() - start
    images = [outputs[(item.index, MAIN)] for item in items]
    correct = [
        score_sample(s.meta, image, s.output_image)["correct"]
        for s, image in zip(samples, images, strict=True)
    ]
    row = {
        "strict": float(np.mean(correct)),
        "seconds": seconds,
        "load_average": [load_before, os.getloadavg()[0]],
    }
    return images, row


def settings(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for sampler in SOLVERS:
        for shift in args.shifts:
            for budget in args.budgets:
                rows.append({"sampler": sampler, "time_shift": shift, "evaluations": budget})
    for threshold in args.cache_thresholds:
        rows.append(
            {"sampler": "euler", "time_shift": None, "evaluations": BASELINE_STEPS, "step_cache": threshold}
        )
    return rows


def key(row: dict[str, Any]) -> tuple:
    return (row["sampler"], row["time_shift"], row["evaluations"], row.get("step_cache"))


def label(row: dict[str, Any]) -> str:
    shift = "" if row["time_shift"] is None else f" s={row['time_shift']:g}"
    return row["sampler"] + shift


def plot(rows: list[dict[str, Any]], reference: dict[str, Any], path: Path, metric: str = "strict") -> None:
    """``metric`` vs evaluations, a line per sampler/shift (drawn with PIL: no matplotlib here); for
    strict accuracy a grey line marks the 50-step reference."""
    width, height, margin = 900, 560, 70
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    lines: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if row.get("step_cache") is None:
            lines.setdefault(label(row), []).append((row["evaluations"], row[metric]))
    budgets = sorted({e for points in lines.values() for e, _ in points} | {REFERENCE_STEPS})
    accs = [a for points in lines.values() for _, a in points]
    accs += [reference["strict"]] if metric == "strict" else []
    pad = 0.05 * (max(accs) - min(accs)) + (0.05 if metric == "strict" else 0.5)
    low, high = min(accs) - pad, max(accs) + pad
    x0, x1, y0, y1 = margin, width - 230, height - margin, margin

    def xy(e: float, a: float) -> tuple[float, float]:
        fx = (np.log(e) - np.log(budgets[0])) / (np.log(budgets[-1]) - np.log(budgets[0]))
        return x0 + fx * (x1 - x0), y0 - (a - low) / (high - low) * (y0 - y1)

    draw.rectangle([x0, y1, x1, y0], outline="black")
    for e in budgets:
        x, _ = xy(e, low)
        draw.line([x, y0, x, y0 + 5], fill="black")
        draw.text((x - 6, y0 + 8), str(e), fill="black")
    for k in range(6):
        a = low + k * (high - low) / 5
        _, y = xy(budgets[0], a)
        draw.line([x0 - 5, y, x0, y], fill="black")
        draw.text((x0 - 45, y - 6), f"{a:.2f}" if metric == "strict" else f"{a:.1f}", fill="black")
    draw.text(((x0 + x1) // 2 - 120, height - 30), "transformer evaluations (log scale)", fill="black")
    draw.text((10, 20), METRICS[metric], fill="black")
    if metric == "strict":
        _, ref_y = xy(budgets[0], reference["strict"])
        draw.line([x0, ref_y, x1, ref_y], fill=(150, 150, 150))
        draw.text((x1 + 10, ref_y - 6), f"euler {REFERENCE_STEPS}", fill=(120, 120, 120))
    for k, (name, points) in enumerate(sorted(lines.items())):
        colour = COLOURS[k % len(COLOURS)]
        dashed = k >= len(COLOURS)
        points = sorted(points)
        coords = [xy(e, a) for e, a in points]
        for (ax, ay), (bx, by) in zip(coords, coords[1:]):
            draw.line([ax, ay, bx, by], fill=colour, width=1 if dashed else 2)
        for x, y in coords:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        ly = y1 + 16 * k
        draw.line([x1 + 10, ly + 6, x1 + 35, ly + 6], fill=colour, width=1 if dashed else 2)
        draw.text((x1 + 40, ly), name, fill="black")
    image.save(path)


def parse_shift(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=120, help="held-out samples")
    parser.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    parser.add_argument("--data-seed", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="noise seed of sample 0")
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (pinned)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 6, 8, 10, 15, 25])
    parser.add_argument("--shifts", type=parse_shift, nargs="+", default=[None, 2.0, 3.0])
    parser.add_argument("--cache-thresholds", type=float, nargs="*", default=[0.05, 0.1, 0.2])
    parser.add_argument("--json", type=Path, default=None, help="write (and resume from) the results here")
    parser.add_argument(
        "--plot", type=Path, default=None, help="PNG: strict accuracy vs evaluations (and PSNR: OUT.psnr.png)"
    )
    parser.add_argument("--fresh", action="store_true", help="ignore the rows already in --json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().handlers[0].setLevel(logging.WARNING)  # the cache counter below listens at INFO
    logging.getLogger("omnigen.text.tokenizer").setLevel(
        logging.ERROR
    )  # unknown words: once per call, not news

    pipe = OmniGenPipeline.from_pretrained(args.model)
    samples = mw.generate(args.n, args.data_seed, "heldout", size=args.size)
    items = [item for item in build_items(samples, args.seed) if item.variant == MAIN]
    meta = {k: getattr(args, k) for k in ("n", "model", "data_seed", "seed", "size", "batch_size", "threads")}
    meta["torch"] = torch.__version__
    # the weights themselves: a new model in the same folder must not resume the old one's rows
    meta["weights_sum"] = float(sum(p.detach().double().abs().sum() for p in pipe.model.parameters()))
    done, reference, ref_images = resume_or_reference(pipe, samples, items, args, meta)

    counter = _CacheCounter()
    logging.getLogger("omnigen.pipeline").addHandler(counter)
    logging.getLogger("omnigen.pipeline").setLevel(logging.INFO)
    rows = []
    todo = settings(args)
    for k, setting in enumerate(todo):
        if key(setting) in done:
            rows.append(done[key(setting)])
            continue
        counter.computed = counter.total = 0
        images, row = run_config(
            pipe,
            samples,
            items,
            args,
            sampler=setting["sampler"],
            time_shift=setting["time_shift"],
            num_inference_steps=setting["evaluations"],
            step_cache_threshold=setting.get("step_cache"),
        )
        row = {**setting, **row, "psnr": float(np.mean([psnr(a, b) for a, b in zip(images, ref_images)]))}
        if setting.get("step_cache") is not None:
            row["full_steps_fraction"] = counter.computed / max(counter.total, 1)
        rows.append(row)
        print(
            f"[{k + 1}/{len(todo)}] {label(row)} {row['evaluations']}: strict {row['strict']:.3f}", flush=True
        )
        if args.json is not None:
            args.json.write_text(json.dumps({"meta": meta, "reference": reference, "rows": rows}, indent=1))

    report(rows, reference)
    if args.json is not None:
        args.json.write_text(json.dumps({"meta": meta, "reference": reference, "rows": rows}, indent=1))
    if args.plot is not None:
        plot(rows, reference, args.plot)
        plot(rows, reference, args.plot.with_suffix(".psnr.png"), metric="psnr")


def resume_or_reference(pipe, samples, items, args, meta) -> tuple[dict, dict, list[np.ndarray]]:
    """The rows already measured (from ``--json`` with the same settings) and the 50-step reference:
    its row and its outputs, run now unless they were kept beside the JSON."""
    ref_path = None if args.json is None else args.json.with_suffix(".reference.npz")
    if args.json is not None and args.json.is_file() and not args.fresh:
        old = json.loads(args.json.read_text())
        if old.get("meta") == meta and ref_path.is_file():
            return {key(r): r for r in old["rows"]}, old["reference"], list(np.load(ref_path)["images"])
    ref_images, reference = run_config(pipe, samples, items, args, num_inference_steps=REFERENCE_STEPS)
    reference.update(sampler="euler", time_shift=None, evaluations=REFERENCE_STEPS)
    if ref_path is not None:
        np.savez_compressed(ref_path, images=np.stack(ref_images))
    return {}, reference, ref_images


def report(rows: list[dict[str, Any]], reference: dict[str, Any]) -> None:
    """Add each row's time relative to Euler at 25 steps, and print the table."""
    base = next((r for r in rows if key(r) == ("euler", None, BASELINE_STEPS, None)), reference)
    for row in [reference, *rows]:
        row["rel_time"] = row["seconds"] / base["seconds"]
    table = [
        (
            label(r),
            r["evaluations"],
            "" if r.get("step_cache") is None else r["step_cache"],
            r["strict"],
            r.get("psnr", float("nan")),
            r["seconds"],
            r["rel_time"],
        )
        for r in [reference, *rows]
    ]
    print(format_table(["sampler", "evals", "cache", "strict", "psnr_vs_50", "seconds", "rel_time"], table))
    print(f"load average (1 min) now: {os.getloadavg()[0]:.2f}; each row's, before and after, in the JSON")


if __name__ == "__main__":
    main()
