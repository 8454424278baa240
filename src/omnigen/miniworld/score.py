"""Automatic scoring of miniature-world outputs against a sample's ground-truth metadata.

This module owns the decoding of an image back into a scene (nearest palette colour per pixel, then per
cell: object present, colour, shape and size by template IoU, identity dot) and the per-task metrics:
object-level correctness for generation, edit, subject and condition tasks (plus preservation of the
untouched pixels for edits), F1 with a 1-px tolerance for edge maps, foreground mIoU for label maps
(segmentation, depth, referring masks) and PSNR plus a scene check for restoration tasks. It reads
images only as arrays and never writes anything.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from omnigen.miniworld import scene as ms
from omnigen.miniworld.tasks import relation_holds

logger = logging.getLogger(__name__)

RESTORE_PSNR_DB = 24.0
EDGE_F1_THRESHOLD = 0.8
LABEL_IOU_THRESHOLD = 0.7
PRESERVE_THRESHOLD = 0.9
MIN_OBJECT_FRACTION = 0.5  # of the smallest sprite's area, for a cell to hold an object
PSNR_CAP_DB = 100.0

_PALETTE_NAMES = (*ms.OBJECT_COLOURS, *ms.BACKGROUND_COLOURS)
_PALETTE = np.array([*ms.OBJECT_COLOURS.values(), *ms.BACKGROUND_COLOURS.values()], dtype=np.float64)
_NUM_OBJECT_COLOURS = len(ms.OBJECT_COLOURS)
_LABEL_PALETTES = {
    "cv/segmentation": [ms.MAP_BACKGROUND, *ms.SEGMENTATION_COLOURS.values()],
    "cv/depth": [ms.MAP_BACKGROUND, *((level,) * 3 for level in ms.DEPTH_LEVELS.values())],
    "cv/referring": [ms.MAP_BACKGROUND, ms.HIGHLIGHT_COLOUR],
}


@dataclass(frozen=True)
class DecodedObject:
    shape: str
    colour: str
    size: str
    dot: str | None


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def nearest_labels(image: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """(S, S) index of the nearest colour (RGB distance) of `colours` (K, 3) for every pixel."""
    distances = ((image.astype(np.float64)[:, :, None, :] - colours[None, None]) ** 2).sum(-1)
    return distances.argmin(-1)


@lru_cache(maxsize=8)
def _cell_templates(image_size: int) -> tuple[tuple[str, str, np.ndarray, np.ndarray], ...]:
    """(shape, size, cell-local mask, cell-local dot region) for every sprite at this image size."""
    c = ms.cell_size(image_size)
    templates = []
    for size in ms.SIZES:
        n = ms.sprite_size(size, image_size)
        pad = (c - n) // 2
        for shape in ms.SHAPES:
            mask, dot = np.zeros((c, c), dtype=bool), np.zeros((c, c), dtype=bool)
            mask[pad : pad + n, pad : pad + n] = ms.sprite(shape, n)
            dot[pad : pad + n, pad : pad + n] = ms.dot_sprite(shape, n)
            templates.append((shape, size, mask, dot))
    return tuple(templates)


def _min_object_pixels(image_size: int) -> int:
    smallest = min(int(mask.sum()) for _, _, mask, _ in _cell_templates(image_size))
    return max(1, math.ceil(MIN_OBJECT_FRACTION * smallest))


def _mode(values: np.ndarray) -> int:
    return int(np.bincount(values.ravel()).argmax())


def _decode_cell(patch: np.ndarray, image_size: int) -> DecodedObject | None:
    """`patch` holds palette indices of one cell; None when too few object-coloured pixels."""
    present = patch < _NUM_OBJECT_COLOURS
    if present.sum() < _min_object_pixels(image_size):
        return None

    def iou(mask: np.ndarray) -> float:
        return float((mask & present).sum() / (mask | present).sum())

    shape, size, mask, dot_region = max(_cell_templates(image_size), key=lambda t: iou(t[2]))
    outer = present & mask & ~dot_region
    colour = _mode(patch[outer if outer.any() else present])
    inner = present & dot_region
    dot = _mode(patch[inner]) if inner.any() else colour
    dot_name = _PALETTE_NAMES[dot] if dot != colour else None
    return DecodedObject(shape, _PALETTE_NAMES[colour], size, dot_name)


def decode_scene(image: np.ndarray) -> tuple[str, dict[int, DecodedObject]]:
    """(background name, {cell: object}) read from an (S, S, 3) image. The background is the most
    common nearest palette colour, which may be an object colour for a badly wrong image."""
    image_size = image.shape[0]
    labels = nearest_labels(image, _PALETTE)
    background = _PALETTE_NAMES[_mode(labels)]
    c = ms.cell_size(image_size)
    cells = {}
    for cell in range(9):
        top, left = ms.cell_origin(cell, image_size)
        decoded = _decode_cell(labels[top : top + c, left : left + c], image_size)
        if decoded is not None:
            cells[cell] = decoded
    return background, cells


OBJECT_ERRORS = ("missing", "shape", "colour", "size", "dot")  # checked in this order; the first one counts


def object_error(found: DecodedObject | None, want: dict[str, Any]) -> str | None:
    """Why a decoded object is not the wanted one (a scene object's dict), or None when it is: nothing
    in the cell, then the first wrong attribute of OBJECT_ERRORS. Its size counts only when the
    instruction named it (no "size_named": false)."""
    if found is None:
        return "missing"
    for name in OBJECT_ERRORS[1:]:
        if name == "size" and want.get("size_named") is False:
            continue
        if getattr(found, name) != want[name]:
            return name
    return None


def _matches(found: DecodedObject | None, want: dict[str, Any]) -> bool:
    return object_error(found, want) is None


def _error_counts(errors: Iterable[str | None]) -> dict[str, int]:
    """{"wrong_<kind>": count} for every kind of OBJECT_ERRORS (zeros included, so means are per sample)."""
    counts = Counter(error for error in errors if error is not None)
    return {f"wrong_{name}": counts[name] for name in OBJECT_ERRORS}


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def psnr(output: np.ndarray, target: np.ndarray) -> float:
    mse = float(((output.astype(np.float64) - target.astype(np.float64)) ** 2).mean())
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(255.0**2 / mse))


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 (Chebyshev 1-px) dilation."""
    size = mask.shape[0]
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy : dy + size, dx : dx + size]
    return out


