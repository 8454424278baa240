"""Training checkpoints: safetensors for every tensor (model, EMA, optimizer) and JSON for the rest; each
checkpoint is a folder written under a temporary name and renamed into place. ``manifest.json``, written
last, holds every file's size and sha256: ``load_checkpoint`` verifies it (and that every tensor is
finite), and when the newest checkpoint is damaged it says which file and falls back to the newest intact
one kept.

There is no RNG state to save: the trainer derives every random draw from (seed, step, sample index).
Optimizer state is keyed by parameter name (``torch.distributed.checkpoint.state_dict`` form) or index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from omnigen.util.atomic import atomic_folder, atomic_write
from omnigen.weights.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

LATEST = "latest"
MANIFEST = "manifest.json"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for key, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{key}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{key}.{name}"] = value
    with_state = [str(key) for key in state["state"]]  # so a lost parameter's entries are noticed
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars, "with_state": with_state}


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
        manifest = json.dumps(_manifest(tmp), indent=1)  # last: it covers every file written above
        atomic_write(tmp / MANIFEST, lambda path: path.write_text(manifest))
    atomic_write(folder / LATEST, lambda path: path.write_text(name))
    old = sorted(p for p in folder.glob("step_*") if p.is_dir())[:-keep] if keep > 0 else []
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return final


def _digest(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _manifest(folder: Path) -> dict[str, Any]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _digest(p)} for p in files
    }
    return {"algorithm": "sha256", "files": entries}


def verify_manifest(path: Path) -> None:
    """CheckpointError naming the first file of checkpoint ``path`` that is missing, of another size or
    with another hash than its ``manifest.json`` records (a checkpoint without one is only warned about:
    it was written before manifests)."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        logger.warning("%s has no %s (an older checkpoint): its files are not verified", path, MANIFEST)
        return
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{manifest} is damaged: {err}") from None
    for name, entry in entries.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (listed in {MANIFEST})")
        if file.stat().st_size != entry["size"]:
            raise CheckpointError(
                f"{file} has {file.stat().st_size} bytes, {MANIFEST} says {entry['size']} (truncated or damaged)"
            )
        if _digest(file) != entry["sha256"]:
            raise CheckpointError(f"{file} does not match its sha256 in {MANIFEST} (damaged)")


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file of a checkpoint; CheckpointError naming the file or tensor that is unreadable
    or not finite."""
    try:
        tensors = load_file(str(file))
    except Exception as err:  # safetensors' errors name neither the file nor what to do
        raise CheckpointError(f"{file} is not a readable safetensors file ({err})") from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{file}: tensor {name!r} holds NaN or infinite values")
    return tensors


def _read(path: Path) -> dict[str, Any]:
    verify_manifest(path)
    try:
        info = json.loads((path / "state.json").read_text())
        meta = info.pop("optimizer")
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path / 'state.json'} is missing or damaged ({err})") from None
    ema = path / "ema.safetensors"
    optimizer = _unflatten_optimizer(read_tensors(path / "optimizer.safetensors"), meta)
    lost = sorted(set(meta.get("with_state", ())) - {str(key) for key in optimizer["state"]})
    if lost:
        raise CheckpointError(f"{path / 'optimizer.safetensors'} lacks the state of {lost[:10]}")
    return {
        "path": path,
        "model": read_tensors(path / "model.safetensors"),
        "ema": read_tensors(ema) if ema.is_file() else None,
        "optimizer": optimizer,
        "info": info,
    }


def _candidates(folder: Path) -> list[Path]:
    """The checkpoints under ``folder``, newest first (the one ``latest`` names leads)."""
    kept = sorted((p for p in folder.glob("step_*") if p.is_dir()), reverse=True)
    pointer = folder / LATEST
    if pointer.is_file():
        named = folder / pointer.read_text().strip()
        kept = [named] + [p for p in kept if p != named]
    return kept


def load_checkpoint(
    folder: Path, check: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any] | None:
    """The newest intact checkpoint under ``folder`` (manifest verified, tensors finite, and ``check``,
    given the loaded checkpoint, raising no CheckpointError), or None if there is none at all. A damaged
    one is logged, naming the file, and the next older one tried; CheckpointError if none is intact."""
    problems = []
    for path in _candidates(folder):
        try:
            loaded = _read(path)
            if check is not None:
                check(loaded)
        except CheckpointError as err:
            logger.error("checkpoint %s is damaged: %s", path.name, err)
            problems.append(f"{path.name}: {err}")
            continue
        if problems:
            logger.warning("resuming from %s, the newest intact checkpoint", path)
        return loaded
    if problems:
        raise CheckpointError(
            f"no intact checkpoint in {folder} to resume from: "
            + "; ".join(problems)
            + " (move the folder away to start the run afresh)"
        )
    return None
