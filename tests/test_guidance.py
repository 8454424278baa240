"""omnigen.sampling.guidance: the CFG combiners, the branch rows and the guided velocity of a run."""

from __future__ import annotations

import pytest
import torch

from omnigen.generation import GenerationConfig
from omnigen.sampling import guidance
from omnigen.text.processor import cfg_prompts


def test_text_image_guidance_is_the_instructpix2pix_formula():
    cond, uncond, img_cond = torch.tensor([3.0, -1.0]), torch.tensor([1.0, 0.5]), torch.tensor([2.0, 0.0])
    # by hand: 1 + 1.5 (2 - 1) + 2 (3 - 2) = 4.5;  0.5 + 1.5 (0 - 0.5) + 2 (-1 - 0) = -2.25
    expected = torch.tensor([4.5, -2.25])
    assert torch.equal(guidance.text_image_guidance(cond, uncond, img_cond, 2.0, 1.5), expected)
    assert torch.equal(guidance.combine([cond, uncond, img_cond], 2.0, 1.5), expected)
    # the scales' meaning: 1 and 1 give the condition; 0 and 0 the unconditional branch
    assert torch.equal(guidance.combine([cond, uncond, img_cond], 1.0, 1.0), cond)
    assert torch.equal(guidance.combine([cond, uncond, img_cond], 0.0, 0.0), uncond)
    assert torch.equal(guidance.combine([cond, uncond, img_cond], 0.0, 1.0), img_cond)


def test_text_guidance_and_the_branch_count():
    cond, uncond = torch.tensor([3.0]), torch.tensor([1.0])
    assert torch.equal(guidance.combine([cond, uncond], 2.5, 99.0), torch.tensor([6.0]))  # 1 + 2.5 (3 - 1)
    assert torch.equal(guidance.text_guidance(cond, uncond, 1.0), cond)
    for count in (1, 4):
        with pytest.raises(ValueError, match=f"expected 2 or 3 CFG branches, got {count}"):
            guidance.combine([cond] * count, 2.0, 1.5)


class FakeProcessor:
    def __init__(self) -> None:
        self.calls = []

    def __call__(self, text, images, template=False):
        self.calls.append((text, len(images), template))
        return f"processed({text})"


def test_branch_rows_are_cond_uncond_img_cond_one_row_per_prompt():
    branches = [
        cfg_prompts("edit <img><|image_1|></img>", ["a"], "bad", use_img_cfg=True),
        cfg_prompts("two <img><|image_1|></img> <img><|image_2|></img>", ["b", "c"], "bad", use_img_cfg=True),
    ]
    processor = FakeProcessor()
    rows = guidance.branch_rows(processor, ["P0", "P1"], branches)
    assert rows == [
        ["P0", "P1"],  # the condition: the prompts as already processed
        ["processed(bad)", "processed(bad)"],  # the negative prompt without images
        ["processed(<img><|image_1|></img>)", "processed(<img><|image_1|></img> <img><|image_2|></img>)"],
    ]
    assert processor.calls[-1] == ("<img><|image_1|></img> <img><|image_2|></img>", 2, True)
    text_only = [cfg_prompts("a cat", [], "bad", use_img_cfg=False)]
    assert guidance.branch_rows(FakeProcessor(), ["P"], text_only) == [["P"], ["processed(bad)"]]


class FakeCache:
    """A prefilled condition: its values, and the step inputs the sampler stores per (tokens, rows)."""

    def __init__(self, values: torch.Tensor) -> None:
        self.values, self.step_inputs = values, {}


class FakeModel:
    """v = z * (row's condition value) + t, so each branch's output is known; records how it was called."""

    def __init__(self) -> None:
        self.calls, self.prefills, self.step_input_builds = [], [], []

    def prefill(self, condition, num_output_tokens, **options):
        self.prefills.append((condition, num_output_tokens, options))
        return FakeCache(condition)

    def step_inputs(self, cache, n, batch):
        self.step_input_builds.append((n, batch))
        return ("inputs", n, batch)

    def __call__(self, z, t, condition=None, cache=None, branch=0, **options):
        self.calls.append((z.shape[0], condition is None, cache is not None, branch))
        values = cache.values if cache is not None else condition
        return z * values.view(-1, 1) + t.view(-1, 1)


@pytest.mark.parametrize("use_kv_cache", [True, False])
@pytest.mark.parametrize("separate", [True, False])
def test_guided_velocity_combines_the_branches(use_kv_cache, separate):
    config = GenerationConfig(guidance_scale=2.0, img_guidance_scale=1.5, use_kv_cache=use_kv_cache)
    values = [torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([2.0])]  # cond, uncond, img_cond
    conditions = values if separate else [torch.cat(values)]
    model = FakeModel()
    velocity = guidance.guided_velocity(model, conditions, 3, num_output_tokens=5, config=config)
    z, t = torch.tensor([[1.0, 2.0]]), torch.tensor([0.5])
    branches = [z * value + 0.5 for value in (3.0, 1.0, 2.0)]
    expected = branches[1] + 1.5 * (branches[2] - branches[1]) + 2.0 * (branches[0] - branches[2])
    assert torch.equal(velocity(z, t), expected)
    assert len(model.prefills) == (len(conditions) if use_kv_cache else 0)  # once, not per step
    velocity(z, t)
    assert len(model.prefills) == (len(conditions) if use_kv_cache else 0)
    assert len(model.step_input_builds) == (len(conditions) if use_kv_cache else 0)  # once per cache
    if separate:  # one call per branch, each told its index
        assert [c[3] for c in model.calls[:3]] == [0, 1, 2] and {c[0] for c in model.calls} == {1}
    else:  # one call with every branch's rows
        assert model.calls[0][0] == 3 and model.calls[0][3] == 0
    assert all(call[1] == use_kv_cache and call[2] == use_kv_cache for call in model.calls)
