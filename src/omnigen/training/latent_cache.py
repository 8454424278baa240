"""An on-disk cache of codec latents, so that each training image is encoded once per way it is processed.

Owns the folder layout, the keys and the atomic writes. Does not decide how an image is processed: the
caller passes a ``view`` string naming that (e.g. ``fill:16x24``), and the key is

    codec fingerprint | resolved path | mtime_ns | file bytes | view

so a replaced or edited image (new mtime or size), another codec or another processing gets a new key and
is encoded again; the old entry is simply never read.

Folder layout: one pair of files per flush, ``<writer>-<random>``, never rewritten afterwards::

    <writer>-<random>.safetensors         the latents added since the previous flush
    index-<writer>-<random>.json          {"version": 1, "entries": {key: {"shard": file, "tensor": name}}}

Each file is written under a temporary name and renamed into place, shard before index, so a reader never
sees an entry whose shard is missing or half written. Since no file is shared, any number of processes
(the trainer's ranks, writer ``rank<k>``, or separate jobs) may fill one folder at once. A cache merges
every index in the folder when it is opened; entries that other processes write later are not seen until
the next open (at worst an image is encoded twice).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from omnigen.util.atomic import atomic_write
from omnigen.util.checks import check_int

logger = logging.getLogger(__name__)

INDEX_VERSION = 1


class LatentCache:
    """``key(path, view)`` -> ``get`` (a hit or None) -> ``put`` on a miss; ``flush()`` before exiting."""

    def __init__(
        self, folder: str | Path, codec_id: str, writer: str = "rank0", flush_every: int = 1024
    ) -> None:
        if not writer or any(c in writer for c in "/\\") or writer.startswith("."):
            raise ValueError(f"writer must be a plain file-name part, got {writer!r}")
        flush_every = check_int("flush_every", flush_every, 1)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.codec_id = codec_id
        self.writer = writer
        self.flush_every = flush_every
        self._entries: dict[str, tuple[str, str]] = {}  # key -> (shard file, tensor name)
        self._pending: dict[str, torch.Tensor] = {}  # added, not yet written
        self.hits = 0
        self.misses = 0
        for path in sorted(self.folder.glob("index-*.json")):
            self._entries.update(_read_index(path))

    def __len__(self) -> int:
        return len(self._entries) + len(self._pending)

    def key(self, path: str | Path, view: str) -> str:
        """The key of ``path`` processed as ``view``; reads the file's mtime and size (not its data)."""
        path = Path(path).resolve()
        stat = path.stat()
        return f"{self.codec_id}|{path}|{stat.st_mtime_ns}|{stat.st_size}|{view}"

    def get(self, key: str) -> torch.Tensor | None:
        """The stored latent (CPU) or None; a shard that has gone missing counts as a miss."""
        latent = self._pending.get(key)
        if latent is None and key in self._entries:
            shard, name = self._entries[key]
            try:
                with safe_open(str(self.folder / shard), framework="pt") as file:
                    latent = file.get_tensor(name)
            except (OSError, SafetensorError) as err:
                logger.warning("latent cache shard %s unreadable (%s); encoding again", shard, err)
                self._entries = {k: v for k, v in self._entries.items() if v[0] != shard}
        if latent is None:
            self.misses += 1
        else:
            self.hits += 1
        return latent

    def put(self, key: str, latent: torch.Tensor) -> None:
        """Queue a latent; a shard is written every ``flush_every`` latents and on ``flush()``."""
        self._pending[key] = latent.detach().to("cpu", copy=True).contiguous()
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write the queued latents as one shard, then its index (both atomically)."""
        if not self._pending:
            return
        stem = f"{self.writer}-{uuid.uuid4().hex[:16]}"
        names = {key: hashlib.blake2b(key.encode(), digest_size=16).hexdigest() for key in self._pending}
        shard = self.folder / f"{stem}.safetensors"
        tensors = {names[key]: latent for key, latent in self._pending.items()}
        atomic_write(shard, lambda path: save_file(tensors, str(path)))
        entries = {key: {"shard": shard.name, "tensor": name} for key, name in names.items()}
        index = self.folder / f"index-{stem}.json"
        text = json.dumps({"version": INDEX_VERSION, "entries": entries}, indent=0)
        atomic_write(index, lambda path: path.write_text(text))
        self._entries.update({key: (shard.name, name) for key, name in names.items()})
        self._pending.clear()


def _read_index(path: Path) -> dict[str, tuple[str, str]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        logger.warning("ignoring unreadable latent cache index %s: %s", path, err)
        return {}
    if data.get("version") != INDEX_VERSION:
        logger.warning("ignoring latent cache index %s of version %r", path, data.get("version"))
        return {}
    return {key: (entry["shard"], entry["tensor"]) for key, entry in data["entries"].items()}


def codec_fingerprint(codec: object, source: str) -> str:
    """What identifies the latents a codec makes: the identity codec's settings, or the VAE folder (its
    resolved path and the newest mtime of its files) and dtype."""
    from omnigen.model.vae import IdentityCodec

    if isinstance(codec, IdentityCodec):
        return f"identity-c{codec.channels}-s{codec.scale}"
    folder = Path(source).resolve()
    stamp = max((p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()), default=0)
    return f"vae-{folder}-{stamp}-{getattr(codec, 'dtype', '')}"
