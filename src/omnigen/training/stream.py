"""Streaming training samples from webdataset-format tar shards (``omnigen data shards`` writes them).

Sources. A run's ``data:`` lists X2I JSONL files (globs) and/or shard sources: a shard pattern (a glob,
or brace ranges ``DIR/{000000..000009}.tar``, or ``pipe:COMMAND``: a shell command whose stdout is a tar) or a weighted
source ``{shards: PATTERN or [PATTERNS], weight: 3}`` (``parse_sources``).

Order. Every epoch each source's shards are permuted by (seed, epoch), the same on every rank, and
shard i goes to the reader ``i % (world * workers)`` (reader = rank * workers + worker), so in one pass
no sample is read by two readers. Each reader draws, sample by sample, a source with probability
proportional to its weight and puts that source's next sample into a shuffle buffer, from which a random
entry leaves. A source that runs out starts its next epoch, but a sample of its next epoch enters the
buffer only once the last epoch's have all left (until then a draw of that source lets one of its
buffered samples leave and is owed a place in the buffer, so the weights hold): a data set smaller than
the buffer is still read once per pass. The stream never ends.

Resume. The stream works on references (shard, byte offset, ordinal in the shard) read from the tar
headers; a sample's files are read only when it leaves the buffer. ``state_dict()`` holds the reader's
RNG state, the references in its buffer and each source's cursor (epoch, shard, offset), so a stream
restored from it yields exactly the samples the original would have: the exact mid-epoch resume needs
these references, which is why the reading is our own (tarfile over the webdataset layout) rather than
the ``webdataset`` package's pipeline. A ``pipe:`` shard cannot seek: resuming inside it re-reads it up
to the cursor.
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
import re
import signal
import subprocess
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
BRACE_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


@dataclass(frozen=True)
class ShardSource:
    """One weighted source: its shard URLs (paths or ``pipe:`` commands), in order."""

    shards: tuple[str, ...]
    weight: float = 1.0


def expand_braces(pattern: str) -> list[str]:
    """``a/{000..002}.tar`` -> a/000.tar, a/001.tar, a/002.tar (width kept); ``{x,y}`` -> each; the
    leftmost group varies slowest, as in the shell."""
    found = [m for m in (BRACE_RANGE.search(pattern), BRACE_LIST.search(pattern)) if m is not None]
    if not found:
        return [pattern]
    match = min(found, key=lambda m: m.start())
    head, tail = pattern[: match.start()], pattern[match.end() :]
    if match.re is BRACE_RANGE:
        low, high = match.group(1), match.group(2)
        if int(low) > int(high):
            raise ValueError(f"brace range {match.group(0)} in {pattern!r} runs backwards")
        items = [str(k).zfill(len(low)) for k in range(int(low), int(high) + 1)]
    else:
        items = match.group(1).split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


def is_shard_pattern(item: str) -> bool:
    return item.startswith("pipe:") or item.endswith(".tar") or bool(BRACE_RANGE.search(item))


def shard_urls(pattern: str) -> list[str]:
    """The shards a pattern names: brace expansion, then globs; ValueError if it names none."""
    urls: list[str] = []
    for item in expand_braces(pattern):
        if item.startswith("pipe:") or not glob.has_magic(item):
            urls.append(item)
        else:
            urls.extend(sorted(glob.glob(item)))
    if not urls:
        raise ValueError(f"shard pattern {pattern!r} matches no files")
    return urls


def parse_sources(data: list[Any]) -> tuple[list[str], list[ShardSource]]:
    """``data:`` entries -> (JSONL files or globs, shard sources). ValueError naming a bad entry."""
    jsonl: list[str] = []
    sources: list[ShardSource] = []
    for index, entry in enumerate(data):
        if isinstance(entry, str) and not is_shard_pattern(entry):
            jsonl.append(entry)
        elif isinstance(entry, str):
            sources.append(ShardSource(tuple(shard_urls(entry))))
        elif isinstance(entry, dict) and set(entry) <= {"shards", "weight"} and "shards" in entry:
            patterns = [entry["shards"]] if isinstance(entry["shards"], str) else entry["shards"]
            weight = entry.get("weight", 1)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                raise ValueError(f"data[{index}].weight must be a positive number, got {weight!r}")
            if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                raise ValueError(
                    f"data[{index}].shards must be a pattern or a list of them, got {patterns!r}"
                )
            sources.append(ShardSource(tuple(u for p in patterns for u in shard_urls(p)), float(weight)))
        else:
            raise ValueError(
                f"data[{index}] must be a JSONL path or glob, a shard pattern (DIR/{{000000..000009}}.tar, "
                f"a glob ending in .tar, pipe:COMMAND) or {{shards: PATTERN, weight: N}}; got {entry!r:.100}"
            )
    return jsonl, sources


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Ref:
    """Where one sample is: its shard (index into the source's URLs), byte offset and ordinal there."""

    shard: int
    offset: int
    ordinal: int
    key: str


def _ref_fields(ref: Ref) -> list[Any]:
    return [ref.shard, ref.offset, ref.ordinal, ref.key]


def _open(url: str, offset: int = 0) -> tuple[tarfile.TarFile, Any]:
    if url.startswith("pipe:"):
        # the config's own command, run by a shell as webdataset runs it; its own process group, so a whole
        # pipeline stops when the stream does
        process = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, start_new_session=True)
        return tarfile.open(fileobj=process.stdout, mode="r|"), process
    handle = open(url, "rb")
    handle.seek(offset)
    return tarfile.open(fileobj=handle, mode="r:"), handle


