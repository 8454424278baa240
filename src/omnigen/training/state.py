"""Training checkpoints: safetensors for every tensor (model, EMA, optimizer) and JSON for the rest; each
checkpoint is a folder written under a temporary name and renamed into place.

There is no RNG state to save: the trainer derives every random draw from (seed, step, sample index).
Optimizer state is keyed by parameter name (``torch.distributed.checkpoint.state_dict`` form) or index.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from omnigen.util.atomic import atomic_folder, atomic_write

LATEST = "latest"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for key, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{key}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{key}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int | str, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        param, name = key.rsplit(".", 1)  # a parameter name may hold dots, a state name does not
        state.setdefault(int(param) if param.isdigit() else param, {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    folder: Path,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None,
    optimizer: dict[str, Any],
    info: dict[str, Any],
    keep: int,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Writes ``folder/step_XXXXXXXX`` atomically and points ``folder/latest`` at it.

    ``extra(tmp_folder)`` may write more files into the checkpoint before it is renamed into place.
    """
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step_{info['step']:08d}"
    cpu = lambda d: {k: v.detach().contiguous().cpu() for k, v in d.items()}  # noqa: E731
    final = folder / name
    with atomic_folder(final, overwrite=True) as tmp:
        save_file(cpu(model), str(tmp / "model.safetensors"))
        if ema is not None:
            save_file(cpu(ema), str(tmp / "ema.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**info, "optimizer": opt_meta}, indent=1))
        if extra is not None:
            extra(tmp)
    atomic_write(folder / LATEST, lambda path: path.write_text(name))
    old = sorted(p for p in folder.glob("step_*") if p.is_dir())[:-keep] if keep > 0 else []
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The latest checkpoint under ``folder`` or None."""
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    path = folder / pointer.read_text().strip()
    info = json.loads((path / "state.json").read_text())
    meta = info.pop("optimizer")
    return {
        "path": path,
        "model": load_file(str(path / "model.safetensors")),
        "ema": load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").is_file() else None,
        "optimizer": _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), meta),
        "info": info,
    }
