"""Task builders of the miniature X2I world: instruction, input images, output image and metadata.

This module owns the split policy for drawing objects (`WITHHELD_PAIRS` only in "compositional" and
"all"), one builder per task kind and the weighted task deck. Scenes and rendering come from `miniworld_scene`, the
wording from `miniworld_text`; it must not do file I/O or seeding of its own: every random choice comes
from the `numpy.random.Generator` it is handed.

Every meta holds "task" (the kind, e.g. "edit/recolour"), "few_shot", "image_size", "scene" (the scene
the output depicts, before any output transform) and "input_scenes" (the scene behind each input). An
object of "scene" whose size the instruction leaves open carries "size_named": false (it is drawn at
`miniworld_text.DEFAULT_SIZE`, and a scorer accepts either size).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from omnigen.miniworld import scene as ms
from omnigen.miniworld import text as mt
from omnigen.miniworld.text import tag

RELATIONS = ("left of", "right of", "above", "below")
# (colour, shape) pairs never drawn in "train"/"heldout"/"phrasing"; every "compositional" sample holds one;
# "all" (the shipped weights' last stage) draws every pair, these over-represented (`WITHHELD_BIAS`).
WITHHELD_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("green", "triangle"), ("blue", "circle"), ("yellow", "square")}
)
# Only ever seen inside few-shot samples (an in-context example followed by the query).
FEW_SHOT_ONLY_TASKS = ("few_shot/invert", "few_shot/mirror")
# Per split allowed to draw WITHHELD_PAIRS: the chance an object takes one of them where one is free.
WITHHELD_BIAS = {"compositional": 0.5, "all": 0.25}


# --------------------------------------------------------------------------------------------------
# Drawing under a split's policy
# --------------------------------------------------------------------------------------------------


class Draw:
    """Random choices for one sample; outside "compositional" and "all" no WITHHELD_PAIRS pair is drawn.
    ``say`` words the instructions (held-out phrasings only in the "phrasing" split)."""

    def __init__(self, rng: np.random.Generator, split: str) -> None:
        self.rng = rng
        self.withheld_bias = WITHHELD_BIAS.get(split)
        self.say = mt.Phrasing(rng, held_out=split == "phrasing")

    def pick(self, options: Iterable[Any]) -> Any:
        options = list(options)
        if not options:
            raise ValueError("nothing to choose from")
        return options[int(self.rng.integers(len(options)))]

    def allowed(self, colour: str, shape: str) -> bool:
        return self.withheld_bias is not None or (colour, shape) not in WITHHELD_PAIRS

    def new_object(
        self,
        others: Iterable[ms.SceneObject],
        dot_p: float = 0.0,
        distinct: bool = False,
        cell: int | None = None,
    ) -> ms.SceneObject:
        """A fresh object in a free cell with a (colour, shape) pair (or colour, if `distinct`) unused by
        `others`. Where one is free, a withheld pair is taken with the split's `WITHHELD_BIAS` chance (half
        of the objects in "compositional", a quarter in "all"; the rest draw uniformly)."""
        others = list(others)
        used = {o.colour if distinct else o.pair for o in others}
        options = [
            (colour, shape)
            for colour in ms.OBJECT_COLOURS
            for shape in ms.SHAPES
            if self.allowed(colour, shape) and (colour if distinct else (colour, shape)) not in used
        ]
        withheld = [pair for pair in options if pair in WITHHELD_PAIRS]
        biased = withheld and self.withheld_bias is not None and self.rng.random() < self.withheld_bias
        colour, shape = self.pick(withheld if biased else options)
        if cell is None:
            cell = self.pick(sorted(set(range(9)) - {o.cell for o in others}))
        dot = self.pick(c for c in ms.OBJECT_COLOURS if c != colour) if self.rng.random() < dot_p else None
        return ms.SceneObject(shape, colour, self.pick(ms.SIZES), cell, dot)

    def worded_object(self, others: Iterable[ms.SceneObject], **kwargs: Any) -> tuple[ms.SceneObject, bool]:
        """A new object whose size only the text decides, and whether the text names it (if not, the
        object is drawn at the default size)."""
        obj = self.new_object(others, **kwargs)
        named = self.say.names_size()
        return (obj if named else replace(obj, size=mt.DEFAULT_SIZE)), named

    def scene(
        self,
        count: tuple[int, int] = (1, 3),
        dot_p: float = 0.15,
        distinct: bool = False,
        avoid_backgrounds: tuple[str, ...] = (),
    ) -> ms.Scene:
        objects: list[ms.SceneObject] = []
        for _ in range(int(self.rng.integers(count[0], count[1] + 1))):
            objects.append(self.new_object(objects, dot_p, distinct))
        background = self.pick(b for b in ms.BACKGROUND_COLOURS if b not in avoid_backgrounds)
        return _with_objects(ms.Scene(background, ()), objects)


@dataclass
class TaskOutput:
    instruction: str
    input_images: list[np.ndarray]
    output_image: np.ndarray
    meta: dict[str, Any]


Builder = Callable[[Draw, int], TaskOutput]


def _with_objects(scene: ms.Scene, objects: Iterable[ms.SceneObject]) -> ms.Scene:
    return ms.Scene(scene.background, tuple(sorted(objects, key=lambda o: o.cell)))


def task_output(
    task: str,
    instruction: str,
    inputs: list[np.ndarray],
    output: np.ndarray,
    scene: ms.Scene,
    input_scenes: list[ms.Scene],
    free_sizes: Iterable[ms.SceneObject] = (),
    **extra: Any,
) -> TaskOutput:
    free = set(free_sizes)
    objects = [{**o.to_dict(), **({"size_named": False} if o in free else {})} for o in scene.objects]
    meta = {
        "task": task,
        "few_shot": False,
        "image_size": int(output.shape[0]),
        "scene": {"background": scene.background, "objects": objects},
        "input_scenes": [s.to_dict() for s in input_scenes],
        **extra,
    }
    return TaskOutput(instruction, inputs, output, meta)


# --------------------------------------------------------------------------------------------------
# Text to image
# --------------------------------------------------------------------------------------------------


def t2i_objects(draw: Draw, size: int) -> TaskOutput:
    worded: list[tuple[ms.SceneObject, bool]] = []
    for _ in range(int(draw.rng.integers(1, 4))):
        worded.append(draw.worded_object([o for o, _ in worded]))
    worded.sort(key=lambda pair: pair[0].cell)
    scene = ms.Scene(draw.pick(ms.BACKGROUND_COLOURS), tuple(o for o, _ in worded))
    objects = draw.say.objects(scene.objects, [named for _, named in worded])
    text = draw.say.instruction("t2i/objects", objects=objects, bg=scene.background)
    free = [o for o, named in worded if not named]
    return task_output("t2i/objects", text, [], ms.render_scene(scene, size), scene, [], free)


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
    first, first_named = draw.worded_object([], cell=cells[0])
    second, second_named = draw.worded_object([first], cell=cells[1])
    scene = ms.Scene(draw.pick(ms.BACKGROUND_COLOURS), (first, second))
    text = draw.say.instruction(
        "t2i/relation",
        first=draw.say.object(first, first_named, cell=False),
        relation=draw.say.word(relation),
        second=draw.say.object(second, second_named, cell=False),
        bg=scene.background,
    )
    free = [o for o, named in ((first, first_named), (second, second_named)) if not named]
    return task_output(
        "t2i/relation", text, [], ms.render_scene(scene, size), scene, [], free, relation=relation
    )


# --------------------------------------------------------------------------------------------------
# Editing: each operation returns the wording (command key and its fills), the edited scene, the cells it
# touched and the objects whose size the wording leaves open, or None when it does not apply
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edit:
    key: str  # a miniworld_text.COMMANDS key
    fills: dict[str, str]
    scene: ms.Scene
    touched: set[int]
    free_sizes: tuple[ms.SceneObject, ...] = ()


def _replaced(scene: ms.Scene, old: ms.SceneObject, new: ms.SceneObject) -> ms.Scene:
    return _with_objects(scene, [new if o == old else o for o in scene.objects])


def _edit_recolour(draw: Draw, scene: ms.Scene, avoid: set[int]) -> Edit | None:
    candidates = [o for o in scene.objects if o.cell not in avoid]
    if not candidates:
        return None
    obj = draw.pick(candidates)
    used = {o.pair for o in scene.objects}
    colours = [c for c in ms.OBJECT_COLOURS if draw.allowed(c, obj.shape) and (c, obj.shape) not in used]
    new = replace(obj, colour=draw.pick(c for c in colours if c != obj.dot))
    fills = {"ref": draw.say.ref(obj), "colour": draw.say.word(new.colour)}
    return Edit("edit/recolour", fills, _replaced(scene, obj, new), {obj.cell})


def _edit_remove(draw: Draw, scene: ms.Scene, avoid: set[int]) -> Edit | None:
    candidates = [o for o in scene.objects if o.cell not in avoid]
    if len(scene.objects) < 2 or not candidates:
        return None
    obj = draw.pick(candidates)
    kept = _with_objects(scene, [o for o in scene.objects if o != obj])
    return Edit("edit/remove", {"ref": draw.say.ref(obj)}, kept, {obj.cell})


def _edit_add(draw: Draw, scene: ms.Scene, avoid: set[int]) -> Edit | None:
    if len(scene.objects) > 2:
        return None
    obj, named = draw.worded_object(scene.objects, dot_p=0.15)
    fills = {"object": draw.say.object(obj, named, cell=True)}
    added = _with_objects(scene, [*scene.objects, obj])
    return Edit("edit/add", fills, added, {obj.cell}, () if named else (obj,))


def _edit_move(draw: Draw, scene: ms.Scene, avoid: set[int]) -> Edit | None:
    candidates = [o for o in scene.objects if o.cell not in avoid]
    free = set(range(9)) - {o.cell for o in scene.objects} - avoid
    if not candidates or not free:
        return None
    obj = draw.pick(candidates)
    new = replace(obj, cell=draw.pick(sorted(free)))
    fills = {"ref": draw.say.ref(obj), "cell": draw.say.word(ms.CELL_NAMES[new.cell])}
    return Edit("edit/move", fills, _replaced(scene, obj, new), {obj.cell, new.cell})


def _edit_resize(draw: Draw, scene: ms.Scene, avoid: set[int]) -> Edit | None:
    candidates = [o for o in scene.objects if o.cell not in avoid]
    if not candidates:
        return None
    obj = draw.pick(candidates)
    new = replace(obj, size="small" if obj.size == "large" else "large")
    fills = {"ref": draw.say.ref(obj), "size": draw.say.word(new.size)}
    return Edit(f"edit/resize/{new.size}", fills, _replaced(scene, obj, new), {obj.cell})


def _edit_background(draw: Draw, scene: ms.Scene, avoid: set[int]) -> Edit | None:
    background = draw.pick(b for b in ms.BACKGROUND_COLOURS if b != scene.background)
    return Edit(
        "edit/background", {"bg": draw.say.word(background)}, ms.Scene(background, scene.objects), set()
    )


EDIT_OPERATIONS: dict[str, Callable[[Draw, ms.Scene, set[int]], Edit | None]] = {
    "recolour": _edit_recolour,
    "remove": _edit_remove,
    "add": _edit_add,
    "move": _edit_move,
    "resize": _edit_resize,
    "background": _edit_background,
}
_EDIT_COUNTS = {"remove": (2, 3), "add": (1, 2)}


def edit_builder(operation: str) -> Builder:
    def build(draw: Draw, size: int) -> TaskOutput:
        source = draw.scene(count=_EDIT_COUNTS.get(operation, (1, 3)))
        edit = EDIT_OPERATIONS[operation](draw, source, set())
        if edit is None:  # cannot happen with the counts above
            raise RuntimeError(f"edit {operation!r} does not apply to {source}")
        task = f"edit/{operation}"
        text = draw.say.instruction(task, command_key=edit.key, img1=tag(1), **edit.fills)
        inputs, output = [ms.render_scene(source, size)], ms.render_scene(edit.scene, size)
        return task_output(
            task, text, inputs, output, edit.scene, [source], edit.free_sizes, edits=[operation]
        )

    return build


def edit_compose(draw: Draw, size: int) -> TaskOutput:
    """Two edits in one instruction; the second names objects as they are after the first and leaves the
    first's cells alone."""
    source = draw.scene(count=(2, 2))
    first_op, second_op = (str(op) for op in draw.rng.permutation(list(EDIT_OPERATIONS))[:2])
    first = EDIT_OPERATIONS[first_op](draw, source, set())
    if first is None:
        raise RuntimeError(f"edit {first_op!r} does not apply to {source}")
    second = EDIT_OPERATIONS[second_op](draw, first.scene, first.touched)
    if second is None:  # e.g. only the touched object is left to edit
        second_op, second = "background", _edit_background(draw, first.scene, first.touched)
    assert second is not None
    text = draw.say.instruction(
        "edit/compose",
        first=draw.say.command(first.key, **first.fills),
        second=draw.say.command(second.key, **second.fills),
        img1=tag(1),
    )
    target = second.scene
    free = [o for o in (*first.free_sizes, *second.free_sizes) if o in target.objects]
    inputs, output = [ms.render_scene(source, size)], ms.render_scene(target, size)
    return task_output(
        "edit/compose", text, inputs, output, target, [source], free, edits=[first_op, second_op]
    )


