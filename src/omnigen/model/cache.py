"""ConditionCache: the condition's keys/values, computed once by a prefill and reused every step.

An explicit object (gpt-fast style), not a subclass of any library cache. It stores, per layer, the
rotary-applied keys and values of the condition tokens, and the condition's token mask so that a step
can build its own mask and positions. With ``offload=True`` the tensors live on the CPU and are moved
to the compute device one layer at a time. With ``mask_free=True`` (the default) a step over a cache
without padding runs its attention without a mask (``Attention.forward``); the result is the same.

Legend: B rows, K kv heads, Lc condition length, E head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ConditionCache:
    token_mask: torch.Tensor  # (B, Lc) bool, True for real tokens
    offload: bool = False
    mask_free: bool = True
    layers: list[KV] = field(default_factory=list)  # per layer: k, v (B, K, Lc, E)
    # per output-token count: (position ids, step mask, rotary cos/sin), built at the first step only
    step_inputs: dict = field(default_factory=dict, repr=False)

    def append(self, kv: KV) -> None:
        k, v = kv
        if self.offload:
            k, v = k.to("cpu", non_blocking=True), v.to("cpu", non_blocking=True)
        self.layers.append((k, v))

    def get(self, layer: int, device: torch.device) -> KV:
        k, v = self.layers[layer]
        return k.to(device, non_blocking=True), v.to(device, non_blocking=True)

    @property
    def batch_size(self) -> int:
        return self.token_mask.shape[0]

    @property
    def length(self) -> int:
        return self.token_mask.shape[1]

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)