def _groups(tar: tarfile.TarFile, with_data: bool) -> Iterator[tuple[str, int, dict[str, bytes]]]:
    """(key, header offset of its first member, files) per sample: members grouped by the name up to the
    first dot, as webdataset groups them."""
    key, first, files = None, 0, {}
    for member in tar:
        name, _, suffix = member.name.rpartition("/")[2].partition(".")
        if name != key:
            if key is not None:
                yield key, first, files
            key, first, files = name, member.offset, {}
        files[suffix] = tar.extractfile(member).read() if with_data else b""
    if key is not None:
        yield key, first, files


def read_samples(
    url: str, shard: int, offset: int = 0, ordinal: int = 0, with_data: bool = True
) -> Iterator[tuple[Ref, dict[str, bytes]]]:
    """The samples of shard ``shard`` (at ``url``) from (offset, ordinal) on. A file is entered at the
    byte offset; a pipe is read from its start, the first ``ordinal`` samples dropped. ``with_data=False``
    reads only the tar headers (the files map names to b"")."""
    pipe = url.startswith("pipe:")
    tar, handle = _open(url, 0 if pipe else offset)
    try:
        groups = _groups(tar, with_data)
        for number, (key, first, files) in enumerate(groups, 0 if pipe else ordinal):
            if number >= ordinal:
                yield Ref(shard, first, number, key), files
    finally:
        tar.close()
        if pipe:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(handle.pid, signal.SIGKILL)
            handle.wait()
        else:
            handle.close()


def load(url: str, ref: Ref) -> dict[str, bytes]:
    """The files of one referenced sample."""
    for found, files in read_samples(url, ref.shard, ref.offset, ref.ordinal):
        if found.key != ref.key:
            raise ValueError(f"{url}: expected sample {ref.key} at offset {ref.offset}, found {found.key}")
        return files
    raise ValueError(f"{url}: no sample at offset {ref.offset}")


# ---------------------------------------------------------------------------------------------- streams


def check_readers(count: int, readers: int) -> None:
    """Every reader needs a shard of its own in every epoch: ValueError when a source has fewer."""
    if count < readers:
        raise ValueError(
            f"{count} shard(s) cannot feed {readers} readers (ranks x data_workers): write more, smaller shards "
            "(omnigen data shards --samples-per-shard) or use fewer data_workers"
        )


def reader_shards(count: int, seed: int, epoch: int, reader: int, readers: int) -> list[int]:
    """This reader's shards in epoch ``epoch``: a permutation by (seed, epoch), shared by all readers,
    of which it takes every ``readers``-th from ``reader``."""
    check_readers(count, readers)
    order = list(range(count))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order[reader::readers]


class SourceCursor:
    """One source's references for one reader, epoch after epoch, with a resumable position: the epoch,
    the shard's place in the reader's order, and the last sample read there (header offset, ordinal)."""

    def __init__(self, source: ShardSource, seed: int, reader: int, readers: int) -> None:
        self.source, self.seed, self.reader, self.readers = source, seed, reader, readers
        self.epoch, self.position, self.last_offset, self.ordinal = 0, 0, -1, 0
        self._refs: Iterator[tuple[Ref, dict[str, bytes]]] | None = None
        self._peeked: tuple[Ref, int] | None = None
        self._empty = 0  # shards in a row that held no sample

    def state_dict(self) -> dict[str, Any]:
        keys = ("epoch", "position", "last_offset", "ordinal")
        state: dict[str, Any] = {k: getattr(self, k) for k in keys}
        state["peeked"] = None if self._peeked is None else [*_ref_fields(self._peeked[0]), self._peeked[1]]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self.last_offset, self.ordinal = state["last_offset"], state["ordinal"]
        peeked = state.get("peeked")
        self._peeked = None if peeked is None else (Ref(*peeked[:4]), peeked[4])
        self._refs = None

    def peek(self) -> tuple[Ref, int]:
        """The next sample's reference and its epoch, not taken yet."""
        if self._peeked is None:
            ref = self._advance()
            self._peeked = (ref, self.epoch)
        return self._peeked

    def take(self) -> tuple[Ref, int]:
        """The next sample's reference and its epoch; the cursor then points past it."""
        item = self.peek()
        self._peeked = None
        return item

    def _open(self, shard: int) -> Iterator[tuple[Ref, dict[str, bytes]]]:
        """The shard's headers after the last sample read (a file: entered at that sample's header and
        stepped past it; a pipe: read from the start, the samples before ``ordinal`` dropped)."""
        url = self.source.shards[shard]
        if self.last_offset < 0 or url.startswith("pipe:"):
            return read_samples(url, shard, 0, self.ordinal, with_data=False)
        refs = read_samples(url, shard, self.last_offset, self.ordinal - 1, with_data=False)
        next(refs)  # the sample already read
        return refs

    def _advance(self) -> Ref:
        while True:
            if self._refs is None:
                shards = reader_shards(
                    len(self.source.shards), self.seed, self.epoch, self.reader, self.readers
                )
                if self.position >= len(shards):
                    if self._empty >= len(shards):  # a whole epoch of empty shards: it would never end
                        raise ValueError(
                            f"the shards of reader {self.reader} of {self.readers} hold no sample (a shard whose "
                            f"rows were all skipped is an empty tar): {[self.source.shards[k] for k in shards]}"
                        )
                    self.epoch, self.position, self.last_offset, self.ordinal = self.epoch + 1, 0, -1, 0
                    continue
                self._refs = self._open(shards[self.position])
            found = next(self._refs, None)
            if found is not None:
                ref, self._empty = found[0], 0
                self.last_offset, self.ordinal = ref.offset, ref.ordinal + 1
                return ref
            self._refs = None
            self._empty = self._empty + 1 if self.ordinal == 0 else 0
            self.position, self.last_offset, self.ordinal = self.position + 1, -1, 0