# --------------------------------------------------------------------------------------------------
# Subject-driven generation: the output keeps the subject's shape, colour, size and dot
# --------------------------------------------------------------------------------------------------


def _placed(draw: Draw, subjects: list[ms.SceneObject]) -> ms.Scene:
    cells = draw.rng.permutation(9)[: len(subjects)]
    placed = [replace(obj, cell=int(cell)) for obj, cell in zip(subjects, cells)]
    return ms.Scene(draw.pick(ms.BACKGROUND_COLOURS), tuple(placed))


def subject_place(draw: Draw, size: int) -> TaskOutput:
    source = draw.scene(count=(1, 1), dot_p=0.7)
    target = _placed(draw, list(source.objects))
    (obj,) = target.objects
    text = draw.say.instruction(
        "subject/place", shape=obj.shape, img1=tag(1), at=draw.say.at(obj.cell), bg=target.background
    )
    inputs = [ms.render_scene(source, size)]
    return task_output("subject/place", text, inputs, ms.render_scene(target, size), target, [source])


def subject_pick(draw: Draw, size: int) -> TaskOutput:
    source = draw.scene(count=(2, 3), dot_p=0.5)
    target = _placed(draw, [draw.pick(source.objects)])
    (obj,) = target.objects
    text = draw.say.instruction(
        "subject/pick", ref=draw.say.ref(obj), img1=tag(1), at=draw.say.at(obj.cell), bg=target.background
    )
    inputs = [ms.render_scene(source, size)]
    return task_output("subject/pick", text, inputs, ms.render_scene(target, size), target, [source])


def subject_pair(draw: Draw, size: int) -> TaskOutput:
    first = draw.scene(count=(1, 1), dot_p=0.7)
    second = draw.new_object(first.objects, dot_p=0.7)
    second_scene = ms.Scene(draw.pick(ms.BACKGROUND_COLOURS), (second,))
    target = _placed(draw, [first.objects[0], second])
    one, two = target.objects
    text = draw.say.instruction(
        "subject/pair",
        shape=one.shape,
        img1=tag(1),
        at=draw.say.at(one.cell),
        shape2=two.shape,
        img2=tag(2),
        at2=draw.say.at(two.cell),
        bg=target.background,
    )
    inputs = [ms.render_scene(first, size), ms.render_scene(second_scene, size)]
    return task_output(
        "subject/pair", text, inputs, ms.render_scene(target, size), target, [first, second_scene]
    )
