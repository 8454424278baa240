"""What differs between one process, DDP and FSDP2 under torchrun, behind one set of small functions.

Owns: process-group set-up (gloo on CPU, nccl on GPU, one GPU per local rank), wrapping the model
(``DistributedDataParallel`` or ``fully_shard`` on every block, then the root), switching gradient sync
off between micro-batches, and moving full state dicts between the (possibly sharded) model and rank 0.
Checkpoint files are written by the trainer on rank 0; everything here that gathers is a collective and
must be called on every rank.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from omnigen.util.checks import check_choice

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass(frozen=True)
class Runtime:
    rank: int
    world: int
    device: torch.device
    kind: str  # "single" | "ddp" | "fsdp"
    owns_group: bool = False  # this call created the process group, so teardown() destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | torch.device | None, kind: str) -> Runtime:
    """One process unless WORLD_SIZE > 1 (torchrun); then ``kind`` ('ddp' or 'fsdp') is used."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Runtime(0, 1, device, "single")
    check_choice("distributed", kind, ("ddp", "fsdp"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(dist.get_rank(), dist.get_world_size(), device, kind, owns_group)


def teardown(runtime: Runtime) -> None:
    if runtime.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """The module to run forward/backward on. FSDP2 shards ``model`` in place (each ``llm.layers`` block,
    then the root) and returns it; DDP returns a wrapper around it; one process returns it unchanged."""
    if runtime.kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [runtime.device] if runtime.device.type == "cuda" else None
        # a batch without input images leaves input_x_embedder unused on that rank
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)
    if runtime.kind == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(runtime.device.type, (runtime.world,))
        for block in model.llm.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def gradient_sync(train_model: torch.nn.Module, runtime: Runtime, enabled: bool):
    """A context in which backward does (enabled) or does not (accumulating) reduce gradients."""
    if runtime.kind == "ddp" and not enabled:
        return train_model.no_sync()
    if runtime.kind == "fsdp":
        train_model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def all_reduce_sum(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Sum over ranks (a copy; the input is not changed)."""
    if runtime.world == 1:
        return tensor.clone()
    out = tensor.to(runtime.device, copy=True)
    dist.all_reduce(out)
    return out.to(tensor.device)


def barrier(runtime: Runtime) -> None:
    if runtime.world > 1:
        dist.barrier()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded DTensor gathered (a collective); a plain tensor as is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gather_tensors(named: dict[str, torch.Tensor], runtime: Runtime) -> dict[str, torch.Tensor]:
    """CPU copies of full tensors on rank 0 ({} on the other ranks)."""
    out = {}
    for name, tensor in named.items():
        full = full_tensor(tensor.detach())
        if runtime.is_main:
            out[name] = full.to("cpu", copy=True)
    return out


def gather_model(model: torch.nn.Module, runtime: Runtime) -> dict[str, torch.Tensor]:
    """The full model state dict on rank 0 (CPU), {} elsewhere."""
    state = get_model_state_dict(model, options=FULL)
    return state if runtime.is_main else {}


def gather_optimizer(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime
) -> dict[str, Any]:
    """The full optimizer state keyed by parameter name on rank 0, {} elsewhere."""
    state = get_optimizer_state_dict(model, optimizer, options=FULL)
    return state if runtime.is_main else {}


def load_model(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every rank passes the full state dict; each keeps its shard."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Every rank passes the full state (keyed by parameter name); each keeps its shard.

    A parameter that never had a gradient has no AdamW state (e.g. ``input_x_embedder`` in a
    text-to-image-only run): it must be listed in the saved param groups, and it stays without state,
    as in a run that did not stop, so a later first gradient starts its moments at step 1 in both."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    saved = {name for group in state["param_groups"] for name in group["params"]}
    if all(isinstance(name, str) for name in saved) and names != saved:
        missing, unexpected = sorted(names - saved), sorted(saved - names)
        raise ValueError(
            f"optimizer state does not match the model: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    stateless = names - set(state["state"])
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_optimizer_state_dict(model, optimizer, state, options=options)
    if stateless:
        by_name = dict(model.named_parameters())
        for name in stateless:  # set_optimizer_state_dict gave them zero moments at step 1
            optimizer.state.pop(by_name[name], None)


@torch.no_grad()
def load_tensors(named: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into (possibly sharded) tensors of the same names; every name must be there."""
    missing, unexpected = sorted(set(named) - set(full)), sorted(set(full) - set(named))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint tensors do not match: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    for name, target in named.items():
        value = full[name].to(target.device, target.dtype)
        if isinstance(target, DTensor):
            value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
        target.copy_(value)
