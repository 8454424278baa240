"""LoRA adapters on the transformer's projections, through ``peft``, in peft's on-disk format.

Owns: adding, saving, loading, scaling, merging and removing adapters on an ``OmniGenModel``. An
adapter is injected into the model in place (``peft.inject_adapter_in_model``), so the model keeps its
class and its ``forward(x, t, condition=..., cache=...)`` signature. Training uses one adapter (named
``ADAPTER_NAME``); inference may stack several (``apply_loras``: each under its own name, all active, their
contributions summed), which is what ``--lora PATH[:SCALE]`` (repeatable), the ComfyUI LoRA node and the
service's per-request adapter use. ``apply_loras`` records the stack it applied, so asking for the same
stack again costs nothing and a different one unloads the old adapters first (the base weights are never
changed: unmerged adapters come off exactly).

On packed weights (an fp8 or GGUF file, ``omnigen.weights.packed.PackedLinear``) an adapter runs unmerged:
it adds its output to the layer's, whose weight stays packed; merging into such a weight is refused.

Our projection names are the original OmniGen's (``llm.layers.N.self_attn.qkv_proj``, ``.o_proj``,
``llm.layers.N.mlp.gate_up_proj``, ``.down_proj``), so a folder written by the original training code
(``PeftModel.save_pretrained``: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys like
``base_model.model.llm.layers.0.self_attn.qkv_proj.lora_A.weight``) loads as is, and ``save_lora``
writes the same layout, which ``PeftModel.from_pretrained`` reads back. Only safetensors are read.
"""

from __future__ import annotations

import copy
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from omnigen.util.atomic import atomic_write
from omnigen.util.checks import check_float, check_int

logger = logging.getLogger(__name__)

DEFAULT_TARGET_MODULES: tuple[str, ...] = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
ADAPTER_NAME = "default"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before the module names
STACK_ATTRIBUTE = "_omnigen_lora_stack"  # the ((folder, scale), ...) that apply_loras last applied
MAX_SCALE = 100  # |scale| of one adapter in a stack


