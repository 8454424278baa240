"""The demo's example gallery: one or more prompts per task family, with their input images.

This module owns the example list (``EXAMPLE_KINDS``), how it is drawn from the miniature world's
"heldout" split (``write_examples``, run at development time: ``python -m omnigen.demo.examples``) and
how the shipped copy in ``assets/examples/`` is read back (``load_examples``). It must not import
gradio or load a model: ``omnigen.demo.app`` turns these records into clickable examples.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from omnigen.text.tags import validate_image_tags

EXAMPLES_FILE = "examples.json"
MAX_INPUT_IMAGES = 3  # the demo's image slots (the original OmniGen app offers three)
FAMILIES = ("text-to-image", "editing", "subject-driven", "visual condition", "cv task", "few-shot")
# (family, miniworld task kind); "few_shot/wrapped" = an in-context example of another kind + its query.
EXAMPLE_KINDS: tuple[tuple[str, str], ...] = (
    ("text-to-image", "t2i/objects"),
    ("text-to-image", "t2i/relation"),
    ("editing", "edit/recolour"),
    ("editing", "edit/move"),
    ("editing", "edit/compose"),
    ("subject-driven", "subject/place"),
    ("subject-driven", "subject/pair"),
    ("visual condition", "condition/edges"),
    ("visual condition", "condition/depth"),
    ("visual condition", "condition/boxes"),
    ("cv task", "cv/segmentation"),
    ("cv task", "cv/denoise"),
    ("cv task", "cv/inpaint"),
    ("cv task", "cv/referring"),
    ("few-shot", "few_shot/invert"),
    ("few-shot", "few_shot/wrapped"),
)


@dataclass(frozen=True)
class DemoExample:
    family: str  # one of FAMILIES
    task: str  # miniworld task kind
    prompt: str
    images: tuple[Path, ...]  # tag k <-> images[k - 1]
    seed: int = 0  # the generation seed the gallery documents (and the demo fills in)
    sample: int | None = None  # the heldout sample seed it was drawn with (example_sample rebuilds it)

    @property
    def label(self) -> str:
        return f"{self.family}: {self.task.split('/', 1)[1].replace('_', ' ')}"


def default_examples_dir() -> Path:
    return Path(__file__).parents[1] / "assets" / "examples"


def load_examples(folder: str | Path | None = None) -> list[DemoExample]:
    """The examples of `folder` (default: the shipped ones), image paths resolved and tags checked."""
    folder = default_examples_dir() if folder is None else Path(folder)
    path = folder / EXAMPLES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {EXAMPLES_FILE} in {folder}; run python -m omnigen.demo.examples")
    examples = []
    for index, row in enumerate(json.loads(path.read_text())):
        images = tuple(folder / name for name in row["images"])
        if len(images) > MAX_INPUT_IMAGES:
            raise ValueError(f"{path}: example {index} has {len(images)} images (max {MAX_INPUT_IMAGES})")
        validate_image_tags(row["prompt"], len(images))
        examples.append(
            DemoExample(
                row["family"], row["task"], row["prompt"], images, row.get("seed", 0), row.get("sample")
            )
        )
    return examples


def _sample_for(kind: str, seed: int, size: int):
    """The first heldout sample of `kind` whose prompt needs at most MAX_INPUT_IMAGES images."""
    from omnigen.miniworld import tasks as miniworld_tasks
    from omnigen.miniworld import world as miniworld

    tasks = "few_shot" if kind == "few_shot/wrapped" else kind
    for sample in miniworld.generate(40, seed, split="heldout", size=size, tasks=tasks):
        only = sample.meta["task"] in miniworld_tasks.FEW_SHOT_ONLY_TASKS
        if kind == "few_shot/wrapped" and (sample.few_shot is None or only):
            continue
        count = len(sample.input_images) + (
            0 if sample.few_shot is None else 1 + len(sample.few_shot["input_images"])
        )
        if count <= MAX_INPUT_IMAGES:
            return sample
    raise ValueError(f"no heldout sample of {kind!r} with at most {MAX_INPUT_IMAGES} images")


def _compose(sample) -> tuple[str, list]:
    """Prompt and images of a sample; few-shot samples get the training wrapper (example first)."""
    from omnigen.eval.miniworld import compose_few_shot

    return compose_few_shot(sample.instruction, sample.input_images, sample.few_shot)


def example_kind(number: int) -> str:
    """The miniworld kind example `number` is drawn from (its EXAMPLE_KINDS entry)."""
    return EXAMPLE_KINDS[number][1]


def example_sample(number: int, sample_seed: int, size: int = 16):
    """The heldout sample behind example `number` (meta and target image, for scoring)."""
    return _sample_for(example_kind(number), sample_seed, size)


def write_examples(
    folder: str | Path,
    seed: int = 7,
    size: int = 16,
    picks: dict[int, tuple[int, int]] | None = None,
) -> list[DemoExample]:
    """Draw EXAMPLE_KINDS from the miniature world's heldout split; write PNGs and examples.json.

    Example `number` is drawn with sample seed ``seed + number`` and documents generation seed 0,
    unless ``picks[number] = (sample_seed, generation_seed)`` says otherwise
    (scripts/pick_example_seeds.py chooses them with a model).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for number, (family, kind) in enumerate(EXAMPLE_KINDS):
        sample_seed, generation_seed = (picks or {}).get(number, (seed + number, 0))
        sample = example_sample(number, sample_seed, size)
        prompt, arrays = _compose(sample)
        stem = f"{number:02d}_{kind.replace('/', '_')}"
        names = []
        for k, array in enumerate(arrays, start=1):
            names.append(f"{stem}_{k}.png")
            Image.fromarray(array).save(folder / names[-1], optimize=True)
        task = f"few_shot/{sample.meta['task']}" if kind == "few_shot/wrapped" else kind
        rows.append(
            {"family": family, "task": task, "prompt": prompt, "images": names}
            | {"seed": generation_seed, "sample": sample_seed}
        )
    (folder / EXAMPLES_FILE).write_text(json.dumps(rows, indent=1) + "\n")
    return load_examples(folder)


