"""Sequence parallel for the cached steps (``omnigen.model.ulysses``): 2 gloo processes on 127.0.0.1 split
each step's tokens and the attention heads (all-to-all), and produce what one process does.

Measured here (torch 2.13, CPU, one thread per process): the latents of 2 ranks equal one process's bit
for bit on the shipped model (every call below) and on the tiny grouped-query model, and on the medium
model of ``benchmarks/bench_cfg_parallel.py``; its ``--quick`` model (2 heads, 5 tokens a step) differs by
up to 3.6e-7: the per-token matmuls run on fewer rows per rank, which a BLAS may sum in another order.
So the tests allow 1e-5 on latents, and no difference in the uint8 images."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_model, tiny_config
from omnigen.model.ulysses import SequenceShard, TokenSplit
from omnigen.types import Condition
from test_cfg_parallel import EDIT, STEPS, T2I, _torchrun, edit_input, free_port

TOLERANCE = 1e-5  # on latents; measured: 0.0 (module docstring)
CALLS = {  # name -> (prompt, with the input image, extra options)
    "t2i": (T2I, False, {}),
    "edit": (EDIT, True, {}),
    "edit_one_batch": (EDIT, True, {"separate_cfg_infer": False}),  # padded rows: a masked step
    "t2i_offloaded_cache": (T2I, False, {"offload_kv_cache": True}),
}


def latents(pipe, folder: Path, parallel: str | None) -> dict[str, torch.Tensor]:
    image = Image.open(folder / "input.png")
    out = {}
    for name, (prompt, with_image, extra) in CALLS.items():
        kw = {"num_inference_steps": STEPS, "seed": 7, "progress": False, "output_type": "latent"}
        out[name] = pipe(
            prompt, input_images=[image] if with_image else None, parallel=parallel, **kw, **extra
        )
    return out


def gqa_model():
    """A tiny random model with grouped-query attention (4 heads, 2 key/value heads)."""
    config = tiny_config()
    config = dataclasses.replace(config, transformer=dataclasses.replace(config.transformer, num_kv_heads=2))
    return random_model(config)


def padded_condition(model) -> Condition:
    """Two rows, the second left-padded: the step runs with a mask."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(8, model.config.transformer.vocab_size, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :4] = False
    return Condition(ids, mask, [[], []], [[], []])


def model_step(model, runner) -> tuple[torch.Tensor, int]:
    """The velocity of one cached step over 4 rows (2 per condition row; 7 step tokens: uneven on 2
    ranks), and the bytes of the cache."""
    cache = model.prefill(padded_condition(model), 6, runner=runner)
    x = torch.randn(4, 4, 6, 4, generator=torch.Generator().manual_seed(4))
    return model(x, torch.tensor([0.1, 0.2, 0.3, 0.4]), cache=cache, runner=runner), cache.nbytes()