class SampleStream:
    """Samples from weighted shard sources for one reader (rank, worker): weighted draw of a source,
    shuffle buffer, exact ``state_dict`` / ``load_state_dict`` (module docstring). Iterating yields
    (source index, key, files)."""

    def __init__(
        self,
        sources: list[ShardSource],
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        worker: int = 0,
        workers: int = 1,
        buffer_size: int = 1000,
    ) -> None:
        if not sources:
            raise ValueError("a SampleStream needs at least one shard source")
        if not 0 <= rank < world or not 0 <= worker < workers:
            raise ValueError(f"rank {rank} of {world} / worker {worker} of {workers} is out of range")
        reader, readers = rank * workers + worker, world * workers
        self.sources = sources
        self.cursors = [SourceCursor(s, seed, reader, readers) for s in sources]
        self.weights = [s.weight for s in sources]
        self.buffer_size = buffer_size
        self.rng = random.Random(f"{seed}:reader{reader}")
        self.buffer: list[tuple[int, int, Ref]] = []  # (source, its epoch, reference)
        self._in_buffer: Counter = Counter()  # (source, epoch) -> references in the buffer
        self.owed = [0] * len(sources)  # draws of each source that waited for its last epoch to leave

    def next_ref(self) -> tuple[int, Ref]:
        """The next (source index, reference) to leave the shuffle buffer, without reading its files."""
        while len(self.buffer) < self.buffer_size:
            index = next((k for k, owed in enumerate(self.owed) if owed and not self._blocked(k)), None)
            if index is not None:
                self.owed[index] -= 1  # a draw that had to wait
            else:
                index = self.rng.choices(range(len(self.sources)), weights=self.weights)[0]
            if self._blocked(index):
                # the source's next epoch waits until its last one has left: one of those leaves now,
                # and the source is owed this draw's place in the buffer
                self.owed[index] += 1
                return self._leave(index)
            ref, epoch = self.cursors[index].take()
            self.buffer.append((index, epoch, ref))
            self._in_buffer[index, epoch] += 1
        return self._leave(None)

    def _blocked(self, index: int) -> bool:
        """Whether the source's next reference starts an epoch while its last epoch's are buffered."""
        return self._in_buffer[index, self.cursors[index].peek()[1] - 1] > 0

    def _leave(self, source: int | None) -> tuple[int, Ref]:
        """A random buffered reference (of ``source``, if given) leaves the buffer."""
        slots = (
            range(len(self.buffer))
            if source is None
            else [k for k, item in enumerate(self.buffer) if item[0] == source]
        )
        slot = slots[self.rng.randrange(len(slots))]
        self.buffer[slot], self.buffer[-1] = self.buffer[-1], self.buffer[slot]
        index, epoch, ref = self.buffer.pop()
        self._in_buffer[index, epoch] -= 1
        return index, ref

    def __iter__(self) -> Iterator[tuple[int, str, dict[str, bytes]]]:
        while True:
            index, ref = self.next_ref()
            yield index, ref.key, load(self.sources[index].shards[ref.shard], ref)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.getstate(),
            "buffer": [(index, epoch, *_ref_fields(ref)) for index, epoch, ref in self.buffer],
            "cursors": [c.state_dict() for c in self.cursors],
            "owed": list(self.owed),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["cursors"]) != len(self.cursors):
            raise ValueError(
                f"the state has {len(state['cursors'])} sources, this stream {len(self.cursors)}"
            )
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.buffer = [(item[0], item[1], Ref(*item[2:])) for item in state["buffer"]]
        self._in_buffer = Counter((index, epoch) for index, epoch, _ in self.buffer)
        self.owed = list(state["owed"])
        for cursor, saved in zip(self.cursors, state["cursors"], strict=True):
            cursor.load_state_dict(saved)
