"""Sampling-side data policy for training: condition dropout, aspect-ratio buckets, sharded batches.

Owns: which condition branch a training sample gets (for classifier-free guidance), which resolution
bucket an image goes to, and which sample indices each rank sees per epoch. Does not open images,
tokenise or touch tensors of pixels. All randomness comes from an explicit torch.Generator or seed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch

from omnigen.text.tags import IMAGE_TAG_PATTERN, image_tag, validate_image_tags
from omnigen.util.checks import check_choice, check_float, check_int

logger = logging.getLogger(__name__)

DropChoice = Literal["keep", "drop_text", "drop_images", "drop_both"]
DROP_CHOICES: tuple[DropChoice, ...] = ("keep", "drop_text", "drop_images", "drop_both")
DEFAULT_RATIOS: tuple[float, ...] = (1 / 2, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 2.0)  # width / height

_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------------
# Condition dropout
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConditionDropout:
    """Drop the text, the input images or both with fixed probabilities (the rest is "keep").

    The three branches are what OmniGen's guidance needs at inference: the unconditional branch
    (drop_both) and the image-only branch (drop_text, where the prompt is just the image tags).
    """

    p_drop_text: float
    p_drop_images: float
    p_drop_both: float

    def __post_init__(self) -> None:
        for name in ("p_drop_text", "p_drop_images", "p_drop_both"):
            object.__setattr__(self, name, check_float(name, getattr(self, name), 0, 1))
        total = self.p_drop_text + self.p_drop_images + self.p_drop_both
        if total > 1.0 + 1e-9:
            raise ValueError(
                f"p_drop_text + p_drop_images + p_drop_both must be <= 1, got {total!r} "
                f"({self.p_drop_text!r} + {self.p_drop_images!r} + {self.p_drop_both!r})"
            )

    def sample(self, generator: torch.Generator) -> DropChoice:
        """Draw one choice from a (CPU) generator: one uniform number per call."""
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        draw = float(torch.rand((), generator=generator))
        threshold = 0.0
        for choice, probability in (
            ("drop_text", self.p_drop_text),
            ("drop_images", self.p_drop_images),
            ("drop_both", self.p_drop_both),
        ):
            threshold += probability
            if draw < threshold:
                return choice
        return "keep"

    @staticmethod
    def apply(instruction: str, images: Sequence[_T], choice: DropChoice) -> tuple[str, list[_T]]:
        """Apply `choice` to one sample; tag k of `instruction` refers to images[k-1].

        keep: unchanged. drop_text: the text becomes the image tags 1..n joined by spaces (OmniGen's
        image-only CFG prompt), images kept. drop_images: images and their tags removed, the rest of the
        text kept with whitespace tidied. drop_both: ("", []). Returns a new list; inputs not mutated.
        """
        check_choice("choice", choice, DROP_CHOICES)
        validate_image_tags(instruction, len(images))
        if choice == "keep":
            return instruction, list(images)
        if choice == "drop_text":
            return " ".join(image_tag(k) for k in range(1, len(images) + 1)), list(images)
        if choice == "drop_images":
            return _remove_image_tags(instruction), []
        return "", []


def _remove_image_tags(text: str) -> str:
    text = IMAGE_TAG_PATTERN.sub(" ", text)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" ?\n ?", "\n", text)
    return text.strip()


# --------------------------------------------------------------------------------------------------
# Aspect-ratio buckets; a bucket is (height, width)
# --------------------------------------------------------------------------------------------------


def make_buckets(
    max_pixels: int, multiple: int = 16, ratios: Sequence[float] = DEFAULT_RATIOS
) -> list[tuple[int, int]]:
    """(height, width) buckets, one per ratio (width / height), sides multiples of `multiple`.

    Each bucket is the largest one with height * width <= max_pixels, sides rounded down. Returned
    sorted by ratio, duplicates removed.
    """
    max_pixels = check_int("max_pixels", max_pixels, 1)
    multiple = check_int("multiple", multiple, 1)
    if max_pixels < multiple * multiple:
        raise ValueError(f"max_pixels must be >= multiple**2 = {multiple * multiple}, got {max_pixels}")
    if len(ratios) == 0:
        raise ValueError("ratios must not be empty")
    buckets: set[tuple[int, int]] = set()
    for ratio in ratios:
        ratio = check_float("ratios", ratio, 0, low_open=True)
        buckets.add(_bucket_for_ratio(max_pixels, multiple, ratio))
    return sorted(buckets, key=lambda bucket: (bucket[1] / bucket[0], bucket[0]))


def _bucket_for_ratio(max_pixels: int, multiple: int, ratio: float) -> tuple[int, int]:
    height = math.sqrt(max_pixels / ratio)
    height_units = max(1, math.floor(height / multiple + 1e-9))
    width_units = max(1, math.floor(height * ratio / multiple + 1e-9))
    while height_units * width_units * multiple * multiple > max_pixels:  # float rounding guard
        if height_units >= width_units and height_units > 1:
            height_units -= 1
        elif width_units > 1:
            width_units -= 1
        else:
            break
    if height_units * width_units * multiple * multiple > max_pixels:
        raise ValueError(f"ratio {ratio!r} is too extreme for max_pixels={max_pixels}, multiple={multiple}")
    return height_units * multiple, width_units * multiple


def bucket_for(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) bucket whose aspect ratio is closest (in log space); ties -> larger area."""
    height, width = check_int("height", height, 1), check_int("width", width, 1)
    if len(buckets) == 0:
        raise ValueError("buckets must not be empty")
    for bucket in buckets:
        if len(bucket) != 2 or bucket[0] <= 0 or bucket[1] <= 0:
            raise ValueError(f"each bucket must be a (height, width) pair of positive ints, got {bucket!r}")
    log_ratio = math.log(width / height)

    def key(bucket: tuple[int, int]) -> tuple[float, int]:
        distance = abs(math.log(bucket[1] / bucket[0]) - log_ratio)
        return round(distance, 9), -bucket[0] * bucket[1]

    return tuple(min(buckets, key=key))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Sharded, bucketed batch sampler
