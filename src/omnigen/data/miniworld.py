"""Miniature X2I world: a procedural, seed-deterministic toy data set covering OmniGen's task families.

This module owns the scene model (1-3 objects on a 3x3 grid over a plain background), exact numpy
rendering of scenes and of the maps derived from them (edges, segmentation, depth, boxes, highlight
masks), the image degradations of the restoration tasks, the `Sample` record, the split and seed policy
(`generate`), the on-disk writer and the word-level tokenizer. Instruction templates and the per-task
builders live in `miniworld_tasks`. Nothing here touches global random state or the disk, except
`write_dataset` and `save_tokenizer`.

Image conventions: uint8 arrays (S, S, 3), S = image size >= 16 (16, 32 and 64 are tested). A grid cell
is c = S // 3 pixels and the grid is centred, so at S=16 the cells start at 0, 5, 10 and the last row
and column are always background. A large object is a c-pixel sprite (c - 2 from c >= 8 on), a small
one about 0.6 c, centred in its cell (S=16: 5 px and 3 px). An optional "dot" of a second colour at the
sprite centre gives an object an identity for the subject-driven tasks.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tqdm import tqdm

if TYPE_CHECKING:
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

Colour = tuple[int, int, int]

OBJECT_COLOURS: dict[str, Colour] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 20),
    "purple": (150, 50, 200),
    "orange": (245, 130, 20),
}
BACKGROUND_COLOURS: dict[str, Colour] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "beige": (225, 205, 160),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
CELL_NAMES = (
    "top left", "top center", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom center", "bottom right",
)  # fmt: skip
# (colour, shape) pairs never drawn in "train"/"heldout"; every "compositional" sample holds at least one.
WITHHELD_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("green", "triangle"), ("blue", "circle"), ("yellow", "square")}
)
SPLITS = ("train", "heldout", "compositional")
_SPLIT_STREAMS = {"train": 0, "heldout": 1, "compositional": 2}

# Maps: segmentation labels one fixed colour per object colour class (black = background), chosen far from
# the class's own colour so that a copy of the input never passes as its segmentation; depth is grey,
# larger = closer = brighter; edges are white on black; boxes are 1-px outlines in the object colour.
SEGMENTATION_COLOURS: dict[str, Colour] = {
    "red": (0, 0, 128),
    "green": (128, 0, 128),
    "blue": (128, 128, 0),
    "yellow": (128, 0, 0),
    "purple": (0, 128, 0),
    "orange": (0, 128, 128),
}
DEPTH_LEVELS: dict[str, int] = {"small": 128, "large": 255}
MAP_BACKGROUND: Colour = (0, 0, 0)
EDGE_COLOUR: Colour = (255, 255, 255)
HIGHLIGHT_NAME = "blue"
HIGHLIGHT_COLOUR: Colour = (0, 0, 255)
MASK_FILL: Colour = (128, 128, 128)  # hidden area of inpaint/outpaint inputs (those scenes avoid "gray")
NOISE_SIGMA = 40.0
LOW_LIGHT_FACTOR = 0.3


# --------------------------------------------------------------------------------------------------
# Scene model
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cell: int  # 0..8, row-major; CELL_NAMES[cell] is its name
    dot: str | None = None  # identity: colour of the centre dot, or None

    def __post_init__(self) -> None:
        object.__setattr__(self, "cell", int(self.cell))
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("colour", self.colour, tuple(OBJECT_COLOURS))
        _check_choice("size", self.size, SIZES)
        if not 0 <= self.cell < 9:
            raise ValueError(f"cell must be in 0..8, got {self.cell}")
        if self.dot is not None and (self.dot == self.colour or self.dot not in OBJECT_COLOURS):
            raise ValueError(f"dot must be an object colour other than {self.colour!r}, got {self.dot!r}")

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)

    def to_dict(self) -> dict[str, Any]:
        cell = CELL_NAMES[self.cell]
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "cell": cell, "dot": self.dot}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SceneObject:
        cell = data["cell"]
        cell = CELL_NAMES.index(cell) if isinstance(cell, str) else cell
        return cls(data["shape"], data["colour"], data["size"], cell, data.get("dot"))


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        _check_choice("background", self.background, tuple(BACKGROUND_COLOURS))
        cells = [obj.cell for obj in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"objects must sit in distinct cells, got cells {cells}")

    def to_dict(self) -> dict[str, Any]:
        return {"background": self.background, "objects": [obj.to_dict() for obj in self.objects]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        return cls(data["background"], tuple(SceneObject.from_dict(obj) for obj in data["objects"]))


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image size must be an int >= 16, got {image_size!r}")


# --------------------------------------------------------------------------------------------------
# Geometry and sprites
# --------------------------------------------------------------------------------------------------


def cell_size(image_size: int) -> int:
    return image_size // 3


def cell_origin(cell: int, image_size: int) -> tuple[int, int]:
    """(top, left) pixel of a grid cell."""
    c = cell_size(image_size)
    offset = (image_size - 3 * c) // 2
    return offset + (cell // 3) * c, offset + (cell % 3) * c


def sprite_size(size: str, image_size: int) -> int:
    """Side of the sprite box, same parity as the cell so that it centres exactly."""
    c = cell_size(image_size)
    if size == "large":
        return c if c < 8 else c - 2
    n = int(round(0.6 * c))
    return n - 1 if (c - n) % 2 else n


@lru_cache(maxsize=64)
def sprite(shape: str, n: int) -> np.ndarray:
    """(n, n) bool mask of a shape (read-only). n=5: circle .###./#####x3/.###., triangle rows 1,3,3,5,5."""
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float64)
    centre = (n - 1) / 2
    if shape == "square":
        mask = np.ones((n, n), dtype=bool)
    elif shape == "circle":
        mask = (ys - centre) ** 2 + (xs - centre) ** 2 <= (n / 2) ** 2 - 0.3
    elif shape == "triangle":
        mask = np.abs(xs - centre) <= (ys + 1) / 2
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    mask.flags.writeable = False
    return mask


