"""Image tags in prompts: ``<img><|image_k|></img>``, k = 1..n, each image referenced exactly once.

The one place that parses and validates them (the inference processor and the X2I data reader both
call ``validate_image_tags``) and that composes a few-shot prompt (``compose_few_shot``: training data,
evaluation and the demo's gallery all call it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TypeVar

from omnigen.util.checks import check_int, check_str

_T = TypeVar("_T")

IMAGE_TAG_PATTERN = re.compile(r"<img><\|image_(\d+)\|></img>")
BARE_TAG_PATTERN = re.compile(r"<\|image_(\d+)\|>")


def image_tag(number: int) -> str:
    """The wrapped tag for image `number` (1-based): `<img><|image_k|></img>`."""
    return f"<img><|image_{number}|></img>"


def validate_image_tags(text: str, num_images: int) -> list[int]:
    """Check that `text` holds exactly the tags `<img><|image_1|></img>`..`<|image_n|>`, n = num_images.

    Each tag must appear exactly once, in any order, wrapped in `<img>`..`</img>`, written without
    leading zeros. Returns the tag numbers in order of appearance. Raises ValueError naming the tags
    found and the tags allowed.
    """
    check_str("text", text)
    num_images = check_int("num_images", num_images, 0)
    raw_numbers = IMAGE_TAG_PATTERN.findall(text)
    stray = BARE_TAG_PATTERN.findall(IMAGE_TAG_PATTERN.sub(" ", text))
    allowed = _allowed_tags_text(num_images)
    if stray:
        labels = ", ".join(f"<|image_{s}|>" for s in stray)
        raise ValueError(
            f"image tag(s) {labels} without the <img>...</img> wrapper; write each as "
            f"<img><|image_k|></img> ({allowed})"
        )
    problems = _tag_problems(raw_numbers, num_images)
    if problems:
        found = ", ".join(f"<|image_{s}|>" for s in raw_numbers) or "none"
        raise ValueError(
            f"image tags do not match {num_images} input image(s): {'; '.join(problems)}; "
            f"found [{found}]; {allowed}"
        )
    return [int(s) for s in raw_numbers]


def _allowed_tags_text(num_images: int) -> str:
    if num_images == 0:
        return "allowed: no image tags (no input images)"
    if num_images == 1:
        return "allowed: <|image_1|> exactly once"
    return f"allowed: each of <|image_1|>..<|image_{num_images}|> exactly once"


def _tag_problems(raw_numbers: list[str], num_images: int) -> list[str]:
    problems = []
    malformed = [s for s in raw_numbers if str(int(s)) != s]
    if malformed:
        problems.append(f"leading zeros in {sorted(set(malformed))}")
    numbers = [int(s) for s in raw_numbers]
    out_of_range = sorted({n for n in numbers if not 1 <= n <= num_images})
    if out_of_range:
        problems.append(f"out of range {out_of_range}")
    duplicated = sorted({n for n in numbers if numbers.count(n) > 1})
    if duplicated:
        problems.append(f"duplicated {duplicated}")
    missing = sorted(set(range(1, num_images + 1)) - set(numbers))
    if missing:
        problems.append(f"missing {missing}")
    return problems


def renumber_image_tags(text: str, offset: int) -> str:
    """Shift every wrapped tag `<|image_k|>` in `text` to `<|image_{k+offset}|>`."""
    return IMAGE_TAG_PATTERN.sub(lambda match: image_tag(int(match.group(1)) + offset), text)


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


# A worked example prepended to the query (the paper's few-shot format).
FEW_SHOT_TEMPLATE = (
    "Here is an example. Instruction: {example_instruction} Output: {example_output} "
    "Now do the same for a new input. Instruction: {query_instruction}"
)


def compose_few_shot(
    instruction: str,
    input_images: Sequence[_T],
    example_instruction: str,
    example_inputs: Sequence[_T],
    example_output: _T,
) -> tuple[str, list[_T]]:
    """Final prompt and ordered images (tag k <-> images[k-1]) of a query with one worked example.

    FEW_SHOT_TEMPLATE is filled: the example's images are tags 1..m, its output tag m+1, the query's
    images m+2... (the query's own tags renumbered). Works for any image type (paths, arrays, PIL).
    """
    offset = len(example_inputs) + 1
    text = FEW_SHOT_TEMPLATE.format(
        example_instruction=example_instruction,
        example_output=image_tag(offset),
        query_instruction=renumber_image_tags(instruction, offset),
    )
    images = [*example_inputs, example_output, *input_images]
    validate_image_tags(text, len(images))
    return text, images
