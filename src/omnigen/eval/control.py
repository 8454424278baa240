"""Controllability (the ControlNet++ protocol): conditions in, generated images out, condition re-extracted.

Owns the reading of ControlNet++'s evaluation sets (limingcv/MultiGen-20M_canny_eval for canny and hed,
limingcv/MultiGen-20M_depth_eval for depth, limingcv/Captioned_ADE20K for seg; parquet or JSONL), the
preparation of conditions and ground-truth annotations at the evaluation resolution (512, 4 images per
condition, as ControlNet++'s eval.py), the OmniGen prompts and the scores:

    canny  F1 x 100 of OpenCV Canny (100, 200) edges of the 4 outputs vs the condition's, mean over conditions
    hed    MS-SSIM of the HED map of each output vs the condition's HED map, mean over conditions
    depth  RMSE (0-255) of each output's depth prediction (scaled by its max) vs the min-max-scaled label
    seg    mIoU x 100 over the data set of each output's segmentation vs the label (ADE20K: 150 classes,
           label 0 ignored)

Detectors are callables image -> array (`Annotator`), loaded from local paths: depth and segmentation
models through transformers (`load_annotator`), any detector (e.g. ControlNet's HED network) through a
"module:factory" spec. ControlNet++ used DPT-Large for depth and mmseg's Mask2Former/UperNet for ADE20K;
a different detector gives different absolute numbers.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from omnigen.batch.requests import Request
from omnigen.eval.common import iter_table, mean, metric_table, open_image
from omnigen.eval.metrics import (
    SegmentationIoU,
    canny_edges,
    canny_f1,
    depth_label_to_uint8,
    depth_prediction_to_uint8,
    hed_ssim,
    rmse,
)
from omnigen.util.atomic import atomic_write

logger = logging.getLogger(__name__)

Annotator = Callable[[Image.Image], np.ndarray]
KINDS = ("canny", "hed", "depth", "seg")
RESOLUTION = 512
IMAGES_PER_CONDITION = 4
# Columns of ControlNet++'s evaluation sets (its eval_*.sh); condition None = derived from the image.
COLUMNS: dict[str, dict[str, str | None]] = {
    "canny": {"image": "image", "condition": None, "prompt": "text", "label": None},
    "hed": {"image": "image", "condition": None, "prompt": "text", "label": None},
    "depth": {"image": "image", "condition": "control_depth", "prompt": "text", "label": "control_depth"},
    "seg": {"image": "image", "condition": "control_seg", "prompt": "prompt", "label": "seg_map"},
}
# Condition prompts in the wording of the paper's examples (Figures 3 and 4).
TEMPLATES = {
    "canny": "{caption} The canny edge of the generated picture should look like the one below: "
    "<img><|image_1|></img>",
    "hed": "{caption} The results of Holistically-nested Edge is <img><|image_1|></img>",
    "depth": "{caption} Depth map: <img><|image_1|></img>",
    "seg": "{caption} The Segmentation map of image is: <img><|image_1|></img>",
}
METRIC = {"canny": "f1", "hed": "ssim", "depth": "rmse", "seg": "miou"}
# OmniGen-v1, Table 4 of the paper (common.PAPER). The HED column of the available text of Table 4 has one
# value fewer than rows, so which row lacks one cannot be read off: left empty.
PAPER_SCORES: dict[str, float | None] = {"f1": 38.96, "ssim": None, "rmse": 31.71, "miou": 40.06}


@dataclass(frozen=True)
class ControlSample:
    uid: str
    image: Any
    condition: Any
    prompt: str
    label: Any


def read_control(
    path: str | Path,
    kind: str,
    split: str = "validation",
    columns: dict[str, str | None] | None = None,
    limit: int | None = None,
) -> list[ControlSample]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    cols = {**COLUMNS[kind], **(columns or {})}
    path = Path(path)
    base = path.parent if path.suffix == ".jsonl" else None
    samples = []
    for index, row in enumerate(iter_table(path, split if path.is_dir() else None)):
        missing = [c for c in cols.values() if c is not None and c not in row]
        if missing:
            raise ValueError(f"{path}: row {index} lacks column(s) {missing}; it has {sorted(row)}")

        cells = {name: _cell(row, cols[name], base, name != "prompt") for name in cols}
        uid = str(row.get("uid", index))
        samples.append(
            ControlSample(uid, cells["image"], cells["condition"], cells["prompt"], cells["label"])
        )
        if limit is not None and len(samples) >= limit:
            break
    return samples


def _cell(row: dict[str, Any], column: str | None, base: Path | None, is_path: bool) -> Any:
    value = row[column] if column is not None else None
    if is_path and base is not None and isinstance(value, str):
        return str(base / value)  # JSONL image paths are relative to the file
    return value


def _sentence(caption: str) -> str:
    caption = " ".join(str(caption).split())
    return caption if caption.endswith((".", "!", "?")) else caption + "."


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def prepare(
    samples: Sequence[ControlSample],
    kind: str,
    out_dir: str | Path,
    resolution: int = RESOLUTION,
    annotator: Annotator | None = None,
    template: str | None = None,
    n: int = IMAGES_PER_CONDITION,
    seed: int = 0,
    params: dict[str, Any] | None = None,
) -> list[Request]:
    """Write OUT/conditions/<uid>.png (model input) and OUT/annotations/<uid>.png (ground truth) once, and
    return one request of `n` images per condition (condition j: seeds seed + n*j + k, so they batch)."""
    out_dir = Path(out_dir)
    size = (resolution, resolution)
    template = template or TEMPLATES[kind]
    requests = []
    for line, sample in enumerate(samples, start=1):
        condition_path, annotation_path = (
            out_dir / "conditions" / f"{sample.uid}.png",
            out_dir / "annotations" / f"{sample.uid}.png",
        )
        if not (condition_path.is_file() and annotation_path.is_file()):
            condition, annotation = _condition_and_annotation(sample, kind, size, annotator)
            _save(condition, condition_path)
            _save(annotation, annotation_path)
        params_all = {"height": resolution, "width": resolution, **(params or {})}
        prompt = template.format(caption=_sentence(sample.prompt))
        requests.append(
            Request(
                f"{kind}-{sample.uid}",
                prompt,
                (str(condition_path.resolve()),),
                n,
                seed + n * (line - 1),
                params_all,
                {"uid": sample.uid},
                line,
            )
        )
    return requests


def _condition_and_annotation(
    sample: ControlSample, kind: str, size: tuple[int, int], annotator: Annotator | None
) -> tuple[Image.Image, Image.Image]:
    if kind in ("canny", "hed"):
        original = open_image(sample.image).resize(size, Image.BICUBIC)
        if kind == "canny":
            edges = Image.fromarray(canny_edges(original).astype(np.uint8) * 255, "L")
            return edges.convert("RGB"), edges
        if annotator is None:
            raise ValueError("the hed benchmark needs an HED annotator to make its conditions")
        hed = Image.fromarray(_to_uint8(annotator(original)), "L").resize(size, Image.BILINEAR)
        return hed.convert("RGB"), hed
    condition = open_image(sample.condition).resize(size, Image.BICUBIC)
    if kind == "depth":
        label = sample.label if sample.label is not None else sample.condition
        return condition, Image.fromarray(depth_label_to_uint8(open_image(label), size), "L")
    label = np.asarray(open_image(sample.label) if not isinstance(sample.label, np.ndarray) else sample.label)
    label = label[..., 0] if label.ndim == 3 else label  # class ids are stored in every channel
    return condition, Image.fromarray(label.astype(np.uint8), "L").resize(size, Image.NEAREST)


def _to_uint8(array: Any) -> np.ndarray:
    a = np.asarray(array)
    if a.dtype == np.uint8:
        return a
    return (np.clip(a.astype(np.float64), 0.0, 1.0) * 255).astype(np.uint8)


def score(
    kind: str,
    requests: Sequence[Request],
    out_dir: str | Path,
    annotator: Annotator | None = None,
    num_classes: int = 150,
    reduce_zero_label: bool = True,
) -> dict[str, Any]:
    """The benchmark metric over OUT/<id>/<k>.png (k < n) of every request with at least one output."""
    out_dir = Path(out_dir)
    if kind != "canny" and annotator is None:
        raise ValueError(f"the {kind} metric needs an annotator (a detector for generated images)")
    per_condition: list[dict[str, Any]] = []
    per_image: list[float] = []
    iou = SegmentationIoU(num_classes, reduce_zero_label=reduce_zero_label)
    for request in requests:
        outputs = [
            Image.open(p).convert("RGB")
            for k in range(request.n)
            if (p := out_dir / request.id / f"{k}.png").is_file()
        ]
        if not outputs:
            continue
        annotation = Image.open(out_dir / "annotations" / f"{request.meta['uid']}.png").convert("L")
        if kind == "canny":
            value = canny_f1(outputs, np.asarray(annotation) > 127) * 100
        elif kind == "hed":
            value = hed_ssim([_to_uint8(annotator(o)) for o in outputs], annotation)
        elif kind == "depth":
            values = [
                rmse(depth_prediction_to_uint8(annotator(o), annotation.size), annotation) for o in outputs
            ]
            per_image += values
            value = mean(values)
        else:
            for o in outputs:
                iou.update(annotator(o), np.asarray(annotation))
            value = None
        per_condition.append(
            {"id": request.id, "uid": request.meta["uid"], "images": len(outputs), METRIC[kind]: value}
        )
    if kind == "seg":
        computed = iou.compute()
        metrics = {"miou": computed["miou"] * 100, "pixel_accuracy": computed["pixel_accuracy"] * 100}
    elif kind == "depth":
        metrics = {"rmse": mean(per_image)}
    else:
        metrics = {METRIC[kind]: mean([r[METRIC[kind]] for r in per_condition])}
    return {
        "kind": kind,
        "conditions": len(per_condition),
        "metrics": metrics,
        "paper": {METRIC[kind]: PAPER_SCORES[METRIC[kind]]},
        "records": per_condition,
    }


def format_summary(result: dict[str, Any]) -> str:
    name = METRIC[result["kind"]]
    return metric_table(result["metrics"], PAPER_SCORES, [name]) + f"\n{result['conditions']} conditions"


# --------------------------------------------------------------------------------------------------
# Annotators
# --------------------------------------------------------------------------------------------------


def load_annotator(kind: str, spec: str, weights: str | None = None, device: str = "cpu") -> Annotator:
    """ "module:factory" -> factory(weights=..., device=...) for any kind; otherwise a local folder or hub
    id of a transformers depth-estimation (depth) or semantic-segmentation (seg) model."""
    if ":" in spec and not Path(spec).exists():
        module, _, name = spec.partition(":")
        factory = getattr(importlib.import_module(module), name)
        return factory(weights=weights, device=device) if weights is not None else factory(device=device)
    if kind == "depth":
        return _transformers_depth(spec, device)
    if kind == "seg":
        return _transformers_segmentation(spec, device)
    raise ValueError(f"a {kind} annotator must be given as 'module:factory' (got {spec!r})")


def _transformers_depth(path: str, device: str) -> Annotator:
    import torch
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    processor = AutoImageProcessor.from_pretrained(path)
    model = AutoModelForDepthEstimation.from_pretrained(path).eval().to(device)

    @torch.no_grad()
    def annotate(image: Image.Image) -> np.ndarray:
        inputs = processor(images=image, return_tensors="pt").to(device)
        return model(**inputs).predicted_depth[0].float().cpu().numpy()

    return annotate


def _transformers_segmentation(path: str, device: str) -> Annotator:
    import torch
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    processor = AutoImageProcessor.from_pretrained(path)
    model = AutoModelForSemanticSegmentation.from_pretrained(path).eval().to(device)

    @torch.no_grad()
    def annotate(image: Image.Image) -> np.ndarray:
        outputs = model(**processor(images=image, return_tensors="pt").to(device))
        seg = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
        return seg.cpu().numpy()

    return annotate
