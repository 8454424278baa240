"""Miniature X2I world: a procedural, seed-deterministic toy data set covering OmniGen's task families.

This module assembles the world: the task registry and weighted deck over the builders of
`miniworld_tasks` and `miniworld_image_tasks`, the `Sample` record, the split and seed policy
(`generate`), the on-disk writer and the word-level tokenizer. Scenes and rendering live in
`miniworld_scene`, wording in `miniworld_text`. Nothing here touches global random state or the disk,
except `write_dataset` and `save_tokenizer`.

Splits: "train"; "heldout" (another seed stream of the training distribution); "compositional" (every
sample holds a (colour, shape) pair of `WITHHELD_PAIRS`, never drawn elsewhere); "phrasing" (the
training distribution worded only with the held-out phrasings of `miniworld_text`); "all" (every pair
allowed, the withheld ones over-represented: the shipped weights' last stage, for users, not science).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from omnigen.miniworld import image_tasks
from omnigen.miniworld import scene as ms
from omnigen.miniworld import text as mt
from omnigen.miniworld.tasks import (
    EDIT_OPERATIONS,
    FEW_SHOT_ONLY_TASKS,
    WITHHELD_PAIRS,
    Builder,
    Draw,
    edit_builder,
    edit_compose,
    subject_pair,
    subject_pick,
    subject_place,
    t2i_objects,
    t2i_relation,
)
from omnigen.util.atomic import atomic_write
from omnigen.util.checks import check_int

if TYPE_CHECKING:
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

SPLITS = ("train", "heldout", "compositional", "phrasing", "all")
_SPLIT_STREAMS = {"train": 0, "heldout": 1, "compositional": 2, "phrasing": 3, "all": 4}


# --------------------------------------------------------------------------------------------------
# Registry and deck
# --------------------------------------------------------------------------------------------------

BUILDERS: dict[str, Builder] = {
    "t2i/objects": t2i_objects,
    "t2i/relation": t2i_relation,
    **{f"edit/{op}": edit_builder(op) for op in EDIT_OPERATIONS},
    "edit/compose": edit_compose,
    "subject/place": subject_place,
    "subject/pick": subject_pick,
    "subject/pair": subject_pair,
    "condition/edges": image_tasks.condition_builder("edges", ms.edge_map),
    "condition/segmentation": image_tasks.condition_builder("segmentation", ms.segmentation_map),
    "condition/depth": image_tasks.condition_builder("depth", ms.depth_map),
    "condition/boxes": image_tasks.condition_builder("boxes", ms.box_map),
    "cv/edges": image_tasks.map_builder("edges", ms.edge_map),
    "cv/segmentation": image_tasks.map_builder("segmentation", ms.segmentation_map),
    "cv/depth": image_tasks.map_builder("depth", ms.depth_map),
    **{
        f"cv/{name}": image_tasks.restore_builder(name)
        for name in ("denoise", "deblur", "inpaint", "outpaint")
    },
    **{f"cv/{name}": image_tasks.restore_builder(name) for name in ("colorize", "lowlight")},
    "cv/referring": image_tasks.cv_referring,
    "few_shot/invert": image_tasks.transform_builder("invert", ms.invert),
    "few_shot/mirror": image_tasks.transform_builder("mirror", ms.mirror),
}
TASK_KINDS = tuple(BUILDERS)
REGULAR_KINDS = tuple(kind for kind in TASK_KINDS if kind not in FEW_SHOT_ONLY_TASKS)
FEW_SHOT_BASE_KINDS = tuple(kind for kind in REGULAR_KINDS if not kind.startswith("t2i/"))
FEW_SHOT_WRAPPED = "few_shot/wrapped"  # deck entry: a few-shot sample of a random FEW_SHOT_BASE_KINDS kind
# Deck weights per round (55 cards): t2i 9, edit 14, subject 6, condition 8, cv 10, few-shot 8.
DECK_WEIGHTS: dict[str, int] = {
    "t2i/objects": 6, "t2i/relation": 3,
    **{kind: 2 for kind in REGULAR_KINDS if kind.split("/")[0] in ("edit", "subject", "condition")},
    **{kind: 1 for kind in REGULAR_KINDS if kind.startswith("cv/")},
    "few_shot/invert": 2, "few_shot/mirror": 2, FEW_SHOT_WRAPPED: 4,
}  # fmt: skip


def _deck_kinds(name: str) -> set[str]:
    """The deck entries a kind ("edit/move"), a family ("edit") or "few_shot" names."""
    matches = {k for k in DECK_WEIGHTS if k == name or k.split("/")[0] == name}
    if not matches:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(DECK_WEIGHTS)} or a family")
    return matches


def task_deck(
    tasks: Iterable[str] | None = None, weights: Mapping[str, int] | None = None
) -> list[tuple[str, bool]]:
    """Deck of (kind, wrapped-in-few-shot) cards. `tasks` selects kinds, families ("edit") or
    "few_shot" (every few-shot card); None selects all. `weights` sets the card count of kinds or
    families (later entries win), e.g. {"t2i/relation": 6}; the default is DECK_WEIGHTS."""
    selected = set(DECK_WEIGHTS) if tasks is None else set()
    for name in [] if tasks is None else ([tasks] if isinstance(tasks, str) else list(tasks)):
        selected |= _deck_kinds(name)
    if not selected:
        raise ValueError("tasks selects no task kinds")
    counts = dict(DECK_WEIGHTS)
    for name, weight in (weights or {}).items():
        weight = check_int(f"the weight of {name!r}", weight, 0)
        counts.update(dict.fromkeys(_deck_kinds(name), weight))
    deck = []
    for kind, weight in counts.items():
        if kind in selected:
            deck += [(kind, False)] * weight if kind != FEW_SHOT_WRAPPED else [("", True)] * weight
    if not deck:
        raise ValueError("the weights leave no task kinds")
    return deck


def build_sample(kind: str, wrapped: bool, rng: np.random.Generator, split: str, size: int) -> Sample:
    """One sample (id left empty). Few-shot samples carry a worked example of the same kind."""
    draw = Draw(rng, split)
    if wrapped:
        kind = draw.pick(FEW_SHOT_BASE_KINDS)
    if not (wrapped or kind in FEW_SHOT_ONLY_TASKS):
        out = BUILDERS[kind](draw, size)
        meta = {**out.meta, "phrasing": draw.say.chosen[-1]}
        return Sample("", kind.split("/")[0], out.instruction, out.input_images, out.output_image, None, meta)
    example = BUILDERS[kind](draw, size)
    query = BUILDERS[kind](draw, size)
    few_shot = {
        "instruction": example.instruction,
        "input_images": example.input_images,
        "output_image": example.output_image,
    }
    example_scenes = [example.meta["scene"], *example.meta["input_scenes"]]
    meta = {**query.meta, "few_shot": True, "example_scenes": example_scenes, "phrasing": draw.say.chosen[-1]}
    return Sample("", "few_shot", query.instruction, query.input_images, query.output_image, few_shot, meta)


# --------------------------------------------------------------------------------------------------
# Samples, splits and generation
# --------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One X2I example. `few_shot`, when set, is {"instruction", "input_images", "output_image"}."""

    id: str
    task_type: str
    instruction: str
    input_images: list[np.ndarray]
    output_image: np.ndarray
    few_shot: dict[str, Any] | None
    meta: dict[str, Any]


