"""FLAT / VMFS extents (a plain file, or a device, from an offset) and ZERO extents."""

from __future__ import annotations

import os

from .._access import RandomAccess, Readable, file_size, release
from ..errors import CorruptImageError, MissingExtentError
from .base import (
    SECTOR_SIZE,
    Alloc,
    BackingReader,
    Extent,
    Run,
    pread_exact,
    pwrite_all,
    stored_ranges,
)


class FlatExtent(Extent):
    """Bytes stored as they are, starting ``start_sector`` sectors into ``filename``."""

    def __init__(self, filename: str, sectors: int, start_sector: int = 0, *,
                 read_only: bool = True, missing_as_zeros: bool = False,
                 source: RandomAccess | None = None) -> None:
        """Open ``filename``, or read it from ``source`` (read-only), which the extent
        then owns."""
        self.filename = filename
        #: Read the part past the end of a file shorter than the descriptor says as zeros
        #: (as qemu does) instead of refusing it: a cut copy would otherwise convert
        #: "successfully" with its tail blanked.
        self.missing_as_zeros = missing_as_zeros
        self.size = sectors * SECTOR_SIZE
        self.base = start_sector * SECTOR_SIZE
        self.read_only = read_only
        if start_sector < 0 or self.base + self.size >= 1 << 63:
            raise CorruptImageError(
                f"flat extent at sector {start_sector} of {sectors} sectors lies beyond any "
                "possible file offset", filename)
        self._dirty = False
        #: What reads go through: a local file's descriptor (``fd``, which writes use too)
        #: or a file elsewhere (``fd`` is then -1); -1 once closed.
        self.src: Readable
        if source is not None:
            self.src, self.fd = source, -1
            return
        flags = os.O_RDONLY if read_only else os.O_RDWR
        try:
            self.src = self.fd = os.open(filename, flags | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError as exc:
            raise MissingExtentError("extent file does not exist", filename) from exc

    @classmethod
    def create(cls, filename: str, sectors: int, *, preallocate: bool = False) -> FlatExtent:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if preallocate and sectors:
                os.posix_fallocate(fd, 0, sectors * SECTOR_SIZE)
            else:
                os.ftruncate(fd, sectors * SECTOR_SIZE)
        finally:
            os.close(fd)
        return cls(filename, sectors, read_only=False)

    def read_into(self, offset: int, buf: memoryview) -> list[tuple[int, int]]:
        self._check_range(offset, len(buf))
        got = pread_exact(self.src, buf, self.base + offset, self.filename)
        if got < len(buf) and not self.missing_as_zeros:
            self._refuse_missing(self.base + offset + got)
        return []

    def _refuse_missing(self, end: int) -> None:
        need = self.base + self.size
        raise CorruptImageError(
            f"the file ends at byte {end} but the descriptor gives it {need} bytes: bytes "
            f"{end}-{need} are missing (a cut copy?)", self.filename,
            opt_in=("missing_as_zeros", "reads them as zeros"))

    def status(self, offset: int, length: int) -> list[Run]:
        """Data where the file stores bytes, holes (reading as zeros) where it has holes.

        Past the end of a file shorter than the descriptor says, nothing is stored
        and yet it is no hole: it is reported as data, so that whoever copies it
        reads it and hears that it is missing (holes with ``missing_as_zeros``).
        """
        self._check_range(offset, length)
        if not length:
            return []
        runs: list[Run] = []
        pos, end = self.base + offset, self.base + offset + length
        stored_end = end if self.missing_as_zeros else max(pos, min(end, self._file_end()))
        for data, hole in stored_ranges(self.src, pos, stored_end):
            if data > pos:
                runs.append(Run(pos - self.base, data - pos, Alloc.HOLE, pos, self.filename))
            runs.append(Run(data - self.base, hole - data, Alloc.DATA, data, self.filename))
            pos = hole
        if pos < stored_end:
            runs.append(Run(pos - self.base, stored_end - pos, Alloc.HOLE, pos, self.filename))
        if stored_end < end:
            runs.append(Run(stored_end - self.base, end - stored_end, Alloc.DATA, stored_end,
                            self.filename))
        return runs

    def _file_end(self) -> int:
        return file_size(self.src)  # a device's size too, where fstat says 0

    def write(self, offset: int, data: memoryview, backing: BackingReader | None = None) -> None:
        self._check_writable()
        self._check_range(offset, len(data))
        pwrite_all(self.fd, data, self.base + offset)
        self._dirty = True

    def flush(self) -> None:
        if self._dirty and self.durable:
            os.fsync(self.fd)
            self._dirty = False

    def close(self) -> None:
        if self.src != -1:
            try:
                self.flush()
            finally:
                release(self.src)
                self.src = self.fd = -1

    def info(self) -> dict[str, object]:
        return {"filename": self.filename, "virtual-size": self.size, "format": "FLAT",
                "offset": self.base}


class ZeroExtent(Extent):
    """A range with no storage that always reads as zeros (raw-disk gaps)."""

    def __init__(self, sectors: int) -> None:
        self.size = sectors * SECTOR_SIZE
        self.read_only = True

    def read_into(self, offset: int, buf: memoryview) -> list[tuple[int, int]]:
        self._check_range(offset, len(buf))
        buf[:] = bytes(len(buf))
        return []

    def status(self, offset: int, length: int) -> list[Run]:
        self._check_range(offset, length)
        return [Run(offset, length, Alloc.ZERO)] if length else []

    def info(self) -> dict[str, object]:
        return {"filename": None, "virtual-size": self.size, "format": "ZERO"}