def check_example(pipe, number: int, example: DemoExample, seed: int | None = None) -> bool:
    """Whether `pipe` gets example `number` right (the miniworld scorer) at `seed` (default: its own)."""
    import numpy as np

    from omnigen.miniworld.score import score_sample

    if example.sample is None:
        raise ValueError(f"example {number} ({example.label}) records no sample seed; redraw the gallery")
    sample = example_sample(number, example.sample, pipe.defaults.height)
    image = pipe(
        example.prompt,
        input_images=[Image.open(path) for path in example.images] or None,
        seed=example.seed if seed is None else seed,
        progress=False,
    )[0]
    return bool(score_sample(sample.meta, np.asarray(image.convert("RGB")), sample.output_image)["correct"])


@dataclass
class Pick:
    """How example `number` was chosen: its (sample seed, generation seed), kept or re-picked."""

    sample: int | None = None
    seed: int | None = None
    kept: bool = False
    tried: list[bool] = field(default_factory=list)  # every (sample, seed) pair's outcome, in order


def _still_drawn(keep: list[DemoExample], folder: Path) -> list[bool]:
    """Per example of `keep`: whether write_examples still draws it from its sample seed (same task,
    prompt and pixels), so keeping its sample keeps the example."""
    keep = keep[: len(EXAMPLE_KINDS)]
    fresh = write_examples(
        folder, picks={n: (e.sample, 0) for n, e in enumerate(keep) if e.sample is not None}
    )
    return [
        e.sample is not None
        and (e.task, e.prompt) == (f.task, f.prompt)
        and [p.read_bytes() for p in e.images] == [p.read_bytes() for p in f.images]
        for e, f in zip(keep, fresh)
    ]


def pick_examples(check, keep=(), samples: int = 4, seeds: int = 4, keep_seeds: int = 16) -> list[Pick]:
    """Choose every EXAMPLE_KINDS entry's (sample seed, generation seed) with ``check(number, example,
    seed) -> bool`` (check_example with a model).

    An example of the gallery `keep` (a list indexed like EXAMPLE_KINDS, e.g. the shipped one) stays,
    sample and images, when write_examples still draws it and it is right at its documented seed or at
    one of seeds 0..keep_seeds - 1 (tried in that order): a retrained model then changes at most the
    seed, and the README, docs and screenshots that show the example stay true. Only the others are
    re-picked: the first heldout sample (sample seeds 7 + number + 100 j, j < samples) that is right at
    one of seeds 0..seeds - 1. An example with no right pair gets Pick(sample=None).
    """
    import tempfile

    picks = [Pick() for _ in EXAMPLE_KINDS]
    with tempfile.TemporaryDirectory() as tmp:
        for number, (example, same) in enumerate(zip(keep, _still_drawn(list(keep), Path(tmp)))):
            if not same:
                continue
            for seed in dict.fromkeys([example.seed, *range(keep_seeds)]):
                picks[number].tried.append(check(number, example, seed))
                if picks[number].tried[-1]:
                    picks[number].sample, picks[number].seed, picks[number].kept = example.sample, seed, True
                    break
    for j in range(samples):
        todo = [n for n, pick in enumerate(picks) if pick.sample is None]
        if not todo:
            break
        with tempfile.TemporaryDirectory() as tmp:
            trial = {n: (7 + n + 100 * j, 0) for n in todo}
            examples = write_examples(tmp, picks=trial)
            for n in todo:
                for seed in range(seeds):
                    picks[n].tried.append(check(n, examples[n], seed))
                    if picks[n].tried[-1]:
                        picks[n].sample, picks[n].seed = trial[n][0], seed
                        break
    return picks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the demo's example gallery.")
    parser.add_argument(
        "--out", default=str(default_examples_dir()), help="folder (default: the shipped one)"
    )
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    for example in write_examples(args.out, args.seed):
        print(f"{example.label:32s} {len(example.images)} image(s)  {example.prompt}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
