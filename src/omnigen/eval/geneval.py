"""GenEval: generate in the layout its official scorer reads; summarise the scorer's output.

Owns the translation of GenEval's ``evaluation_metadata.jsonl`` (one prompt per line: "tag", "prompt",
"include", ...) into batch requests and the output layout of djghosh13/geneval's generation script:

    OUT/<index:05d>/metadata.jsonl      the prompt's metadata line (json.dump, as GenEval writes it)
    OUT/<index:05d>/samples/<k:05d>.png one file per sample

Scoring is the official script's job (it needs mmdet and a Mask2Former checkpoint):

    python evaluation/evaluate_images.py OUT --outfile OUT/geneval_results.jsonl --model-path DETECTOR_DIR
    omnigen eval geneval-summary OUT/geneval_results.jsonl     # or: python evaluation/summary_scores.py ...

The scorer reads only folders whose name is all digits and files named <digits>.png, so the batch state
files this writes at the top of OUT (results*.jsonl, errors.jsonl) are invisible to it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omnigen.batch.requests import Request
from omnigen.eval.common import format_table, read_jsonl
from omnigen.util.atomic import atomic_write

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# OmniGen-v1, Table 2 of the paper (common.PAPER).
PAPER_SCORES: dict[str, float] = {
    "overall": 0.70,
    "single_object": 0.99,
    "two_object": 0.86,
    "counting": 0.64,
    "colors": 0.85,
    "position": 0.31,
    "color_attr": 0.55,
}
SCORE_COMMAND = (
    "python evaluation/evaluate_images.py {out} --outfile {out}/geneval_results.jsonl "
    "--model-path DETECTOR_DIR\n"
    "omnigen eval geneval-summary {out}/geneval_results.jsonl"
)


def folder_name(index: int) -> str:
    return f"{index:05d}"


def sample_layout(request: Request, k: int) -> str:
    return f"{request.id}/samples/{k:05d}.png"


def read_metadata(path: str | Path) -> list[dict[str, Any]]:
    rows = read_jsonl(path)
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}: prompt {number} has no 'prompt' string: {row!r:.80}")
    return rows


def build_requests(
    metadata: Sequence[dict[str, Any]],
    n_samples: int = 4,
    seed: int = 0,
    params: dict[str, Any] | None = None,
) -> list[Request]:
    """One request per prompt, id = the zero-padded index; every prompt uses seeds seed..seed+n-1 (GenEval
    reseeds with the same seed before each prompt)."""
    params = dict(params or {})
    return [
        Request(folder_name(i), row["prompt"], (), n_samples, seed, params, {"tag": row.get("tag")}, i + 1)
        for i, row in enumerate(metadata)
    ]


def write_metadata(out_dir: str | Path, metadata: Sequence[dict[str, Any]]) -> None:
    """<index>/metadata.jsonl for every prompt (idempotent; atomic per file)."""
    for i, row in enumerate(metadata):
        folder = Path(out_dir) / folder_name(i)
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        text = json.dumps(row)
        target = folder / "metadata.jsonl"
        if not target.is_file() or target.read_text() != text:
            atomic_write(target, lambda tmp, text=text: tmp.write_text(text))


def summarize_scores(results_path: str | Path) -> dict[str, Any]:
    """summary_scores.py's numbers from the scorer's JSONL: per tag the fraction of correct images, overall
    the mean over tags; plus the image- and prompt-level rates."""
    rows = read_jsonl(results_path)
    if not rows:
        raise ValueError(f"{results_path} holds no results")
    by_tag: dict[str, list[bool]] = defaultdict(list)
    by_prompt: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        by_tag[row["tag"]].append(bool(row["correct"]))
        by_prompt[str(row.get("metadata", row.get("prompt")))].append(bool(row["correct"]))
    tags = {tag: sum(v) / len(v) for tag, v in by_tag.items()}
    return {
        "images": len(rows),
        "prompts": len(by_prompt),
        "correct_images": sum(sum(v) for v in by_tag.values()) / len(rows),
        "correct_prompts": sum(any(v) for v in by_prompt.values()) / len(by_prompt),
        "tags": tags,
        "overall": sum(tags.values()) / len(tags),
    }


def format_summary(summary: dict[str, Any]) -> str:
    names = ["overall", *[t for t in TAGS if t in summary["tags"]], *sorted(set(summary["tags"]) - set(TAGS))]
    rows = [
        (name, summary["overall"] if name == "overall" else summary["tags"][name], PAPER_SCORES.get(name))
        for name in names
    ]
    return format_table(["task", "ours", "OmniGen-v1 (paper)"], rows, digits=3) + (
        f"\n{summary['images']} images, {summary['prompts']} prompts"
    )