def _peft():
    try:
        import peft
    except ImportError as err:
        raise ImportError("LoRA needs peft: pip install 'omnigen-unified[lora]'") from err
    return peft


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Module name -> peft LoRA layer, for every adapted projection."""
    if "peft" not in sys.modules:  # peft never imported: nothing can have been injected
        return {}
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def has_lora(model: torch.nn.Module) -> bool:
    return bool(lora_layers(model))


def adapter_names(model: torch.nn.Module) -> list[str]:
    """The names of the injected adapters, in the order they were added."""
    return list(getattr(model, "peft_config", {}) or {}) if has_lora(model) else []


def lora_config(model: torch.nn.Module, name: str = ADAPTER_NAME):  # peft.LoraConfig
    """The LoraConfig of the injected adapter ``name``."""
    if name not in adapter_names(model):
        raise ValueError("the model has no LoRA adapter; call add_lora or load_lora first")
    return model.peft_config[name]


def add_lora(
    model: torch.nn.Module,
    rank: int,
    alpha: float,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    dropout: float = 0.0,
):  # peft.LoraConfig
    """Inject a fresh adapter (A random, B zero: the model's output is unchanged) and freeze the base.

    ``target_modules``: projection names (``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``);
    each matches the modules whose name ends with it. Only the adapter's parameters require grad after.
    """
    rank = check_int("rank", rank, 1)
    check_float("alpha", alpha, 0, low_open=True)  # kept as given (an int stays an int in the saved config)
    check_float("dropout", dropout, 0, 1, high_open=True)
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError(f"target_modules must be a non-empty list of names, got {target_modules!r}")
    peft = _peft()
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout
    )
    _inject(model, config)
    return config


def _inject(model: torch.nn.Module, config, adapter: str = ADAPTER_NAME) -> None:
    if adapter in adapter_names(model) or (adapter == ADAPTER_NAME and has_lora(model)):
        raise ValueError(
            f"the model already has a LoRA adapter ({', '.join(adapter_names(model)) or 'unnamed'}); "
            "call unload_lora first"
        )
    names = [name for name, _ in model.named_modules()]
    targets = [t for t in config.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if targets:
        raise ValueError(f"target_modules {sorted(targets)} match no module of the model")
    with warnings.catch_warnings():  # peft warns that a second adapter makes several: we mean it
        warnings.simplefilter("ignore", UserWarning)
        _peft().inject_adapter_in_model(config, model, adapter_name=adapter)
    active = adapter_names(model)
    for layer in lora_layers(model).values():  # every adapter active; a layer skips those it lacks
        layer.set_adapter(active)
    model.requires_grad_(False)
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.requires_grad_(True)


def adapter_state_dict(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's saved names (``base_model.model.<module>.lora_A.weight``).

    ``state_dict``: the model's full state dict to take them from (e.g. gathered from FSDP shards or
    with EMA weights); the model's own by default.
    """
    peft = _peft()
    lora_config(model)
    state = peft.get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=ADAPTER_NAME)
    return {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_lora(
    model: torch.nn.Module,
    folder: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
    base_model: str | None = None,
) -> Path:
    """``folder/adapter_config.json`` + ``folder/adapter_model.safetensors`` (peft's layout).

    ``base_model`` is recorded as ``base_model_name_or_path``: the model folder the adapter belongs to.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model, state_dict)
    config = copy.copy(lora_config(model))
    config.base_model_name_or_path = base_model
    atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    config.save_pretrained(str(folder))
    return folder


def read_adapter(folder: str | Path):  # (peft.LoraConfig, dict)
    """The LoraConfig and the tensors (module names, no ``base_model.model.`` prefix) of a saved adapter."""
    peft = _peft()
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise ValueError(f"{folder} is not a LoRA adapter folder: no {CONFIG_NAME}")
    if not (folder / WEIGHTS_NAME).is_file():
        found = sorted(p.name for p in folder.iterdir())
        raise ValueError(f"{folder} has no {WEIGHTS_NAME} (only safetensors are read); found {found}")
    config = peft.PeftConfig.from_pretrained(str(folder))
    if not isinstance(config, peft.LoraConfig):
        raise ValueError(f"{folder} holds a {type(config).__name__}, not a LoraConfig")
    tensors = load_file(str(folder / WEIGHTS_NAME))
    return config, {
        (k[len(PEFT_PREFIX) :] if k.startswith(PEFT_PREFIX) else k): v for k, v in tensors.items()
    }


def load_lora(model: torch.nn.Module, folder: str | Path, scale: float = 1.0, adapter: str = ADAPTER_NAME):
    """Inject the adapter saved in ``folder`` under the name ``adapter`` and load its weights; every
    tensor must find its place. ``scale`` multiplies the adapter's contribution (1.0: as trained).
    Returns its LoraConfig.
    """
    peft = _peft()
    scale = check_scale(scale)
    config, tensors = read_adapter(folder)
    _inject(model, config, adapter)
    try:
        result = peft.set_peft_model_state_dict(model, tensors, adapter_name=adapter)
        unexpected = [k for k in result.unexpected_keys if ".lora_" in k]
        missing = [k for k in result.missing_keys if ".lora_" in k and f".{adapter}." in k]
        if unexpected or missing:
            raise ValueError(
                f"adapter {folder} does not fit the model: unexpected {sorted(unexpected)[:10]}, "
                f"missing {sorted(missing)[:10]}"
            )
    except BaseException:
        delete_adapter(model, adapter)
        raise
    set_lora_scale(model, scale, adapter)
    logger.info("loaded LoRA adapter %s (r=%d, %d layers)", folder, config.r, len(lora_layers(model)))
    return config


def set_lora_scale(model: torch.nn.Module, scale: float, adapter: str = ADAPTER_NAME) -> None:
    """The adapter's output times ``scale`` (on top of alpha / r). Unmerge before changing a merged one."""
    for layer in lora_layers(model).values():
        if layer.merged:
            raise ValueError("unmerge_lora before changing the scale of a merged adapter")
        if adapter in layer.lora_A:
            layer.set_scale(adapter, scale)


def _check_mergeable(layers: dict[str, torch.nn.Module]) -> None:
    from omnigen.weights.packed import PackedLinear

    for name, layer in layers.items():
        base = layer.get_base_layer()
        if isinstance(base, PackedLinear) and not layer.merged:
            raise ValueError(
                f"cannot merge a LoRA adapter into {name}: its weight is packed ({type(base).__name__}, from "
                "an fp8 or GGUF file or int8 quantization); use the adapter unmerged (it adds to the layer's "
                "output), or load a dense copy of the model (omnigen export --dtype float32) to merge"
            )


def merge_lora(model: torch.nn.Module) -> None:
    """Add the adapter into the base weights (faster inference); ``unmerge_lora`` subtracts it again."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapter to merge")
    _check_mergeable(layers)
    for layer in layers.values():
        if not layer.merged:
            layer.merge(adapter_names=[a for a in layer.active_adapters if a in layer.lora_A])


def unmerge_lora(model: torch.nn.Module) -> None:
    for layer in lora_layers(model).values():
        if layer.merged:
            layer.unmerge()


def unload_lora(model: torch.nn.Module, merge: bool = False) -> None:
    """Remove the adapter layers. ``merge=False``: back to the base weights (unmerging first if merged);
    ``merge=True``: the base weights keep the adapter merged in (a plain model with the LoRA applied)."""
    if merge:
        _check_mergeable(lora_layers(model))
    for name, layer in lora_layers(model).items():
        if merge and not layer.merged:
            layer.merge(adapter_names=[a for a in layer.active_adapters if a in layer.lora_A])
        elif not merge and layer.merged:
            layer.unmerge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    model.__dict__.pop(STACK_ATTRIBUTE, None)


# ---------------------------------------------------------------------- stacks of adapters (inference)
def check_scale(scale: float, name: str = "LoRA scale") -> float:
    return check_float(name, scale, -MAX_SCALE, MAX_SCALE)


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` (the ``--lora`` flag) -> (path, scale); a tail that is not a number is part of
    the path (so ``C:\\adapters\\x`` keeps its colon)."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            return path, check_scale(float(tail), f"the scale in --lora {text!r}")
        except ValueError as err:
            if "between" in str(err):
                raise
    if not text:
        raise ValueError("--lora needs a path: --lora PATH[:SCALE]")
    return text, 1.0


def current_stack(model: torch.nn.Module) -> tuple[tuple[str, float], ...]:
    """The ((folder, scale), ...) that ``apply_loras`` last applied (empty: none, or another adapter)."""
    return model.__dict__.get(STACK_ATTRIBUTE, ())


def apply_loras(model: torch.nn.Module, stack: Sequence[tuple[str | Path, float]]) -> bool:
    """Make ``stack`` (folder, scale pairs; empty: none) exactly the model's adapters, all active and
    summed. The same stack as last time costs nothing; the same folders at other scales only rescale;
    otherwise the old adapters are unloaded (the base weights are restored exactly) and the new ones
    loaded. Any adapter not applied by this function (``load_lora``, training) is replaced too.
    Returns whether adapters were (re)loaded."""
    wanted = tuple((str(folder), check_scale(scale)) for folder, scale in stack)
    current = current_stack(model)
    if wanted == current:
        return False
    if current and [f for f, _ in wanted] == [f for f, _ in current] and not _merged(model):
        for k, (_, scale) in enumerate(wanted):
            set_lora_scale(model, scale, f"lora_{k}")
        model.__dict__[STACK_ATTRIBUTE] = wanted
        return False
    unload_lora(model)
    try:
        for k, (folder, scale) in enumerate(wanted):
            load_lora(model, folder, scale, adapter=f"lora_{k}")
    except BaseException:
        unload_lora(model)
        raise
    if wanted:
        model.__dict__[STACK_ATTRIBUTE] = wanted
    return True


def delete_adapter(model: torch.nn.Module, adapter: str) -> None:
    """Remove one adapter (the others stay); the last one leaves the plain model (``unload_lora``)."""
    if adapter_names(model) in ([adapter], []):
        unload_lora(model)
        return
    for layer in lora_layers(model).values():
        if adapter in layer.lora_A:
            layer.delete_adapter(adapter)
    model.peft_config.pop(adapter, None)


def activate(model: torch.nn.Module, scales: dict[str, float], layers: Sequence | None = None) -> None:
    """Make exactly the adapters named in ``scales`` active, at those scales; the others stay loaded
    but inactive (an inactive adapter costs nothing and changes nothing: the layers add only the active
    ones, so one active adapter gives what loading it alone gives, and none the plain model's outputs).
    ``layers``: the model's LoRA layers, if known (finding them walks every module)."""
    for layer in lora_layers(model).values() if layers is None else layers:
        present = [name for name in scales if name in layer.lora_A]
        layer.set_adapter(present, inference_mode=True)
        for name in present:
            layer.set_scale(name, scales[name])


def _merged(model: torch.nn.Module) -> bool:
    return any(layer.merged for layer in lora_layers(model).values())
