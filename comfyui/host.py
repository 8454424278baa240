"""What the nodes use of ComfyUI itself, each piece optional so the package imports and runs without it.

ComfyUI modules are imported here only, lazily, inside the function that needs them: device choice and
memory (``comfy.model_management``), the interrupt button (``throw_exception_if_processing_interrupted``),
the node's progress bar (``comfy.utils.ProgressBar``) and the model folders (``folder_paths``: ours is
``models/omnigen``, registered on first use unless ``extra_model_paths.yaml`` names it; OmniGen pipelines
in ``models/diffusers`` are listed too). Outside ComfyUI each falls back to plain torch, to no model
folders, or to doing nothing.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

MODEL_CATEGORY = "omnigen"  # ComfyUI's model-folder name for OmniGen model folders (models/omnigen)


def _comfy(name: str) -> ModuleType | None:
    """``comfy.<name>`` when ComfyUI is importable, else None."""
    try:
        return importlib.import_module(f"comfy.{name}")
    except ImportError:
        return None


def torch_device() -> torch.device:
    """ComfyUI's compute device when running inside it, else CUDA if available, else the CPU."""
    management = _comfy("model_management")
    if management is not None:
        return torch.device(management.get_torch_device())
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def free_memory(num_bytes: int, device: torch.device) -> None:
    """Ask ComfyUI to unload its own models until ``num_bytes`` fit on ``device`` (no-op outside it)."""
    management = _comfy("model_management")
    if device.type == "cpu" or management is None:
        return
    logger.info("asking ComfyUI to free %.1f GiB on %s", num_bytes / 2**30, device)
    management.free_memory(num_bytes, device)


def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException if the user pressed Cancel (no-op outside it)."""
    management = _comfy("model_management")
    if management is not None:
        management.throw_exception_if_processing_interrupted()


class Progress:
    """The node's progress bar in ComfyUI's UI (``comfy.utils.ProgressBar``); does nothing outside it."""

    def __init__(self, total: int) -> None:
        utils = _comfy("utils")
        self.total = total
        self._bar = utils.ProgressBar(total) if utils is not None else None

    def done(self, value: int) -> None:
        if self._bar is not None:
            self._bar.update_absolute(value, self.total)


def model_folders() -> dict[str, Path]:
    """ComfyUI's OmniGen model folders by label ("omnigen/<name>", "diffusers/<name>"); {} outside it.

    Each subfolder of a ``models/omnigen`` path with a ``config.json`` (ours, OmniGen-v1's layout) or a
    ``model_index.json`` (diffusers' layout), and each subfolder of a ``models/diffusers`` path whose
    ``model_index.json`` names an OmniGen pipeline."""
    try:
        folder_paths = importlib.import_module("folder_paths")
    except ImportError:
        return {}
    if MODEL_CATEGORY not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(
            MODEL_CATEGORY, os.path.join(folder_paths.models_dir, MODEL_CATEGORY)
        )
    found: dict[str, Path] = {}
    for category in (MODEL_CATEGORY, "diffusers"):
        roots = folder_paths.folder_names_and_paths.get(category, ([], set()))[0]
        for root in map(Path, roots):
            folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            for folder in folders:
                if _is_omnigen(folder, category):
                    found.setdefault(f"{category}/{folder.name}", folder)
    return found


def _is_omnigen(folder: Path, category: str) -> bool:
    index = folder / "model_index.json"
    if category == MODEL_CATEGORY and (folder / "config.json").is_file():
        return True
    try:
        return "OmniGen" in str(json.loads(index.read_text()).get("_class_name", ""))
    except (OSError, ValueError, AttributeError):
        return False