# --------------------------------------------------------------------------------------------------


class ShardedBucketSampler:
    """Yields this rank's batches of sample indices; every batch holds one bucket key.

    Per epoch (seed, epoch) fix one global order: indices are shuffled within each bucket, cut into
    batches of `batch_size` (a bucket's last batch may be smaller), and the batches are shuffled. Batch
    i goes to rank i % num_replicas, so ranks never share a sample. If the batch count is not a multiple
    of num_replicas: with drop_last=False, batches from the start of the order are repeated to pad it
    (those samples are then seen twice that epoch); with drop_last=True the last batches are dropped,
    and so are the smaller per-bucket remainders. Every rank yields len(self) batches.

    Length grouping (`lengths` given, `length_groups` = g > 1): within a bucket, each run of g batches'
    worth of shuffled samples is sorted by length before it is cut into batches, so a batch holds
    samples of similar sequence length and pads little (the "sortish" sampler of fairseq / HF's
    group_by_length); which samples share a run stays random. g = 1 is the plain order above.

    Resume: `position` counts batches already handed out in `epoch`; state_dict()/load_state_dict()
    carry both. set_epoch(e) resets position to 0 only when e differs from the current epoch, so the
    usual `for e in range(start, n): sampler.set_epoch(e)` continues a loaded state. With DataLoader
    workers, batches are prefetched, so save the count of batches actually trained on instead.
    """

    def __init__(
        self,
        sizes: Sequence[tuple[int, int]],
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        drop_last: bool = False,
        lengths: Sequence[int] | None = None,
        length_groups: int = 1,
    ) -> None:
        batch_size = check_int("batch_size", batch_size, 1)
        length_groups = check_int("length_groups", length_groups, 1)
        if lengths is not None and len(lengths) != len(sizes):
            raise ValueError(f"lengths has {len(lengths)} entries for {len(sizes)} samples")
        num_replicas = check_int("num_replicas", num_replicas, 1)
        rank = check_int("rank", rank, 0, num_replicas - 1)
        seed = check_int("seed", seed)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.lengths = None if lengths is None else list(lengths)
        self.length_groups = length_groups
        self.num_samples = len(sizes)
        self._buckets = group_by_size(sizes)
        self._length = self._count_rank_batches()
        self.epoch = 0
        self.position = 0
        if self._length == 0:
            logger.warning(
                "ShardedBucketSampler gives rank %d no batches (%d samples, batch_size=%d, drop_last=%s)",
                rank,
                self.num_samples,
                batch_size,
                self.drop_last,
            )

    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        epoch = check_int("epoch", epoch, 0)
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches()
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield list(batch)

    def _group_by_length(self, shuffled: list[int]) -> list[int]:
        if self.lengths is None or self.length_groups == 1:
            return shuffled
        run = self.batch_size * self.length_groups
        lengths = self.lengths
        return [
            i
            for start in range(0, len(shuffled), run)
            for i in sorted(shuffled[start : start + run], key=lambda i: lengths[i])
        ]

    def epoch_batches(self) -> list[list[int]]:
        """All of this rank's batches for the current epoch, ignoring `position`."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        batches: list[list[int]] = []
        for indices in self._buckets:
            order = torch.randperm(len(indices), generator=generator).tolist()
            shuffled = self._group_by_length([indices[i] for i in order])
            for start in range(0, len(shuffled), self.batch_size):
                batch = shuffled[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        order = torch.randperm(len(batches), generator=generator).tolist()
        batches = _fit_to_replicas([batches[i] for i in order], self.num_replicas, self.drop_last)
        return batches[self.rank :: self.num_replicas]

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_replicas": self.num_replicas,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore (epoch, position); other keys, if present, must match this sampler's settings."""
        for key in ("epoch", "position"):
            check_int(f"state[{key!r}]", state.get(key), 0)
        for key in ("seed", "num_replicas", "batch_size", "num_samples"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"state[{key!r}] is {state[key]!r} but this sampler has {getattr(self, key)!r}"
                )
        if state["position"] > self._length:
            raise ValueError(f"state['position'] must be <= {self._length} batches, got {state['position']}")
        self.epoch = state["epoch"]
        self.position = state["position"]

    def _count_rank_batches(self) -> int:
        total = 0
        for indices in self._buckets:
            full, remainder = divmod(len(indices), self.batch_size)
            total += full + (1 if remainder and not self.drop_last else 0)
        if self.drop_last:
            return total // self.num_replicas
        return math.ceil(total / self.num_replicas) if total else 0