def _worker(rank: int, world_size: int, port: int, folder: str) -> None:
    """A spawned rank: the shipped model's latents with parallel='sequence', a sharded step of the
    grouped-query model, and the refused options; saved for the parent."""
    import torch.distributed as dist

    from omnigen.model.runner import Runner
    from omnigen.pipeline import OmniGenPipeline

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        pipe = OmniGenPipeline.from_pretrained()
        out = latents(pipe, Path(folder), "sequence")
        with torch.no_grad():
            out["gqa"], out["gqa_bytes"] = model_step(gqa_model(), Runner(sequence=SequenceShard(rank, 2)))
        out["drawn"] = pipe(
            T2I, num_inference_steps=1, progress=False, output_type="latent", parallel="sequence"
        )
        for option in ({"step_cache_threshold": 0.1}, {"use_kv_cache": False}):
            try:
                pipe(T2I, num_inference_steps=1, progress=False, parallel="sequence", **option)
            except ValueError as err:
                out[next(iter(option))] = str(err)
        torch.save(out, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """One process, one thread (the ranks' setting): the references."""
    from omnigen.pipeline import OmniGenPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = tmp_path_factory.mktemp("single")
        edit_input(folder)
        pipe = OmniGenPipeline.from_pretrained()
        out = latents(pipe, folder, None)
        with torch.no_grad():
            out["gqa"], out["gqa_bytes"] = model_step(gqa_model(), pipe.runner)
        out["pipe"] = pipe
        return out
    finally:
        torch.set_num_threads(threads)


def test_two_ranks_match_one_process(single, tmp_path):
    import torch.multiprocessing as mp

    from omnigen.model.vae import to_uint8

    edit_input(tmp_path)
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert torch.equal(ranks[0]["drawn"], ranks[1]["drawn"]), "without a seed, the ranks disagree"
    codec = single["pipe"].codec
    for rank, out in enumerate(ranks):
        for name in [*CALLS, "gqa"]:
            difference = (out[name] - single[name]).abs().max().item()
            assert difference <= TOLERANCE, f"{name}: rank {rank} differs by {difference}"
        for name in CALLS:
            images = [to_uint8(codec.decode(z)) for z in (out[name], single[name])]
            assert torch.equal(*images), f"{name}: rank {rank}'s image differs"
        assert out["gqa_bytes"] * 2 == single["gqa_bytes"], "each rank keeps half the cache's heads"
        assert "step_cache_threshold cannot be used with parallel='sequence'" in out["step_cache_threshold"]
        assert "needs use_kv_cache=True" in out["use_kv_cache"]


def test_the_split_of_tokens_and_heads():
    shard = SequenceShard(rank=1, world_size=2)
    assert shard.sizes(17) == (9, 8) and shard.sizes(6) == (3, 3)
    assert TokenSplit(shard, (9, 8)).bounds(1) == (9, 17)
    assert shard.heads(4, 1) == slice(2, 4)
    k = torch.arange(2 * 4 * 3 * 2.0).view(2, 4, 3, 2)
    own_k, own_v = shard.own_heads((k, k + 1))
    assert torch.equal(own_k, k[:, 2:]) and own_k.untyped_storage().nbytes() == k.nbytes // 2
    with pytest.raises(
        ValueError, match="the model's 4 attention heads do not divide by a process group of 3"
    ):
        SequenceShard(rank=0, world_size=3).check_heads(4, 4)
    with pytest.raises(
        ValueError, match="the model's 2 key/value heads do not divide by a process group of 4"
    ):
        SequenceShard(rank=0, world_size=4).check_heads(4, 2)
    with pytest.raises(ValueError, match="a step of 2 tokens cannot be split over 3 ranks"):
        SequenceShard(rank=0, world_size=3).shard(torch.zeros(1, 2, 8), None)


def test_cli_two_ranks_match_one_process(single, tmp_path):
    """`torchrun --nproc-per-node 2 -m omnigen generate ... --parallel sequence`: rank 0 writes the image,
    equal to one process's."""
    from omnigen.model.vae import to_uint8

    image = edit_input(tmp_path)
    out = tmp_path / "out" / "edit.png"
    args = ["generate", EDIT, "--image", str(image), "-o", str(out), "--seed", "7"]
    done = _torchrun(2, [*args, "--num-inference-steps", str(STEPS), "--parallel", "sequence"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert sorted(p.name for p in out.parent.iterdir()) == ["edit.png"]
    reference = to_uint8(single["pipe"].codec.decode(single["edit"]))[0].numpy()
    assert np.array_equal(np.asarray(Image.open(out)), reference)


def test_clear_error_without_a_process_group(single):
    with pytest.raises(ValueError, match="parallel='sequence' needs an initialized torch.distributed"):
        single["pipe"](T2I, num_inference_steps=1, progress=False, parallel="sequence")


def test_batch_two_ranks_match_one_process(tmp_path):
    """`omnigen batch --parallel sequence` on 2 ranks: the image equals a one-process batch run's, and
    rank 0 is the only writer."""
    import json

    from omnigen.cli.main import main

    image = edit_input(tmp_path)
    row = {"id": "e", "prompt": EDIT, "input_images": [str(image)], "num_inference_steps": STEPS}
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps(row) + "\n")
    args = ["batch", str(requests), "--no-progress"]
    done = _torchrun(2, [*args, "--out", str(tmp_path / "two"), "--parallel", "sequence"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    two, one = (np.asarray(Image.open(tmp_path / run / "e" / "0.png")) for run in ("two", "one"))
    assert np.array_equal(two, one)
    assert not (tmp_path / "two" / "results.rank1.jsonl").exists()
    assert len((tmp_path / "two" / "results.jsonl").read_text().splitlines()) == 1
