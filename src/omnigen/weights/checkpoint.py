"""Checkpoint loading and saving: safetensors only, meta-device build, strict key/shape checks.

Folder layouts understood by ``resolve_layout``:
- official OmniGen-v1 (and ours): ``config.json`` (Phi-3 form) + ``model.safetensors`` (original key
  names, optionally sharded with ``model.safetensors.index.json``) + tokenizer files + optional ``vae/``
  (ours may carry ``codec.json`` instead of ``vae/`` and ``omnigen_generation.json``);
- diffusers: ``transformer/`` (config.json + diffusion_pytorch_model*.safetensors), ``vae/``,
  ``tokenizer/``; weights renamed through ``keymap``.
Never unpickles anything.

``load_model`` streams: it reads the file headers first (names, shapes: the strict check runs before any
weight is read), builds the model on the meta device, then reads the tensors one by one with
``safe_open``, casts each to the target dtype, moves it to the target device and assigns it. Host memory
therefore peaks at the loaded model (nothing, for a GPU target) plus one tensor, not at the file size
plus the cast copy. Each tensor is read through its own short-lived ``safe_open`` handle: a handle maps
the whole file and the pages it touched stay resident until it is closed.

FP8 files (plain casts or ComfyUI's scaled fp8, in either layout): Linear weights stored as float8 stay
float8 (``omnigen.weights.fp8.Fp8Linear``, at one byte per weight; torchao's float8 tensors on GPUs with
FP8 matmuls); other float8 tensors are dequantized to the target dtype. ``dtype`` is then the compute dtype.

GGUF files (``omnigen.weights.gguf_file``; a folder's one ``*.gguf`` in place of the safetensors file, or
a ``.gguf`` file path beside config.json and the tokenizer files): quantized Linear weights stay in their
GGML blocks (``omnigen.weights.ggml.GgufLinear``), other quantized tensors are dequantized to the target
dtype, F32/F16/BF16 tensors load as usual; tensor names in our layout or diffusers'.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from omnigen.config import OmniGenConfig
from omnigen.model import OmniGenModel
from omnigen.util.atomic import atomic_write
from omnigen.weights import fp8, ggml, gguf_file
from omnigen.weights.keymap import diffusers_sources

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
    """A model folder, or a ``.gguf`` file in one (beside its config.json and tokenizer files)."""
    root, chosen = Path(folder), None
    if root.is_file() and root.suffix == gguf_file.SUFFIX:
        root, chosen = root.parent, root.name
    if not root.is_dir():
        raise ValueError(f"model folder not found: {root}")
    transformer = root / "transformer"
    if (root / "config.json").is_file() and (name := chosen or _weights_name(root, WEIGHTS)):
        return Layout("official", root, root / "config.json", root, name, root)
    if (transformer / "config.json").is_file() and (name := _weights_name(transformer, DIFFUSERS_WEIGHTS)):
        tokenizer = root / "tokenizer" if (root / "tokenizer").is_dir() else root
        return Layout("diffusers", root, transformer / "config.json", transformer, name, tokenizer)
    raise ValueError(
        f"{root} is neither an OmniGen folder (config.json + {WEIGHTS} or one .gguf file) nor a diffusers "
        f"folder (transformer/config.json + {DIFFUSERS_WEIGHTS} or one .gguf file); found "
        f"{sorted(p.name for p in root.iterdir())}"
    )


def _weights_name(folder: Path, name: str) -> str | None:
    """``name`` if it (or its shard index) is in ``folder``, else the folder's one ``.gguf`` file."""
    if (folder / name).is_file() or (folder / f"{name}.index.json").is_file():
        return name
    found = sorted(p.name for p in folder.glob(f"*{gguf_file.SUFFIX}"))
    if len(found) > 1:
        raise ValueError(f"{folder} holds several GGUF files ({', '.join(found)}): pass the one to load")
    return found[0] if found else None


def weight_files(folder: Path, name: str) -> list[Path]:
    """One file, or the shards listed in ``<name>.index.json``."""
    single = folder / name
    if single.is_file():
        return [single]
    index = json.loads((folder / f"{name}.index.json").read_text())
    return [folder / shard for shard in sorted(set(index["weight_map"].values()))]


def read_safetensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """Every tensor of one file or of its shards, in memory (for small checkpoints and tools)."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(folder, name):
        state.update(load_file(str(file)))
    return state


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor lives in a safetensors file, and its shape there (read from the header only)."""

    file: Path
    key: str
    shape: tuple[int, ...]


