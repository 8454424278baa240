"""EMU-Edit test set: reader, edit requests and the CLIP-I / CLIP-T / DINO scores.

Owns the released format of facebook/emu_edit_test_set (parquet ``data/<split>-*.parquet`` with columns
instruction, image, task, split, idx, hash, input_caption, output_caption; a JSONL with the same keys
and "image" as a path also works) and the protocol: the edit prompt is ``<img><|image_1|></img>
{instruction}``, the output keeps the source's size (use_input_image_size_as_output), image guidance 2
(the paper's setting for editing); CLIP-I = cosine(CLIP(source), CLIP(output)), CLIP-T = cosine(CLIP
(output), CLIP(output_caption)) with CLIP ViT-L/14, DINO = cosine of DINO ViT-S/16 CLS features of source
and output; each averaged over the samples.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from omnigen.batch.requests import Request
from omnigen.eval.common import iter_table, mean, metric_table, open_image
from omnigen.eval.metrics import ClipFeatures, DinoFeatures, clip_i, clip_t, dino
from omnigen.util.atomic import atomic_write

logger = logging.getLogger(__name__)

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_DINO = "facebook/dino-vits16"
EDIT_PARAMS = {"use_input_image_size_as_output": True, "img_guidance_scale": 2.0}
# OmniGen-v1, Table 3 (left) of the paper (common.PAPER); the paper reports no DINO on EMU-Edit.
PAPER_SCORES: dict[str, float | None] = {"clip_i": 0.829, "clip_t": 0.231, "dino": None}
METRICS = ("clip_i", "clip_t", "dino")


@dataclass(frozen=True)
class EditSample:
    idx: str
    instruction: str
    image: Any  # a parquet image cell, bytes or a path
    input_caption: str
    output_caption: str
    task: str | None = None


def read_emu_edit(path: str | Path, split: str = "test", limit: int | None = None) -> list[EditSample]:
    path = Path(path)
    base = path.parent if path.suffix == ".jsonl" else None
    samples = []
    for row in iter_table(path, split if path.is_dir() else None):
        if path.suffix == ".jsonl" and row.get("split") not in (None, split):
            continue
        missing = [k for k in ("idx", "instruction", "image", "output_caption") if k not in row]
        if missing:
            raise ValueError(f"{path}: row without {missing}: keys {sorted(row)}")
        image = row["image"]
        if base is not None and isinstance(image, str) and not Path(image).is_absolute():
            image = str(base / image)
        samples.append(
            EditSample(
                str(row["idx"]),
                row["instruction"],
                image,
                row.get("input_caption") or "",
                row["output_caption"],
                row.get("task"),
            )
        )
        if limit is not None and len(samples) >= limit:
            break
    return samples


def edit_prompt(instruction: str) -> str:
    return f"<img><|image_1|></img> {instruction.strip()}"


def source_path(out_dir: Path, sample: EditSample) -> Path:
    return out_dir / "sources" / f"{sample.idx}.png"


def build_requests(
    samples: Sequence[EditSample], out_dir: str | Path, seed: int = 0, params: dict[str, Any] | None = None
) -> list[Request]:
    """One request per sample, the i-th seeded with seed + i (consecutive seeds batch together); the source
    images are written once to OUT/sources/<idx>.png."""
    out_dir = Path(out_dir)
    (out_dir / "sources").mkdir(parents=True, exist_ok=True)
    merged = {**EDIT_PARAMS, **(params or {})}
    requests = []
    for line, sample in enumerate(samples, start=1):
        target = source_path(out_dir, sample)
        if not target.is_file():
            image = open_image(sample.image)
            atomic_write(target, lambda tmp, image=image: image.save(tmp, format="PNG"))
        meta = {"task": sample.task, "output_caption": sample.output_caption}
        requests.append(
            Request(
                sample.idx,
                edit_prompt(sample.instruction),
                (str(target.resolve()),),
                1,
                seed + line - 1,
                merged,
                meta,
                line,
            )
        )
    return requests


def score(
    samples: Sequence[EditSample], out_dir: str | Path, clip: ClipFeatures, dino_model: DinoFeatures | None
) -> dict[str, Any]:
    """Per-sample and mean metrics of OUT/<idx>/0.png against its source and output caption."""
    out_dir = Path(out_dir)
    kept = [s for s in samples if (out_dir / s.idx / "0.png").is_file()]
    if len(kept) < len(samples):
        logger.warning(
            "%d of %d samples have no output and are left out", len(samples) - len(kept), len(samples)
        )
    sources = [Image.open(source_path(out_dir, s)).convert("RGB") for s in kept]
    outputs = [Image.open(out_dir / s.idx / "0.png").convert("RGB") for s in kept]
    scores = {
        "clip_i": clip_i(clip, outputs, sources),
        "clip_t": clip_t(clip, outputs, [s.output_caption for s in kept]),
    }
    if dino_model is not None:
        scores["dino"] = dino(dino_model, outputs, sources)
    records = [
        {"idx": s.idx, "task": s.task, **{k: v[i] for k, v in scores.items()}} for i, s in enumerate(kept)
    ]
    return {
        "n": len(kept),
        "missing": len(samples) - len(kept),
        "metrics": {k: mean(v) for k, v in scores.items()},
        "paper": PAPER_SCORES,
        "records": records,
    }


def format_summary(result: dict[str, Any]) -> str:
    return metric_table(result["metrics"], PAPER_SCORES, METRICS) + f"\n{result['n']} samples"
