"""From X2I samples to model-ready training batches, through the inference processor and ``collate``
(one code path for both).

Image sizes. Square mode (the default): every image, input or target, is resized to cover a
``resolution`` x ``resolution`` square and centre-cropped. ``keep_raw_resolution``: ``resolution**2`` is
the pixel budget of the output image. Each target goes to the aspect-ratio bucket (``make_buckets``:
sides multiples of the model's ``image_multiple``, area <= resolution**2, scaled down to sides <=
its ``max_image_size``) closest to its own ratio, read once from the file header, and is resized to cover
the bucket and centre-cropped; inputs go through the processor's ``prepare_image(resolution)``, exactly
as at inference (long side <= resolution, sides cropped to multiples). ``target_sizes`` gives the sampler
each sample's bucket, so a batch shares one output size.

Latents come from the codec, or from a ``LatentCache`` when one is given (then a cached image is not even
decoded: the processor only needs its size). Without a cache, decoded pixels are kept in memory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image

from omnigen.config import OmniGenConfig
from omnigen.model.vae import LatentCodec
from omnigen.text.collate import collate
from omnigen.text.processor import OmniGenProcessor, load_image, to_tensor
from omnigen.text.tags import IMAGE_TAG_PATTERN
from omnigen.text.tokenizer import TextTokenizer
from omnigen.training.config import TrainConfig
from omnigen.training.latent_cache import LatentCache, codec_fingerprint
from omnigen.training.sampling_data import ConditionDropout, bucket_for, make_buckets, sample_generator, shard
from omnigen.training.stream import parse_sources
from omnigen.training.x2i import X2ISample, compose_instruction, read_x2i
from omnigen.types import Condition

Size = tuple[int, int]  # (height, width) in pixels

_WORDS = re.compile(r"\w+|[^\w\s]")


@dataclass
class TrainBatch:
    condition: Condition
    x1: torch.Tensor  # (B, C, h, w) target latents
    reference: torch.Tensor  # (B, C, h, w) the edited input's latents (zeros where none)
    has_reference: torch.Tensor  # (B,) bool
    weights: torch.Tensor  # (B,) sample weights


@dataclass(frozen=True)
class ImageView:
    """One image file processed one way: ``fill`` = (height, width) to cover and centre-crop to, or
    ``fit`` = the max side given to the inference processor's ``prepare_image``."""

    path: Path
    fill: Size | None = None
    fit: int | None = None

    def spec(self, multiple: int) -> str:
        """How the view is made, as a latent cache key part (with the model's image multiple)."""
        return (f"fill:{self.fill[0]}x{self.fill[1]}" if self.fill else f"fit:{self.fit}") + f":{multiple}"


