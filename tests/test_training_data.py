"""Training data: aspect-ratio buckets with ``keep_raw_resolution`` and the on-disk latent cache.

A tiny X2I file of square, landscape (3:2) and portrait (1:2) images, a pixel-space (identity) codec and
the tiny PIXEL_MODEL of test_training (sides multiples of 4, at most 32).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from omnigen.model.vae import IdentityCodec
from omnigen.training import trainer
from omnigen.training.batches import BatchBuilder, fill_pixels
from omnigen.training.latent_cache import LatentCache
from omnigen.training.sampling_data import ShardedBucketSampler, shard
from omnigen.training.trainer import precompute_latents, train
from test_training import make_config

SHAPES = {"square": (16, 16), "wide": (16, 24), "tall": (32, 16)}  # (height, width) of the files
BUCKETS = {"square": (16, 16), "wide": (12, 16), "tall": (20, 8)}  # at resolution 16, multiple 4


@pytest.fixture(scope="module")
def raw_world(tmp_path_factory):
    """Per shape: a text-to-image sample and an edit (input of the output's size); plus a subject sample
    whose input (wide) differs from its output (square)."""
    from omnigen.miniworld.world import save_tokenizer

    root = tmp_path_factory.mktemp("raw_world")
    rng = np.random.default_rng(0)

    def image(name, shape):
        Image.fromarray(rng.integers(0, 256, (*SHAPES[shape], 3), dtype=np.uint8)).save(root / name)
        return name

    rows = []
    for shape in SHAPES:
        rows.append(
            {
                "instruction": f"a red {shape} circle",
                "input_images": [],
                "output_image": image(f"{shape}_t2i.png", shape),
            }
        )
        rows.append(
            {
                "instruction": "make it blue <img><|image_1|></img>",
                "input_images": [image(f"{shape}_in.png", shape)],
                "output_image": image(f"{shape}_out.png", shape),
            }
        )
    rows.append(
        {
            "instruction": "put the cat on the left <img><|image_1|></img>",
            "input_images": ["wide_in.png"],
            "output_image": "square_out.png",
        }
    )
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    save_tokenizer(root / "tokenizer.json")
    return root


def raw_config(root, out, steps, batch_size=2, **kw):
    stage = {"resolution": 16, "steps": steps, "batch_size": batch_size, "lr": 3e-3}
    kw.setdefault("stages", [stage])
    return make_config(root, out, steps, keep_raw_resolution=True, warmup_steps=0, **kw)


def builder_for(config, codec=None):
    from omnigen.config import OmniGenConfig
    from omnigen.text.tokenizer import Tokenizer

    model_config = OmniGenConfig.from_dict(config.model)
    tokenizer = Tokenizer.from_file(config.tokenizer)
    return BatchBuilder.from_config(
        config, tokenizer, codec or IdentityCodec(), model_config, torch.device("cpu")
    )


class CountingCodec(IdentityCodec):
    calls = 0

    def encode(self, pixels):
        CountingCodec.calls += 1
        return super().encode(pixels)


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()]


def test_bucketed_batches_share_a_size_keep_aspect_and_use_the_inference_processor(raw_world, tmp_path):
    builder = builder_for(raw_config(raw_world, tmp_path, 1))
    samples, processor = builder.samples, builder.processor
    sizes = builder.target_sizes(16)
    for sample, size in zip(samples, sizes):
        shape = sample.output_image.name.split("_")[0]
        assert size == BUCKETS[shape]  # the bucket nearest the file's own ratio: orientation kept
    capped = builder.buckets(32)  # make_buckets(32**2) has sides > 32: scaled down, not dropped
    assert len(capped) == 5 and max(max(b) for b in capped) == 32
    sampler = ShardedBucketSampler(sizes, 2, seed=0)
    seen = 0
    for indices in sampler:
        batch = builder(indices, 16, torch.Generator().manual_seed(0))
        assert {sizes[i] for i in indices} == {tuple(batch.x1.shape[-2:])}
        for row, index in enumerate(indices):
            sample = samples[index]
            target = fill_pixels(Image.open(sample.output_image).convert("RGB"), *sizes[index])
            assert torch.equal(batch.x1[row], target)
            for path, latent in zip(sample.input_images, batch.condition.image_latents[row]):
                assert torch.equal(latent, processor.prepare_image(path, 16))  # exactly as at inference
            same_size = bool(sample.input_images) and "cat" not in sample.instruction
            assert bool(batch.has_reference[row]) == same_size  # edits only (no dropout in this config)
        seen += len(indices)
    assert seen == len(samples)
    # two ranks slice one global batch, so both slices hold the same size
    for indices in ShardedBucketSampler(sizes, 3, seed=1):
        slices = [shard(indices, rank, 2)[0] for rank in range(2)]
        assert len({sizes[i] for part in slices for i in part}) == 1


def test_trains_with_raw_resolution_over_two_stages(raw_world, tmp_path):
    stages = [
        {"resolution": 16, "steps": 2, "batch_size": 2, "lr": 3e-3},
        {"resolution": 24, "steps": 2, "batch_size": 3, "lr": 1e-3},
    ]
    config = raw_config(raw_world, tmp_path, 4, stages=stages, drop_text=0.3, drop_images=0.2)
    assert builder_for(config).target_sizes(24)[0] == (24, 24)
    train(config, device="cpu")
    curve = losses(tmp_path)
    assert len(curve) == 4 and all(np.isfinite(curve))
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_latent_cache_is_read_back_and_gives_the_same_losses(raw_world, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "_make_codec", lambda *args: CountingCodec())
    curves, calls = {}, {}
    for name, cache in (("plain", None), ("fill", tmp_path / "cache"), ("read", tmp_path / "cache")):
        CountingCodec.calls = 0
        train(raw_config(raw_world, tmp_path / name, 3, drop_text=0.3, latent_cache=cache and str(cache)))
        curves[name], calls[name] = losses(tmp_path / name), CountingCodec.calls
    assert calls["plain"] > 0 and calls["fill"] > 0
    assert calls["read"] == 0  # every latent came from disk
    assert len(curves["plain"]) == 3 and len(set(curves["plain"])) == 3
    assert curves["plain"] == curves["fill"] == curves["read"]  # bit for bit
    files = os.listdir(tmp_path / "cache")
    assert not [f for f in files if f.endswith(".tmp")]
    assert any(f.startswith("index-rank0-") and f.endswith(".json") for f in files)


def test_precompute_and_invalidation_of_a_changed_image(raw_world, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "_make_codec", lambda *args: CountingCodec())
    config = raw_config(raw_world, tmp_path / "run", 1, latent_cache=str(tmp_path / "cache"))
    first = precompute_latents(config, device="cpu")
    assert first > 0 and precompute_latents(config, device="cpu") == 0
    # split over two writers: both sets of shards are read back by a fresh cache
    other = raw_config(raw_world, tmp_path / "run", 1, latent_cache=str(tmp_path / "cache2"))
    assert precompute_latents(other, "cpu", rank=0, world=2) + precompute_latents(other, "cpu", 1, 2) == first
    assert precompute_latents(other, "cpu") == 0

    path = raw_world / "tall_t2i.png"
    original = path.read_bytes()
    try:
        changed = np.full((*SHAPES["tall"], 3), 200, dtype=np.uint8)
        Image.fromarray(changed).save(path)
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
        assert precompute_latents(config, device="cpu") == 1  # only the changed file's one view
        builder = builder_for(config)
        index = next(i for i, s in enumerate(builder.samples) if s.output_image == path)
        batch = builder([index], 16, torch.Generator().manual_seed(0))
        assert builder.cache.hits > 0 and builder.cache.misses == 0
        assert torch.allclose(batch.x1[0], torch.full((3, *BUCKETS["tall"]), 200 / 255 * 2 - 1))
    finally:
        path.write_bytes(original)


def test_latent_cache_unit_round_trip(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not read")
    cache = LatentCache(tmp_path / "c", "codec", writer="rank1", flush_every=2)
    key = cache.key(tmp_path / "a.png", "fill:4x4")
    assert cache.get(key) is None
    value = torch.randn(3, 4, 4)
    cache.put(key, value)
    assert torch.equal(cache.get(key), value)  # pending
    cache.put(cache.key(tmp_path / "a.png", "fit:8"), value * 2)  # second put: flushed
    again = LatentCache(tmp_path / "c", "codec", writer="rank0")
    assert len(again) == 2 and torch.equal(again.get(key), value)
    assert LatentCache(tmp_path / "c", "other codec").key(tmp_path / "a.png", "fill:4x4") != key
    for file in (tmp_path / "c").glob("*.safetensors"):
        file.unlink()
    assert again.get(key) is None  # a lost shard is a miss, not an error


def test_resume_with_raw_resolution_and_latent_cache(raw_world, tmp_path):
    def config(name):
        return raw_config(
            raw_world,
            tmp_path / name,
            6,
            ema_decay=0.9,
            drop_text=0.3,
            t_distribution="logit_normal",
            latent_cache=str(tmp_path / "cache"),
        )

    train(config("a"), device="cpu")
    train(config("b"), device="cpu", stop_after=3)
    train(config("b"), device="cpu")
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "checkpoints" / "step_00000006" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step_00000006" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_two_ranks_slice_each_bucket_like_one_process(raw_world, tmp_path):
    """torchrun DDP, 2 ranks x batch 2 == 1 process x batch 4: each global batch is one bucket (3, 2 and
    2 samples here, so slices get padded); each rank fills the latent cache with its own shards."""
    from test_distributed import TOLERANCE, torchrun

    def config(name, batch_size, **kw):
        return raw_config(
            raw_world,
            tmp_path / name,
            4,
            batch_size=batch_size,
            drop_text=0.3,
            t_distribution="logit_normal",
            latent_cache=str(tmp_path / f"cache_{name}"),
            **kw,
        )

    train(config("one", 4), device="cpu")
    torchrun(config("two", 2, distributed="ddp"))
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert max(abs(a - b) for a, b in zip(one, two)) <= TOLERANCE, (one, two)
    writers = {f.split("-")[0] for f in os.listdir(tmp_path / "cache_two") if f.endswith(".safetensors")}
    assert writers == {"rank0", "rank1"}
