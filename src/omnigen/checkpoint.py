"""Checkpoint loading and saving: safetensors only, meta-device build, strict key/shape checks.

Folder layouts understood by ``resolve_layout``:
- official OmniGen-v1 (and ours): ``config.json`` (Phi-3 form) + ``model.safetensors`` (original key
  names, optionally sharded with ``model.safetensors.index.json``) + tokenizer files + optional ``vae/``
  (ours may carry ``codec.json`` instead of ``vae/`` and ``generation_config.json``);
- diffusers: ``transformer/`` (config.json + diffusion_pytorch_model*.safetensors), ``vae/``,
  ``tokenizer/``; weights renamed through ``keymap``.
Never unpickles anything.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from omnigen.config import OmniGenConfig
from omnigen.keymap import diffusers_to_ours
from omnigen.model import OmniGenModel

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint whose keys or shapes do not match the model its config describes."""


@dataclass(frozen=True)
class Layout:
    kind: str  # "official" | "diffusers"
    root: Path
    config_path: Path
    weights_dir: Path
    weights_name: str
    tokenizer_dir: Path


def resolve_layout(folder: str | Path) -> Layout:
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"model folder not found: {root}")
    if (root / "config.json").is_file() and _has_weights(root, WEIGHTS):
        return Layout("official", root, root / "config.json", root, WEIGHTS, root)
    transformer = root / "transformer"
    if (transformer / "config.json").is_file() and _has_weights(transformer, DIFFUSERS_WEIGHTS):
        tokenizer = root / "tokenizer" if (root / "tokenizer").is_dir() else root
        return Layout(
            "diffusers", root, transformer / "config.json", transformer, DIFFUSERS_WEIGHTS, tokenizer
        )
    raise ValueError(
        f"{root} is neither an OmniGen folder (config.json + {WEIGHTS}) nor a diffusers folder "
        f"(transformer/config.json + {DIFFUSERS_WEIGHTS}); found {sorted(p.name for p in root.iterdir())}"
    )


def _has_weights(folder: Path, name: str) -> bool:
    return (folder / name).is_file() or (folder / f"{name}.index.json").is_file()


def read_safetensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """One file or the shards listed in ``<name>.index.json``."""
    single = folder / name
    if single.is_file():
        return load_file(str(single))
    index = json.loads((folder / f"{name}.index.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(folder / shard)))
    return state


def load_config(layout: Layout) -> OmniGenConfig:
    data = json.loads(layout.config_path.read_text())
    if layout.kind == "diffusers":
        config = OmniGenConfig.from_diffusers_dict(data)
        vae_config = layout.root / "vae" / "config.json"
        if vae_config.is_file():  # the latent factor is the VAE's (diffusers derives it the same way)
            blocks = json.loads(vae_config.read_text()).get("block_out_channels")
            if blocks:
                config = replace(config, latent_downsample=2 ** (len(blocks) - 1))
        return config
    return OmniGenConfig.from_dict(data)


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raises CheckpointError listing every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
        ):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
                parts.append(f"{title}: {shown}")
        raise CheckpointError(f"checkpoint {source} does not match its config: " + "; ".join(parts))


def build_model(
    config: OmniGenConfig,
    state: dict[str, torch.Tensor],
    source: str = "<state dict>",
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> OmniGenModel:
    """Builds on the meta device and assigns the checkpoint's tensors (no random init, no copy)."""
    with torch.device("meta"):
        model = OmniGenModel(config)
    if "pos_embed" not in state:  # recomputable; some exports drop it
        state = {**state, "pos_embed": _pos_embed(config)}
    check_state_dict(model, state, source)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.materialize_buffers(device)
    return model.to(device).eval()


def _pos_embed(config: OmniGenConfig) -> torch.Tensor:
    from omnigen.model.embeddings import sincos_2d

    return sincos_2d(config.transformer.hidden_size, config.pos_embed_max_size, config.pos_embed_base_size)[
        None
    ]


def load_model(
    folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[OmniGenModel, Layout]:
    layout = resolve_layout(folder)
    config = load_config(layout)
    state = read_safetensors(layout.weights_dir, layout.weights_name)
    if layout.kind == "diffusers":
        state = diffusers_to_ours(state, config)
    model = build_model(config, state, str(layout.weights_dir / layout.weights_name), device, dtype)
    logger.info(
        "loaded %s OmniGen model (%d parameters) from %s", layout.kind, model.num_parameters(), folder
    )
    return model, layout


def save_model(model: OmniGenModel, folder: str | Path, dtype: torch.dtype | None = None) -> None:
    """config.json + model.safetensors (official key names), each written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    atomic_write(folder / WEIGHTS, lambda path: save_file(state, str(path), metadata={"format": "pt"}))
    atomic_write(folder / "config.json", lambda path: model.config.save(path))


def atomic_write(target: Path, write) -> None:  # noqa: ANN001 - write(path) -> None
    """Write to a temporary file in the same folder, then rename over ``target``."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty temporary folder beside ``target``; when the block ends without an error it is
    renamed to ``target`` (a reader sees the old folder or the whole new one, never a half-written one).

    An existing non-empty ``target`` is replaced only with ``overwrite``; on an error the temporary
    folder is removed and ``target`` is left as it was.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ValueError(f"{target} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())  # mkdtemp creates 0700; give the folder the usual permissions
        if not target.exists():
            os.replace(tmp, target)
            return
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
        os.replace(target, old / target.name)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old / target.name, target)
            old.rmdir()
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A local folder as is; otherwise a hub id fetched with huggingface_hub (safetensors/json only)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise ValueError(f"model {name!r} is neither an existing folder nor a hub id like 'org/name'")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise ImportError(
            "loading from the hub needs huggingface_hub: pip install 'omnigen-unified[hf]'"
        ) from err
    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # network or auth failure: say what to do instead
        raise ValueError(
            f"could not fetch {name!r} from the hub ({err}); download it elsewhere and pass the local folder"
        ) from err
