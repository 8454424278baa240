"""A rank's shard stream inside a torch DataLoader (omnigen.training.stream_loader): shards split over
ranks x workers, a fixed order over the workers, exact resume from the per-worker positions."""

import json
import subprocess
import sys

import pytest

from omnigen.training.stream import ShardSource
from omnigen.training.stream_loader import LoaderStream
from test_stream import write_shards


def keys(stream, count: int) -> list[str]:
    return [next(stream)[1] for _ in range(count)]


def test_two_ranks_of_two_workers_read_one_pass_without_a_repeat(tmp_path):
    urls = tuple(write_shards(tmp_path, "p", 8, 5))  # 40 samples: 2 shards per reader
    seen = []
    for rank in range(2):
        stream = LoaderStream([ShardSource(urls)], seed=1, rank=rank, world=2, workers=2, buffer_size=4)
        seen.append(keys(stream, 20))
    assert len(set(seen[0]) | set(seen[1])) == 40  # every sample once
    assert not set(seen[0]) & set(seen[1])
    # each worker's samples come from its own two shards, and the workers alternate
    shards_of = [{key[1:4] for key in seen[0][w::2]} for w in range(2)]
    assert all(len(s) == 2 for s in shards_of) and not shards_of[0] & shards_of[1]


def test_a_resumed_loader_yields_the_same_samples(tmp_path):
    urls = tuple(write_shards(tmp_path, "r", 4, 7))  # 28 samples: 60 draws cross epochs
    sources = [ShardSource(urls[:2], 2.0), ShardSource(urls[2:], 1.0)]
    options = {"seed": 5, "workers": 2, "buffer_size": 6, "snapshot_every": 4}
    straight = keys(LoaderStream(sources, **options), 60)
    first = LoaderStream(sources, **options)
    head = keys(first, 23)  # odd: the resumed loader must start with worker 1
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    del first  # killed
    resumed = LoaderStream(sources, state=state, **options)
    assert head + keys(resumed, 37) == straight
    other = LoaderStream(sources, **options)
    assert keys(other, 60) == straight  # deterministic: the loader's delivery order does not matter


def test_too_few_shards_and_another_worker_count_are_refused(tmp_path):
    urls = tuple(write_shards(tmp_path, "f", 3, 2))
    with pytest.raises(ValueError, match="3 shard\\(s\\) cannot feed 4 readers \\(ranks x data_workers\\)"):
        LoaderStream([ShardSource(urls)], world=2, workers=2)
    state = LoaderStream([ShardSource(urls)], workers=1).state_dict()
    with pytest.raises(ValueError, match="read by 1 data workers, this run has 2"):
        LoaderStream([ShardSource(urls)], workers=2, state=state)


RANK_SCRIPT = """
import json, sys, torch.distributed as dist
from omnigen.training.stream import ShardSource
from omnigen.training.stream_loader import LoaderStream
rank, store, urls = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
options = dict(seed=3, rank=rank, world=2, workers=2, buffer_size=8, snapshot_every=4)
sources = [ShardSource(tuple(urls))]
mine = [next(stream)[1] for stream in [LoaderStream(sources, **options)] for _ in range(len(urls) // 2 * 5)]
first = LoaderStream(sources, **options)
head = [next(first)[1] for _ in range(7)]
states = [None, None]
dist.all_gather_object(states, first.state_dict())  # as the trainer's checkpoint gathers them
del first
resumed = LoaderStream(sources, state=json.loads(json.dumps(states))[rank], **options)
again = head + [next(resumed)[1] for _ in range(len(mine) - 7)]
keys = [None, None]
dist.all_gather_object(keys, [mine, again])
if rank == 0:
    print("KEYS", repr(keys))
dist.destroy_process_group()
"""


def test_two_gloo_ranks_of_two_loader_workers_share_one_pass_and_resume(tmp_path):
    urls = write_shards(tmp_path, "g", 8, 5)  # 40 samples, 2 shards per reader
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(rank), str(tmp_path / "store"), *urls],
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in ranks]
    assert all(p.returncode == 0 for p in ranks)
    (mine0, again0), (mine1, again1) = eval(outputs[0].split("KEYS", 1)[1])
    assert len(mine0) == len(mine1) == 20
    assert len(set(mine0) | set(mine1)) == 40  # one pass, no sample twice
    assert again0 == mine0 and again1 == mine1  # killed after 7 samples and resumed: the same samples