def _f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def edge_scores(output: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Exact F1 and F1 where a pixel counts as matched within 1 px of the other map."""
    pred, true = output.mean(-1) >= 128, target.mean(-1) >= 128
    if not pred.any() or not true.any():
        same = float(pred.any() == true.any())
        return {"f1": same, "f1_tol": same}
    exact = _f1(float((pred & true).sum() / pred.sum()), float((pred & true).sum() / true.sum()))
    precision = float((pred & _dilate(true)).sum() / pred.sum())
    recall = float((true & _dilate(pred)).sum() / true.sum())
    return {"f1": exact, "f1_tol": _f1(precision, recall)}


def label_scores(output: np.ndarray, target: np.ndarray, colours: list[tuple[int, ...]]) -> dict[str, float]:
    """Foreground mIoU (label 0 is background) over labels present in either map, and pixel accuracy."""
    palette = np.array(colours, dtype=np.float64)
    pred, true = nearest_labels(output, palette), nearest_labels(target, palette)
    classes = sorted((set(np.unique(pred)) | set(np.unique(true))) - {0})
    ious = [float(((pred == k) & (true == k)).sum() / ((pred == k) | (true == k)).sum()) for k in classes]
    return {"miou": float(np.mean(ious)) if ious else 1.0, "pixel_acc": float((pred == true).mean())}


def scene_scores(scene_dict: dict[str, Any], image: np.ndarray) -> dict[str, Any]:
    """Background right, fraction of expected objects right in their cell, objects in other cells."""
    scene = ms.Scene.from_dict(scene_dict)
    background, cells = decode_scene(image)
    errors = [
        object_error(cells.get(obj.cell), want) for obj, want in zip(scene.objects, scene_dict["objects"])
    ]
    hits = [error is None for error in errors]
    extra = len(set(cells) - {obj.cell for obj in scene.objects})
    background_ok = background == scene.background
    object_acc = float(np.mean(hits)) if hits else 1.0
    return {"background_ok": background_ok, "object_acc": object_acc, "extra_objects": extra,
            **_error_counts(errors), "scene_ok": background_ok and all(hits) and extra == 0}  # fmt: skip


def relation_scores(meta: dict[str, Any], image: np.ndarray) -> dict[str, Any]:
    """Objects may sit anywhere that satisfies the relation; each must appear exactly once."""
    scene = ms.Scene.from_dict(meta["scene"])
    background, cells = decode_scene(image)
    found = [
        [cell for cell, obj in cells.items() if _matches(obj, want)] for want in meta["scene"]["objects"]
    ]
    hits = [len(options) == 1 for options in found]
    relation_ok = all(hits) and relation_holds(meta["relation"], found[0][0], found[1][0])
    extra = len(cells) - sum(hits)
    background_ok = background == scene.background
    return {"background_ok": background_ok, "object_acc": float(np.mean(hits)), "extra_objects": extra,
            "relation_ok": relation_ok, "scene_ok": background_ok and relation_ok and extra == 0}  # fmt: skip


def preservation(meta: dict[str, Any], output: np.ndarray, target: np.ndarray) -> float:
    """Palette accuracy on the pixels the edit leaves unchanged (input render == target)."""
    source = ms.render_scene(ms.Scene.from_dict(meta["input_scenes"][0]), target.shape[0])
    unchanged = (source == target).all(-1)
    if not unchanged.any():
        return 1.0
    same = nearest_labels(output, _PALETTE) == nearest_labels(target, _PALETTE)
    return float(same[unchanged].mean())


# --------------------------------------------------------------------------------------------------
# Per-sample scoring and summaries
# --------------------------------------------------------------------------------------------------

_TRANSFORMS = {None: lambda image: image, "invert": ms.invert, "mirror": ms.mirror}  # involutions


def task_family(meta: dict[str, Any]) -> str:
    return "few_shot" if meta.get("few_shot") else meta["task"].split("/")[0]


def hidden_region(meta: dict[str, Any]) -> np.ndarray:
    """(S, S) bool: the area an inpaint/outpaint input hid; the whole image for other tasks."""
    size = meta["image_size"]
    region = np.zeros((size, size), dtype=bool)
    if "hidden_box" in meta:
        top, left, side = meta["hidden_box"]
        region[top : top + side, left : left + side] = True
    elif "hidden_border" in meta:
        width = meta["hidden_border"]
        region[:] = True
        region[width:-width, width:-width] = False
    else:
        region[:] = True
    return region


def _check_images(meta: dict[str, Any], output: np.ndarray, target: np.ndarray) -> None:
    size = meta["image_size"]
    for name, image in (("output", output), ("target", target)):
        if image.shape != (size, size, 3) or image.dtype != np.uint8:
            raise ValueError(f"{name} must be uint8 {(size, size, 3)}, got {image.dtype} {image.shape}")


def _task_metrics(meta: dict[str, Any], output: np.ndarray, target: np.ndarray) -> dict[str, Any]:
    task = meta["task"]
    if task == "cv/edges":
        metrics: dict[str, Any] = edge_scores(output, target)
        return {**metrics, "correct": metrics["f1_tol"] >= EDGE_F1_THRESHOLD}
    if task in _LABEL_PALETTES:
        metrics = label_scores(output, target, _LABEL_PALETTES[task])
        return {**metrics, "correct": metrics["miou"] >= LABEL_IOU_THRESHOLD}
    if task == "t2i/relation":
        metrics = relation_scores(meta, output)
        return {**metrics, "correct": metrics["scene_ok"]}
    if task.startswith(("cv/", "few_shot/")):  # restoration and the invertible few-shot transforms
        hidden = hidden_region(meta)
        metrics = {"psnr": psnr(output, target), "psnr_hidden": psnr(output[hidden], target[hidden])}
        metrics |= scene_scores(meta["scene"], _TRANSFORMS[meta.get("output_transform")](output))
        restored = min(metrics["psnr"], metrics["psnr_hidden"]) >= RESTORE_PSNR_DB
        return {**metrics, "correct": restored and metrics["scene_ok"]}
    metrics = scene_scores(meta["scene"], output)
    if task.startswith("edit/"):
        metrics["preserve_acc"] = preservation(meta, output, target)
        return {**metrics, "correct": metrics["scene_ok"] and metrics["preserve_acc"] >= PRESERVE_THRESHOLD}
    return {**metrics, "correct": metrics["scene_ok"]}


def score_sample(meta: dict[str, Any], output: np.ndarray, target: np.ndarray) -> dict[str, Any]:
    """Metrics of one generated `output` for a sample with ground truth `target` and `meta`; always has
    "task", "family" and a boolean "correct"."""
    _check_images(meta, output, target)
    metrics = _task_metrics(meta, output, target)
    metrics["correct"] = bool(metrics["correct"])
    return {"task": meta["task"], "family": task_family(meta), **metrics}


def summarize(records: Iterable[dict[str, Any]], by: str = "family") -> dict[str, dict[str, float]]:
    """{group: {"n", "accuracy", mean of every numeric metric}}, grouped by "family" or "task"."""
    if by not in ("family", "task"):
        raise ValueError(f"by must be 'family' or 'task', got {by!r}")
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[record[by]].append(record)
    summary = {}
    for key in sorted(groups):
        rows = groups[key]
        sums: Counter[str] = Counter()
        counts: Counter[str] = Counter()
        for row in rows:
            for name, value in row.items():
                if name != "correct" and isinstance(value, (bool, int, float)):
                    sums[name] += float(value)
                    counts[name] += 1
        summary[key] = {"n": len(rows), "accuracy": float(np.mean([row["correct"] for row in rows]))}
        summary[key] |= {name: sums[name] / counts[name] for name in sorted(sums)}
    logger.debug("summarised %d groups", len(summary))
    return summary
