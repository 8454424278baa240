"""Step caching (first-block cache, after TeaCache and ParaAttention's FBCache): at sampling steps where the
transformer's input barely changed, skip every decoder layer after the first and reuse their residual.

This module owns the decision and the stored residuals only; the model runs the layers
(``OmniGenModel._layers_with_step_cache``) and the pipeline makes one ``StepCache`` per sampling run.

The rule. At every step the first decoder layer runs (1/num_layers of a step's cost); its output on the
output-image tokens, h_i, is the indicator. Its relative L1 change since the previous step is
``d_i = mean|h_i - h_{i-1}| / mean|h_{i-1}|``, and ``A_i`` is the sum of the ``d`` since the last fully
computed step, ``d_i`` included. Step i runs all layers when

- i < ``warmup_steps`` or i >= num_steps - ``final_steps`` (the first and last steps always run), or
- ``A_i >= threshold`` (then ``A`` restarts from 0);

otherwise the layers after the first are skipped and their output is taken as ``h_i + R``, where ``R`` is
(output of the last layer - h) on the last step that ran them, kept per CFG branch. The final norm and
the time-modulated output head always run on the current step's values.

``threshold=0`` runs every step (the exact output); larger values skip more steps and drift more from it.
The decision is taken once per step, by the first branch evaluated at that step (the conditional one),
and the other CFG branches follow it, so guidance combines outputs of the same age.

Legend: B batch, N output tokens, D hidden.
"""

from __future__ import annotations

import torch

from omnigen.util.checks import check_float, check_int


class StepCache:
    def __init__(self, threshold: float, num_steps: int, warmup_steps: int = 1, final_steps: int = 1) -> None:
        self.threshold = check_float("step cache threshold", threshold, 0)
        self.num_steps = check_int("num_steps", num_steps, 1)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 1)  # step 0 fills the cache
        self.final_steps = check_int("final_steps", final_steps, 0)
        self.step = -1
        self.accumulated = 0.0
        self.computed: list[bool] = []  # per step: did it run all layers
        self.changes: list[float] = []  # per step: d_i of the deciding branch (0 at step 0)
        self._previous: dict[int, torch.Tensor] = {}  # branch -> h_{i-1}
        self._residuals: dict[int, torch.Tensor] = {}  # branch -> R (B, N, D)

    def begin_step(self) -> None:
        """Call once before evaluating the branches of each sampling step."""
        self.step += 1

    def should_compute(self, indicator: torch.Tensor, branch: int) -> bool:
        """indicator: the first layer's output on the output tokens (B, N, D) of ``branch`` at this step."""
        if self.step < 0:
            raise RuntimeError("StepCache.begin_step() must be called before the first step")
        previous = self._previous.get(branch)
        self._previous[branch] = indicator.detach()
        if len(self.computed) > self.step:  # another branch already decided this step
            return self.computed[self.step]
        change = 0.0 if previous is None else relative_change(indicator, previous)
        self.changes.append(change)
        forced = self.step < self.warmup_steps or self.step >= self.num_steps - self.final_steps
        missing = branch not in self._residuals
        self.accumulated += change
        compute = forced or missing or self.accumulated >= self.threshold
        if compute:
            self.accumulated = 0.0
        self.computed.append(compute)
        return compute

    def store(self, branch: int, residual: torch.Tensor) -> None:
        self._residuals[branch] = residual.detach()

    def residual(self, branch: int) -> torch.Tensor:
        if branch not in self._residuals:
            raise RuntimeError(f"no residual stored for CFG branch {branch}: it never ran all layers")
        return self._residuals[branch]

    @property
    def num_computed(self) -> int:
        return sum(self.computed)


def relative_change(current: torch.Tensor, previous: torch.Tensor) -> float:
    """mean|current - previous| / mean|previous| (relative L1 change), in fp32."""
    current, previous = current.float(), previous.float()
    scale = previous.abs().mean().clamp_min(1e-12)
    return ((current - previous).abs().mean() / scale).item()
