"""``omnigen eval miniworld``: generate a split of the miniature world, run the pipeline, score it.

Owns the sample-to-prompt step (`compose_few_shot`, over `tags.compose_few_shot`), batching of the
samples and the summary: accuracy per family and per task (`omnigen.miniworld.score`), and for the few-shot-only
tasks the score with the worked example against the same query without it. Writes nothing itself.

Seeds: sample i is generated with noise seed `seed + i`; its no-example twin uses the same seed, so the
two differ only in the prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

from omnigen.batch.runner import Job, consecutive_batches
from omnigen.eval.common import format_table
from omnigen.miniworld import world as mw
from omnigen.miniworld.score import score_sample, summarize
from omnigen.miniworld.tasks import FEW_SHOT_ONLY_TASKS
from omnigen.text import tags

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
MAIN, NO_EXAMPLE = "main", "no_example"


def compose_few_shot(
    instruction: str, input_images: Sequence[_T], few_shot: Mapping[str, Any] | None
) -> tuple[str, list[_T]]:
    """Final prompt and ordered images of a miniworld sample (its `few_shot` dict
    {"instruction", "input_images", "output_image"} or None): ``tags.compose_few_shot``'s rule."""
    if few_shot is None:
        return instruction, list(input_images)
    return tags.compose_few_shot(
        instruction,
        input_images,
        few_shot["instruction"],
        list(few_shot["input_images"] or []),
        few_shot["output_image"],
    )


@dataclass(frozen=True)
class _Item:
    index: int
    variant: str
    prompt: str
    images: list[np.ndarray]
    seed: int


@dataclass
class MiniworldResult:
    records: list[dict[str, Any]]
    ablation_records: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        main = self.records
        ablation = {}
        for task in FEW_SHOT_ONLY_TASKS:
            with_example = [r for r in main if r["task"] == task]
            without = [r for r in self.ablation_records if r["task"] == task]
            if with_example:
                ablation[task] = {
                    "n": len(with_example),
                    "with_example": float(np.mean([r["correct"] for r in with_example])),
                    "without_example": float(np.mean([r["correct"] for r in without])) if without else None,
                }
        return {
            "overall": {
                "n": len(main),
                "accuracy": float(np.mean([r["correct"] for r in main])) if main else None,
            },
            "families": summarize(main, by="family"),
            "tasks": summarize(main, by="task"),
            "few_shot_ablation": ablation,
        }


def build_items(samples: Sequence[mw.Sample], seed: int) -> list[_Item]:
    """The main prompt of every sample and, for few-shot-only tasks, the query without its example."""
    items = []
    for i, sample in enumerate(samples):
        prompt, images = compose_few_shot(sample.instruction, sample.input_images, sample.few_shot)
        items.append(_Item(i, MAIN, prompt, images, seed + i))
        if sample.meta["task"] in FEW_SHOT_ONLY_TASKS and sample.few_shot is not None:
            items.append(_Item(i, NO_EXAMPLE, sample.instruction, list(sample.input_images), seed + i))
    return items


def generate(
    pipe: Any, items: Sequence[_Item], size: int, batch_size: int, progress: bool = True, **overrides: Any
) -> dict[tuple[int, str], np.ndarray]:
    """(sample index, variant) -> uint8 output; calls hold one variant and consecutive seeds."""
    jobs = sorted(
        (Job(position, 0, item.seed, item.variant) for position, item in enumerate(items)),
        key=lambda job: (job.key, job.seed),
    )
    outputs: dict[tuple[int, str], np.ndarray] = {}
    bar = tqdm(total=len(items), unit="img", desc="miniworld", disable=not progress)
    for batch in consecutive_batches(jobs, batch_size):
        chosen = [items[job.request] for job in batch]
        images = pipe(
            [item.prompt for item in chosen],
            input_images=[item.images for item in chosen],
            height=size,
            width=size,
            seed=chosen[0].seed,
            num_images_per_prompt=1,
            progress=False,
            **overrides,
        )
        for item, image in zip(chosen, images, strict=True):
            outputs[(item.index, item.variant)] = np.asarray(image.convert("RGB"))
        bar.update(len(batch))
    bar.close()
    return outputs


def evaluate(
    pipe: Any,
    split: str,
    n: int,
    data_seed: int = 0,
    seed: int = 0,
    size: int = 16,
    batch_size: int = 16,
    tasks: Sequence[str] | None = None,
    progress: bool = True,
    **overrides: Any,
) -> MiniworldResult:
    """Generate `n` samples of `split` (data seed `data_seed`), run `pipe` on each and score the outputs.
    `overrides` go to the pipeline call (num_inference_steps, guidance_scale, ...)."""
    samples = mw.generate(n, data_seed, split, size=size, tasks=tasks)
    items = build_items(samples, seed)
    outputs = generate(pipe, items, size, batch_size, progress, **overrides)
    records, ablation = [], []
    for item in items:
        sample = samples[item.index]
        score = score_sample(sample.meta, outputs[(item.index, item.variant)], sample.output_image)
        row = {"index": item.index, "id": sample.id, "variant": item.variant, "seed": item.seed, **score}
        (records if item.variant == MAIN else ablation).append(row)
    return MiniworldResult(records, ablation)


def format_summary(summary: dict[str, Any]) -> str:
    overall = summary["overall"]
    parts = [f"overall: {overall['n']} samples, accuracy {overall['accuracy']:.4f}", ""]
    parts.append(
        format_table(
            ["family", "n", "accuracy"], [(k, v["n"], v["accuracy"]) for k, v in summary["families"].items()]
        )
    )
    parts.append("")
    parts.append(
        format_table(
            ["task", "n", "accuracy"], [(k, v["n"], v["accuracy"]) for k, v in summary["tasks"].items()]
        )
    )
    if summary["few_shot_ablation"]:
        rows = [
            (k, v["n"], v["with_example"], v["without_example"])
            for k, v in summary["few_shot_ablation"].items()
        ]
        parts += ["", format_table(["few-shot-only task", "n", "with example", "without example"], rows)]
    parts += ["", "OmniGen-v1 (paper): no published numbers for this synthetic benchmark."]
    return "\n".join(parts)
