"""Random access to a disk inside a package, for ``cat``, ``compare`` and ``serve``.

The disk is read through once, front to back (so a cut or damaged stream is
refused at open, as ``convert`` refuses it), and where each grain record lies
in the archive is kept: three integers a stored grain, whatever the layout
(grains in any order included).  A read then inflates only the grains it
touches, straight from the archive; nothing is extracted.  A gzip-compressed
disk cannot be read so (gzip has no random access): ``convert`` reads it.
"""

from __future__ import annotations

import functools
import os
from array import array
from collections.abc import Iterator
from typing import Any, Self

from .. import _deflate
from .._structs import GrainMarker
from ..errors import CorruptImageError, ReadOnlyError, UnsupportedFormatError
from ..stream_read import StreamReader
from .package import Package

#: Inflated grains kept for reads that come back to them (NBD clients read 4 KiB at a time).
GRAIN_CACHE = 64


class OvaDisk:
    """One disk of an OVA, read-only, read at any offset; a context manager."""

    def __init__(self, path: str, disk: str | None = None) -> None:
        import numpy as np

        self.path = path
        package = Package(path)
        try:
            ref, member = package.find_disk(disk)
            if ref.compression not in (None, "", "identity"):
                raise UnsupportedFormatError(
                    f"{member.name} is gzip-compressed, which is read front to back only: "
                    "'vmdk convert' it first", path)
            self.name = f"{path}:{member.name}"
            reader = StreamReader(package.open(member), self.name)
            grains, starts, sizes = _index(reader)
        except BaseException:
            package.close()
            raise
        self._package = package
        self._base = member.data_offset
        self.size = reader.capacity
        self.grain_bytes = reader.grain_bytes
        order = np.argsort(np.frombuffer(grains, dtype=np.int64), kind="stable")
        self._grains = np.frombuffer(grains, dtype=np.int64)[order]
        self._starts = np.frombuffer(starts, dtype=np.int64)[order]
        self._sizes = np.frombuffer(sizes, dtype=np.int64)[order]
        self._grain = functools.lru_cache(GRAIN_CACHE)(self._read_grain)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._package.close()

    # -- reading --------------------------------------------------------------------------

    def _slot(self, grain: int) -> int | None:
        """Where ``grain`` is in the index, or None when it is not stored (reads as zeros)."""
        at = int(self._grains.searchsorted(grain))
        return at if at < len(self._grains) and int(self._grains[at]) == grain else None

    def _read_grain(self, slot: int) -> bytes:
        start, size = int(self._starts[slot]), int(self._sizes[slot])
        record = os.pread(self._package.fd, GrainMarker.SIZE + size, self._base + start)
        if len(record) < GrainMarker.SIZE + size:
            raise CorruptImageError(f"the grain record at byte {start} is no longer there: "
                                    "the package changed since it was opened", self.name)
        try:
            data = _deflate.inflate_bounded(record[GrainMarker.SIZE:], self.grain_bytes)
        except ValueError as exc:
            raise CorruptImageError(f"grain record at byte {start}: {exc}", self.name) from exc
        return data.ljust(self.grain_bytes, b"\0")

    def readinto_at(self, offset: int, buf: memoryview) -> None:
        end = offset + len(buf)
        if offset < 0 or end > self.size:
            raise ValueError(f"read of {len(buf)} bytes at {offset} passes the end of the "
                             f"disk ({self.size} bytes)")
        pos = offset
        while pos < end:
            grain, within = divmod(pos, self.grain_bytes)
            n = min(self.grain_bytes - within, end - pos)
            slot = self._slot(grain)
            piece = buf[pos - offset:pos - offset + n]
            if slot is None:
                piece[:] = bytes(n)
            else:
                piece[:] = self._grain(slot)[within:within + n]
            pos += n

    def read_at(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto_at(offset, memoryview(buf))
        return bytes(buf)

    # -- what is stored -------------------------------------------------------------------

    def _runs(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """(start, length, stored) runs of [offset, offset + length), a run per stretch of
        consecutive stored grains and per gap between them."""
        import numpy as np

        end = min(self.size, offset + length)
        if offset >= end:
            return
        gb = self.grain_bytes
        lo, hi = self._grains.searchsorted([offset // gb, (end - 1) // gb + 1])
        stored = self._grains[lo:hi]
        pos = offset
        if len(stored):
            for group in np.split(stored, np.flatnonzero(np.diff(stored) != 1) + 1):
                first = max(offset, int(group[0]) * gb)
                last = min(end, (int(group[-1]) + 1) * gb)
                if first > pos:
                    yield pos, first - pos, False
                yield first, last - first, True
                pos = last
        if pos < end:
            yield pos, end - pos, False

    def map(self, offset: int = 0, length: int | None = None) -> list[Any]:
        from ..image import MapRun

        length = self.size - offset if length is None else length
        return [MapRun(start, n, data=stored, zero=not stored, depth=0, present=stored,
                       filename=self.name, compressed=stored)
                for start, n, stored in self._runs(offset, length)]

    def spans(self) -> Iterator[Any]:
        from ..convert import Span

        for start, n, stored in self._runs(0, self.size):
            yield Span(start, n, stored)

    def files(self) -> list[str]:
        return [self.path]

    # -- it is read-only ------------------------------------------------------------------

    def writable(self) -> bool:
        return False

    def _read_only(self) -> ReadOnlyError:
        return ReadOnlyError("a disk inside an OVA is read-only", self.path)

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        raise self._read_only()

    def write_zeroes_at(self, offset: int, length: int) -> None:
        raise self._read_only()

    def discard_at(self, offset: int, length: int) -> None:
        raise self._read_only()

    def flush(self) -> None:
        pass


def _index(reader: StreamReader) -> tuple[array[int], array[int], array[int]]:
    """(grain, record start, compressed size) of every grain of the stream, read through."""
    grains, starts, sizes = array("q"), array("q"), array("q")
    grain_bytes = reader.grain_bytes
    for offset, _data in reader.grains():
        start, size = reader.grain_record
        grains.append(offset // grain_bytes)
        starts.append(start)
        sizes.append(size)
    return grains, starts, sizes


def open_disk(path: str, disk: str | None = None, *, read_only: bool = True) -> OvaDisk:
    """A disk of the OVA at ``path`` for random reads (``serve``, ``cat``)."""
    if not read_only:
        raise UnsupportedFormatError("a disk inside an OVA is served read-only: add "
                                     "--read-only, or 'vmdk convert' it to a VMDK first", path)
    return OvaDisk(path, disk)


__all__ = ["OvaDisk", "open_disk"]