def fill_pixels(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """(3, height, width) in [-1, 1]: scale (bicubic) to cover the box, then centre crop."""
    scale = max(height / image.height, width / image.width)
    if scale != 1:
        size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(size, resample=Image.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return to_tensor(image.crop((left, top, left + width, top + height)))


def read_samples(config: TrainConfig) -> list[X2ISample]:
    """The run's JSONL samples, read once per run (the run's tokenizer words come from them too, with
    ``extend_tokenizer``); none when ``data`` names tar shards (the stream brings those,
    ``ShardBatchStream``). ValueError when ``data`` mixes the two."""
    jsonl, shards = parse_sources(config.data)
    if jsonl and shards:
        raise ValueError(
            f"data mixes JSONL files {jsonl} with tar shards: write the JSONL into shards too "
            "(omnigen data shards --jsonl ... --images ... --out DIR) and list DIR's shards"
        )
    if shards and config.latent_cache is not None:
        raise ValueError("latent_cache reads images from files: set it to null when data names shards")
    if not jsonl:
        return []
    return read_x2i(
        jsonl, image_root=config.image_root, on_bad_row=config.on_bad_row, check_images=config.check_images
    ).samples


class BatchBuilder:
    def __init__(
        self,
        samples: list[X2ISample],
        processor: OmniGenProcessor,
        codec: LatentCodec,
        dropout: ConditionDropout,
        device: torch.device,
        keep_raw_resolution: bool = False,
        cache: LatentCache | None = None,
    ) -> None:
        self.samples = samples
        self.processor = processor
        self.codec = codec
        self.dropout = dropout
        self.device = device
        self.keep_raw_resolution = keep_raw_resolution
        self.cache = cache
        self._sizes: dict[int, list[Size]] = {}  # resolution -> each sample's target size
        self._raw_sizes: dict[Path, Size] = {}
        # with a cache each view is decoded about once, so holding its pixels would only cost memory
        self._pixels = (
            self._load_pixels if cache is not None else lru_cache(maxsize=200_000)(self._load_pixels)
        )

    @classmethod
    def from_config(
        cls,
        config: TrainConfig,
        tokenizer: TextTokenizer,
        codec: LatentCodec,
        model_config: OmniGenConfig,
        device: torch.device,
        rank: int = 0,
        samples: list[X2ISample] | None = None,
    ) -> BatchBuilder:
        """The trainer's builder: its samples (``samples`` when the run has read them already, else
        ``read_samples(config)``), processor, dropout and (per-rank writer) latent cache."""
        if samples is None:
            samples = read_samples(config)
        processor = OmniGenProcessor(
            tokenizer, model_config, max_input_image_size=max(s.resolution for s in config.stages)
        )
        dropout = ConditionDropout(config.drop_text, config.drop_images, config.drop_both)
        cache = None
        if config.latent_cache is not None:
            fingerprint = codec_fingerprint(codec, config.codec)
            cache = LatentCache(config.latent_cache, fingerprint, writer=f"rank{rank}")
        return cls(samples, processor, codec, dropout, device, config.keep_raw_resolution, cache)

    def reset_samples(self, samples: list[X2ISample]) -> None:
        """Replace the samples (a streamed step's), forgetting what was read about the old ones."""
        self.samples = samples
        self._sizes.clear()
        self._raw_sizes.clear()
        self._pixels = (
            self._load_pixels if self.cache is not None else lru_cache(maxsize=200_000)(self._load_pixels)
        )

    # ------------------------------------------------------------------ sizes
    def buckets(self, resolution: int) -> list[Size]:
        """``make_buckets(resolution**2)``, a bucket with a side over the model's max_image_size scaled
        down (sides rounded down to multiples) until it fits."""
        multiple, largest = self.processor.config.image_multiple, self.processor.config.max_image_size
        buckets = set()
        for height, width in make_buckets(resolution * resolution, multiple):
            scale = min(1.0, largest / max(height, width))
            height, width = (
                max(1, math.floor(side * scale / multiple + 1e-9)) * multiple for side in (height, width)
            )
            buckets.add((height, width))
        return sorted(buckets, key=lambda bucket: (bucket[1] / bucket[0], bucket[0]))

    def raw_size(self, path: Path) -> Size:
        """(height, width) from the file header, read once."""
        if path not in self._raw_sizes:
            with Image.open(path) as image:
                self._raw_sizes[path] = (image.height, image.width)
        return self._raw_sizes[path]

    def target_sizes(self, resolution: int) -> list[Size]:
        """Each sample's output size at this stage: its bucket, or the square."""
        if resolution not in self._sizes:
            if self.keep_raw_resolution:
                buckets = self.buckets(resolution)
                sizes = [bucket_for(*self.raw_size(s.output_image), buckets) for s in self.samples]
            else:
                sizes = [(resolution, resolution)] * len(self.samples)
            self._sizes[resolution] = sizes
        return self._sizes[resolution]

    def sequence_lengths(self, resolution: int) -> list[int]:
        """Each sample's approximate sequence length at this stage (words and punctuation of the composed
        instruction plus each input image's tokens at `resolution` and its <img> </img> pair), for the
        sampler's length grouping."""
        per_side = resolution // self.processor.config.image_multiple
        lengths = []
        for sample in self.samples:
            text, images = compose_instruction(sample)
            lengths.append(
                len(_WORDS.findall(IMAGE_TAG_PATTERN.sub(" ", text))) + len(images) * (per_side**2 + 2)
            )
        return lengths

    # ------------------------------------------------------------------ views of one sample
    def _input_view(self, path: Path, resolution: int) -> ImageView:
        if self.keep_raw_resolution:
            return ImageView(path, fit=resolution)
        return ImageView(path, fill=(resolution, resolution))

    def _reference_view(self, sample: X2ISample, paths: list[Path], size: Size) -> ImageView | None:
        """An edit (one input, the target's raw size) compares the target with its input at the target's
        size; in square mode every single-input sample counts, as all its images are squared alike."""
        if len(paths) != 1:
            return None
        if self.keep_raw_resolution and self.raw_size(paths[0]) != self.raw_size(sample.output_image):
            return None
        return ImageView(paths[0], fill=size)

    def views(self, index: int, resolution: int) -> list[ImageView]:
        """Every view sample ``index`` may use at this resolution (for ``precompute``)."""
        sample = self.samples[index]
        _, paths = compose_instruction(sample)
        size = self.target_sizes(resolution)[index]
        views = [self._input_view(p, resolution) for p in paths] + [ImageView(sample.output_image, fill=size)]
        reference = self._reference_view(sample, paths, size)
        return views + ([reference] if reference is not None else [])

    # ------------------------------------------------------------------ batches
    def __call__(
        self,
        indices: list[int],
        resolution: int,
        generators: torch.Generator | Sequence[torch.Generator],
    ) -> TrainBatch:
        """``generators``: one per sample (its dropout draw), or one shared by the whole batch."""
        if isinstance(generators, torch.Generator):
            generators = [generators] * len(indices)
        if len(generators) != len(indices):
            raise ValueError(f"got {len(generators)} generators for {len(indices)} samples")
        sizes = {self.target_sizes(resolution)[i] for i in indices}
        if len(sizes) != 1:
            raise ValueError(f"a batch must share one target size, got {sorted(sizes)} for {indices}")
        size = sizes.pop()
        prompts, latents, targets, references, has_reference, weights = [], [], [], [], [], []
        for index, generator in zip(indices, generators, strict=True):
            sample = self.samples[index]
            encoded: dict[ImageView, tuple[torch.Tensor, torch.Tensor]] = {}  # this sample's (pixels, latent)
            instruction, paths = compose_instruction(sample)
            choice = self.dropout.sample(generator)
            instruction, kept = ConditionDropout.apply(
                instruction, [self._input_view(p, resolution) for p in paths], choice
            )
            pixels = [self._encode(view, encoded)[0] for view in kept]
            prompt = self.processor(instruction, pixels)
            prompts.append(prompt)
            # the processor passes tensors through, reordered as their tags appear; match them by identity
            latent_of = {id(encoded[view][0]): encoded[view][1] for view in kept}
            latents.append([latent_of[id(p)] for p in prompt.pixel_values])
            target = self._encode(ImageView(sample.output_image, fill=size), encoded)[1]
            targets.append(target)
            reference = self._reference_view(sample, paths, size) if len(kept) == 1 else None
            references.append(
                self._encode(reference, encoded)[1] if reference is not None else torch.zeros_like(target)
            )
            has_reference.append(reference is not None)
            weights.append(sample.weight)
        condition = collate(prompts, latents, self.processor.config.transformer.pad_token_id)
        return TrainBatch(
            condition=condition.to(self.device),
            x1=torch.stack(targets),
            reference=torch.stack(references),
            has_reference=torch.tensor(has_reference, device=self.device),
            weights=torch.tensor(weights, dtype=torch.float32, device=self.device),
        )

    def rank_batch(
        self, indices: list[int], resolution: int, seed: int, step: int, rank: int, world: int
    ) -> tuple[TrainBatch, list[torch.Generator], list[bool]]:
        """Rank ``rank``'s slice of a global batch (``shard``) with each sample's own draws
        (``sample_generator(seed, step, index)``), so any split over ranks draws the same t, noise and
        dropout per sample; pads get weight 0. Returns the batch, its generators and the real flags."""
        local, real = shard(indices, rank, world)
        generators = [sample_generator(seed, step, i) for i in local]
        batch = self(local, resolution, generators)
        batch.weights = batch.weights * torch.tensor(real, device=self.device)
        return batch, generators, real

    def precompute(self, indices: Sequence[int], resolution: int) -> int:
        """Encode into the cache every view of these samples; returns how many were not there yet."""
        if self.cache is None:
            raise ValueError("precompute needs a latent cache")
        misses = self.cache.misses
        for index in indices:
            for view in self.views(index, resolution):
                self._encode_view(view)
        self.cache.flush()
        return self.cache.misses - misses

    # ------------------------------------------------------------------ one image
    def _encode(
        self, view: ImageView, memo: dict[ImageView, tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if view not in memo:
            memo[view] = self._encode_view(view)
        return memo[view]

    def _encode_view(self, view: ImageView) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixels, latent) of one view. A cached latent comes with a zero-stride stand-in for its pixels,
        of the right size: the processor reads only the size, the latents go to ``collate``."""
        key = None
        if self.cache is not None:
            key = self.cache.key(view.path, view.spec(self.processor.config.image_multiple))
            latent = self.cache.get(key)
            if latent is not None:
                height, width = (side * self.codec.downsample for side in latent.shape[-2:])
                return torch.zeros(()).expand(3, height, width), latent.to(self.device)
        stat = view.path.stat()
        pixels = self._pixels(view, (stat.st_mtime_ns, stat.st_size))
        latent = self.codec.encode(pixels[None].to(self.device))[0]
        if key is not None:
            self.cache.put(key, latent)
        return pixels, latent

    def _load_pixels(self, view: ImageView, stamp: tuple[int, int]) -> torch.Tensor:
        """``stamp`` (mtime, bytes) is only part of the memo key, so a changed file is read again."""
        if view.fit is not None:
            return self.processor.prepare_image(view.path, view.fit)
        return fill_pixels(load_image(view.path), *view.fill)