@lru_cache(maxsize=64)
def dot_sprite(shape: str, n: int) -> np.ndarray:
    """(n, n) bool mask of the identity dot: a centred square of side about n/4, inside the shape."""
    d = max(1, int(round(n / 4)))
    d = d + 1 if (n - d) % 2 else d
    start = (n - d) // 2
    mask = np.zeros((n, n), dtype=bool)
    mask[start : start + d, start : start + d] = True
    mask &= sprite(shape, n)
    mask.flags.writeable = False
    return mask


def object_box(obj: SceneObject, image_size: int) -> tuple[int, int, int]:
    """(top, left, side) of the object's sprite box."""
    top, left = cell_origin(obj.cell, image_size)
    n = sprite_size(obj.size, image_size)
    pad = (cell_size(image_size) - n) // 2
    return top + pad, left + pad, n


def object_masks(obj: SceneObject, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Full-image bool masks (S, S) of the object and of its dot (empty when it has none)."""
    top, left, n = object_box(obj, image_size)
    mask = np.zeros((image_size, image_size), dtype=bool)
    dot = np.zeros_like(mask)
    mask[top : top + n, left : left + n] = sprite(obj.shape, n)
    if obj.dot is not None:
        dot[top : top + n, left : left + n] = dot_sprite(obj.shape, n)
    return mask, dot


# --------------------------------------------------------------------------------------------------
# Rendering and maps
# --------------------------------------------------------------------------------------------------


def _canvas(image_size: int, colour: Colour) -> np.ndarray:
    return np.tile(np.asarray(colour, dtype=np.uint8), (image_size, image_size, 1))


def render_scene(scene: Scene, image_size: int) -> np.ndarray:
    """The scene as an (S, S, 3) uint8 image."""
    check_image_size(image_size)
    image = _canvas(image_size, BACKGROUND_COLOURS[scene.background])
    for obj in scene.objects:
        mask, dot = object_masks(obj, image_size)
        image[mask] = OBJECT_COLOURS[obj.colour]
        if obj.dot is not None:
            image[dot] = OBJECT_COLOURS[obj.dot]
    return image


def label_map(scene: Scene, image_size: int) -> np.ndarray:
    """(S, S) int array: 0 background, k + 1 inside object k."""
    labels = np.zeros((image_size, image_size), dtype=np.int16)
    for index, obj in enumerate(scene.objects):
        labels[object_masks(obj, image_size)[0]] = index + 1
    return labels


def edge_mask(scene: Scene, image_size: int) -> np.ndarray:
    """(S, S) bool: object pixels with a 4-neighbour of another label; outside the image counts as other."""
    labels = label_map(scene, image_size)
    padded = np.pad(labels, 1, constant_values=-1)
    boundary = np.zeros(labels.shape, dtype=bool)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        boundary |= padded[1 + dy : 1 + dy + image_size, 1 + dx : 1 + dx + image_size] != labels
    return (labels > 0) & boundary


def edge_map(scene: Scene, image_size: int) -> np.ndarray:
    image = _canvas(image_size, MAP_BACKGROUND)
    image[edge_mask(scene, image_size)] = EDGE_COLOUR
    return image


def segmentation_map(scene: Scene, image_size: int) -> np.ndarray:
    image = _canvas(image_size, MAP_BACKGROUND)
    for obj in scene.objects:
        image[object_masks(obj, image_size)[0]] = SEGMENTATION_COLOURS[obj.colour]
    return image


def depth_map(scene: Scene, image_size: int) -> np.ndarray:
    image = _canvas(image_size, MAP_BACKGROUND)
    for obj in scene.objects:
        image[object_masks(obj, image_size)[0]] = DEPTH_LEVELS[obj.size]
    return image


def box_map(scene: Scene, image_size: int) -> np.ndarray:
    """1-px outline of each object's bounding box in the object's colour, on black."""
    image = _canvas(image_size, MAP_BACKGROUND)
    for obj in scene.objects:
        ys, xs = np.nonzero(object_masks(obj, image_size)[0])
        top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
        colour = OBJECT_COLOURS[obj.colour]
        image[[top, bottom], left : right + 1] = colour
        image[top : bottom + 1, [left, right]] = colour
    return image


def highlight_map(scene: Scene, index: int, image_size: int) -> np.ndarray:
    """Referring-segmentation target: object `index` in HIGHLIGHT_COLOUR, everything else black."""
    image = _canvas(image_size, MAP_BACKGROUND)
    image[object_masks(scene.objects[index], image_size)[0]] = HIGHLIGHT_COLOUR
    return image


# --------------------------------------------------------------------------------------------------
# Degradations (restoration inputs) and few-shot-only transforms
# --------------------------------------------------------------------------------------------------


def add_noise(image: np.ndarray, rng: np.random.Generator, sigma: float = NOISE_SIGMA) -> np.ndarray:
    noisy = image.astype(np.float64) + rng.normal(0.0, sigma, size=image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def box_blur(image: np.ndarray, radius: int = 1) -> np.ndarray:
    """Mean over a (2r+1)^2 window with edge replication."""
    size = image.shape[0]
    padded = np.pad(image.astype(np.float64), ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    total = np.zeros(image.shape, dtype=np.float64)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            total += padded[dy : dy + size, dx : dx + size]
    return np.rint(total / (2 * radius + 1) ** 2).astype(np.uint8)


def darken(image: np.ndarray, factor: float = LOW_LIGHT_FACTOR) -> np.ndarray:
    return np.rint(image.astype(np.float64) * factor).astype(np.uint8)


def to_gray(image: np.ndarray) -> np.ndarray:
    luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.repeat(np.rint(luma).astype(np.uint8)[..., None], 3, axis=2)


def fill_box(image: np.ndarray, top: int, left: int, side: int, colour: Colour = MASK_FILL) -> np.ndarray:
    out = image.copy()
    out[top : top + side, left : left + side] = colour
    return out


def fill_border(image: np.ndarray, width: int, colour: Colour = MASK_FILL) -> np.ndarray:
    out = np.empty_like(image)
    out[:] = colour
    out[width:-width, width:-width] = image[width:-width, width:-width]
    return out


def invert(image: np.ndarray) -> np.ndarray:
    return 255 - image


def mirror(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[:, ::-1])


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
    n: int, seed: int, split: str = "train", size: int = 16, tasks: Iterable[str] | None = None
) -> Iterator[Sample]:
    """Yields `n` samples; sample i depends only on (seed, split, i, size, tasks), so prefixes agree.

    Task kinds are dealt from a weighted deck reshuffled every round, so every selected kind appears
    once `n` reaches the deck size. "heldout" is another seed stream of the training distribution;
    "compositional" redraws a sample until it holds a WITHHELD_PAIRS pair.
    """
    from omnigen.data import miniworld_tasks  # imported here: it builds on this module

    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    _check_choice("split", split, SPLITS)
    check_image_size(size)
    deck = miniworld_tasks.task_deck(tasks)
    stream = _SPLIT_STREAMS[split]
    order: np.ndarray | None = None
    for index in range(n):
        if index % len(deck) == 0:
            order = np.random.default_rng([seed, stream, index // len(deck), 7]).permutation(len(deck))
        kind, wrapped = deck[int(order[index % len(deck)])]
        yield _make_sample(miniworld_tasks, kind, wrapped, seed, split, index, size)


def _make_sample(
    tasks_module: Any, kind: str, wrapped: bool, seed: int, split: str, index: int, size: int
) -> Sample:
    stream = _SPLIT_STREAMS[split]
    for attempt in range(100):
        rng = np.random.default_rng([seed, stream, index, attempt])
        sample = tasks_module.build_sample(kind, wrapped, rng, split, size)
        pairs = meta_pairs(sample.meta)
        if (split == "compositional") == bool(pairs & WITHHELD_PAIRS):
            sample.id = f"{split}-{seed}-{index:06d}"
            return sample
    raise RuntimeError(f"no valid {split} sample for task {kind!r} after 100 attempts")


def generate(
    n: int, seed: int, split: str = "train", size: int = 16, tasks: Iterable[str] | None = None
) -> list[Sample]:
    """`n` samples of `split` at image size `size`; `tasks` restricts to kinds ("edit/move"), families
    ("edit") or "few_shot". Same arguments, same bytes."""
    return list(iter_samples(n, seed, split, size, tasks))


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


def write_dataset(out_dir: str | Path, n: int, seed: int, split: str = "train", size: int = 16) -> Path:
    """Writes PNGs under out_dir/images/ and out_dir/{split}.jsonl (paths relative to it); returns the
    jsonl path. The jsonl appears atomically once every image is on disk."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{split}.jsonl"
    handle, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=f".{split}.", suffix=".jsonl.tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            samples = iter_samples(n, seed, split, size)
            for sample in tqdm(samples, total=n, desc=f"miniworld {split}", disable=None):
                file.write(json.dumps(_sample_row(sample, out_dir)) + "\n")
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
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

    from omnigen.data import miniworld_tasks  # imported here: it builds on this module

    normalizer = normalizers.Lowercase()
    pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    words: set[str] = set()
    for text in miniworld_tasks.vocabulary_texts():
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
