"""The miniature world's scene model: 1-3 objects on a 3x3 grid over a plain background.

This module owns the palette and vocabulary of things (colours, shapes, sizes, cells), the `Scene` and
`SceneObject` records, exact numpy rendering of scenes and of the maps derived from them (edges,
segmentation, depth, boxes, highlight masks), and the image degradations of the restoration tasks. It
knows nothing of instructions, tasks or splits and touches neither the disk nor global random state.

Image conventions: uint8 arrays (S, S, 3), S = image size >= 16 (16, 32 and 64 are tested). A grid cell
is c = S // 3 pixels and the grid is centred, so at S=16 the cells start at 0, 5, 10 and the last row
and column are always background. A large object is a c-pixel sprite (c - 2 from c >= 8 on), a small
one about 0.6 c, centred in its cell (S=16: 5 px and 3 px). An optional "dot" of a second colour at the
sprite centre gives an object an identity for the subject-driven tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from omnigen.util.checks import check_int

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
        object.__setattr__(self, "cell", check_int("cell", int(self.cell), 0, 8))  # a numpy int too
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("colour", self.colour, tuple(OBJECT_COLOURS))
        _check_choice("size", self.size, SIZES)
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
    check_int("image size", image_size, 16)


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
