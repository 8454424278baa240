"""Streaming from tar shards (omnigen.training.stream): sources, rank split, mixing, exact resume."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from omnigen.training.stream import SampleStream, ShardSource, expand_braces, parse_sources, shard_urls


def write_shards(folder: Path, name: str, shards: int, per_shard: int) -> list[str]:
    """Tiny shards in the ``omnigen data shards`` layout: KEY.json and KEY.out.png per sample."""
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for s in range(shards):
        path = folder / f"{name}-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for k in range(per_shard):
                key = f"{name}{s:03d}x{k:04d}"
                for suffix, data in (("json", json.dumps({"key": key}).encode()), ("out.png", key.encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        urls.append(str(path))
    return urls


def test_sources_parse_braces_globs_and_weights(tmp_path):
    urls = write_shards(tmp_path, "a", 3, 2)
    assert expand_braces("d/{000..002}.tar") == ["d/000.tar", "d/001.tar", "d/002.tar"]
    assert expand_braces("{x,y}/{8..10}.tar") == [
        "x/8.tar",
        "x/9.tar",
        "x/10.tar",
        "y/8.tar",
        "y/9.tar",
        "y/10.tar",
    ]
    assert shard_urls(str(tmp_path / "a-{000000..000002}.tar")) == urls
    assert shard_urls(str(tmp_path / "a-*.tar")) == urls
    jsonl, sources = parse_sources(
        ["x2i.jsonl", str(tmp_path / "a-*.tar"), {"shards": [urls[0], urls[1]], "weight": 3}]
    )
    assert jsonl == ["x2i.jsonl"]
    assert sources == [ShardSource(tuple(urls), 1.0), ShardSource(tuple(urls[:2]), 3.0)]
    with pytest.raises(ValueError, match=r"data\[0\].weight must be a positive number"):
        parse_sources([{"shards": urls[0], "weight": 0}])
    with pytest.raises(ValueError, match=r"data\[1\] must be a JSONL path"):
        parse_sources(["x.jsonl", {"shard": urls[0]}])
    with pytest.raises(ValueError, match="matches no files"):
        parse_sources([str(tmp_path / "b-*.tar")])


def test_mixing_follows_the_weights(tmp_path):
    heavy = write_shards(tmp_path, "h", 4, 250)
    light = write_shards(tmp_path, "l", 4, 250)
    stream = SampleStream(
        [ShardSource(tuple(heavy), 3), ShardSource(tuple(light), 1)], seed=1, buffer_size=200
    )
    picks = [stream.next_ref()[0] for _ in range(10_000)]
    assert abs(picks.count(0) / len(picks) - 0.75) < 0.02


def test_resumed_stream_yields_the_same_samples(tmp_path):
    urls = write_shards(tmp_path, "r", 5, 7)  # 35 samples: 100 draws cross two epoch boundaries
    sources = [ShardSource(tuple(urls[:3])), ShardSource(tuple(urls[3:]), 2)]
    stream = SampleStream(sources, seed=5, buffer_size=8)
    samples = iter(stream)
    first = [next(samples)[1] for _ in range(41)]
    state = json.loads(json.dumps(stream.state_dict()))  # what a checkpoint stores survives JSON
    rest = [next(samples)[1] for _ in range(60)]
    resumed = SampleStream(sources, seed=5, buffer_size=8)
    resumed.load_state_dict(state)
    again = iter(resumed)
    got = [next(again) for _ in range(60)]
    assert [key for _, key, _ in got] == rest
    assert all(json.loads(files["json"])["key"] == key for _, key, files in got)
    assert len(set(first + rest)) == 35  # every sample came by


def test_a_buffer_larger_than_the_data_yields_each_sample_once_per_pass(tmp_path):
    urls = write_shards(tmp_path, "s", 2, 4)
    stream = SampleStream([ShardSource(tuple(urls))], seed=0, buffer_size=100)
    keys = [stream.next_ref()[1].key for _ in range(24)]
    assert [len(set(keys[k : k + 8])) for k in (0, 8, 16)] == [8, 8, 8]
    assert keys[:8] != keys[8:16]  # each pass its own order


def test_a_pipe_shard_streams_and_resumes(tmp_path):
    urls = write_shards(tmp_path, "p", 2, 6)
    pipes = tuple(f"pipe:cat {url}" for url in urls)
    stream = SampleStream([ShardSource(pipes)], seed=2, buffer_size=3)
    files = SampleStream([ShardSource(tuple(urls))], seed=2, buffer_size=3)
    assert [next(iter(stream))[1] for _ in range(5)] == [next(iter(files))[1] for _ in range(5)]
    state = stream.state_dict()
    expected = [next(iter(stream))[1] for _ in range(9)]
    stream.load_state_dict(state)
    assert [next(iter(stream))[1] for _ in range(9)] == expected


def test_ranks_times_workers_split_the_shards_of_each_epoch(tmp_path):
    urls = tuple(write_shards(tmp_path, "w", 8, 3))
    for epoch_passes in (1, 2):  # each epoch its own permutation, still a partition
        seen = []
        for rank in range(2):
            for worker in range(2):
                stream = SampleStream(
                    [ShardSource(urls)], seed=7, rank=rank, world=2, worker=worker, workers=2
                )
                keys = [stream.next_ref()[1].key for _ in range(6 * epoch_passes)]
                seen.append(keys[-6:])
        flat = [k for keys in seen for k in keys]
        assert len(flat) == len(set(flat)) == 24
    with pytest.raises(ValueError, match="8 shard\\(s\\) cannot feed 16 readers"):
        SampleStream([ShardSource(urls)], rank=0, world=8, workers=2).next_ref()


def test_a_checkpoint_of_another_world_size_is_refused(tmp_path):
    from types import SimpleNamespace

    from omnigen.model.vae import IdentityCodec
    from omnigen.training.stream_batches import ShardBatchStream

    urls = tuple(write_shards(tmp_path, "c", 2, 2))
    config = SimpleNamespace(keep_raw_resolution=False, seed=0, codec="identity", data_workers=0)
    builder = SimpleNamespace(codec=IdentityCodec())
    runtime = SimpleNamespace(rank=0, world=1)
    saved = [SampleStream([ShardSource(urls)]).state_dict()] * 2
    with pytest.raises(ValueError, match="holds 2 stream states but the run has 1 ranks"):
        ShardBatchStream(config, builder, [ShardSource(urls)], runtime, tmp_path / "spool", saved)


RANK_SCRIPT = """
import sys, torch.distributed as dist
from omnigen.training.stream import SampleStream, ShardSource
rank, store, urls = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
stream = SampleStream([ShardSource(tuple(urls))], seed=3, rank=rank, world=2, buffer_size=8)
mine = [key for _, key, _ in (next(iter(stream)) for _ in range(sum(1 for u in urls[rank::2]) * 5))]
keys = [None, None]
dist.all_gather_object(keys, mine)
if rank == 0:
    print("KEYS", repr(keys))