def meta_pairs(meta: dict[str, Any]) -> set[tuple[str, str]]:
    """Every (colour, shape) pair drawn anywhere in a sample: target, inputs and few-shot example."""
    scenes = [meta["scene"], *meta["input_scenes"], *meta.get("example_scenes", [])]
    return {(obj["colour"], obj["shape"]) for scene in scenes for obj in scene["objects"]}


def iter_samples(
    n: int,
    seed: int,
    split: str = "train",
    size: int = 16,
    tasks: Iterable[str] | None = None,
    weights: Mapping[str, int] | None = None,
) -> Iterator[Sample]:
    """Yields `n` samples; sample i depends only on (seed, split, i, size, tasks), so prefixes agree.

    Task kinds are dealt from a weighted deck reshuffled every round, so every selected kind appears
    once `n` reaches the deck size. Each split has its own seed stream (module docstring);
    "compositional" redraws a sample until it holds a WITHHELD_PAIRS pair, "all" never redraws, the others
    redraw until it holds none.
    """
    n, seed = check_int("n", n, 0), check_int("seed", seed, 0)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    ms.check_image_size(size)
    deck = task_deck(tasks, weights)
    stream = _SPLIT_STREAMS[split]
    order: np.ndarray | None = None
    for index in range(n):
        if index % len(deck) == 0:
            order = np.random.default_rng([seed, stream, index // len(deck), 7]).permutation(len(deck))
        kind, wrapped = deck[int(order[index % len(deck)])]
        yield _make_sample(kind, wrapped, seed, split, index, size)


def _make_sample(kind: str, wrapped: bool, seed: int, split: str, index: int, size: int) -> Sample:
    stream = _SPLIT_STREAMS[split]
    for attempt in range(100):
        rng = np.random.default_rng([seed, stream, index, attempt])
        sample = build_sample(kind, wrapped, rng, split, size)
        pairs = meta_pairs(sample.meta)
        if split == "all" or (split == "compositional") == bool(pairs & WITHHELD_PAIRS):
            sample.id = f"{split}-{seed}-{index:06d}"
            return sample
    raise RuntimeError(f"no valid {split} sample for task {kind!r} after 100 attempts")


def generate(
    n: int,
    seed: int,
    split: str = "train",
    size: int = 16,
    tasks: Iterable[str] | None = None,
    weights: Mapping[str, int] | None = None,
) -> list[Sample]:
    """`n` samples of `split` at image size `size`; `tasks` restricts to kinds ("edit/move"), families
    ("edit") or "few_shot"; `weights` changes the task mix (`task_deck`). Same arguments, same bytes."""
    return list(iter_samples(n, seed, split, size, tasks, weights))


# --------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------


def _save_png(image: np.ndarray, out_dir: Path, name: str) -> str:
    Image.fromarray(image).save(out_dir / "images" / name)
    return f"images/{name}"


def _sample_row(sample: Sample, out_dir: Path) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": sample.id,
        "task_type": sample.task_type,
        "instruction": sample.instruction,
        "input_images": [
            _save_png(img, out_dir, f"{sample.id}_in{k + 1}.png") for k, img in enumerate(sample.input_images)
        ],
        "output_image": _save_png(sample.output_image, out_dir, f"{sample.id}_out.png"),
    }
    if sample.few_shot is not None:
        shot = sample.few_shot
        row["few_shot"] = {
            "instruction": shot["instruction"],
            "input_images": [
                _save_png(img, out_dir, f"{sample.id}_shot_in{k + 1}.png")
                for k, img in enumerate(shot["input_images"])
            ],
            "output_image": _save_png(shot["output_image"], out_dir, f"{sample.id}_shot_out.png"),
        }
    row["meta"] = sample.meta
    return row


def write_dataset(
    out_dir: str | Path,
    n: int,
    seed: int,
    split: str = "train",
    size: int = 16,
    weights: Mapping[str, int] | None = None,
) -> Path:
    """Writes PNGs under out_dir/images/ and out_dir/{split}.jsonl (paths relative to it); returns the
    jsonl path. The jsonl appears atomically once every image is on disk."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{split}.jsonl"

    def write(path: Path) -> None:
        with path.open("w", encoding="utf-8") as file:
            samples = iter_samples(n, seed, split, size, weights=weights)
            for sample in tqdm(samples, total=n, desc=f"miniworld {split}", disable=None):
                file.write(json.dumps(_sample_row(sample, out_dir)) + "\n")

    atomic_write(target, write)
    logger.info("wrote %d %s samples (size %d) to %s", n, split, size, target)
    return target


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|end|>", "<|assistant|>", "<|diffusion|>", "<img>", "</img>",
)  # fmt: skip


def build_tokenizer() -> Tokenizer:
    """WordLevel tokenizer covering every word the generator emits, OmniGen's template and negative
    prompts and the few-shot wrapper; ids 0-3 are <unk> <s> </s> <pad>; BOS is prepended."""
    from tokenizers import AddedToken, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel
    from tokenizers.processors import TemplateProcessing

    normalizer = normalizers.Lowercase()
    pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    words: set[str] = set()
    for text in mt.vocabulary_texts():
        words.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in sorted(words - set(vocab)):
        vocab[word] = len(vocab)
    tokenizer = Backend(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.add_special_tokens([AddedToken(token, normalized=False) for token in SPECIAL_TOKENS])
    tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", 1)]
    )
    return tokenizer


def save_tokenizer(path: str | Path) -> Path:
    """Writes build_tokenizer() as tokenizer.json (`path` may be a directory or a file name)."""
    path = Path(path)
    if path.suffix != ".json":
        path = path / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(path))
    return path
