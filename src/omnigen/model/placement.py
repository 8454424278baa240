"""Layer-wise split of the model over several devices (pipeline parallelism without the pipelining).

``place_layers`` assigns the decoder layers, in order, to the given devices in contiguous runs balanced
by parameter bytes (in proportion to ``memory`` when given), moves them there, and returns the map as a
``Runner`` (``omnigen.model.runner``), which then moves the hidden states (and the per-call rotary
tables and mask) from one device to the next and back. Everything else (embeddings, time embedders,
final norm and head, ~1% of OmniGen-v1) goes to ``devices[0]``, which should be the pipeline's device.
The condition cache's keys/values live where their layer ran. Runs are sequential: one device works at
a time, so this buys memory, not speed. ``pipe.place_layers`` keeps the runner on the pipeline;
``pipe.to(device)`` undoes the split. ``place_model`` puts a model where one pipeline call runs it
(split, on one device, or with its layers offloaded) and returns that call's runner. Nothing is
recorded on the model: the runner is the only record.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from omnigen.model.offload import offload_layers as offload_layers_to_host
from omnigen.model.runner import Runner
from omnigen.util.checks import check_int
from omnigen.weights.quantize import tensor_bytes

logger = logging.getLogger(__name__)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(tensor_bytes(t) for t in list(module.parameters()) + list(module.buffers()))


def plan_layers(
    layer_bytes: Sequence[int], num_devices: int, memory: Sequence[int] | None = None, extra_bytes: int = 0
) -> list[int]:
    """Device index of each layer: contiguous runs whose byte totals are proportional to ``memory`` (equal
    without it); ``extra_bytes`` already sit on device 0. A pure function of the sizes."""
    weights = [1] * num_devices if memory is None else list(memory)
    total = extra_bytes + sum(layer_bytes)
    bounds, running = [], 0
    for weight in weights:
        running += weight
        bounds.append(total * running / sum(weights))  # cumulative byte target up to each device
    plan, before = [], extra_bytes
    for size in layer_bytes:
        middle = before + size / 2
        plan.append(next((d for d, bound in enumerate(bounds) if middle <= bound), num_devices - 1))
        before += size
    return plan


def place_layers(
    model: nn.Module, devices: Sequence[str | torch.device], memory: Sequence[int] | None = None
) -> Runner:
    """Split ``model`` (an ``OmniGenModel``) over ``devices``; ``memory``: bytes available on each (used to
    balance, and checked). Returns the runner of the split (``Runner.devices``: each decoder layer's)."""
    if not devices:
        raise ValueError("devices must name at least one device, got an empty list")
    targets = [torch.device(d) for d in devices]
    if memory is not None:
        if len(memory) != len(targets):
            raise ValueError(f"memory has {len(memory)} entries but {len(targets)} devices were given")
        memory = [check_int(f"memory[{k}] (bytes)", m, 1) for k, m in enumerate(memory)]
    llm = model.llm
    sizes = [module_bytes(layer) for layer in llm.layers]
    extra = module_bytes(model) - sum(sizes)
    plan = plan_layers(sizes, len(targets), memory, extra)
    if memory is not None:
        load = [extra if d == 0 else 0 for d in range(len(targets))]
        for device, size in zip(plan, sizes):
            load[device] += size
        for d, (need, have) in enumerate(zip(load, memory)):
            if need > have:
                raise ValueError(
                    f"device {devices[d]!s} needs {need} bytes for its layers but memory gives it {have}; "
                    f"the model needs {sum(load)} bytes in all"
                )
    _place_rest(model, targets[0])
    for layer, device in zip(llm.layers, plan):
        layer.to(targets[device])
    logger.info("layers per device: %s", {str(t): plan.count(d) for d, t in enumerate(targets)})
    return Runner(devices=tuple(targets[d] for d in plan))


def place_model(
    model: nn.Module, device: torch.device, runner: Runner, offload_layers: bool = False
) -> Runner:
    """Where a call runs, and the runner that runs it there (``runner`` with its offload set): with
    ``offload_layers`` the decoder layers' weights live on the host and stream to ``device``
    (``omnigen.model.offload``; ``runner``'s masters are reused while current); otherwise each layer lives
    on its device of ``runner.devices`` (a split), else on ``device``. Everything else lives on
    ``device``. Moves only what is elsewhere."""
    layers = model.llm.layers
    if offload_layers:
        runner = replace(runner, offloaded=offload_layers_to_host(layers, runner.offloaded))
    else:
        runner = replace(runner, offloaded=None)
        for layer, target in zip(layers, runner.layer_devices(layers, device)):
            if next(layer.parameters()).device != target:
                layer.to(target)
    if next(model.x_embedder.parameters()).device != device:
        _place_rest(model, device)
    return runner


def _place_rest(model: nn.Module, device: torch.device) -> None:
    """Everything but the decoder layers (embeddings, time embedders, final norm and head) to ``device``."""
    for name, child in model.named_children():
        if name != "llm":
            child.to(device)
    llm = model.llm
    llm.embed_tokens.to(device)
    llm.norm.to(device)
    llm.rotary.materialize(device)
    model.pos_embed = model.pos_embed.to(device)
