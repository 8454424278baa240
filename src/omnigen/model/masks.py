"""Attention masks and rotary position ids as pure functions over explicit spans.

Sequence layout of one row (left padded to the batch's condition length ``Lc``)::

    [pad ... pad | condition tokens (text + input-image blocks) | time token | N output tokens]

Rules (OmniGen, paper Sec. 2.1): causal everywhere, bidirectional inside each input image block,
output-image tokens see every real token, nobody sees padding. Boolean masks: True = may attend.
Nothing here knows about the model; everything is tested without one.

Legend: B batch rows, Lc condition length, N output tokens, L = Lc + 1 + N.
"""

from __future__ import annotations

import torch

Span = tuple[int, int]  # [start, end) in padded condition coordinates


def _image_block_mask(spans: list[list[Span]], length: int, device: torch.device) -> torch.Tensor:
    """(B, length, length) True where query and key lie in the same input-image block."""
    block = torch.zeros(len(spans), length, length, dtype=torch.bool, device=device)
    for row, row_spans in enumerate(spans):
        for start, end in row_spans:
            block[row, start:end, start:end] = True
    return block


def condition_mask(token_mask: torch.Tensor, image_spans: list[list[Span]]) -> torch.Tensor:
    """Mask of the condition part alone (what a KV-cache prefill uses).

    token_mask: (B, Lc) bool, True for real tokens. Returns (B, Lc, Lc) bool.
    Padded query rows attend only to themselves, so they stay finite and influence nothing.
    """
    batch, length = token_mask.shape
    device = token_mask.device
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    mask = (causal | _image_block_mask(image_spans, length, device)) & token_mask[:, None, :]
    eye = torch.eye(length, dtype=torch.bool, device=device)
    return torch.where(token_mask[:, :, None], mask, eye)


def step_mask(token_mask: torch.Tensor, num_output_tokens: int) -> torch.Tensor:
    """Mask of the [time token | output tokens] queries against [condition | time | output] keys.

    The time token sees the real condition and itself (causal); output tokens see every real token.
    Returns (B, 1 + N, Lc + 1 + N) bool.
    """
    batch, length = token_mask.shape
    n = num_output_tokens
    device = token_mask.device
    cond = token_mask[:, None, :].expand(batch, 1 + n, length)
    own = torch.ones(1 + n, 1 + n, dtype=torch.bool, device=device)
    own[0, 1:] = False  # the time token does not see the output image
    return torch.cat([cond, own.expand(batch, -1, -1)], dim=2)


def full_mask(
    token_mask: torch.Tensor, image_spans: list[list[Span]], num_output_tokens: int
) -> torch.Tensor:
    """(B, L, L) mask of the whole sequence: the condition block plus the step block."""
    batch, length = token_mask.shape
    n = num_output_tokens
    top = torch.cat(
        [condition_mask(token_mask, image_spans), token_mask.new_zeros(batch, length, 1 + n)], dim=2
    )
    return torch.cat([top, step_mask(token_mask, n)], dim=1)


def condition_positions(token_mask: torch.Tensor) -> torch.Tensor:
    """(B, Lc) rotary positions of the condition: 0.. for real tokens, 0 for left padding."""
    return (token_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def step_positions(token_mask: torch.Tensor, num_output_tokens: int) -> torch.Tensor:
    """(B, 1 + N) positions of the time token and the output tokens; they continue each row's text."""
    lengths = token_mask.long().sum(dim=1, keepdim=True)
    offsets = torch.arange(1 + num_output_tokens, device=token_mask.device)
    return lengths + offsets


def full_positions(token_mask: torch.Tensor, num_output_tokens: int) -> torch.Tensor:
    """(B, L) positions of the whole sequence."""
    return torch.cat([condition_positions(token_mask), step_positions(token_mask, num_output_tokens)], dim=1)
