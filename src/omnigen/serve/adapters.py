"""Per-request LoRA adapters: ``omnigen serve --lora-dir DIR`` lets a request name one adapter in DIR.

The operator chooses the adapters (the subfolders of DIR, each a peft adapter folder); a request names one
by its folder name (field ``lora``, never a path: a name with ``/``, ``\\`` or ``..`` is refused) and
gives its ``lora_scale``. The worker makes the model's adapters exactly the request's before running it
(``AdapterSwitch``, on ``omnigen.weights.lora.apply_loras``): the adapters given with ``--lora`` at start
stay under every request, and a request without ``lora`` runs with them alone. Switching unloads the old
adapter and loads the new one from disk (the base weights are never changed), so a request gets exactly
what a service running only its adapter would give; consecutive requests for the same adapter switch
nothing. ``/health`` reports the switches and their mean time.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from omnigen.serve.errors import ApiError

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_REQUEST_SCALE = 10.0
CONFIG_FILE = "adapter_config.json"  # omnigen.weights.lora.CONFIG_NAME (not imported: no torch here)

REQUEST_FIELDS: dict[str, tuple[Any, Any]] = {
    "lora": (
        str | None,
        Field(
            None,
            description="a LoRA adapter of the service (a folder name in its --lora-dir; GET /health lists "
            "them); unset: none",
        ),
    ),
    "lora_scale": (
        float | None,
        Field(
            None,
            ge=-MAX_REQUEST_SCALE,
            le=MAX_REQUEST_SCALE,
            allow_inf_nan=False,
            description="the adapter's scale (unset: 1)",
        ),
    ),
}


def available(lora_dir: str | Path | None) -> list[str]:
    """The adapter names in ``lora_dir`` (its subfolders holding an adapter config), sorted."""
    if lora_dir is None:
        return []
    return sorted(
        p.name
        for p in Path(lora_dir).iterdir()
        if NAME_PATTERN.fullmatch(p.name) and (p / CONFIG_FILE).is_file()
    )


def request_stack(req: Any, lora_dir: str | None) -> tuple[tuple[str, float], ...] | None:
    """The request's adapters as (folder, scale) pairs, () for none; None when the service has no
    ``--lora-dir`` (the model's adapters stay as loaded). A bad name is a 400."""
    name, scale = getattr(req, "lora", None), getattr(req, "lora_scale", None)
    if lora_dir is None:
        if name is not None or scale is not None:
            message = "this service serves no LoRA adapters (start it with --lora-dir); send no 'lora'"
            raise ApiError(
                400, "unsupported_parameter", message, field="lora" if name is not None else "lora_scale"
            )
        return None
    if name is None:
        if scale is not None:
            raise ApiError(400, "invalid_value", "lora_scale given without lora", field="lora_scale")
        return ()
    if ".." in name or "/" in name or "\\" in name or not NAME_PATTERN.fullmatch(name):
        message = f"lora must be the name of one of the service's adapters (letters, digits, '.', '_', '-'), got {name!r:.80}"
        raise ApiError(400, "invalid_value", message, field="lora")
    folder = Path(lora_dir) / name
    if not (folder / CONFIG_FILE).is_file():
        message = f"no LoRA adapter named {name!r}; available: {available(lora_dir)}"
        raise ApiError(400, "invalid_value", message, field="lora")
    return ((str(folder), 1.0 if scale is None else float(scale)),)


class AdapterSwitch:
    """Applies each job's adapters on top of the ones the model had at start; counts and times switches."""

    def __init__(self, model: Any) -> None:
        from omnigen.weights import lora

        self._lora = lora
        self.model = model
        self.base = lora.current_stack(model)
        if lora.has_lora(model) and not self.base:
            raise ValueError(
                "the model has a LoRA adapter not loaded with --lora; per-request adapters replace it"
            )
        self._lock = threading.Lock()
        self.switches, self.seconds = 0, 0.0

    def apply(self, stack: tuple[tuple[str, float], ...]) -> None:
        started = time.perf_counter()
        if self._lora.apply_loras(self.model, (*self.base, *stack)):
            took = time.perf_counter() - started
            with self._lock:
                self.switches, self.seconds = self.switches + 1, self.seconds + took
            logger.info("LoRA switch to %s in %.3f s", [Path(f).name for f, _ in stack], took)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            mean = self.seconds / self.switches if self.switches else None
            return {"lora_switches": self.switches, "lora_switch_mean_s": mean}
