"""Token-budget packing (omnigen.model.packing): same loss and gradients as the padded batch."""

import pytest
import torch

from conftest import random_model, tiny_config
from omnigen.model import masks, packing
from omnigen.text.collate import collate
from omnigen.text.processor import OmniGenProcessor
from omnigen.training.batches import TrainBatch
from omnigen.training.config import LossSettings, TrainConfig
from omnigen.training.loss import flow_matching_loss

# An X2I-like mix: text-to-image rows with no input image beside one-, two- and three-image edits.
PROMPTS = [
    ("a red circle", 0),
    ("make it blue <img><|image_1|></img>", 1),
    ("put <img><|image_1|></img> on the left of <img><|image_2|></img> .", 2),
    ("a photo of a cat", 0),
    ("put <img><|image_1|></img> <img><|image_2|></img> , <img><|image_3|></img> in a square", 3),
    ("a green dog", 0),
]


def make_batch(tokenizer, config, size: int = 16) -> TrainBatch:
    processor = OmniGenProcessor(tokenizer, config, max_input_image_size=size)
    g = torch.Generator().manual_seed(0)
    prompts, latents = [], []
    for text, count in PROMPTS:
        pixels = [torch.rand(3, size, size, generator=g) * 2 - 1 for _ in range(count)]
        prompt = processor(text, pixels)
        prompts.append(prompt)
        down = config.latent_downsample
        latents.append([torch.randn(4, size // down, size // down, generator=g) for _ in prompt.pixel_values])
    condition = collate(prompts, latents, config.transformer.pad_token_id)
    b = len(PROMPTS)
    x1 = torch.randn(b, 4, size // config.latent_downsample, size // config.latent_downsample, generator=g)
    return TrainBatch(condition, x1, torch.zeros_like(x1), torch.zeros(b, dtype=torch.bool), torch.ones(b))


def loss_and_grads(model, batch, max_tokens):
    model.zero_grad()
    generators = [torch.Generator().manual_seed(i) for i in range(batch.x1.shape[0])]
    result = flow_matching_loss(model, batch, generators, LossSettings(), max_tokens=max_tokens)
    result.loss.backward()
    return result, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("long_rope", [True, False])
def test_packed_loss_and_gradients_equal_padded(tokenizer, long_rope):
    config = tiny_config(long_rope=long_rope)
    model = random_model(config).train()
    batch = make_batch(tokenizer, config)
    n = config.num_image_tokens(16, 16)
    lengths = packing.sample_lengths(batch.condition.token_mask, n)
    max_tokens = max(lengths) + min(lengths)  # the longest sample shares its row with a short one
    assert len(packing.plan_rows(lengths, max_tokens)) < len(lengths)  # rows really are shared
    padded, padded_grads = loss_and_grads(model, batch, None)
    packed, packed_grads = loss_and_grads(model, batch, max_tokens)
    torch.testing.assert_close(packed.per_sample, padded.per_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-5)
    assert padded_grads.keys() == packed_grads.keys() and len(padded_grads) > 10
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_samples_never_attend_across_each_other(tokenizer, config):
    batch = make_batch(tokenizer, config)
    token_mask, spans = batch.condition.token_mask, batch.condition.image_spans
    n = config.num_image_tokens(16, 16)
    lengths = packing.sample_lengths(token_mask, n)
    rows = [[0, 1, 2], [3, 4, 5]]
    model = random_model(config)
    plan = packing.layout(token_mask, spans, n, rows, model.llm.rotary)
    for r, row in enumerate(rows):
        owner = torch.full((plan.mask.shape[1],), -1)
        for i in row:
            start = plan.starts[i][1]
            owner[start : start + lengths[i]] = i
            # each sample's block is its own full mask, positions restart at 0
            keep = torch.cat([token_mask[i], torch.ones(1 + n, dtype=torch.bool)])
            own = masks.full_mask(token_mask[i : i + 1], [spans[i]], n)[0][keep][:, keep]
            assert torch.equal(plan.mask[r, start : start + lengths[i], start : start + lengths[i]], own)
            assert plan.position_ids[r, start] == 0
        across = (owner[:, None] != owner[None, :]) & plan.mask[r]
        assert not across.any()
        assert plan.mask[r].any(dim=-1).all()  # no empty row: SDPA stays finite


def test_plan_rows_respects_the_budget_and_rejects_a_too_long_sample():
    lengths = [90, 10, 50, 50, 30, 70, 20]
    rows = packing.plan_rows(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    assert rows == [[0, 1], [4, 5], [2, 3], [6]]  # longest first: 90+10, 70+30, 50+50, 20
    with pytest.raises(ValueError, match="max_tokens=80"):
        packing.plan_rows(lengths, 80)
    with pytest.raises(ValueError, match="positive int"):
        packing.plan_rows(lengths, 0)


def test_max_tokens_in_a_training_config_takes_the_same_steps(tmp_path, monkeypatch):
    import json

    from omnigen.miniworld.world import save_tokenizer, write_dataset
    from omnigen.training.trainer import train
    from test_training import make_config

    jsonl = write_dataset(tmp_path / "world", 6, seed=2, size=16)
    save_tokenizer(tmp_path / "world" / "tokenizer.json")
    stages = [{"resolution": 16, "steps": 2, "batch_size": 6, "lr": 3e-3}]
    plans = []
    plan_rows = packing.plan_rows
    monkeypatch.setattr(packing, "plan_rows", lambda *a: plans.append(plan_rows(*a)) or plans[-1])
    for out, max_tokens in (("padded", None), ("packed", 200)):
        config = make_config(tmp_path / "world", tmp_path / out, 2, data=[str(jsonl)], stages=stages)
        train(TrainConfig.from_dict({**json.loads(config.to_json()), "max_tokens": max_tokens}), device="cpu")
    losses = [
        [json.loads(x)["loss"] for x in (tmp_path / n / "loss.jsonl").read_text().splitlines()]
        for n in ("padded", "packed")
    ]
    assert len(losses[0]) == 2
    assert len(plans) == 2 and all(len(rows) < 6 for rows in plans)  # the packed run packed 6 samples
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
