"""ConditionCache: the condition's keys/values, computed once by a prefill and reused every step.

An explicit object (gpt-fast style), not a subclass of any library cache. It stores, per layer, the
rotary-applied keys and values of the condition tokens, and the condition's token mask so that a step
can build its own mask and positions.

One row per condition, whatever the number of images made from it: a step over ``B = copies * Bc`` rows
(``num_images_per_prompt``) lets each cache row serve ``copies`` consecutive step rows; attention
broadcasts the row (``layers._prepend``) instead of storing it ``copies`` times, so the cache's bytes do
not grow with the number of images.

With ``offload=True`` the keys/values live on the host and visit the compute device one layer at a time;
every host<->device move of them is in ``omnigen.model.offload``. With ``mask_free=True`` (the default)
a step over a cache without padding runs its attention without a mask (``Attention.forward``); the result
is the same.

Legend: Bc condition rows, B step rows, K kv heads, Lc condition length, E head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ConditionCache:
    token_mask: torch.Tensor  # (Bc, Lc) bool, True for real tokens
    offload: bool = False
    mask_free: bool = True
    layers: list[KV] = field(default_factory=list)  # per layer: k, v (Bc, K, Lc, E)
    # per (output-token count, step rows): the step's ``ForwardInputs`` without ``past`` (rotary tables,
    # mask), stored by the caller that runs the steps (``OmniGenModel.step_inputs``); the model only reads
    step_inputs: dict = field(default_factory=dict, repr=False)

    def append(self, kv: KV) -> None:
        """Store one layer's keys/values (already on the host when ``offload``; see ``offload.Streamer``)."""
        self.layers.append(kv)

    def step_token_mask(self, batch: int) -> torch.Tensor:
        """(B, Lc) the token mask of each step row."""
        return self.token_mask.repeat_interleave(copies_per_row(batch, self.token_mask.shape[0]), dim=0)

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)


def copies_per_row(batch: int, rows: int) -> int:
    """How many consecutive rows of a batch of ``batch`` rows each of ``rows`` condition rows serves."""
    if batch < rows or batch % rows:
        raise ValueError(
            f"a batch of {batch} rows cannot use a condition of {rows} rows: each condition row serves "
            f"the same number of consecutive rows (a multiple of {rows})"
        )
    return batch // rows
