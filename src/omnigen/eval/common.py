"""Shared plumbing of the benchmarks: result tables, JSON output, local data-set tables, generation args.

Owns the table layout every ``omnigen eval`` prints (ours beside the paper's OmniGen-v1 number where one
is published), atomic JSON writing and reading of released data-set tables (parquet files, as on the
Hugging Face hub, or JSONL with image paths). Does not load models or compute metrics.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from omnigen.util.atomic import atomic_write

PAPER = "OmniGen: Unified Image Generation (arXiv:2409.11340, CVPR 2025 version)"


def format_value(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> str:
    """A plain-text table; None/NaN cells stay empty."""
    cells = [[format_value(v, digits) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def metric_table(ours: dict[str, float], paper: dict[str, float | None], order: Sequence[str]) -> str:
    """metric | ours | OmniGen-v1 (paper); an empty paper cell means the paper publishes no number."""
    rows = [(name, ours.get(name), paper.get(name)) for name in order]
    return format_table(["metric", "ours", "OmniGen-v1 (paper)"], rows)


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=1, default=str)
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: invalid JSON: {err}") from None
    return rows


def iter_table(path: str | Path, split: str | None = None) -> Iterator[dict[str, Any]]:
    """Rows of a released table: a .parquet file, a folder of them (optionally only files whose name
    starts with `split`, the hub's ``data/<split>-*.parquet``), or a .jsonl file. Image cells of parquet
    files ({"bytes", "path"} structs) are returned as they are; see `open_image`."""
    path = Path(path)
    if path.suffix == ".jsonl":
        yield from read_jsonl(path)
        return
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if split is not None and path.is_dir():
        files = [f for f in files if f.name.startswith(split)]
    if not files:
        raise ValueError(
            f"no parquet or jsonl data found at {path}" + (f" for split {split!r}" if split else "")
        )
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError("reading parquet files needs pyarrow: pip install 'omnigen-unified[eval]'") from err
    for file in files:
        yield from pq.read_table(file).to_pylist()


def open_image(value: Any, base: Path | None = None) -> Image.Image:
    """An RGB image from a parquet image cell ({"bytes", "path"}), raw bytes, a path or a PIL image."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value)).convert("RGB")
    if isinstance(value, str):
        path = Path(value)
        return Image.open(path if path.is_absolute() or base is None else base / path).convert("RGB")
    raise TypeError(f"cannot read an image from {type(value).__name__}")


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")
