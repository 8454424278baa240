"""One image over the ranks of a process group: the modes of ``parallel=``, and CFG-parallel sampling.

``PARALLEL_MODES``: "cfg" (below: each rank runs its own guidance branches) and "sequence" (every rank
runs every branch, each cached step's output tokens split over the ranks with an all-to-all over heads:
``omnigen.model.ulysses``, which owns it). Both need an initialized process group (``check_parallel``)
and start from rank 0's seed when none is given (``agree``).

CFG-parallel sampling: one image over 2 or 3 processes, each running only its own guidance branches.

The CFG branches ([cond | uncond | img_cond], ``omnigen.sampling.guidance.branch_rows``) are independent
until ``guidance.combine``. With ``parallel="cfg"`` inside an initialized ``torch.distributed`` process
group, rank r encodes, prefills and caches only the conditions of its branches (``split_branches``), so
the condition memory of each device drops; at each step it runs those branches, the velocities of every
branch are gathered (``all_gather``) and every rank combines them the same way, so all ranks hold the
same latents and return the same images.

Exactness: each branch runs with the same inputs and shapes as in one process with
``separate_cfg_infer`` (the default), so the image is bit-equal to that process's at the same number of
threads per process. (A rank always runs its branches one by one, whatever ``separate_cfg_infer`` says.)
The step cache is refused: its per-step decision is taken by the conditional branch, which runs on one
rank only.

gloo (CPU) and NCCL (CUDA, one device per rank) both work; nothing here starts a process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from omnigen.model.ulysses import SequenceShard

PARALLEL_MODES = ("cfg", "sequence")


class Ranks(NamedTuple):
    """A call's place in its process group (``join``)."""

    group: CfgGroup | None  # parallel="cfg": this rank's guidance branches
    shard: SequenceShard | None  # parallel="sequence": this rank's share of each step (the runner's)
    seed: int  # the call's seed, the same on every rank
    lead: bool  # rank 0 (or one process): the one that shows progress


def join(parallel: str | None, num_branches: int, model_config: Any, config: Any, seed: int) -> Ranks:
    """A call's ranks, its options checked against ``parallel``: ``num_branches`` guidance branches,
    ``model_config`` the ``OmniGenConfig``, ``config`` the call's ``GenerationConfig`` and ``seed`` its
    seed (drawn at random when ``config.seed`` is None: rank 0's is used)."""
    check_parallel(parallel)
    group = CfgGroup.join(parallel, num_branches, config.step_cache_threshold)
    shard = SequenceShard.join(parallel, model_config.transformer, config)
    seed = seed if parallel is None or config.seed is not None else agree(seed)
    place = group or shard
    return Ranks(group, shard, seed, place is None or place.rank == 0)


def split_branches(num_branches: int, world_size: int) -> tuple[tuple[int, ...], ...]:
    """Branches of each rank: contiguous, sizes within 1, the larger shares last. Three branches on two
    ranks give (0,), (1, 2): the conditional branch (the longest condition) alone, the short
    unconditional one with the image-conditional one."""
    if not 1 <= world_size <= num_branches:
        raise ValueError(
            f"parallel='cfg' puts each of the {num_branches} guidance branches on its own rank: it runs on "
            f"at most {num_branches} processes, got a process group of {world_size}"
        )
    base, extra = divmod(num_branches, world_size)
    sizes = [base + (rank >= world_size - extra) for rank in range(world_size)]
    starts = [sum(sizes[:rank]) for rank in range(world_size)]
    return tuple(tuple(range(start, start + size)) for start, size in zip(starts, sizes))


def check_parallel(parallel: str | None) -> None:
    """``parallel`` is None (one process) or one of ``PARALLEL_MODES`` (then a process group must be
    initialized)."""
    if parallel is None:
        return
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be None or one of {PARALLEL_MODES}, got {parallel!r}")
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"parallel={parallel!r} needs an initialized torch.distributed process group: launch with "
            "`torchrun --nproc-per-node 2` (or more) and call torch.distributed.init_process_group first "
            "(the omnigen CLI does this itself)"
        )


def agree(value: Any, group: Any = None) -> Any:
    """Rank 0's ``value`` (any picklable object), on every rank: e.g. a seed drawn at random."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


@dataclass(frozen=True)
class CfgGroup:
    """This rank's place in a CFG-parallel run: its rank, and the branches of every rank."""

    rank: int
    assignment: tuple[tuple[int, ...], ...]
    group: Any = None  # the process group (None: the default one)

    @classmethod
    def join(
        cls, parallel: str | None, num_branches: int, step_cache_threshold: float | None = None
    ) -> CfgGroup | None:
        """None unless ``parallel == "cfg"``; then checks the process group, its size and the options."""
        check_parallel(parallel)
        if parallel != "cfg":
            return None
        import torch.distributed as dist

        if step_cache_threshold is not None:
            raise ValueError(
                "step_cache_threshold cannot be used with parallel='cfg': the step cache's per-step "
                "decision is taken by the conditional branch, which runs on one rank only"
            )
        return cls(dist.get_rank(), split_branches(num_branches, dist.get_world_size()))

    @property
    def branches(self) -> tuple[int, ...]:
        return self.assignment[self.rank]

    def mine(self, rows: list) -> list:
        """The entries of a per-branch list that belong to this rank."""
        return [rows[k] for k in self.branches]

    def gather(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every branch's output in branch order, from this rank's (one per own branch, same shapes)."""
        import torch.distributed as dist

        slots = max(len(owned) for owned in self.assignment)
        padding = [torch.zeros_like(outputs[0])] * (slots - len(outputs))
        local = torch.stack(outputs + padding).contiguous()
        parts = [torch.empty_like(local) for _ in self.assignment]
        dist.all_gather(parts, local, group=self.group)
        return [parts[rank][j] for rank, owned in enumerate(self.assignment) for j in range(len(owned))]
