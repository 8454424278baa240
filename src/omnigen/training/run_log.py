"""What a run reports, on rank 0 only: ``loss.jsonl`` (one line per optimizer step), ``val.jsonl`` (one
line per validation), the progress bar, and every ``log_every`` steps a log line with the loss per t-bin.

On a resumed run the two files keep their lines up to the resumed step and drop the rest, so every step
appears once.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TextIO

import torch
from tqdm.auto import tqdm

from omnigen.training.config import TrainConfig
from omnigen.training.step import T_BINS, StepResult

logger = logging.getLogger(__name__)


def open_loss_log(path: Path, step: int) -> TextIO:
    """``loss.jsonl`` or ``val.jsonl`` opened for appending; lines past a resumed ``step`` are dropped."""
    kept = []
    if step > 0 and path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
    return path.open("a")


class RunLog:
    """A context manager; ``step`` records every optimizer step, ``validation`` every validation."""

    def __init__(self, config: TrainConfig, out: Path, step: int, main: bool, validating: bool) -> None:
        self.config, self.main = config, main
        # rank 0 draws a progress bar on a terminal only (tqdm's disable=None), other ranks never
        self.progress = tqdm(
            total=config.total_steps, initial=step, disable=None if main else True, desc="train"
        )
        self.losses = open_loss_log(out / "loss.jsonl", step) if main else None
        self.val = open_loss_log(out / "val.jsonl", step) if main and validating else None
        self.bins = torch.zeros(T_BINS, 2)  # loss sum, count per t-bin since the last log line
        self.started, self.seen = time.perf_counter(), 0

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.close()
        for file in (self.losses, self.val):
            if file is not None:
                file.close()

    def step(self, step: int, result: StepResult, lr: float) -> None:
        """Record optimizer step ``step`` (1-based: steps done), trained at learning rate ``lr``."""
        self.bins += result.bins
        self.seen += result.samples
        self.progress.update(1)
        if not self.main:
            return
        elapsed = time.perf_counter() - self.started  # seconds since this process began training
        record = {"step": step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm, "time": elapsed}
        self.losses.write(json.dumps(record) + "\n")
        self.losses.flush()
        if step % self.config.log_every == 0 or step == self.config.total_steps:
            per_bin = (self.bins[:, 0] / self.bins[:, 1].clamp(min=1)).tolist()
            rate = self.seen / (time.perf_counter() - self.started)
            self.progress.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}", sps=f"{rate:.1f}")
            logger.info(
                "step %d loss %.4f lr %.2e samples/s %.1f loss by t-bin %s",
                step,
                result.loss,
                lr,
                rate,
                " ".join(f"{v:.3f}" for v in per_bin),
            )
            self.bins.zero_()

    def validation(self, step: int, val_loss: float, weights: str) -> None:
        """Record a validation loss at ``step``, computed with ``weights`` ('ema' or 'model')."""
        if not self.main:
            return
        self.val.write(json.dumps({"step": step, "val_loss": val_loss, "weights": weights}) + "\n")
        self.val.flush()
        logger.info("step %d validation loss %.4f (%s weights)", step, val_loss, weights)