dist.destroy_process_group()
"""


def test_two_ranks_share_one_pass_without_a_repeat(tmp_path):
    urls = write_shards(tmp_path, "d", 6, 5)  # 30 samples, 3 shards per rank
    store = tmp_path / "store"
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(rank), str(store), *urls],
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in ranks]
    assert all(p.returncode == 0 for p in ranks)
    keys = eval(outputs[0].split("KEYS", 1)[1])
    assert len(keys[0]) == len(keys[1]) == 15
    assert not set(keys[0]) & set(keys[1])
    assert len(set(keys[0]) | set(keys[1])) == 30


def _streamed_run(tmp_path, out, stop_after=None, latents=False, steps=5, **options):
    from omnigen.data.shards import write_shards as pack
    from omnigen.miniworld.world import save_tokenizer, write_dataset
    from omnigen.training.shard_latents import load_codec
    from omnigen.training.trainer import train
    from test_training import make_config

    world = tmp_path / "world"
    if not world.exists():
        jsonl = write_dataset(world, 8, seed=4, size=16)
        save_tokenizer(world / "tokenizer.json")
        pack([jsonl], world, tmp_path / "shards", samples_per_shard=3)
        pack([jsonl], world, tmp_path / "latents", samples_per_shard=3, latents=load_codec("identity", 16))
    pattern = str(tmp_path / ("latents" if latents else "shards") / "{000000..000002}.tar")
    stages = [{"resolution": 16, "steps": steps, "batch_size": 2, "lr": 3e-3}]
    config = make_config(
        world, tmp_path / out, steps, data=[pattern], stages=stages, drop_text=0.3, **options
    )
    train(config, device="cpu", stop_after=stop_after)
    return [json.loads(x)["loss"] for x in (tmp_path / out / "loss.jsonl").read_text().splitlines()]


def test_training_streams_from_shards_and_resumes_mid_epoch_exactly(tmp_path):
    straight = _streamed_run(tmp_path, "a")
    _streamed_run(tmp_path, "b", stop_after=2)  # 4 of 8 samples read: mid-epoch
    resumed = _streamed_run(tmp_path, "b")
    assert len(straight) == 5 and resumed == straight  # the same batches, the same losses
    assert len(set(straight)) == 5


def test_training_with_data_loader_workers_resumes_exactly(tmp_path):
    straight = _streamed_run(tmp_path, "a", data_workers=2)
    _streamed_run(tmp_path, "b", stop_after=3, data_workers=2)  # 6 samples: each worker mid-way
    with pytest.raises(ValueError, match="read by 2 data workers, this run has none"):
        _streamed_run(tmp_path, "b")
    resumed = _streamed_run(tmp_path, "b", data_workers=2)
    assert len(straight) == 5 and resumed == straight
    assert straight != _streamed_run(tmp_path, "c")  # two readers of 3 shards: another order than one


def test_stored_latents_replace_the_encoding(tmp_path, monkeypatch):
    from omnigen.model.vae import IdentityCodec

    plain = _streamed_run(tmp_path, "plain", steps=2)
    calls = []
    encode = IdentityCodec.encode
    monkeypatch.setattr(IdentityCodec, "encode", lambda self, x: calls.append(1) or encode(self, x))
    stored = _streamed_run(tmp_path, "stored", latents=True, steps=2)
    assert calls == []  # every image's latent came from the shards
    assert stored == plain


def test_a_reader_whose_shards_are_all_empty_is_named(tmp_path):
    urls = write_shards(tmp_path, "e", 2, 3)
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()  # a shard whose rows were all skipped
    fine = SampleStream([ShardSource((*urls, str(empty)))], seed=0, buffer_size=2)
    assert len({next(iter(fine))[1] for _ in range(12)}) == 6
    stream = SampleStream([ShardSource((str(empty),))], buffer_size=2)
    with pytest.raises(ValueError, match="reader 0 of 1 hold no sample"):
        stream.next_ref()
