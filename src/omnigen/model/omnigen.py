"""OmniGenModel: one transformer over [condition | time token | noisy output-image tokens].

The condition is text with input-image latents scattered into their placeholder spans. The model
returns the velocity for the output latents. Two ways to run it, with equal results:
- ``forward(x, t, condition)``: the whole sequence in one pass (training, reference);
- ``prefill(condition, n)`` once, then ``forward(x, t, cache=cache)`` every sampling step.
Both take the ``Runner`` that runs the decoder layers (``omnigen.model.runner``); the model holds only
weights and config.
A step may also take a ``StepCache`` (``omnigen.sampling.step_cache``) that skips most layers at steps whose input
barely changed: an approximation, off unless asked for.

Legend: B batch, C latent channels, H/W latent size, P patch, N output tokens, Lc condition length,
D hidden.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial

import torch
from torch import nn

import omnigen.model.masks as masks
import omnigen.model.packing as packing
from omnigen.config import OmniGenConfig
from omnigen.model.cache import ConditionCache, copies_per_row
from omnigen.model.embeddings import (
    FinalLayer,
    PatchEmbed,
    TimestepEmbedder,
    cropped_pos_embed,
    sincos_2d,
    unpatchify,
)
from omnigen.model.runner import PLAIN, ForwardInputs, Runner
from omnigen.model.transformer import Transformer
from omnigen.model.ulysses import TokenSplit
from omnigen.sampling.step_cache import StepCache
from omnigen.types import Condition


class OmniGenModel(nn.Module):
    def __init__(self, config: OmniGenConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.transformer.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, hidden)
        self.input_x_embedder = PatchEmbed(config.patch_size, config.in_channels, hidden)
        self.time_token = TimestepEmbedder(hidden, config.time_embed_dim)
        self.t_embedder = TimestepEmbedder(hidden, config.time_embed_dim)
        table = sincos_2d(hidden, config.pos_embed_max_size, config.pos_embed_base_size)
        self.register_buffer("pos_embed", table[None], persistent=True)  # (1, max**2, D)
        self.final_layer = FinalLayer(hidden, config.patch_size, config.in_channels)
        self.llm = Transformer(config.transformer)

    # ------------------------------------------------------------------ initialisation
    def initialize_weights(self, std: float = 0.02) -> None:
        """From-scratch init (DiT/OmniGen): xavier linears, patch convs like linears, N(0, 0.02) time MLPs
        and embeddings, zeroed adaLN and output head so the initial velocity is 0."""

        def basic(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic)
        nn.init.normal_(self.llm.embed_tokens.weight, std=std)
        for embed in (self.x_embedder, self.input_x_embedder):
            weight = embed.proj.weight.data
            nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
            nn.init.zeros_(embed.proj.bias)
        for embedder in (self.t_embedder, self.time_token):
            nn.init.normal_(embedder.mlp[0].weight, std=std)
            nn.init.normal_(embedder.mlp[2].weight, std=std)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def materialize_buffers(self, device: torch.device | str = "cpu") -> None:
        """Recompute non-persistent buffers after a meta-device build."""
        self.llm.rotary.materialize(torch.device(device))

    # ------------------------------------------------------------------ embeddings
    def _patch_tokens(self, embedder: PatchEmbed, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D) with the cropped 2-D position table added."""
        p = self.config.patch_size
        pos = cropped_pos_embed(
            self.pos_embed, self.config.pos_embed_max_size, latents.shape[-2] // p, latents.shape[-1] // p
        )
        return embedder(latents) + pos.to(latents.dtype)

    def embed_condition(self, condition: Condition) -> torch.Tensor:
        """Token embeddings with each input image's tokens written into its span. (B, Lc, D)"""
        embeds = self.llm.embed_tokens(condition.input_ids)
        if not any(condition.image_spans):
            return embeds
        embeds = embeds.clone()
        for row, (spans, latents) in enumerate(
            zip(condition.image_spans, condition.image_latents, strict=True)
        ):
            for (start, end), latent in zip(spans, latents, strict=True):
                tokens = self._patch_tokens(self.input_x_embedder, latent[None].to(embeds.dtype))[0]
                if tokens.shape[0] != end - start:
                    raise ValueError(
                        f"row {row}: image span [{start}, {end}) holds {end - start} tokens but its latent "
                        f"{tuple(latent.shape)} makes {tokens.shape[0]}"
                    )
                embeds[row, start:end] = tokens
        return embeds

    def _step_embeddings(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.x_embedder.proj.weight.dtype
        x_tokens = self._patch_tokens(self.x_embedder, x.to(dtype))  # (B, N, D)
        time_token = self.time_token(t, dtype)[:, None]  # (B, 1, D)
        return torch.cat([time_token, x_tokens], dim=1), self.t_embedder(t, dtype)

    def _velocity(
        self,
        hidden: torch.Tensor,
        t_emb: torch.Tensor,
        height: int,
        width: int,
        split: TokenSplit | None = None,
    ) -> torch.Tensor:
        """The velocity of the last N tokens of ``hidden``; with a sequence-parallel ``split`` hidden is this
        rank's slice of the step, and the final layer's outputs of every rank are gathered."""
        n = (height // self.config.patch_size) * (width // self.config.patch_size)
        if split is None:
            out = self.final_layer(hidden[:, -n:], t_emb)  # (B, N, P*P*C)
        else:
            out = split.gather(self.final_layer(hidden, t_emb))[:, -n:]
        return unpatchify(out, height, width, self.config.patch_size)  # (B, C, H, W)

    # ------------------------------------------------------------------ passes
    def prefill(
        self,
        condition: Condition,
        num_output_tokens: int,
        runner: Runner = PLAIN,
        offload_cache: bool = False,
        mask_free: bool = True,
    ) -> ConditionCache:
        """Run the condition alone; ``runner`` fills a new cache with its keys/values. ``num_output_tokens``
        is needed because the rotary long/short choice depends on the length of the whole row.
        ``mask_free``: let the steps run their attention without a mask when the condition has no padding
        (same result, faster kernels)."""
        token_mask = condition.token_mask
        cache = ConditionCache(token_mask=token_mask, offload=offload_cache, mask_free=mask_free)
        positions = masks.condition_positions(token_mask)
        row_max = token_mask.long().sum(dim=1) + num_output_tokens
        mask = masks.condition_mask(token_mask, condition.image_spans)
        self.llm(
            self.embed_condition(condition), self.llm.inputs(positions, row_max, mask, collect=cache), runner
        )
        return cache

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        condition: Condition | None = None,
        cache: ConditionCache | None = None,
        runner: Runner = PLAIN,
        step_cache: StepCache | None = None,
        branch: int = 0,
        max_tokens: int | None = None,
    ) -> torch.Tensor:
        """x (B, C, H, W) noisy latents at time t (B,) in [0, 1] -> velocity (B, C, H, W).

        Give exactly one of ``condition`` (full pass) or ``cache`` (a prefilled condition). Either may have
        fewer rows than x (Bc dividing B): each of its rows then serves B // Bc consecutive rows of x
        (several images of one prompt), broadcast rather than stored once per image. A cached step uses
        the cache's stored step inputs when its caller stored them (``step_inputs``), else builds them.
        ``runner``: how the decoder layers run (``omnigen.model.runner``); with its ``sequence`` shard a
        cached step runs only this rank's slice of the tokens (``omnigen.model.ulysses``).
        ``step_cache`` (with this call's CFG ``branch``): may skip every layer after the first and reuse
        their residual from an earlier step (``omnigen.sampling.step_cache``).
        ``max_tokens`` (with ``condition``, one row per sample): pack the samples into rows of at most this
        many tokens instead of padding them to the longest (``omnigen.model.packing``); same result.
        """
        if (condition is None) == (cache is None):
            raise ValueError("give exactly one of `condition` or `cache`")
        height, width = x.shape[-2:]
        step, t_emb = self._step_embeddings(x, t)  # (B, 1 + N, D)
        n = step.shape[1] - 1
        if max_tokens is not None:
            return self._velocity(
                self._packed_pass(condition, step, max_tokens, runner), t_emb, height, width
            )
        if cache is not None:
            sequence = step
            stored = cache.step_inputs.get((n, x.shape[0]))
            inputs = self.step_inputs(cache, n, x.shape[0]) if stored is None else stored
            inputs = replace(inputs, past=cache)
            if runner.sequence is not None:  # this rank's tokens only (``omnigen.model.ulysses``)
                if step_cache is not None:
                    raise ValueError("a step cache cannot be used with a sequence-parallel runner")
                sequence, inputs = runner.sequence.shard(sequence, inputs)
        else:
            copies = copies_per_row(x.shape[0], condition.batch_size)
            token_mask = condition.token_mask.repeat_interleave(copies, dim=0)  # (B, Lc)
            spans = [row for row in condition.image_spans for _ in range(copies)]
            embeds = self.embed_condition(condition).repeat_interleave(copies, dim=0)  # (B, Lc, D)
            sequence = torch.cat([embeds, step], dim=1)  # (B, Lc + 1 + N, D)
            positions = masks.full_positions(token_mask, n)
            inputs = self.llm.inputs(positions, positions[:, -1], masks.full_mask(token_mask, spans, n))
        run = partial(self.llm, inputs=inputs, runner=runner)
        if step_cache is None:
            hidden = run(sequence)  # (B, L, D)
        else:
            hidden = self._layers_with_step_cache(run, sequence, n, step_cache, branch)  # (B, N, D)
        return self._velocity(hidden, t_emb, height, width, inputs.split)

    def _packed_pass(
        self, condition: Condition | None, step: torch.Tensor, max_tokens: int, runner: Runner
    ) -> torch.Tensor:
        """The output tokens' hidden states (B, N, D) of a pass over packed rows."""
        if condition is None or condition.batch_size != step.shape[0]:
            raise ValueError("max_tokens packs a full pass: give `condition` with one row per sample")
        n = step.shape[1] - 1
        token_mask = condition.token_mask
        rows = packing.plan_rows(packing.sample_lengths(token_mask, n), max_tokens)
        plan = packing.layout(token_mask, condition.image_spans, n, rows, self.llm.rotary)
        sequence = packing.pack(self.embed_condition(condition), token_mask, step, plan)  # (R, Lr, D)
        hidden = self.llm(sequence, ForwardInputs(plan.rope, plan.mask), runner)
        return packing.unpack_outputs(hidden, plan, n)  # (B, N, D)

    def step_inputs(self, cache: ConditionCache, n: int, batch: int) -> ForwardInputs:
        """The rotary tables and mask (None when the step can run mask-free) of a step of ``n`` output
        tokens over ``batch`` rows after ``cache``: the same at every step, so a sampler builds them once
        and stores them in ``cache.step_inputs[(n, batch)]``. ``past`` is left to the call (no cycle)."""
        token_mask = cache.step_token_mask(batch)  # (B, Lc)
        positions = masks.step_positions(token_mask, n)
        mask_free = cache.mask_free and bool(token_mask.all())
        mask = None if mask_free else masks.step_mask(token_mask, n)
        return self.llm.inputs(positions, positions[:, -1], mask)

    def _layers_with_step_cache(
        self,
        run: Callable[..., torch.Tensor],
        sequence: torch.Tensor,
        n: int,
        step_cache: StepCache,
        branch: int,
    ) -> torch.Tensor:
        """The first layer always; the others only when the step cache says so, else their residual from
        the last step that ran them. Returns the final-normed hidden states of the N output tokens."""
        first = run(sequence, layer_range=(0, 1), normalize=False)  # (B, L, D) raw residual stream
        tokens = first[:, -n:]  # (B, N, D)
        if step_cache.should_compute(tokens, branch):
            layers = (1, self.config.transformer.num_layers)
            out = run(first, layer_range=layers, normalize=False)[:, -n:]
            step_cache.store(branch, out - tokens)
        else:
            out = tokens + step_cache.residual(branch)
        return self.llm.finish(out)

    def num_parameters(self) -> int:
        """Parameter count (the stored ``pos_embed`` table is a buffer and not counted)."""
        return sum(p.numel() for p in self.parameters())
