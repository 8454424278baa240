"""Sequence parallel for the cached steps (DeepSpeed-Ulysses): one image's output tokens over the ranks.

With ``parallel="sequence"`` every rank of an initialized ``torch.distributed`` group runs the whole
call, and each cached denoising step (``OmniGenModel.forward`` with a ``ConditionCache``) is split:

- the step's [time token | N output tokens] are cut into one contiguous slice per rank (sizes within
  1, the larger ones first; the time token is in rank 0's slice), and the per-token work (norms, MLP,
  the QKV and output projections, rotary) runs on the rank's slice only;
- in each attention, an ``all_to_all`` gives every rank all the step's tokens for its share of the
  heads (``num_heads / world_size`` query heads, ``num_kv_heads / world_size`` key/value heads); it
  attends them against its heads' share of the cached condition, and a second ``all_to_all`` returns
  each rank its own tokens for every head;
- the final layer runs on the slice and the velocities are gathered (``all_gather``), so every rank
  holds the same latents.

The prefill (the condition) runs in full on every rank, and each rank keeps only its heads' share of
the condition's keys/values (``own_heads``): the cache per device is ``1 / world_size`` of one process's.
The step's mask and rotary tables are those of one process (queries see every step token after the
exchange); nothing else changes. Both heads counts must divide by the world size (a ``ValueError``
otherwise); the tokens need not. gloo (CPU) and NCCL both run ``all_to_all``.

Exactness: attention is per head, so it is the same computation; the per-token matmuls run on fewer
rows than in one process, which may change the last bits of a row (docs/scaling.md gives the measured
difference). The step cache is refused (its decision is taken on the whole step input), and so is
``use_kv_cache=False`` (only the cached steps are split).

Legend: B batch, H heads, K kv heads, L step tokens (1 + N), Ll this rank's tokens, E head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch


@dataclass(frozen=True)
class SequenceShard:
    """This rank's place in a sequence-parallel step: its rank and the group's size (module docstring)."""

    rank: int
    world_size: int
    group: Any = None  # the process group (None: the default one)

    @classmethod
    def join(cls, parallel: str | None, config: Any, options: Any) -> SequenceShard | None:
        """None unless ``parallel == "sequence"``; otherwise checks the ``GenerationConfig`` ``options`` and
        the heads of ``config`` (a ``TransformerConfig``) against the initialized process group."""
        if parallel != "sequence":
            return None
        if options.step_cache_threshold is not None:
            raise ValueError(
                "step_cache_threshold cannot be used with parallel='sequence': the step cache decides on "
                "the whole step input, which no rank holds"
            )
        if not options.use_kv_cache:
            raise ValueError(
                "parallel='sequence' splits the cached steps: it needs use_kv_cache=True, got False"
            )
        import torch.distributed as dist

        shard = cls(dist.get_rank(), dist.get_world_size())
        shard.check_heads(config.num_heads, config.num_kv_heads)
        return shard

    def check_heads(self, num_heads: int, num_kv_heads: int) -> None:
        for count, what in ((num_heads, "attention heads"), (num_kv_heads, "key/value heads")):
            if count % self.world_size:
                raise ValueError(
                    f"parallel='sequence' splits the attention heads over the ranks: the model's {count} "
                    f"{what} do not divide by a process group of {self.world_size}"
                )

    def sizes(self, length: int) -> tuple[int, ...]:
        """Tokens of each rank for a step of ``length`` tokens: contiguous, within 1, larger first."""
        base, extra = divmod(length, self.world_size)
        return tuple(base + (rank < extra) for rank in range(self.world_size))

    def shard(self, sequence: torch.Tensor, inputs: Any) -> tuple[torch.Tensor, Any]:
        """This rank's tokens of a step (B, L, D) and the ``ForwardInputs`` for them: the rotary tables
        cut to the same tokens, the mask unchanged (after the exchange the queries are every step token)
        and the split that the layers' attention exchanges heads through."""
        if sequence.shape[1] < self.world_size:
            raise ValueError(
                f"parallel='sequence': a step of {sequence.shape[1]} tokens cannot be split over "
                f"{self.world_size} ranks"
            )
        split = TokenSplit(self, self.sizes(sequence.shape[1]))
        start, stop = split.bounds(self.rank)
        cos, sin = inputs.rope
        rope = (cos[:, start:stop], sin[:, start:stop])
        return sequence[:, start:stop], replace(inputs, rope=rope, split=split)

    def own_heads(self, kv: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's key/value heads of a prefill's (Bc, K, Lc, E) keys and values, as their own copy
        (a view would keep every head's memory alive)."""
        k, v = (t[:, self.heads(t.shape[1], self.rank)].clone() for t in kv)
        return k, v

    def heads(self, count: int, rank: int) -> slice:
        """The heads of ``rank`` among ``count``: a contiguous share."""
        per = count // self.world_size
        return slice(rank * per, (rank + 1) * per)


@dataclass(frozen=True)
class TokenSplit:
    """One step's tokens over the ranks of a ``SequenceShard``: the exchanges of its attention layers."""

    shard: SequenceShard
    sizes: tuple[int, ...]  # tokens of each rank

    def bounds(self, rank: int) -> tuple[int, int]:
        """[start, stop) of the tokens of ``rank``."""
        start = sum(self.sizes[:rank])
        return start, start + self.sizes[rank]

    def to_heads(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's tokens for every head, q (B, H, Ll, E), k/v (B, K, Ll, E) -> every token for this
        rank's heads, q (B, H/W, L, E), k/v (B, K/W, L, E): one ``all_to_all`` of the three."""
        shard, heads, kv_heads = self.shard, q.shape[1], k.shape[1]
        sends = []
        for j in range(shard.world_size):
            kv_share = shard.heads(kv_heads, j)
            sends.append(torch.cat([q[:, shard.heads(heads, j)], k[:, kv_share], v[:, kv_share]], dim=1))
        batch, width, _, dim = sends[0].shape
        full = torch.cat(self._exchange(sends, [(batch, width, n, dim) for n in self.sizes]), dim=2)
        h, kh = heads // shard.world_size, kv_heads // shard.world_size
        return full[:, :h], full[:, h : h + kh], full[:, h + kh :]

    def to_tokens(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output of this rank's heads, (B, H/W, L, E) -> this rank's tokens for every head,
        (B, H, Ll, E): the second ``all_to_all``."""
        sends = [out[:, :, slice(*self.bounds(j))] for j in range(self.shard.world_size)]
        shape = (out.shape[0], out.shape[1], self.sizes[self.shard.rank], out.shape[3])
        return torch.cat(self._exchange(sends, [shape] * self.shard.world_size), dim=1)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's tokens (B, Ll, F) -> the whole step's (B, L, F), in rank order (``all_gather``,
        each rank's part padded to the largest)."""
        import torch.distributed as dist

        padded = x.new_zeros(x.shape[0], max(self.sizes), x.shape[2])
        padded[:, : x.shape[1]] = x
        parts = [torch.empty_like(padded) for _ in self.sizes]
        dist.all_gather(parts, padded, group=self.shard.group)
        return torch.cat([part[:, :n] for part, n in zip(parts, self.sizes)], dim=1)

    def _exchange(self, sends: list[torch.Tensor], shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """``sends[j]`` goes to rank j; returns what each rank sent here (of ``shapes``). One
        ``all_to_all_single`` over the flattened tensors: its split sizes may differ (gloo's list
        ``all_to_all`` wants equal shapes)."""
        import torch.distributed as dist

        counts = [math.prod(shape) for shape in shapes]
        flat = torch.cat([t.reshape(-1) for t in sends])
        received = flat.new_empty(sum(counts))
        dist.all_to_all_single(received, flat, counts, [t.numel() for t in sends], group=self.shard.group)
        return [part.view(shape) for part, shape in zip(received.split(counts), shapes)]
