import torch

from omnigen.model import masks


def naive_full_mask(lengths, length, spans, n):
    """Straight from the rules: causal, image blocks bidirectional, outputs see all, padding hidden."""
    rows = []
    total = length + 1 + n
    for row, real in enumerate(lengths):
        pad = length - real
        m = torch.zeros(total, total, dtype=torch.bool)
        for i in range(total):
            if i < pad:
                m[i, i] = True
                continue
            for j in range(pad, total):
                same_image = any(s <= i < e and s <= j < e for s, e in spans[row])
                if i >= length + 1 or j <= i or same_image:
                    m[i, j] = True
        rows.append(m)
    return torch.stack(rows)


def test_full_mask_matches_rules():
    token_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    spans = [[(3, 6)], [(1, 3), (5, 7)]]
    got = masks.full_mask(token_mask, spans, num_output_tokens=3)
    assert torch.equal(got, naive_full_mask([6, 8], 8, spans, 3))


def test_golden_single_row():
    # [t t | i i | t] + time + 2 outputs
    token_mask = torch.ones(1, 5, dtype=torch.bool)
    got = masks.full_mask(token_mask, [[(2, 4)]], 2)[0].int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],  # image token sees the whole image
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 0, 0],  # time token: causal, not the output image
            [1, 1, 1, 1, 1, 1, 1, 1],  # output tokens see everything
            [1, 1, 1, 1, 1, 1, 1, 1],
        ]
    )
    assert torch.equal(got, expected)


def test_padding_never_attended_and_rows_finite():
    token_mask = torch.tensor([[0, 0, 0, 1, 1]], dtype=torch.bool)
    m = masks.full_mask(token_mask, [[]], 2)
    assert not m[0, 3:, :3].any()  # real queries never see padding
    assert m.any(dim=-1).all()  # every query row attends to something (no NaN rows in SDPA)


def test_positions_left_padding():
    token_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    pos = masks.full_positions(token_mask, 2)
    assert pos.tolist() == [[0, 0, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7]]
    assert torch.equal(masks.step_positions(token_mask, 2), pos[:, 5:])


def test_cached_masks_are_blocks_of_the_full_mask():
    token_mask = torch.tensor([[0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    spans = [[(2, 5)]]
    full = masks.full_mask(token_mask, spans, 4)
    assert torch.equal(full[:, :6, :6], masks.condition_mask(token_mask, spans))
    assert torch.equal(full[:, 6:], masks.step_mask(token_mask, 4))
    assert not full[:, 1:6, 6:].any()  # the condition never sees the step tokens, so caching it is exact
