"""Held-out velocity loss during training (``val_data``): the training loss on rows the run never trains
on, at draws fixed per row (the same t and noise at every evaluation), so the curve moves only with the
weights. A training loss that keeps falling while this one rises is memorisation.

Every rank takes a slice of each batch (padded like training batches, pads weighted 0) and the sums are
all-reduced, so DDP and FSDP runs call the model the same number of times on every rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from omnigen.training import distributed
from omnigen.training.batches import BatchBuilder
from omnigen.training.loss import flow_matching_loss
from omnigen.training.sampling_data import ConditionDropout, group_by_size
from omnigen.training.x2i import read_x2i

VAL_SEED_OFFSET = 7919  # the draws differ from the training seed's


class Validator:
    def __init__(self, config, train_builder: BatchBuilder, runtime: distributed.Runtime) -> None:
        samples = read_x2i(
            config.val_data,
            image_root=config.image_root,
            on_bad_row=config.on_bad_row,
            check_images=config.check_images,
        ).samples
        self.samples = samples[: config.val_samples]
        self.loss_settings = config.loss_settings()
        self.builder = BatchBuilder(
            self.samples,
            train_builder.processor,
            train_builder.codec,
            ConditionDropout(0.0, 0.0, 0.0),  # the full condition, always
            train_builder.device,
            train_builder.keep_raw_resolution,
        )
        self.config, self.runtime = config, runtime

    def _batches(self, resolution: int, batch_size: int) -> Iterator[list[int]]:
        for indices in group_by_size(self.builder.target_sizes(resolution)):
            for start in range(0, len(indices), batch_size):
                yield indices[start : start + batch_size]

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, resolution: int, batch_size: int) -> float:
        """The weighted mean velocity loss (edit weighting as in training) over the validation rows."""
        config, runtime = self.config, self.runtime
        totals = torch.zeros(2, dtype=torch.float64)
        was_training = model.training
        model.eval()
        try:
            for indices in self._batches(resolution, batch_size * runtime.world):
                batch, generators, _ = self.builder.rank_batch(
                    indices, resolution, config.seed + VAL_SEED_OFFSET, 0, runtime.rank, runtime.world
                )
                result = flow_matching_loss(model, batch, generators, self.loss_settings)
                weights = batch.weights.cpu().double()  # pads weigh 0
                totals += torch.stack([(result.per_sample.cpu().double() * weights).sum(), weights.sum()])
        finally:
            model.train(was_training)
        totals = distributed.all_reduce_sum(totals, runtime)
        return (totals[0] / totals[1]).item()


@contextlib.contextmanager
def swapped_in(params: dict[str, torch.Tensor], values: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Temporarily copy ``values`` (e.g. the EMA) into ``params``, name by name; nothing if None."""
    if values is None:
        yield
        return
    saved = {name: p.detach().clone() for name, p in params.items()}
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(values[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
