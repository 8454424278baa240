"""Per-request LoRA adapters: ``omnigen serve --lora-dir DIR`` lets a request name one adapter in DIR.

The operator chooses the adapters (the subfolders of DIR, each a peft adapter folder); a request names one
by its folder name (field ``lora``, never a path: a name with ``/``, ``\\`` or ``..`` is refused) and
gives its ``lora_scale``. The worker makes the model's active adapters exactly the request's before running
it (``AdapterSwitch``): the adapters given with ``--lora`` at start stay under every request, and a request
without ``lora`` runs with them alone. An adapter is loaded on its first request and stays (inactive
adapters cost nothing and change nothing; the base weights are never changed), so a request gets exactly
what a service running only its adapter would give, and a switch between loaded adapters only flips which
are active. ``/health`` reports the loads and switches and their mean times
(``benchmarks/bench_lora_switch.py`` measures them).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
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
    """Makes each job's adapters the active ones, on top of those the model had at start (``--lora``).

    An adapter is read and injected on its first request and then stays loaded (at most ``max_resident``,
    the least recently used leaving first), so switching between loaded adapters only changes which are
    active (``omnigen.weights.lora.activate``). Counts and times the loads and the switches."""

    def __init__(self, model: Any, max_resident: int = 8) -> None:
        from omnigen.weights import lora

        self._lora, self.model, self.max_resident = lora, model, max_resident
        base = lora.current_stack(model)
        if lora.has_lora(model) and not base:
            raise ValueError(
                "the model has a LoRA adapter not loaded with --lora; per-request adapters replace it"
            )
        self.base = {f"lora_{k}": scale for k, (_, scale) in enumerate(base)}  # apply_loras' names
        self.resident: OrderedDict[str, str] = OrderedDict()  # folder -> adapter name
        self._layers: list | None = None
        self._active: dict[str, float] | None = None
        self._serial = 0
        self._lock = threading.Lock()
        self.counts = {"switches": 0, "switch_s": 0.0, "loads": 0, "load_s": 0.0}

    def apply(self, stack: tuple[tuple[str, float], ...]) -> None:
        wanted = dict(self.base)
        for folder, scale in stack:
            if folder not in self.resident:
                self._load(folder, keep={f for f, _ in stack})
            self.resident.move_to_end(folder)
            wanted[self.resident[folder]] = scale
        if wanted == self._active:
            return
        started = time.perf_counter()
        if self._layers is None:
            self._layers = list(self._lora.lora_layers(self.model).values())
        self._lora.activate(self.model, wanted, self._layers)
        self._active = wanted
        self._count("switch", time.perf_counter() - started)

    def _load(self, folder: str, keep: set[str]) -> None:
        started = time.perf_counter()
        while len(self.resident) >= self.max_resident:
            evict = next(f for f in self.resident if f not in keep)
            self._lora.delete_adapter(self.model, self.resident.pop(evict))
        self._serial += 1
        name = f"serve_{self._serial}"
        self._layers, self._active = None, None  # new layers; peft activated every adapter
        self._lora.load_lora(self.model, folder, adapter=name)
        self.resident[folder] = name
        took = time.perf_counter() - started
        self._count("load", took)
        logger.info("LoRA adapter %s loaded in %.3f s", Path(folder).name, took)

    def _count(self, what: str, seconds: float) -> None:
        with self._lock:
            self.counts[what + "es" if what == "switch" else what + "s"] += 1
            self.counts[what + "_s"] += seconds

    def stats(self) -> dict[str, Any]:
        with self._lock:
            c = dict(self.counts)
        return {
            "lora_loads": c["loads"],
            "lora_load_mean_s": c["load_s"] / c["loads"] if c["loads"] else None,
            "lora_switches": c["switches"],
            "lora_switch_mean_s": c["switch_s"] / c["switches"] if c["switches"] else None,
        }
