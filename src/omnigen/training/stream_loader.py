"""A rank's shard stream read by torch data-loader workers (``data_workers: W`` in a run's config).

``StreamDataset`` is an ``IterableDataset``: in loader worker w of W on rank r it iterates its own
``SampleStream`` as reader ``r * W + w`` of ``world * W``, so the shards of every epoch are split over
ranks x workers and no sample is read twice in a pass. Every source needs at least world x W shards (a
ValueError when the loader is built otherwise, ``stream.check_readers``): a worker without a shard
would sit idle while its turn holds up the others.

``LoaderStream`` is the main process's side. It takes the workers' samples in a fixed round robin
(worker 0, 1, ..., W-1, 0, ...), whatever order the loader delivers them in, so the sequence of samples
depends on the seed and the shards only. Resume: each sample carries its worker and its ordinal n in
that worker's stream, and every ``snapshot_every``-th sample (n = 0 included) carries the worker stream's
state from before it was drawn. ``state_dict()`` records per worker the latest snapshot the main process
has taken a sample of and how many samples it has taken since; a restored worker loads that snapshot
and draws (without reading files) up to the first sample not taken, so a resumed rank yields exactly the
samples the uninterrupted one would have. Samples the loader had prefetched but the main process had not
taken are read again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from omnigen.training.stream import SampleStream, ShardSource, check_readers, load
from omnigen.util.checks import check_int

SNAPSHOT_EVERY = 64


def _as_is(sample: dict[str, Any]) -> dict[str, Any]:
    """The loader's collate: the sample unchanged (the default one would turn tuples into lists)."""
    return sample


class StreamDataset(IterableDataset):
    """One ``SampleStream`` per loader worker; yields dicts: worker, n, snapshot (or None), source, key,
    files. ``positions``: per worker [snapshot or None, its n, samples taken], from ``LoaderStream``."""

    def __init__(
        self,
        sources: list[ShardSource],
        seed: int,
        rank: int,
        world: int,
        workers: int,
        buffer_size: int,
        positions: list[list[Any]],
        snapshot_every: int = SNAPSHOT_EVERY,
    ) -> None:
        self.sources, self.seed, self.rank, self.world = sources, seed, rank, world
        self.workers, self.buffer_size, self.positions = workers, buffer_size, positions
        self.snapshot_every = snapshot_every

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is None or info.num_workers != self.workers:
            raise ValueError(f"a StreamDataset is read by a DataLoader with num_workers={self.workers}")
        worker = info.id
        stream = SampleStream(
            self.sources, self.seed, self.rank, self.world, worker, self.workers, self.buffer_size
        )
        snapshot, n, taken = self.positions[worker]
        if snapshot is not None:
            stream.load_state_dict(snapshot)
            for _ in range(taken - n):  # replay the draws taken since the snapshot
                stream.next_ref()
        n = taken
        while True:
            state = stream.state_dict() if n % self.snapshot_every == 0 else None
            source, ref = stream.next_ref()
            files = load(self.sources[source].shards[ref.shard], ref)
            yield {
                "worker": worker,
                "n": n,
                "snapshot": state,
                "source": source,
                "key": ref.key,
                "files": files,
            }
            n += 1


class LoaderStream:
    """A rank's samples from ``workers`` loader processes (module docstring). Iterating yields (source
    index, key, files), like ``SampleStream``."""

    def __init__(
        self,
        sources: list[ShardSource],
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        workers: int = 1,
        buffer_size: int = 1000,
        state: dict[str, Any] | None = None,
        snapshot_every: int = SNAPSHOT_EVERY,
    ) -> None:
        workers = check_int("data workers", workers, 1)
        for source in sources:
            check_readers(len(source.shards), world * workers)
        if state is None:
            self.positions: list[list[Any]] = [[None, 0, 0] for _ in range(workers)]
            self.next_worker = 0
        else:
            if state.get("workers") != workers:
                raise ValueError(
                    f"the checkpoint's stream was read by {state.get('workers', 'no')} data workers, this run has "
                    f"{workers}: resume with the data_workers it was saved with"
                )
            self.positions = [list(p) for p in state["positions"]]
            self.next_worker = state["next_worker"]
        dataset = StreamDataset(
            sources, seed, rank, world, workers, buffer_size, self.positions, snapshot_every
        )
        self.workers = workers
        self.loader = iter(DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_as_is))
        self.pending: list[deque] = [deque() for _ in range(workers)]

    def __iter__(self) -> LoaderStream:
        return self

    def __next__(self) -> tuple[int, str, dict[str, bytes]]:
        worker = self.next_worker
        while not self.pending[worker]:
            sample = next(self.loader)
            self.pending[sample["worker"]].append(sample)
        sample = self.pending[worker].popleft()
        if sample["snapshot"] is not None:
            self.positions[worker][:2] = [sample["snapshot"], sample["n"]]
        self.positions[worker][2] = sample["n"] + 1
        self.next_worker = (worker + 1) % self.workers
        return sample["source"], sample["key"], sample["files"]

    def state_dict(self) -> dict[str, Any]:
        return {"workers": self.workers, "next_worker": self.next_worker, "positions": self.positions}
