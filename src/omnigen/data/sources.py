"""Where ``omnigen data shards`` reads images: a folder, a tar archive, or a split archive read as one
stream (``x.tar.gz.aa``, ``.ab``, ...), never extracted to disk.

``rows_with_images(rows)`` yields each row with the bytes of its images (those found), in row order. An
archive is read once, front to back: a member some pending row needs is kept until the rows that need
it are done; every other member is passed over. Memory therefore follows how far the archive's order is
from the rows' order (an archive written row by row holds one row's images at a time).
"""

from __future__ import annotations

import io
import re
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

SPLIT_SUFFIX = re.compile(r"\.([a-z]{2}|\d{2,3})$")  # split(1)'s .aa .ab ... or .00 .01 / .001 ...
ARCHIVE_ENDINGS = (".tar", ".tar.gz", ".tgz")


class _Row(Protocol):
    def images(self) -> list[tuple[str, str]]: ...


def member_name(name: str) -> str:
    """An archive member's path relative to the archive's root."""
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def archive_name(path: Path) -> str | None:
    """The archive's own name (``x.tar.gz`` for ``x.tar.gz.aa``), or None when it is no tar archive."""
    if path.name.endswith(ARCHIVE_ENDINGS):
        return path.name
    match = SPLIT_SUFFIX.search(path.name)
    stem = path.name[: match.start()] if match else ""
    return stem if stem.endswith(ARCHIVE_ENDINGS) else None


def split_parts(first: Path) -> list[Path]:
    """``x.tar.gz.aa`` -> every part ``x.tar.gz.??`` beside it with a suffix of the same kind, sorted."""
    if first.name.endswith(ARCHIVE_ENDINGS):
        return [first]
    match = SPLIT_SUFFIX.search(first.name)
    stem, kind = first.name[: match.start()], len(match.group(1))
    pattern = re.compile(re.escape(stem) + rf"\.([a-z]{{{kind}}}|\d{{{kind}}})$")
    return sorted(p for p in first.parent.iterdir() if pattern.match(p.name))


class ConcatenatedReader(io.RawIOBase):
    """The files, end to end, as one read-only stream."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths, self.index, self.handle = list(paths), 0, None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.index < len(self.paths):
            if self.handle is None:
                self.handle = open(self.paths[self.index], "rb")
            count = self.handle.readinto(buffer)
            if count:
                return count
            self.handle.close()
            self.handle, self.index = None, self.index + 1
        return 0

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
        super().close()


class FolderSource:
    def __init__(self, root: Path) -> None:
        self.root = root

    def rows_with_images(self, rows: Sequence[_Row]) -> Iterator[tuple[_Row, dict[str, bytes]]]:
        for row in rows:
            images = {}
            for _, path in row.images() if _has_images(row) else []:
                file = self.root / path
                if file.is_file():
                    images[path] = file.read_bytes()
            yield row, images

    def close(self) -> None:
        pass


class ArchiveSource:
    """One pass over a (possibly split, possibly gzipped) tar stream."""

    def __init__(self, parts: list[Path]) -> None:
        self.reader = ConcatenatedReader(parts)
        gz = archive_name(parts[0]).endswith((".gz", ".tgz"))
        self.tar = tarfile.open(fileobj=io.BufferedReader(self.reader, 1 << 20), mode="r|gz" if gz else "r|")
        self.members = iter(self.tar)

    def rows_with_images(self, rows: Sequence[_Row]) -> Iterator[tuple[_Row, dict[str, bytes]]]:
        needed = Counter(path for row in rows if _has_images(row) for _, path in row.images())
        held: dict[str, bytes] = {}
        for row in rows:
            paths = [path for _, path in row.images()] if _has_images(row) else []
            for path in paths:
                while path not in held and self._read_one(needed, held):
                    pass
            yield row, {p: held[p] for p in paths if p in held}
            for path in paths:
                needed[path] -= 1
                if needed[path] <= 0:
                    held.pop(path, None)

    def _read_one(self, needed: Counter, held: dict[str, bytes]) -> bool:
        """Read the next member, keeping it if a pending row needs it; False at the end of the stream."""
        member = next(self.members, None)
        if member is None:
            return False
        name = member_name(member.name)
        if member.isfile() and needed[name] > 0 and name not in held:
            held[name] = self.tar.extractfile(member).read()
        return True

    def close(self) -> None:
        self.tar.close()
        self.reader.close()


def _has_images(row: _Row) -> bool:
    return getattr(row, "error", None) is None


class ImageSource:
    """Context manager over a folder or archive source."""

    def __init__(self, location: str | Path) -> None:
        path = Path(location)
        if path.is_dir():
            self.source: FolderSource | ArchiveSource = FolderSource(path)
        elif path.is_file() and archive_name(path) is not None:
            self.source = ArchiveSource(split_parts(path))
        else:
            raise ValueError(
                f"--images {location} must be an image folder, a .tar / .tar.gz file, or the first part of a "
                "split archive (x.tar.gz.aa)"
            )

    def rows_with_images(self, rows):
        return self.source.rows_with_images(rows)

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc) -> None:
        self.source.close()


def open_images(location: str | Path) -> ImageSource:
    return ImageSource(location)