def read_headers(files: list[Path]) -> dict[str, StoredTensor | gguf_file.GgufTensor]:
    stored: dict[str, StoredTensor | gguf_file.GgufTensor] = {}
    for file in files:
        if file.suffix == gguf_file.SUFFIX:
            stored.update(gguf_file.read_header(file))
            continue
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                stored[key] = StoredTensor(file, key, tuple(handle.get_slice(key).get_shape()))
    return stored


def read_tensor(
    parts: tuple[StoredTensor, ...], device: torch.device | str, dtype: torch.dtype | None
) -> torch.Tensor:
    """One of our tensors: its stored part(s) read, cast, moved, and concatenated along rows (a fused qkv).

    Always a fresh copy, so no tensor keeps a file mapping alive. CheckpointError, naming the tensor and
    its file, if it holds NaN or infinite values (or overflows ``dtype``): such weights render black."""
    out = []
    for part in parts:
        if isinstance(part, gguf_file.GgufTensor):  # quantized types dequantized to float32
            tensor = gguf_file.read_dense(part)
        else:
            with safe_open(str(part.file), framework="pt") as handle:
                tensor = handle.get_tensor(part.key)
        cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        if tensor.dtype in fp8.FP8_DTYPES:  # kept at one byte; load_model scales or dequantizes it
            cast = tensor.dtype
        _check_finite(tensor, part, "")
        moved = tensor.to(device=device, dtype=cast, copy=True)
        if cast != tensor.dtype:
            _check_finite(moved, part, f" once cast to {cast} (its values exceed that dtype's range)")
        out.append(moved)
        del tensor
    return out[0] if len(out) == 1 else torch.cat(out, dim=0)


def _check_finite(tensor: torch.Tensor, part: StoredTensor, how: str) -> None:
    if tensor.dtype in fp8.FP8_DTYPES:  # torch has no isfinite for fp8: check a half-precision copy
        tensor = tensor.to(torch.float16)
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise CheckpointError(f"{part.file}: tensor {part.key!r} holds NaN or infinite values{how}")


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
    check_shapes(model, {k: tuple(v.shape) for k, v in state.items()}, source)


def check_shapes(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """``check_state_dict`` on names and shapes alone (a checkpoint's header, before reading it)."""
    _compare({k: tuple(v.shape) for k, v in model.state_dict().items()}, shapes, source)


LAYERS = "llm.layers."


def check_config(config: OmniGenConfig, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """``check_shapes`` before the model is built: the layer count the file holds, then every shape of a
    one-layer model of ``config`` (on the meta device), layer 0's shapes standing for each layer. So a
    config.json that does not describe its weights (num_hidden_layers: 1000000) fails at once instead of
    building a model of its size."""
    stored = sorted({int(k[len(LAYERS) :].split(".")[0]) for k in shapes if k.startswith(LAYERS)})
    layers = config.transformer.num_layers
    if layers > len(stored):  # more layers than the file holds: refused before any is built
        held = f"layers 0 to {stored[-1]} ({len(stored)} in all)" if stored else "no layers"
        raise CheckpointError(
            f"checkpoint {source} does not match its config: config.json says num_hidden_layers={layers} "
            f"but the weights hold {held}"
        )
    with torch.device("meta"):
        one = OmniGenModel(
            replace(config, transformer=replace(config.transformer, num_layers=min(layers, 1)))
        )
    expected = {}
    for key, value in one.state_dict().items():
        rest = key[len(LAYERS) + 2 :]
        names = [f"{LAYERS}{n}.{rest}" for n in range(layers)] if key.startswith(LAYERS) else [key]
        expected.update({name: tuple(value.shape) for name in names})
    _compare(expected, shapes, source)


def _compare(expected: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]], source: str) -> None:
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    mismatched = [
        f"{k}: checkpoint {shapes[k]} vs model {expected[k]}"
        for k in sorted(set(expected) & set(shapes))
        if shapes[k] != expected[k]
    ]
    if missing or unexpected or mismatched:
        parts = []
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
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


