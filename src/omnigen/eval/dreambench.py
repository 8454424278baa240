"""DreamBench (google/dreambooth ``dataset/``): reader, subject-driven requests and DINO / CLIP-I / CLIP-T.

Owns the released format (one folder of photos per subject; ``prompts_and_classes.txt`` with the
subject -> class table and the 25 object and 25 live-subject prompt templates, live subjects being the
cats and dogs) and the protocol: per subject one input image (the first photo in name order), per prompt 4
images; DINO and CLIP-I are the mean cosine over every (generated image, real photo of the subject) pair
(DreamBooth's subject-fidelity average over all real photos), CLIP-T the cosine of each generated image
with its prompt written with the class noun ("a backpack in the jungle").

The OmniGen prompt puts the reference image after the scene: SUBJECT_TEMPLATE, e.g. "a backpack in the
jungle. The backpack is <img><|image_1|></img>." (the paper's subject prompts name the object and point
at its image; its exact DreamBench wording is not published).
"""

from __future__ import annotations

import ast
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from omnigen.batch.requests import Request
from omnigen.eval.common import mean, metric_table
from omnigen.eval.metrics import ClipFeatures, DinoFeatures, mean_pairwise_cosine

logger = logging.getLogger(__name__)

LIVE_CLASSES = ("cat", "dog")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
SUBJECT_TEMPLATE = "{prompt}. The {cls} is <img><|image_1|></img>."
IMAGES_PER_PROMPT = 4
# OmniGen-v1, Table 3 (right) of the paper (common.PAPER); the paper reports no DINO on DreamBench.
PAPER_SCORES: dict[str, float | None] = {"dino": None, "clip_i": 0.801, "clip_t": 0.315}
METRICS = ("dino", "clip_i", "clip_t")


@dataclass(frozen=True)
class Subject:
    name: str
    cls: str
    images: tuple[Path, ...]

    @property
    def live(self) -> bool:
        return self.cls in LIVE_CLASSES


@dataclass(frozen=True)
class DreamBench:
    subjects: list[Subject]
    object_prompts: list[str]  # templates with {0} (identifier) and {1} (class)
    live_prompts: list[str]


def parse_prompts_and_classes(text: str) -> tuple[dict[str, str], list[str], list[str]]:
    """(subject -> class, object prompt templates, live prompt templates) from prompts_and_classes.txt."""
    classes: dict[str, str] = {}
    match = re.search(r"subject_name,class\s*\n(.*?)\n\s*\n", text, flags=re.S)
    if match is None:
        raise ValueError("prompts_and_classes.txt: no 'subject_name,class' table")
    for line in match.group(1).splitlines():
        if line.strip():
            name, cls = (part.strip() for part in line.split(",", 1))
            classes[name] = cls
    lists = re.findall(r"prompt_list\s*=\s*\[(.*?)\]", text, flags=re.S)
    if len(lists) != 2:
        raise ValueError(
            f"prompts_and_classes.txt: expected 2 prompt lists (object, live), found {len(lists)}"
        )
    object_prompts, live_prompts = (
        [ast.literal_eval(s) for s in re.findall(r"('(?:[^'\\]|\\.)*')\.format", block)] for block in lists
    )
    return classes, object_prompts, live_prompts


def read_dreambench(root: str | Path) -> DreamBench:
    """`root` is the dataset/ folder of google/dreambooth (subject folders + prompts_and_classes.txt)."""
    root = Path(root)
    table = root / "prompts_and_classes.txt"
    if not table.is_file():
        raise ValueError(f"{root} is not DreamBench's dataset folder: no prompts_and_classes.txt")
    classes, object_prompts, live_prompts = parse_prompts_and_classes(table.read_text())
    subjects = []
    for name, cls in classes.items():
        folder = root / name
        images = (
            tuple(sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
            if folder.is_dir()
            else ()
        )
        if not images:
            raise ValueError(f"DreamBench subject {name!r}: no images in {folder}")
        subjects.append(Subject(name, cls, images))
    return DreamBench(subjects, object_prompts, live_prompts)


def class_prompt(template: str, cls: str) -> str:
    """The prompt with the class noun, no identifier: 'a {0} {1} in the jungle' -> 'a dog in the jungle'."""
    return re.sub(r"\s+", " ", template.replace("{0}", "").replace("{1}", cls)).strip()


def build_requests(
    bench: DreamBench,
    seed: int = 0,
    n: int = IMAGES_PER_PROMPT,
    template: str = SUBJECT_TEMPLATE,
    params: dict[str, Any] | None = None,
    subjects: Sequence[str] | None = None,
) -> list[Request]:
    """One request per (subject, prompt): id "<subject>-<p:02d>", the subject's first photo as input; the
    j-th request uses seeds seed + n*j + k, consecutive across requests so that they batch together."""
    requests = []
    for subject in bench.subjects:
        if subjects is not None and subject.name not in subjects:
            continue
        prompts = bench.live_prompts if subject.live else bench.object_prompts
        for p, prompt_template in enumerate(prompts):
            text = class_prompt(prompt_template, subject.cls)
            prompt = template.format(prompt=text, cls=subject.cls)
            meta = {"subject": subject.name, "class": subject.cls, "clip_text": text, "prompt_index": p}
            requests.append(
                Request(
                    f"{subject.name}-{p:02d}",
                    prompt,
                    (str(subject.images[0].resolve()),),
                    n,
                    seed + n * len(requests),
                    dict(params or {}),
                    meta,
                    len(requests) + 1,
                )
            )
    return requests


def score(
    bench: DreamBench,
    requests: Sequence[Request],
    out_dir: str | Path,
    clip: ClipFeatures,
    dino_model: DinoFeatures | None,
) -> dict[str, Any]:
    """Per (subject, prompt) and mean metrics over every generated image found in OUT/<id>/<k>.png."""
    out_dir = Path(out_dir)
    subjects = {s.name: s for s in bench.subjects}
    real_clip: dict[str, Any] = {}
    real_dino: dict[str, Any] = {}
    records, per_image = [], {"dino": [], "clip_i": [], "clip_t": []}
    for request in requests:
        files = [out_dir / request.id / f"{k}.png" for k in range(request.n)]
        outputs = [Image.open(f).convert("RGB") for f in files if f.is_file()]
        if not outputs:
            continue
        subject = subjects[request.meta["subject"]]
        if subject.name not in real_clip:
            photos = [Image.open(p).convert("RGB") for p in subject.images]
            real_clip[subject.name] = clip.images(photos)
            real_dino[subject.name] = dino_model.images(photos) if dino_model is not None else None
        generated = clip.images(outputs)
        text = clip.texts([request.meta["clip_text"]])
        row = {
            "id": request.id,
            "subject": subject.name,
            "images": len(outputs),
            "clip_i": [mean_pairwise_cosine(g[None], real_clip[subject.name]) for g in generated],
            "clip_t": [mean_pairwise_cosine(g[None], text) for g in generated],
        }
        if dino_model is not None:
            row["dino"] = [
                mean_pairwise_cosine(g[None], real_dino[subject.name]) for g in dino_model.images(outputs)
            ]
        for name in per_image:
            per_image[name] += row.get(name, [])
        records.append({k: (mean(v) if isinstance(v, list) else v) for k, v in row.items()})
    metrics = {name: mean(values) for name, values in per_image.items() if values}
    return {"images": len(per_image["clip_i"]), "metrics": metrics, "paper": PAPER_SCORES, "records": records}


def format_summary(result: dict[str, Any]) -> str:
    return metric_table(result["metrics"], PAPER_SCORES, METRICS) + f"\n{result['images']} images"
