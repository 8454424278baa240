"""Token-budget packing: several samples share one row of at most ``max_tokens`` tokens instead of each
row being left padded to the longest condition of the batch.

A packed row is the samples' unpadded sequences end to end, then right padding to the longest packed
row::

    [cond_a | time_a | out_a | cond_b | time_b | out_b | ... | pad]

Each sample keeps exactly what it has in a padded batch: its own mask (``masks.full_mask`` of that
sample alone, placed on the row's diagonal, so nothing attends across samples), its own rotary
positions (restarting at 0) and its own long/short rotary choice. A packed pass therefore equals the
padded pass up to float rounding; it only skips the padding's compute. The dense boolean mask goes to
SDPA like any other mask.

Legend: B samples, R packed rows, Lr packed row length, Lc condition length, N output tokens, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import omnigen.model.masks as masks


def plan_rows(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Sample indices per packed row: first-fit over the samples longest first, so every row holds at
    most ``max_tokens`` tokens. Deterministic (ties keep input order). ValueError if a sample alone is
    longer than ``max_tokens``."""
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    too_long = [(i, n) for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        index, length = too_long[0]
        raise ValueError(
            f"sample {index} has {length} tokens, more than max_tokens={max_tokens}: raise max_tokens to at "
            "least the longest sample (condition + 1 + output tokens)"
        )
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for row, left in enumerate(room):
            if lengths[index] <= left:
                rows[row].append(index)
                room[row] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(max_tokens - lengths[index])
    return [sorted(row) for row in rows]


def sample_lengths(token_mask: torch.Tensor, num_output_tokens: int) -> list[int]:
    """Each sample's unpadded sequence length: real condition tokens + time token + output tokens."""
    return (token_mask.long().sum(dim=1) + 1 + num_output_tokens).tolist()


@dataclass
class PackedLayout:
    """Where each sample sits and what each packed row holds."""

    rows: list[list[int]]  # sample indices per packed row
    starts: list[tuple[int, int]]  # per sample: (row, first token)
    lengths: list[int]  # per sample: its sequence length
    position_ids: torch.Tensor  # (R, Lr) long, 0 on padding
    mask: torch.Tensor  # (R, Lr, Lr) bool, block diagonal
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin (R, Lr, E), 0 on padding


def layout(
    token_mask: torch.Tensor,
    image_spans: list[list[masks.Span]],
    num_output_tokens: int,
    rows: list[list[int]],
    rotary: torch.nn.Module,
) -> PackedLayout:
    """The packed rows' positions, mask and rotary tables, each sample's part cut from what the padded
    batch gives that sample alone (``masks.full_mask`` / ``masks.full_positions`` / ``rotary``)."""
    n = num_output_tokens
    lengths = sample_lengths(token_mask, n)
    placed = sorted(i for row in rows for i in row)
    if placed != list(range(len(lengths))):
        raise ValueError(f"packed rows must hold every sample once, got {rows} for {len(lengths)} samples")
    width = max(sum(lengths[i] for i in row) for row in rows)
    device = token_mask.device
    positions = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    mask = torch.eye(width, dtype=torch.bool, device=device).repeat(len(rows), 1, 1)  # padding sees itself
    head_dim = rotary.config.head_dim
    cos = torch.zeros(len(rows), width, head_dim, device=device)
    sin = torch.zeros_like(cos)
    starts: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for r, row in enumerate(rows):
        offset = 0
        for i in row:
            one = token_mask[i : i + 1]
            keep = torch.cat([one[0], one.new_ones(1 + n)])  # this sample's real tokens
            sample_positions = masks.full_positions(one, n)[:, keep]  # (1, length)
            sample_mask = masks.full_mask(one, [image_spans[i]], n)[0][keep][:, keep]
            sample_cos, sample_sin = rotary(sample_positions, sample_positions[:, -1])
            span = slice(offset, offset + lengths[i])
            positions[r, span] = sample_positions[0]
            mask[r, span, span] = sample_mask
            cos[r, span], sin[r, span] = sample_cos[0], sample_sin[0]
            starts[i] = (r, offset)
            offset += lengths[i]
    return PackedLayout(rows, starts, lengths, positions, mask, (cos, sin))


def pack(
    embeds: torch.Tensor, token_mask: torch.Tensor, step: torch.Tensor, plan: PackedLayout
) -> torch.Tensor:
    """(R, Lr, D): each sample's real condition embeddings (from the padded (B, Lc, D)) and its
    [time | output] tokens (B, 1 + N, D), at its place in its row; zeros on padding."""
    width = plan.position_ids.shape[1]
    out = embeds.new_zeros(len(plan.rows), width, embeds.shape[-1])
    for i, (row, start) in enumerate(plan.starts):
        sample = torch.cat([embeds[i][token_mask[i]], step[i]])
        out[row, start : start + plan.lengths[i]] = sample
    return out


def unpack_outputs(hidden: torch.Tensor, plan: PackedLayout, num_output_tokens: int) -> torch.Tensor:
    """(B, N, D): each sample's output-token hidden states, in sample order."""
    n = num_output_tokens
    return torch.stack(
        [
            hidden[row, start + length - n : start + length]
            for (row, start), length in zip(plan.starts, plan.lengths)
        ]
    )
