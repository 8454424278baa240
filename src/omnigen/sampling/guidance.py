"""Classifier-free guidance combiners (pure functions).

Text + image guidance (OmniGen, after InstructPix2Pix):
    v = uncond + s_img * (img_cond - uncond) + s_txt * (cond - img_cond)
Text-only guidance (no input images):
    v = uncond + s_txt * (cond - uncond)

Beside the pure combiners, the guided velocity of a sampling run: ``branch_rows`` assembles the CFG
branches' prompts (each branch a block of rows of the condition batch, in the reference's order
[cond | uncond | img_cond]) and ``guided_velocity`` prefills them and returns v(z, t) for the solver.

Guidance interval (OmniGen2's ``cfg_range``, BAGEL's ``cfg_interval``; Kynkaanniemi et al. 2024): guidance
applies only at evaluation times t with ``guidance_start <= t <= guidance_end``; elsewhere the velocity is
the conditional branch's alone and, with separate CFG batches, the other branches do not run (fewer
transformer evaluations). With all branches in one batch the batch still runs (its cache holds every
branch's rows) and only the conditional rows are used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from omnigen.model.runner import PLAIN, Runner

if TYPE_CHECKING:
    from omnigen.generation import GenerationConfig
    from omnigen.model import OmniGenModel
    from omnigen.sampling.parallel import CfgGroup
    from omnigen.sampling.step_cache import StepCache
    from omnigen.types import Condition, ProcessedPrompt


def text_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


def text_image_guidance(
    cond: torch.Tensor, uncond: torch.Tensor, img_cond: torch.Tensor, scale: float, img_scale: float
) -> torch.Tensor:
    return uncond + img_scale * (img_cond - uncond) + scale * (cond - img_cond)


def combine(branches: list[torch.Tensor], scale: float, img_scale: float) -> torch.Tensor:
    """``branches`` = [cond, uncond] or [cond, uncond, img_cond] (the reference's row order)."""
    if len(branches) == 2:
        return text_guidance(branches[0], branches[1], scale)
    if len(branches) == 3:
        return text_image_guidance(branches[0], branches[1], branches[2], scale, img_scale)
    raise ValueError(f"expected 2 or 3 CFG branches, got {len(branches)}")


def guided_at(t: float, config: GenerationConfig) -> bool:
    """Whether guidance applies at time t (``guidance_start <= t <= guidance_end``)."""
    return config.guidance_start <= t <= config.guidance_end


def branch_rows(processor: Any, processed: list[ProcessedPrompt], branches: list) -> list[list]:
    """Per CFG branch, the processed prompt of every row: one row per prompt, whatever the images per
    prompt (the model broadcasts each condition row, and its cache row, over the prompt's images, so the
    prefill and the cache do not grow with them). ``branches``: the samples' ``processor.CfgPrompts``."""
    names = ["cond", "uncond"] + (["img_cond"] if branches[0].img_cond is not None else [])
    rows = []
    for name in names:
        texts = [getattr(b, name) for b in branches]
        prompts = [
            processed[i] if name == "cond" else processor(text, images, template=True)
            for i, (text, images) in enumerate(texts)
        ]
        rows.append(prompts)
    return rows


def guided_velocity(
    model: OmniGenModel,
    conditions: list[Condition],
    num_branches: int,
    num_output_tokens: int,
    config: GenerationConfig,
    step_cache: StepCache | None = None,
    runner: Runner = PLAIN,
    group: CfgGroup | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """v(z, t) with guidance. ``conditions``: one per branch (separate CFG) or one holding every branch's
    rows; with ``config.use_kv_cache`` they are prefilled into caches once, here, and each cache gets the
    step inputs of its batch at the first step. ``runner``: how the decoder layers run
    (``omnigen.model.runner``). With a CFG-parallel ``group`` (``omnigen.sampling.parallel``): one per
    branch of this rank, the others gathered."""
    ids = list(range(len(conditions))) if group is None else list(group.branches)
    caches = [
        model.prefill(
            c,
            num_output_tokens,
            runner=runner,
            offload_cache=config.offload_kv_cache,
            mask_free=config.mask_free_attention,
        )
        if config.use_kv_cache
        else None
        for c in conditions
    ]

    def run(index: int, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cache = caches[index]
        if cache is not None:
            key = (num_output_tokens, z.shape[0])
            if key not in cache.step_inputs:  # the same at every step: built once per cache and batch
                cache.step_inputs[key] = model.step_inputs(cache, *key)
        return model(
            z,
            t,
            condition=None if cache is not None else conditions[index],
            cache=cache,
            runner=runner,
            step_cache=step_cache,
            branch=ids[index],
        ).float()

    def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if step_cache is not None:
            step_cache.begin_step()
        scale, img_scale = config.guidance_scale, config.img_guidance_scale
        guided = guided_at(t[0].item(), config)
        if group is not None:
            gathered = group.gather([run(k, z, t) for k in range(len(ids))])
            return combine(gathered, scale, img_scale) if guided else gathered[0]
        if len(conditions) == 1:  # all branches in one batch
            out = run(0, torch.cat([z] * num_branches), torch.cat([t] * num_branches))
            branches = list(out.chunk(num_branches))
            return combine(branches, scale, img_scale) if guided else branches[0]
        if not guided:
            return run(0, z, t)
        return combine([run(k, z, t) for k in range(num_branches)], scale, img_scale)

    return velocity
