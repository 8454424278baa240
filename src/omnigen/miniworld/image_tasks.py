"""Task builders of the miniature world whose input is a map or an image to transform: visual conditions
(edges, segmentation, depth, boxes -> image), computer-vision tasks (image -> map, restoration, referring
segmentation) and the few-shot-only transforms.

The same contract as `miniworld_tasks` (whose `Draw`, `TaskOutput` and meta layout these builders use):
no file I/O, every random choice from the `Draw` handed in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from omnigen.miniworld import scene as ms
from omnigen.miniworld import text as mt
from omnigen.miniworld.tasks import Builder, Draw, TaskOutput, task_output
from omnigen.miniworld.text import tag

MapRenderer = Callable[[ms.Scene, int], np.ndarray]


# --------------------------------------------------------------------------------------------------
# Condition -> image (maps carry no dots, so condition scenes have none)
# --------------------------------------------------------------------------------------------------


def map_phrases(draw: Draw, scene: ms.Scene) -> str:
    """Objects named for a map condition: sizes come from the map; cells only where a shape repeats."""
    shapes = [obj.shape for obj in scene.objects]
    phrases = [draw.say.object(o, size=False, cell=shapes.count(o.shape) > 1) for o in scene.objects]
    return mt.join_phrases(phrases)


def condition_builder(name: str, render_map: MapRenderer) -> Builder:
    map_names = {"edges": "edge map", "segmentation": "segmentation map", "depth": "depth map"}

    def build(draw: Draw, size: int) -> TaskOutput:
        scene = draw.scene(dot_p=0.0, distinct=name == "boxes")
        if name == "boxes":
            objects = mt.join_phrases(
                [f"a {o.shape} in the {draw.say.word(o.colour)} box" for o in scene.objects]
            )
        elif name == "segmentation":
            objects = "an image"
        else:
            objects = map_phrases(draw, scene)
        fills = {"map": draw.say.word(map_names[name])} if name in map_names else {}
        text = draw.say.instruction(
            f"condition/{name}", objects=objects, bg=scene.background, img1=tag(1), **fills
        )
        output = ms.render_scene(scene, size)
        return task_output(f"condition/{name}", text, [render_map(scene, size)], output, scene, [scene])

    return build


# --------------------------------------------------------------------------------------------------
# Image -> image computer-vision tasks
# --------------------------------------------------------------------------------------------------


def map_builder(name: str, render_map: MapRenderer) -> Builder:
    def build(draw: Draw, size: int) -> TaskOutput:
        scene = draw.scene()
        text = draw.say.instruction(f"cv/{name}", img1=tag(1))
        inputs = [ms.render_scene(scene, size)]
        return task_output(f"cv/{name}", text, inputs, render_map(scene, size), scene, [scene])

    return build


def cv_referring(draw: Draw, size: int) -> TaskOutput:
    scene = draw.scene()
    index = int(draw.rng.integers(len(scene.objects)))
    text = draw.say.instruction(
        "cv/referring", img1=tag(1), ref=draw.say.ref(scene.objects[index]), highlight=ms.HIGHLIGHT_NAME
    )
    output = ms.highlight_map(scene, index, size)
    inputs = [ms.render_scene(scene, size)]
    return task_output("cv/referring", text, inputs, output, scene, [scene], target_index=index)


def _degrade(name: str, draw: Draw, scene: ms.Scene, image: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Degraded input and extra meta; "hidden_box" = [top, left, side] of the area inpainting must fill."""
    size = image.shape[0]
    if name == "denoise":
        return ms.add_noise(image, draw.rng), {}
    if name == "deblur":
        return ms.box_blur(image, radius=max(1, size // 16)), {}
    if name == "lowlight":
        return ms.darken(image), {}
    if name == "colorize":
        return ms.to_gray(image), {}
    if name == "outpaint":
        width = max(2, size // 8)
        return ms.fill_border(image, width), {"hidden_border": width}
    top, left, side = ms.object_box(draw.pick(scene.objects), size)  # inpaint: hide a corner of an object
    box = max(2, side // 2 + 1)
    top, left = (
        top + int(draw.rng.integers(2)) * (side - box),
        left + int(draw.rng.integers(2)) * (side - box),
    )
    return ms.fill_box(image, top, left, box), {"hidden_box": [top, left, box]}


def restore_builder(name: str) -> Builder:
    def build(draw: Draw, size: int) -> TaskOutput:
        scene = draw.scene(avoid_backgrounds=("gray",) if name in ("inpaint", "outpaint") else ())
        image = ms.render_scene(scene, size)
        fills = {}
        if name == "colorize":
            fills["desc"] = f"{map_phrases(draw, scene)} on a {draw.say.word(scene.background)} background"
        text = draw.say.instruction(f"cv/{name}", img1=tag(1), **fills)
        degraded, extra = _degrade(name, draw, scene, image)
        return task_output(f"cv/{name}", text, [degraded], image, scene, [scene], **extra)

    return build


def transform_builder(name: str, transform: Callable[[np.ndarray], np.ndarray]) -> Builder:
    """Few-shot-only kinds; meta "output_transform" undoes the transform before scene checks."""

    def build(draw: Draw, size: int) -> TaskOutput:
        scene = draw.scene()
        image = ms.render_scene(scene, size)
        text = draw.say.instruction(f"few_shot/{name}", img1=tag(1))
        return task_output(
            f"few_shot/{name}", text, [image], transform(image), scene, [scene], output_transform=name
        )

    return build
