"""What the nodes use of ComfyUI itself, each piece optional so the package imports and runs without it.

ComfyUI modules are imported here only, lazily, inside the function that needs them: device choice and
memory (``comfy.model_management``), the interrupt button (``throw_exception_if_processing_interrupted``)
and the node's progress bar (``comfy.utils.ProgressBar``). Outside ComfyUI each falls back to plain torch
or to doing nothing.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch

logger = logging.getLogger(__name__)


def _comfy(name: str) -> ModuleType | None:
    """``comfy.<name>`` when ComfyUI is importable, else None."""
    try:
        return importlib.import_module(f"comfy.{name}")
    except ImportError:
        return None


def torch_device() -> torch.device:
    """ComfyUI's compute device when running inside it, else CUDA if available, else the CPU."""
    management = _comfy("model_management")
    if management is not None and hasattr(management, "get_torch_device"):
        return torch.device(management.get_torch_device())
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def free_memory(num_bytes: int, device: torch.device) -> None:
    """Ask ComfyUI to unload its own models until ``num_bytes`` fit on ``device`` (no-op outside it)."""
    management = _comfy("model_management")
    if device.type == "cpu" or management is None or not hasattr(management, "free_memory"):
        return
    logger.info("asking ComfyUI to free %.1f GiB on %s", num_bytes / 2**30, device)
    management.free_memory(num_bytes, device)


def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException if the user pressed Cancel (no-op outside it)."""
    management = _comfy("model_management")
    if management is not None and hasattr(management, "throw_exception_if_processing_interrupted"):
        management.throw_exception_if_processing_interrupted()


class Progress:
    """The node's progress bar in ComfyUI's UI (``comfy.utils.ProgressBar``); does nothing outside it."""

    def __init__(self, total: int) -> None:
        utils = _comfy("utils")
        self.total = total
        self._bar = utils.ProgressBar(total) if utils is not None and hasattr(utils, "ProgressBar") else None

    def done(self, value: int) -> None:
        if self._bar is not None:
            self._bar.update_absolute(value, self.total)
