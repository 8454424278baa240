"""How the miniature world words its instructions: synonyms, word orders, one or two sentences, and which
phrasings are held out.

An instruction is a *frame* filled with a *command*. The frame places the command, the image tags and (for
generated scenes) the background, in one or two sentences; the command is one of the task's variants
("make the {ref} {colour}", "paint the {ref} {colour}", ...). Names get synonyms ("upper left", "grey",
"big"); a size that only the text decides may be left out, and the world then draws `DEFAULT_SIZE`; a
trailing full stop is optional. Users' capitalisation does not matter (the tokenizer lowercases).

Held-out phrasing: the pair (variant v, frame f) of a task is held out when (v + f) % max(V, F, 2) == 0
for V variants and F frames, so every variant and every frame also occurs in training with other partners
and every word of a held-out instruction occurs in training; only the combination is new. The "phrasing"
split draws only held-out pairs, every other split only the others.

This module owns the word lists (`SYNONYMS`, `COMMANDS`, `FRAMES`), `Phrasing` (fills them from a numpy
Generator) and `vocabulary_texts()` for the tokenizer. It knows the scene model but no task logic.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from omnigen.miniworld import scene as ms

DEFAULT_SIZE = "large"  # drawn when an instruction names no size
P_NAME_SIZE = 0.5  # chance that an instruction names a size the image does not fix
P_FULL_STOP = 0.25
P_CELL_FIRST = 0.2  # "in the top left a red circle" instead of "a red circle in the top left"
IMAGE_TAG = "<img><|image_{k}|></img>"

SYNONYMS: dict[str, tuple[str, ...]] = {
    "top left": ("top left", "upper left", "top left corner", "upper left corner"),
    "top center": ("top center", "top middle", "top", "upper middle"),
    "top right": ("top right", "upper right", "top right corner", "upper right corner"),
    "middle left": ("middle left", "center left", "left", "left middle"),
    "center": ("center", "middle", "centre"),
    "middle right": ("middle right", "center right", "right", "right middle"),
    "bottom left": ("bottom left", "lower left", "bottom left corner", "lower left corner"),
    "bottom center": ("bottom center", "bottom middle", "bottom", "lower middle"),
    "bottom right": ("bottom right", "lower right", "bottom right corner", "lower right corner"),
    "gray": ("gray", "grey"),
    "purple": ("purple", "violet"),
    "small": ("small", "little", "tiny"),
    "large": ("large", "big"),
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "edge map": ("edge map", "edges"),
    "segmentation map": ("segmentation map", "segmentation"),
    "depth map": ("depth map", "depth"),
}
CELL_PREPOSITIONS = ("in the", "at the")

_SCENE_FRAMES = (
    "{cmd} on a {bg} background",
    "{cmd} on {bg}",
    "{cmd} with a {bg} background",
    "{cmd}. the background is {bg}",
    "on a {bg} background, {cmd}",
    "a {bg} background. {cmd}",
)
_IMAGE_FRAMES = (
    "{img1} {cmd}",
    "{cmd} in {img1}",
    "in {img1}, {cmd}",
    "{img1} please {cmd}",
    "here is an image: {img1}. {cmd}",
)
_CONDITION_FRAMES = (
    "{objects} on a {bg} background {cmd}",
    "{cmd}, {objects} on a {bg} background",
    "draw {objects} on a {bg} background {cmd}",
    "{cmd}, draw {objects} on {bg}",
    "{objects} on {bg}, {cmd}",
)
_GUIDES = ("following the {map} {img1}", "using the {map} {img1}", "guided by the {map} {img1}",
           "according to the {map} {img1}")  # fmt: skip
_SUBJECT = ("the {shape} in {img1} placed {at}", "the {shape} from {img1} {at}", "put the {shape} of {img1} {at}",
            "the {shape} shown in {img1} {at}", "draw the {shape} from {img1} {at}")  # fmt: skip

COMMANDS: dict[str, tuple[str, ...]] = {
    "t2i/objects": ("{objects}", "draw {objects}", "an image of {objects}", "please draw {objects}",
                    "show {objects}"),
    "t2i/relation": ("{first} {relation} {second}", "draw {first} {relation} {second}",
                     "{first} placed {relation} {second}", "an image of {first} {relation} {second}",
                     "please draw {first} {relation} {second}"),
    "edit/recolour": ("make the {ref} {colour}", "turn the {ref} {colour}", "change the {ref} to {colour}",
                      "color the {ref} {colour}", "paint the {ref} {colour}"),
    "edit/remove": ("remove the {ref}", "delete the {ref}", "take away the {ref}", "get rid of the {ref}",
                    "erase the {ref}"),
    "edit/add": ("add {object}", "put {object}", "draw {object}", "insert {object}", "place {object}"),
    "edit/move": ("move the {ref} to the {cell}", "put the {ref} in the {cell}", "place the {ref} in the {cell}",
                  "shift the {ref} to the {cell}", "move the {ref} into the {cell}"),
    "edit/resize/small": ("make the {ref} {size}", "make the {ref} smaller", "shrink the {ref}"),
    "edit/resize/large": ("make the {ref} {size}", "make the {ref} bigger", "enlarge the {ref}"),
    "edit/background": ("change the background to {bg}", "make the background {bg}", "use a {bg} background",
                        "turn the background {bg}", "set the background to {bg}"),
    "edit/compose": ("{first} and then {second}", "{first}, then {second}", "{first}. then {second}",
                     "first {first}, then {second}", "{first} and {second}"),
    "subject/place": _SUBJECT,
    "subject/pick": tuple(text.replace("{shape}", "{ref}") for text in _SUBJECT),
    "subject/pair": ("the {shape} in {img1} {at} and the {shape2} in {img2} {at2}",
                     "the {shape} from {img1} {at} and the {shape2} from {img2} {at2}",
                     "put the {shape} of {img1} {at} and the {shape2} of {img2} {at2}",
                     "draw the {shape} from {img1} {at} and the {shape2} from {img2} {at2}"),
    "condition/edges": _GUIDES,
    "condition/segmentation": _GUIDES,
    "condition/depth": _GUIDES,
    "condition/boxes": ("using the boxes in {img1}", "following the boxes in {img1}",
                        "inside the boxes of {img1}", "according to the boxes in {img1}"),
    "cv/edges": ("detect the edges", "find the edges", "show the edges", "draw the edges", "extract the edges"),
    "cv/segmentation": ("segment the objects by color", "segment the objects", "show the segmentation",
                        "make a segmentation map"),
    "cv/depth": ("estimate the depth map", "estimate the depth", "show the depth map", "make a depth map"),
    "cv/denoise": ("remove the noise", "denoise the image", "clean up the noise", "make it less noisy"),
    "cv/deblur": ("remove the blur", "deblur the image", "sharpen the image", "make it sharp"),
    "cv/inpaint": ("fill in the {gray} box", "fill the {gray} box", "complete the {gray} box",
                   "repair the {gray} box"),
    "cv/outpaint": ("extend the image into the {gray} border", "fill in the {gray} border",
                    "complete the {gray} border", "extend the image"),
    "cv/colorize": ("colorize the image: {desc}", "add color to the image: {desc}", "color the image: {desc}",
                    "colorize it: {desc}"),
    "cv/lowlight": ("brighten the dark image", "brighten the image", "make the image brighter",
                    "fix the dark image"),
    "cv/referring": ("highlight the {ref} in {highlight}", "mark the {ref} in {highlight}",
                     "show the {ref} in {highlight}", "highlight the {ref} with {highlight}"),
    "few_shot/invert": ("invert the colors", "invert the image colors", "make the colors inverted"),
    "few_shot/mirror": ("mirror the image horizontally", "flip the image horizontally",
                        "mirror the image left to right", "flip it horizontally"),
}  # fmt: skip
FRAMES: dict[str, tuple[str, ...]] = {
    "t2i": _SCENE_FRAMES,
    "subject": _SCENE_FRAMES,
    "condition": _CONDITION_FRAMES,
    "edit": _IMAGE_FRAMES,
    "cv": _IMAGE_FRAMES,
    "few_shot": _IMAGE_FRAMES,
}
# Text other stages wrap around instructions (OmniGen's template and default negative prompt, the
# few-shot wrapper of omnigen.training.x2i) and the world's own negative prompt: the tokenizer covers them.
NEGATIVE_PROMPT = "low quality, blurry, noisy, distorted shapes, wrong colors, extra objects"
WRAPPER_TEXTS = (
    "Generate an image according to the following instructions",
    "low quality, jpeg artifacts, ugly, duplicate, morbid, mutilated, extra fingers, mutated hands, "
    "poorly drawn hands, poorly drawn face, mutation, deformed, blurry, dehydrated, bad anatomy, "
    "bad proportions, extra limbs, cloned face, disfigured, gross proportions, malformed limbs, "
    "missing arms, missing legs, extra arms, extra legs, fused fingers, too many fingers.",
    "Here is an example. Instruction: Output: Now do the same for a new input. Instruction:",
    NEGATIVE_PROMPT,
)
# Fixed fragments the phrase helpers add around names.
PHRASE_FRAGMENTS = ("a", "an", "the", "with a", "dot", "and", ",", ".", ":", "box", "in the box")


def family_of(task: str) -> str:
    return task.split("/")[0]


def is_held_out(variant: int, frame: int, variants: int, frames: int) -> bool:
    """The held-out rule of the module docstring."""
    return (variant + frame) % max(variants, frames, 2) == 0


def tag(k: int) -> str:
    return IMAGE_TAG.format(k=k)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def join_phrases(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


class Phrasing:
    """Random wording for one sample; ``held_out`` selects the held-out (variant, frame) pairs."""

    def __init__(self, rng: np.random.Generator, held_out: bool = False) -> None:
        self.rng = rng
        self.held_out = held_out
        self.chosen: list[list[Any]] = []  # [task, variant, frame] of every instruction worded so far

    def pick(self, options: Sequence[Any]) -> Any:
        return options[int(self.rng.integers(len(options)))]

    def word(self, name: str) -> str:
        """A synonym of a name ("upper left" for "top left"); the name itself when it has none."""
        return self.pick(SYNONYMS.get(name, (name,)))

    def names_size(self) -> bool:
        """Whether a size that only the text decides is named (else the world draws DEFAULT_SIZE)."""
        return bool(self.rng.random() < P_NAME_SIZE)

    def at(self, cell: int) -> str:
        """ "in the upper left", "at the center"."""
        return f"{self.pick(CELL_PREPOSITIONS)} {self.word(ms.CELL_NAMES[cell])}"

    def ref(self, obj: ms.SceneObject) -> str:
        """Names an object uniquely within its scene (scenes never repeat a (colour, shape) pair)."""
        return f"{self.word(obj.colour)} {obj.shape}"

    def object(self, obj: ms.SceneObject, size: bool, cell: bool, cell_first: bool = False) -> str:
        """ "a small red circle with a blue dot in the top left" (or "in the top left a ...")."""
        words = ([self.word(obj.size)] if size else []) + [self.word(obj.colour), obj.shape]
        words.insert(0, article(words[0]))
        if obj.dot is not None:
            words += ["with a", self.word(obj.dot), "dot"]
        if not cell:
            return " ".join(words)
        return (
            f"{self.at(obj.cell)} {' '.join(words)}"
            if cell_first
            else f"{' '.join(words)} {self.at(obj.cell)}"
        )

    def objects(self, objects: Iterable[ms.SceneObject], sizes: Iterable[bool], cell: bool = True) -> str:
        cell_first = cell and bool(self.rng.random() < P_CELL_FIRST)
        return join_phrases(
            [self.object(o, s, cell, cell_first) for o, s in zip(objects, sizes, strict=True)]
        )

    def command(self, key: str, **fills: Any) -> str:
        """One variant of COMMANDS[key] (any variant: used inside composed commands)."""
        return self.pick(COMMANDS[key]).format(**fills)

    def instruction(self, task: str, command_key: str | None = None, **fills: Any) -> str:
        """A (variant, frame) pair allowed by the split, filled; {bg} is given a synonym here."""
        variants, frames = COMMANDS[command_key or task], FRAMES[family_of(task)]
        pairs = [
            (v, f)
            for v in range(len(variants))
            for f in range(len(frames))
            if is_held_out(v, f, len(variants), len(frames)) == self.held_out
        ]
        v, f = self.pick(pairs)
        self.chosen.append([command_key or task, v, f])
        if "bg" in fills:
            fills["bg"] = self.word(fills["bg"])
        fills.setdefault("gray", self.word("gray"))
        command = variants[v].format(**fills)
        text = frames[f].format(cmd=command, **fills)
        return text + "." if self.rng.random() < P_FULL_STOP else text


# The cells and backgrounds a placed prompt turns through with its seed (`placed_prompt`).
PLACED_CELLS = (
    "top left", "center", "bottom right", "top right",
    "bottom left", "middle left", "top center", "middle right",
)  # fmt: skip
PLACED_BACKGROUNDS = ("white", "gray", "black", "beige")


def placed_prompt(colour: str, shape: str, seed: int) -> tuple[str, dict[str, Any]]:
    """ "a {colour} {shape} in the {cell} on a {background} background" for ``seed`` (cell
    ``PLACED_CELLS[seed % 8]``, background ``PLACED_BACKGROUNDS[seed % 4]``) and the scene it asks for,
    as ``score.scene_scores`` takes it (no size named: the world's `DEFAULT_SIZE`). Seed 0 gives the
    README's prompt; scripts/withheld_pairs.py and tests/test_shipped_model.py measure with these."""
    cell = PLACED_CELLS[seed % len(PLACED_CELLS)]
    background = PLACED_BACKGROUNDS[seed % len(PLACED_BACKGROUNDS)]
    want = ms.SceneObject(shape, colour, DEFAULT_SIZE, ms.CELL_NAMES.index(cell))  # checks the names
    scene = {"background": background, "objects": [want.to_dict() | {"size_named": False}]}
    return f"a {colour} {shape} in the {cell} on a {background} background", scene


def vocabulary_texts() -> list[str]:
    """Every text fragment an instruction or its wrapper can contain ({placeholders} dropped)."""
    names = [*ms.OBJECT_COLOURS, *ms.BACKGROUND_COLOURS, *ms.SHAPES, *ms.SIZES, *ms.CELL_NAMES]
    synonyms = [word for options in SYNONYMS.values() for word in options]
    templates = [*(t for options in COMMANDS.values() for t in options)]
    templates += [t for options in FRAMES.values() for t in options]
    templates = [text.replace("{", " {").replace("}", "} ") for text in templates]
    fields = [" ".join(w for w in text.split() if not w.startswith("{")) for text in templates]
    return [*fields, *names, *synonyms, *CELL_PREPOSITIONS, *PHRASE_FRAGMENTS, *WRAPPER_TEXTS]