def tensor_plan(layout: Layout, config: OmniGenConfig) -> dict[str, tuple[StoredTensor, ...]]:
    """Our key -> the stored tensor(s) it is read from (renamed and fused for the diffusers layout)."""
    stored = read_headers(weight_files(layout.weights_dir, layout.weights_name))
    # a GGUF file in an official folder may hold diffusers' names (a community conversion)
    foreign = layout.weights_name.endswith(gguf_file.SUFFIX) and not any(k.startswith("llm.") for k in stored)
    if layout.kind != "diffusers" and not foreign:
        return {key: (tensor,) for key, tensor in stored.items()}
    return {ours: tuple(stored[k] for k in keys) for ours, keys in diffusers_sources(stored, config).items()}


def _planned_shape(parts: tuple[StoredTensor, ...]) -> tuple[int, ...]:
    first = parts[0].shape
    return (sum(p.shape[0] for p in parts), *first[1:]) if len(parts) > 1 else first


def stream_tensors(
    plan: dict[str, tuple[StoredTensor, ...]], device: torch.device | str, dtype: torch.dtype | None
) -> Iterator[tuple[str, torch.Tensor]]:
    from tqdm.auto import tqdm

    bar = tqdm(plan.items(), desc="loading weights", unit="tensor", disable=len(plan) < 100, leave=False)
    for name, parts in bar:
        yield name, read_tensor(parts, device, dtype)


def load_model(
    folder: str | Path | Layout,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    config: OmniGenConfig | None = None,
) -> tuple[OmniGenModel, Layout]:
    """Stream a model folder's weights into a meta-built model (see the module docstring). A caller that
    has already resolved the folder passes its ``Layout`` (and its ``load_config``) to read them once."""
    layout = folder if isinstance(folder, Layout) else resolve_layout(folder)
    config = config or load_config(layout)
    source = str(layout.weights_dir / layout.weights_name)
    plan, scales = fp8.split_plan(tensor_plan(layout, config))
    shapes = {name: _planned_shape(parts) for name, parts in plan.items()}
    if "pos_embed" not in shapes:  # recomputable; some exports drop it
        shapes["pos_embed"] = (1, config.pos_embed_max_size**2, config.transformer.hidden_size)
    check_config(config, shapes, source)
    with torch.device("meta"):
        model = OmniGenModel(config)
    check_shapes(model, shapes, source)
    if "pos_embed" not in plan:
        table = _pos_embed(config)
        model.load_state_dict(
            {"pos_embed": table.to(device, dtype or table.dtype)}, strict=False, assign=True
        )
    _assign_streamed(model, plan, scales, device, dtype)
    model.materialize_buffers(device)
    model.eval()
    shape = config.transformer
    logger.info(
        "loaded the model in %s (%s layout; %d layers, hidden %d, %s parameters)",
        layout.root,
        layout.kind,
        shape.num_layers,
        shape.hidden_size,
        f"{model.num_parameters():,}",
    )
    return model, layout


def _assign_streamed(
    model: OmniGenModel,
    plan: dict[str, tuple[StoredTensor, ...]],
    scales: dict[str, StoredTensor],
    device: torch.device | str,
    dtype: torch.dtype | None,
) -> None:
    """Assign every planned tensor; fp8 Linear weights stay fp8 (``fp8.Fp8Linear``), other fp8 tensors are
    dequantized to ``dtype`` (bfloat16 when None); GGUF's quantized Linear weights stay packed
    (``ggml.GgufLinear``), its other quantized tensors are dequantized to ``dtype``."""
    linear_keys, kept = fp8.linear_weight_keys(model), {}
    packed = {k for k, parts in plan.items() if k in linear_keys and gguf_file.is_packable(parts)}
    for name, tensor in stream_tensors({k: v for k, v in plan.items() if k not in packed}, device, dtype):
        if tensor.dtype in fp8.FP8_DTYPES:
            scale = fp8.part_scale(plan[name], scales, lambda s: read_tensor((s,), device, None))
            if name in linear_keys and tensor.dim() == 2:
                kept[name] = (tensor, scale)
                continue
            compute = dtype or torch.bfloat16
            tensor = tensor.to(compute) * scale.to(device, compute)
        model.load_state_dict({name: tensor}, strict=False, assign=True)
    fp8.install(model, kept)
    for name in packed:  # after their biases were assigned
        ggml.install(model, name, *gguf_file.read_packed(plan[name], device))
    if packed:
        logger.info("%d Linear weights kept in GGUF blocks", len(packed))
    if kept:
        logger.info("%d Linear weights kept in fp8 (%s)", len(kept), fp8.accelerate(model))


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