def group_by_size(sizes: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Sample indices grouped by (height, width), groups in sorted size order, indices in order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, key in enumerate(sizes):
        if not isinstance(key, (tuple, list)) or len(key) != 2:
            raise ValueError(f"sizes[{index}] must be a (height, width) pair of ints, got {key!r}")
        key = (check_int(f"sizes[{index}] height", key[0]), check_int(f"sizes[{index}] width", key[1]))
        groups.setdefault((key[0], key[1]), []).append(index)
    return [groups[key] for key in sorted(groups)]


def _fit_to_replicas(batches: list[list[int]], num_replicas: int, drop_last: bool) -> list[list[int]]:
    remainder = len(batches) % num_replicas
    if remainder == 0 or not batches:
        return batches
    if drop_last:
        return batches[: len(batches) - remainder]
    padding = num_replicas - remainder
    return batches + [batches[i % len(batches)] for i in range(padding)]


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The CPU generator of one sample's draws at one step (dropout, then t, then noise)."""
    digest = hashlib.blake2b(f"{seed}/{step}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def shard(indices: list[int], rank: int, world: int) -> tuple[list[int], list[bool]]:
    """Rank ``rank``'s contiguous slice of a global batch, padded to ceil(len / world) with copies of the
    first sample; the flags say which entries are real (pads get zero weight)."""
    per_rank = math.ceil(len(indices) / world)
    local = indices[rank * per_rank : (rank + 1) * per_rank]
    pad = per_rank - len(local)
    return local + [indices[0]] * pad, [True] * len(local) + [False] * pad
