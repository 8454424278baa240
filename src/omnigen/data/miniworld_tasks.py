"""Task builders of the miniature X2I world: instructions, input images, output image and metadata.

This module owns the instruction templates (and so the vocabulary), the split policy for drawing
objects (WITHHELD_PAIRS only in "compositional"), one builder per task kind and the weighted task deck.
It builds on `miniworld`'s scene model and rendering and must not do file I/O or seeding of its own:
every random choice comes from the `numpy.random.Generator` it is handed.

Every meta holds "task" (the kind, e.g. "edit/recolour"), "few_shot", "image_size", "scene" (the scene
the output depicts, before any output transform) and "input_scenes" (the scene behind each input).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from omnigen.data import miniworld as mw

IMAGE_TAG = "<img><|image_{k}|></img>"
RELATIONS = ("left of", "right of", "above", "below")
NEGATIVE_PROMPT = "low quality, blurry, noisy, distorted shapes, wrong colors, extra objects"
# Only ever seen inside few-shot samples (an in-context example followed by the query).
FEW_SHOT_ONLY_TASKS = ("few_shot/invert", "few_shot/mirror")

TEMPLATES: dict[str, str] = {
    "t2i/objects": "{objects} on a {background} background",
    "t2i/relation": "{first} {relation} {second} on a {background} background",
    "edit/recolour": "make the {ref} {colour}",
    "edit/remove": "remove the {ref}",
    "edit/add": "add {object}",
    "edit/move": "move the {ref} to the {cell}",
    "edit/resize": "make the {ref} {size}",
    "edit/background": "change the background to {background}",
    "edit": "{img1} {edit}",
    "edit/compose": "{img1} {first} and then {second}",
    "subject/place": "the {shape} in {img1} placed in the {cell} on a {background} background",
    "subject/pick": "the {ref} in {img1} placed in the {cell} on a {background} background",
    "subject/pair": "the {shape} in {img1} in the {cell} and the {shape2} in {img2} in the {cell2} "
    "on a {background} background",
    "condition/edges": "{objects} on a {background} background following the edge map {img1}",
    "condition/segmentation": "an image on a {background} background following the segmentation map {img1}",
    "condition/depth": "{objects} on a {background} background following the depth map {img1}",
    "condition/boxes": "draw {items} on a {background} background using the boxes in {img1}",
    "cv/edges": "{img1} detect the edges",
    "cv/segmentation": "{img1} segment the objects by color",
    "cv/depth": "{img1} estimate the depth map",
    "cv/denoise": "{img1} remove the noise",
    "cv/deblur": "{img1} remove the blur",
    "cv/inpaint": "{img1} fill in the gray box",
    "cv/outpaint": "{img1} extend the image into the gray border",
    "cv/colorize": "{img1} colorize the image: {objects} on a {background} background",
    "cv/lowlight": "{img1} brighten the dark image",
    "cv/referring": "{img1} highlight the {ref} in " + mw.HIGHLIGHT_NAME,
    "few_shot/invert": "{img1} invert the colors",
    "few_shot/mirror": "{img1} mirror the image horizontally",
}
# Fixed fragments the phrase helpers below add around the names.
PHRASE_FRAGMENTS = ("a", "an", "the", "with a", "dot", "in the", "and", ",", "box", "in the box")
# Text other stages wrap around instructions (OmniGen's template and default negative prompt, the
# few-shot wrapper of omnigen.training.x2i); copied here so that the tokenizer covers them.
WRAPPER_TEXTS = (
    "Generate an image according to the following instructions",
    "low quality, jpeg artifacts, ugly, duplicate, morbid, mutilated, extra fingers, mutated hands, "
    "poorly drawn hands, poorly drawn face, mutation, deformed, blurry, dehydrated, bad anatomy, "
    "bad proportions, extra limbs, cloned face, disfigured, gross proportions, malformed limbs, "
    "missing arms, missing legs, extra arms, extra legs, fused fingers, too many fingers.",
    "Here is an example. Instruction: Output: Now do the same for a new input. Instruction:",
    NEGATIVE_PROMPT,
)


def vocabulary_texts() -> list[str]:
    """Every text fragment an instruction or its wrapper can contain ({placeholders} dropped)."""
    names = [*mw.OBJECT_COLOURS, *mw.BACKGROUND_COLOURS, *mw.SHAPES, *mw.SIZES, *mw.CELL_NAMES, *RELATIONS]
    templates = [text.replace("{", " {").replace("}", "} ") for text in TEMPLATES.values()]
    fields = [" ".join(w for w in text.split() if not w.startswith("{")) for text in templates]
    return [*fields, *names, *PHRASE_FRAGMENTS, *WRAPPER_TEXTS]


def tag(k: int) -> str:
    return IMAGE_TAG.format(k=k)


# --------------------------------------------------------------------------------------------------
# Phrases
# --------------------------------------------------------------------------------------------------


def object_phrase(obj: mw.SceneObject, size: bool = True, cell: bool = True) -> str:
    """ "a small red circle with a blue dot in the top left"."""
    words = ([obj.size] if size else []) + [obj.colour, obj.shape]
    words.insert(0, "an" if words[0][0] in "aeiou" else "a")
    if obj.dot is not None:
        words += ["with a", obj.dot, "dot"]
    if cell:
        words += ["in the", mw.CELL_NAMES[obj.cell]]
    return " ".join(words)


def ref_phrase(obj: mw.SceneObject) -> str:
    """Unique within a scene, since scenes never repeat a (colour, shape) pair."""
    return f"{obj.colour} {obj.shape}"


def join_phrases(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def map_phrases(scene: mw.Scene) -> str:
    """Objects named for a map condition: sizes come from the map; cells only where a shape repeats."""
    shapes = [obj.shape for obj in scene.objects]
    return join_phrases([object_phrase(o, size=False, cell=shapes.count(o.shape) > 1) for o in scene.objects])


# --------------------------------------------------------------------------------------------------
# Drawing under a split's policy
# --------------------------------------------------------------------------------------------------


class Draw:
    """Random choices for one sample; outside "compositional" no WITHHELD_PAIRS pair is ever drawn."""

    def __init__(self, rng: np.random.Generator, split: str) -> None:
        self.rng = rng
        self.compositional = split == "compositional"

    def pick(self, options: Iterable[Any]) -> Any:
        options = list(options)
        if not options:
            raise ValueError("nothing to choose from")
        return options[int(self.rng.integers(len(options)))]

    def allowed(self, colour: str, shape: str) -> bool:
        return self.compositional or (colour, shape) not in mw.WITHHELD_PAIRS

    def new_object(
        self,
        others: Iterable[mw.SceneObject],
        dot_p: float = 0.0,
        distinct: bool = False,
        cell: int | None = None,
    ) -> mw.SceneObject:
        """A fresh object in a free cell with a (colour, shape) pair (or colour, if `distinct`) unused by
        `others`. In "compositional" half of the objects take a withheld pair where one is free."""
        others = list(others)
        used = {o.colour if distinct else o.pair for o in others}
        options = [
            (colour, shape)
            for colour in mw.OBJECT_COLOURS
            for shape in mw.SHAPES
            if self.allowed(colour, shape) and (colour if distinct else (colour, shape)) not in used
        ]
        withheld = [pair for pair in options if pair in mw.WITHHELD_PAIRS]
        colour, shape = self.pick(withheld if withheld and self.rng.random() < 0.5 else options)
        if cell is None:
            cell = self.pick(sorted(set(range(9)) - {o.cell for o in others}))
        dot = self.pick(c for c in mw.OBJECT_COLOURS if c != colour) if self.rng.random() < dot_p else None
        return mw.SceneObject(shape, colour, self.pick(mw.SIZES), cell, dot)

    def scene(
        self,
        count: tuple[int, int] = (1, 3),
        dot_p: float = 0.15,
        distinct: bool = False,
        avoid_backgrounds: tuple[str, ...] = (),
    ) -> mw.Scene:
        objects: list[mw.SceneObject] = []
        for _ in range(int(self.rng.integers(count[0], count[1] + 1))):
            objects.append(self.new_object(objects, dot_p, distinct))
        background = self.pick(b for b in mw.BACKGROUND_COLOURS if b not in avoid_backgrounds)
        return mw.Scene(background, tuple(sorted(objects, key=lambda o: o.cell)))


@dataclass
class TaskOutput:
    instruction: str
    input_images: list[np.ndarray]
    output_image: np.ndarray
    meta: dict[str, Any]


Builder = Callable[[Draw, int], TaskOutput]
MapRenderer = Callable[[mw.Scene, int], np.ndarray]


def _output(
    task: str,
    instruction: str,
    inputs: list[np.ndarray],
    output: np.ndarray,
    scene: mw.Scene,
    input_scenes: list[mw.Scene],
    **extra: Any,
) -> TaskOutput:
    meta = {
        "task": task,
        "few_shot": False,
        "image_size": int(output.shape[0]),
        "scene": scene.to_dict(),
        "input_scenes": [s.to_dict() for s in input_scenes],
        **extra,
    }
    return TaskOutput(instruction, inputs, output, meta)


# --------------------------------------------------------------------------------------------------
# Text to image
# --------------------------------------------------------------------------------------------------


def t2i_objects(draw: Draw, size: int) -> TaskOutput:
    scene = draw.scene()
    text = TEMPLATES["t2i/objects"].format(
        objects=join_phrases([object_phrase(o) for o in scene.objects]), background=scene.background
    )
    return _output("t2i/objects", text, [], mw.render_scene(scene, size), scene, [])


def relation_holds(relation: str, first: int, second: int) -> bool:
    """Cell-level relations: "left of" = strictly smaller column, "above" = strictly smaller row."""
    (row_a, col_a), (row_b, col_b) = divmod(first, 3), divmod(second, 3)
    return {
        "left of": col_a < col_b,
        "right of": col_a > col_b,
        "above": row_a < row_b,
        "below": row_a > row_b,
    }[relation]


def t2i_relation(draw: Draw, size: int) -> TaskOutput:
    relation = draw.pick(RELATIONS)
    cells = draw.pick([(a, b) for a in range(9) for b in range(9) if relation_holds(relation, a, b)])
    first = draw.new_object([], cell=cells[0])
    second = draw.new_object([first], cell=cells[1])
    scene = mw.Scene(draw.pick(mw.BACKGROUND_COLOURS), (first, second))
    text = TEMPLATES["t2i/relation"].format(
        first=object_phrase(first, cell=False),
        relation=relation,
        second=object_phrase(second, cell=False),
        background=scene.background,
    )
    return _output("t2i/relation", text, [], mw.render_scene(scene, size), scene, [], relation=relation)


# --------------------------------------------------------------------------------------------------
# Editing: each operation returns (phrase, edited scene, touched cells) or None when it does not apply
# --------------------------------------------------------------------------------------------------

EditResult = tuple[str, mw.Scene, set[int]]


def _with_objects(scene: mw.Scene, objects: Iterable[mw.SceneObject]) -> mw.Scene:
    return mw.Scene(scene.background, tuple(sorted(objects, key=lambda o: o.cell)))


def _edit_recolour(draw: Draw, scene: mw.Scene, avoid: set[int]) -> EditResult | None:
    candidates = [o for o in scene.objects if o.cell not in avoid]
    if not candidates:
        return None
    obj = draw.pick(candidates)
    used = {o.pair for o in scene.objects}
    colours = [c for c in mw.OBJECT_COLOURS if draw.allowed(c, obj.shape) and (c, obj.shape) not in used]
    colours = [c for c in colours if c != obj.dot]
    new = replace(obj, colour=draw.pick(colours))
    phrase = TEMPLATES["edit/recolour"].format(ref=ref_phrase(obj), colour=new.colour)
    return phrase, _with_objects(scene, [new if o == obj else o for o in scene.objects]), {obj.cell}


def _edit_remove(draw: Draw, scene: mw.Scene, avoid: set[int]) -> EditResult | None:
    candidates = [o for o in scene.objects if o.cell not in avoid]
    if len(scene.objects) < 2 or not candidates:
        return None
    obj = draw.pick(candidates)
    phrase = TEMPLATES["edit/remove"].format(ref=ref_phrase(obj))
    return phrase, _with_objects(scene, [o for o in scene.objects if o != obj]), {obj.cell}


def _edit_add(draw: Draw, scene: mw.Scene, avoid: set[int]) -> EditResult | None:
    if len(scene.objects) > 2:
        return None
    obj = draw.new_object(scene.objects, dot_p=0.15)
    phrase = TEMPLATES["edit/add"].format(object=object_phrase(obj))
    return phrase, _with_objects(scene, [*scene.objects, obj]), {obj.cell}


def _edit_move(draw: Draw, scene: mw.Scene, avoid: set[int]) -> EditResult | None:
    candidates = [o for o in scene.objects if o.cell not in avoid]
    free = set(range(9)) - {o.cell for o in scene.objects} - avoid
    if not candidates or not free:
        return None
    obj = draw.pick(candidates)
    new = replace(obj, cell=draw.pick(sorted(free)))
    phrase = TEMPLATES["edit/move"].format(ref=ref_phrase(obj), cell=mw.CELL_NAMES[new.cell])
    return phrase, _with_objects(scene, [new if o == obj else o for o in scene.objects]), {obj.cell, new.cell}


def _edit_resize(draw: Draw, scene: mw.Scene, avoid: set[int]) -> EditResult | None:
    candidates = [o for o in scene.objects if o.cell not in avoid]
    if not candidates:
        return None
    obj = draw.pick(candidates)
    new = replace(obj, size="small" if obj.size == "large" else "large")
    phrase = TEMPLATES["edit/resize"].format(ref=ref_phrase(obj), size=new.size)
    return phrase, _with_objects(scene, [new if o == obj else o for o in scene.objects]), {obj.cell}


def _edit_background(draw: Draw, scene: mw.Scene, avoid: set[int]) -> EditResult | None:
    background = draw.pick(b for b in mw.BACKGROUND_COLOURS if b != scene.background)
    phrase = TEMPLATES["edit/background"].format(background=background)
    return phrase, mw.Scene(background, scene.objects), set()


EDIT_OPERATIONS: dict[str, Callable[[Draw, mw.Scene, set[int]], EditResult | None]] = {
    "recolour": _edit_recolour,
    "remove": _edit_remove,
    "add": _edit_add,
    "move": _edit_move,
    "resize": _edit_resize,
    "background": _edit_background,
}
_EDIT_COUNTS = {"remove": (2, 3), "add": (1, 2)}


def _edit_builder(operation: str) -> Builder:
    def build(draw: Draw, size: int) -> TaskOutput:
        source = draw.scene(count=_EDIT_COUNTS.get(operation, (1, 3)))
        phrase, target, _ = EDIT_OPERATIONS[operation](draw, source, set())
        text = TEMPLATES["edit"].format(img1=tag(1), edit=phrase)
        inputs = [mw.render_scene(source, size)]
        return _output(
            f"edit/{operation}",
            text,
            inputs,
            mw.render_scene(target, size),
            target,
            [source],
            edits=[operation],
        )

    return build


def edit_compose(draw: Draw, size: int) -> TaskOutput:
    """Two edits in one instruction; the second names objects as they are after the first."""
    source = draw.scene(count=(2, 2))
    first_op, second_op = (str(op) for op in draw.rng.permutation(list(EDIT_OPERATIONS))[:2])
    first, middle, touched = EDIT_OPERATIONS[first_op](draw, source, set())
    result = EDIT_OPERATIONS[second_op](draw, middle, touched)
    if result is None:  # e.g. only the touched object is left to edit
        second_op, result = "background", _edit_background(draw, middle, touched)
    second, target, _ = result
    text = TEMPLATES["edit/compose"].format(img1=tag(1), first=first, second=second)
    inputs = [mw.render_scene(source, size)]
    return _output(
        "edit/compose",
        text,
        inputs,
        mw.render_scene(target, size),
        target,
        [source],
        edits=[first_op, second_op],
    )


# --------------------------------------------------------------------------------------------------
# Subject-driven generation: the output keeps the subject's shape, colour, size and dot
# --------------------------------------------------------------------------------------------------


def _placed(draw: Draw, subjects: list[mw.SceneObject]) -> mw.Scene:
    cells = draw.rng.permutation(9)[: len(subjects)]
    placed = [replace(obj, cell=int(cell)) for obj, cell in zip(subjects, cells)]
    return mw.Scene(draw.pick(mw.BACKGROUND_COLOURS), tuple(placed))


def subject_place(draw: Draw, size: int) -> TaskOutput:
    source = draw.scene(count=(1, 1), dot_p=0.7)
    target = _placed(draw, list(source.objects))
    (obj,) = target.objects
    text = TEMPLATES["subject/place"].format(
        shape=obj.shape, img1=tag(1), cell=mw.CELL_NAMES[obj.cell], background=target.background
    )
    inputs = [mw.render_scene(source, size)]
    return _output("subject/place", text, inputs, mw.render_scene(target, size), target, [source])


def subject_pick(draw: Draw, size: int) -> TaskOutput:
    source = draw.scene(count=(2, 3), dot_p=0.5)
    target = _placed(draw, [draw.pick(source.objects)])
    (obj,) = target.objects
    text = TEMPLATES["subject/pick"].format(
        ref=ref_phrase(obj), img1=tag(1), cell=mw.CELL_NAMES[obj.cell], background=target.background
    )
    inputs = [mw.render_scene(source, size)]
    return _output("subject/pick", text, inputs, mw.render_scene(target, size), target, [source])


def subject_pair(draw: Draw, size: int) -> TaskOutput:
    first = draw.scene(count=(1, 1), dot_p=0.7)
    second = draw.new_object(first.objects, dot_p=0.7)
    second_scene = mw.Scene(draw.pick(mw.BACKGROUND_COLOURS), (second,))
    target = _placed(draw, [first.objects[0], second])
    one, two = target.objects
    text = TEMPLATES["subject/pair"].format(
        shape=one.shape,
        img1=tag(1),
        cell=mw.CELL_NAMES[one.cell],
        shape2=two.shape,
        img2=tag(2),
        cell2=mw.CELL_NAMES[two.cell],
        background=target.background,
    )
    inputs = [mw.render_scene(first, size), mw.render_scene(second_scene, size)]
    return _output("subject/pair", text, inputs, mw.render_scene(target, size), target, [first, second_scene])


# --------------------------------------------------------------------------------------------------
# Condition -> image (maps carry no dots, so condition scenes have none)
# --------------------------------------------------------------------------------------------------


def _condition_builder(name: str, render_map: MapRenderer) -> Builder:
    def build(draw: Draw, size: int) -> TaskOutput:
        scene = draw.scene(dot_p=0.0, distinct=name == "boxes")
        items = join_phrases([f"a {o.shape} in the {o.colour} box" for o in scene.objects])
        text = TEMPLATES[f"condition/{name}"].format(
            objects=map_phrases(scene), items=items, background=scene.background, img1=tag(1)
        )
        output = mw.render_scene(scene, size)
        return _output(f"condition/{name}", text, [render_map(scene, size)], output, scene, [scene])

    return build


# --------------------------------------------------------------------------------------------------
# Image -> image computer-vision tasks
# --------------------------------------------------------------------------------------------------


def _map_builder(name: str, render_map: MapRenderer) -> Builder:
    def build(draw: Draw, size: int) -> TaskOutput:
        scene = draw.scene()
        text = TEMPLATES[f"cv/{name}"].format(img1=tag(1))
        return _output(
            f"cv/{name}", text, [mw.render_scene(scene, size)], render_map(scene, size), scene, [scene]
        )

    return build


def cv_referring(draw: Draw, size: int) -> TaskOutput:
    scene = draw.scene()
    index = int(draw.rng.integers(len(scene.objects)))
    text = TEMPLATES["cv/referring"].format(img1=tag(1), ref=ref_phrase(scene.objects[index]))
    output = mw.highlight_map(scene, index, size)
    return _output(
        "cv/referring", text, [mw.render_scene(scene, size)], output, scene, [scene], target_index=index
    )


def _degrade(name: str, draw: Draw, scene: mw.Scene, image: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Degraded input and extra meta; "hidden_box" = [top, left, side] of the area inpainting must fill."""
    size = image.shape[0]
    if name == "denoise":
        return mw.add_noise(image, draw.rng), {}
    if name == "deblur":
        return mw.box_blur(image, radius=max(1, size // 16)), {}
    if name == "lowlight":
        return mw.darken(image), {}
    if name == "colorize":
        return mw.to_gray(image), {}
    if name == "outpaint":
        width = max(2, size // 8)
        return mw.fill_border(image, width), {"hidden_border": width}
    top, left, side = mw.object_box(draw.pick(scene.objects), size)  # inpaint: hide a corner of an object
    box = max(2, side // 2 + 1)
    top, left = (
        top + int(draw.rng.integers(2)) * (side - box),
        left + int(draw.rng.integers(2)) * (side - box),
    )
    return mw.fill_box(image, top, left, box), {"hidden_box": [top, left, box]}


def _restore_builder(name: str) -> Builder:
    def build(draw: Draw, size: int) -> TaskOutput:
        scene = draw.scene(avoid_backgrounds=("gray",) if name in ("inpaint", "outpaint") else ())
        image = mw.render_scene(scene, size)
        text = TEMPLATES[f"cv/{name}"].format(
            img1=tag(1), objects=map_phrases(scene), background=scene.background
        )
        degraded, extra = _degrade(name, draw, scene, image)
        return _output(f"cv/{name}", text, [degraded], image, scene, [scene], **extra)

    return build


def _transform_builder(name: str, transform: Callable[[np.ndarray], np.ndarray]) -> Builder:
    """Few-shot-only kinds; meta "output_transform" undoes the transform before scene checks."""

    def build(draw: Draw, size: int) -> TaskOutput:
        scene = draw.scene()
        image = mw.render_scene(scene, size)
        text = TEMPLATES[f"few_shot/{name}"].format(img1=tag(1))
        return _output(
            f"few_shot/{name}", text, [image], transform(image), scene, [scene], output_transform=name
        )

    return build


# --------------------------------------------------------------------------------------------------
# Registry, deck and sample assembly
# --------------------------------------------------------------------------------------------------

BUILDERS: dict[str, Builder] = {
    "t2i/objects": t2i_objects,
    "t2i/relation": t2i_relation,
    **{f"edit/{op}": _edit_builder(op) for op in EDIT_OPERATIONS},
    "edit/compose": edit_compose,
    "subject/place": subject_place,
    "subject/pick": subject_pick,
    "subject/pair": subject_pair,
    "condition/edges": _condition_builder("edges", mw.edge_map),
    "condition/segmentation": _condition_builder("segmentation", mw.segmentation_map),
    "condition/depth": _condition_builder("depth", mw.depth_map),
    "condition/boxes": _condition_builder("boxes", mw.box_map),
    "cv/edges": _map_builder("edges", mw.edge_map),
    "cv/segmentation": _map_builder("segmentation", mw.segmentation_map),
    "cv/depth": _map_builder("depth", mw.depth_map),
    **{f"cv/{name}": _restore_builder(name) for name in ("denoise", "deblur", "inpaint", "outpaint")},
    **{f"cv/{name}": _restore_builder(name) for name in ("colorize", "lowlight")},
    "cv/referring": cv_referring,
    "few_shot/invert": _transform_builder("invert", mw.invert),
    "few_shot/mirror": _transform_builder("mirror", mw.mirror),
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


def task_deck(tasks: Iterable[str] | None = None) -> list[tuple[str, bool]]:
    """Deck of (kind, wrapped-in-few-shot) cards. `tasks` selects kinds, families ("edit") or
    "few_shot" (every few-shot card); None selects all."""
    selected = set(DECK_WEIGHTS) if tasks is None else set()
    for name in [] if tasks is None else ([tasks] if isinstance(tasks, str) else list(tasks)):
        matches = {k for k in DECK_WEIGHTS if k == name or k.split("/")[0] == name}
        if not matches:
            raise ValueError(f"unknown task {name!r}; expected one of {sorted(DECK_WEIGHTS)} or a family")
        selected |= matches
    if not selected:
        raise ValueError("tasks selects no task kinds")
    deck = []
    for kind, weight in DECK_WEIGHTS.items():
        if kind in selected:
            deck += [(kind, False)] * weight if kind != FEW_SHOT_WRAPPED else [("", True)] * weight
    return deck


def build_sample(kind: str, wrapped: bool, rng: np.random.Generator, split: str, size: int) -> mw.Sample:
    """One sample (id left empty). Few-shot samples carry a worked example of the same kind."""
    draw = Draw(rng, split)
    if wrapped:
        kind = draw.pick(FEW_SHOT_BASE_KINDS)
    if not (wrapped or kind in FEW_SHOT_ONLY_TASKS):
        out = BUILDERS[kind](draw, size)
        return mw.Sample(
            "", kind.split("/")[0], out.instruction, out.input_images, out.output_image, None, out.meta
        )
    example = BUILDERS[kind](draw, size)
    query = BUILDERS[kind](draw, size)
    few_shot = {
        "instruction": example.instruction,
        "input_images": example.input_images,
        "output_image": example.output_image,
    }
    example_scenes = [example.meta["scene"], *example.meta["input_scenes"]]
    meta = {**query.meta, "few_shot": True, "example_scenes": example_scenes}
    return mw.Sample(
        "", "few_shot", query.instruction, query.input_images, query.output_image, few_shot, meta
    )
