"""ESXi seSparse extents (snapshot deltas on VMFS-6), read-only.

Layout: a constant header at sector 0 and a volatile header (magic 0xCAFECAFE,
journal state) at ``volatile_header_offset``; both 512 bytes of u64 fields with
offsets and sizes in sectors.  The grain directory (GD) holds u64 entries: 0
for "no table", else ``0x10000000 << 32 | table index``; table ``i`` lies at
``grain_tables_offset + i * grain_table_size``.  A grain table (GT) has 4096
u64 entries whose top nibble is the state: 0 unallocated, 1 SCSI-unmapped and
2 zeroed (both read as zeros), 3 allocated, with the cluster number split over
the other bits.  Grains are always 8 sectors (4 KiB).

Every number in the headers and tables is checked against the file before it
sizes a buffer or an offset: a hostile file raises a :class:`CorruptImageError`
subclass, not a MemoryError.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
else:
    from .._numpy import np

from .._access import RandomAccess, Readable, file_size, release
from .._structs import (
    SESPARSE_CONST_MAGIC,
    SESPARSE_VOLATILE_MAGIC,
    SESparseConstHeader,
    SESparseVolatileHeader,
)
from ..errors import CorruptImageError, InvalidHeaderError, UnsupportedFormatError
from .base import SECTOR_SIZE, pread_exact, read_stored
from .cowd import DATA, HOLE, ZERO, GrainMappedExtent

VERSION = 0x0000000200000001
GRAIN_SECTORS = 8
GT_SECTORS = 64
GT_ENTRIES = GT_SECTORS * SECTOR_SIZE // 8
#: Capacity must stay below 64 TiB.
MAX_CAPACITY_SECTORS = (64 << 40) // SECTOR_SIZE
#: Bound on every header offset and size, so sums of them cannot overflow u64.
MAX_HEADER_SECTORS = 1 << 48
GD_ENTRY_TAG = 0x10000000
DEFAULT_GT_CACHE = 256

# GT entry states by top nibble.
_STATE_KIND = np.array([HOLE, ZERO, ZERO, DATA], dtype=np.int8)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class SESparseExtent(GrainMappedExtent):
    """One seSparse extent file, opened read-only."""

    def __init__(
        self,
        filename: str,
        fd: Readable,
        header: SESparseConstHeader,
        volatile: SESparseVolatileHeader,
        gd: np.ndarray,
        *,
        nominal_sectors: int | None,
        file_sectors: int,
    ) -> None:
        self.filename = filename
        self.header = header
        self.volatile = volatile
        self.read_only = True
        self.size = (header.capacity if nominal_sectors is None else nominal_sectors) * SECTOR_SIZE
        self._src = fd
        self._gd = gd
        self._present = np.flatnonzero(gd)
        self._grain_bytes = GRAIN_SECTORS * SECTOR_SIZE
        self._gt_entries = GT_ENTRIES
        self._file_sectors = file_sectors
        self._tables: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_size = DEFAULT_GT_CACHE

    @classmethod
    def open(cls, path: str, *, nominal_sectors: int | None = None,
             source: RandomAccess | None = None) -> SESparseExtent:
        """Open ``path``, or read it from ``source``, which the extent then owns."""
        path = os.fspath(path)
        fd: Readable = source if source is not None else os.open(path, os.O_RDONLY)
        try:
            file_sectors = file_size(fd) // SECTOR_SIZE
            header = _read_const_header(fd, path, file_sectors)
            volatile = _read_volatile_header(fd, path, header)
            gd = _read_gd(fd, path, header, file_sectors)
            return cls(
                path,
                fd,
                header,
                volatile,
                gd,
                nominal_sectors=nominal_sectors,
                file_sectors=file_sectors,
            )
        except BaseException:
            release(fd)
            raise

    def _present_tables(self) -> np.ndarray:
        return self._present

    def _decoded(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        cached = self._tables.get(index)
        if cached is not None:
            with contextlib.suppress(KeyError):  # another reader may have just evicted it
                self._tables.move_to_end(index)
            return cached
        decoded = self._read_gt(index)
        self._tables[index] = decoded
        if len(self._tables) > self._cache_size:
            self._tables.popitem(last=False)
        return decoded

    def _read_gt(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Read and check table ``index``; return per-grain (kind, host byte offset)."""
        h = self.header
        table_no = int(self._gd[index]) & 0xFFFFFFFF
        sector = h.grain_tables_offset + table_no * GT_SECTORS
        raw = bytearray(GT_ENTRIES * 8)
        pread_exact(self._src, memoryview(raw), sector * SECTOR_SIZE, self.filename)
        entries = np.frombuffer(raw, dtype="<u8")
        state = entries >> np.uint64(60)
        cluster = ((entries >> np.uint64(48)) & np.uint64(0xFFF)) | (
            (entries & np.uint64(0xFFFFFFFFFFFF)) << np.uint64(12)
        )
        allocated = state == 3
        data_end = np.uint64(h.grains_offset) + (cluster + np.uint64(1)) * np.uint64(GRAIN_SECTORS)
        bad = np.flatnonzero(
            (state > 3)
            | ((state == 0) & (entries != 0))
            | (allocated & (cluster >= np.uint64(h.grains_size // GRAIN_SECTORS)))
            | (allocated & (data_end > np.uint64(self._file_sectors)))
        )
        if bad.size:
            i = int(bad[0])
            raise CorruptImageError(
                f"grain table {index} (sector {sector}) entry {i} is {int(entries[i]):#018x}: "
                f"not a known state, or outside the grains area / the file "
                f"({self._file_sectors} sectors)",
                self.filename,
            )
        kinds = _STATE_KIND[state.astype(np.intp)]
        clusters = np.where(allocated, cluster, np.uint64(0)).astype(np.int64)
        return kinds, (h.grains_offset + clusters * GRAIN_SECTORS) * SECTOR_SIZE

    def close(self) -> None:
        if self._src != -1:
            src, self._src = self._src, -1
            self._tables.clear()
            release(src)

    def info(self) -> dict[str, object]:
        return {
            "filename": self.filename,
            "virtual-size": self.size,
            "format": "SESPARSE",
            "cluster-size": self._grain_bytes,
        }


def _read_header_sector(fd: Readable, path: str, sector: int, what: str) -> bytes:
    raw = bytearray(SECTOR_SIZE)
    if pread_exact(fd, memoryview(raw), sector * SECTOR_SIZE, path) < SECTOR_SIZE:
        raise InvalidHeaderError(f"{what} at sector {sector} is past the end of the file", path)
    return bytes(raw)


def _read_const_header(fd: Readable, path: str, file_sectors: int) -> SESparseConstHeader:
    h = SESparseConstHeader.unpack(_read_header_sector(fd, path, 0, "seSparse header"))
    if h.magic != SESPARSE_CONST_MAGIC:
        raise InvalidHeaderError(
            f"bad magic {h.magic:#x}, expected {SESPARSE_CONST_MAGIC:#x}", path
        )
    if h.version != VERSION:
        raise UnsupportedFormatError(f"seSparse version {h.version:#x} (only {VERSION:#x})", path)
    if h.flags != 0:
        raise UnsupportedFormatError(f"seSparse flags {h.flags:#x} are not known", path)
    if h.grain_size != GRAIN_SECTORS:
        raise InvalidHeaderError(
            f"grain size {h.grain_size} sectors, expected {GRAIN_SECTORS}", path
        )
    if h.grain_table_size != GT_SECTORS:
        raise InvalidHeaderError(
            f"grain table size {h.grain_table_size} sectors, expected {GT_SECTORS}", path
        )
    if h.capacity >= MAX_CAPACITY_SECTORS:
        raise InvalidHeaderError(f"capacity {h.capacity} sectors is not below 64 TiB", path)
    for name in (
        "volatile_header_offset",
        "grain_dir_offset",
        "grain_dir_size",
        "grain_tables_offset",
        "grain_tables_size",
        "grains_offset",
        "grains_size",
    ):
        if getattr(h, name) >= MAX_HEADER_SECTORS:
            raise InvalidHeaderError(f"{name} {getattr(h, name)} is implausibly large", path)
    return h


def _read_volatile_header(fd: Readable, path: str, h: SESparseConstHeader) -> SESparseVolatileHeader:
    if h.volatile_header_offset == 0:
        raise InvalidHeaderError("volatile header offset is 0 (the constant header)", path)
    v = SESparseVolatileHeader.unpack(
        _read_header_sector(fd, path, h.volatile_header_offset, "volatile header")
    )
    if v.magic != SESPARSE_VOLATILE_MAGIC:
        raise InvalidHeaderError(
            f"bad volatile header magic {v.magic:#x}, expected {SESPARSE_VOLATILE_MAGIC:#x}", path
        )
    if v.replay_journal:
        raise UnsupportedFormatError(
            "journal needs replay (the image was not closed cleanly)", path
        )
    return v


#: Directory entries checked at a time: temporaries stay bounded.
_CHECK_CHUNK = 1 << 18


def _check_gd_entries(gd: np.ndarray, lo: int, hi: int, h: SESparseConstHeader,
                      file_sectors: int, path: str) -> None:
    """Entries ``lo .. hi`` must be 0 or name a table inside the tables area and the file."""
    part = gd[lo:hi]
    index = (part & np.uint64(0xFFFFFFFF)).astype(np.int64)
    table_end = h.grain_tables_offset + (index + 1) * GT_SECTORS
    bad = np.flatnonzero(
        (part != 0)
        & (
            ((part >> np.uint64(32)) != GD_ENTRY_TAG)
            | ((index + 1) * GT_SECTORS > h.grain_tables_size)
            | (table_end > file_sectors)
        )
    )
    if bad.size:
        i = lo + int(bad[0])
        raise CorruptImageError(
            f"grain directory entry {i} is {int(gd[i]):#018x}: not a table reference inside the "
            f"grain tables area ({h.grain_tables_size} sectors) and the file "
            f"({file_sectors} sectors)",
            path,
        )


def _read_gd(fd: Readable, path: str, h: SESparseConstHeader, file_sectors: int) -> np.ndarray:
    needed = _ceil_div(h.capacity, GT_ENTRIES * GRAIN_SECTORS)
    if needed * 8 > h.grain_dir_size * SECTOR_SIZE:
        raise InvalidHeaderError(
            f"grain directory of {h.grain_dir_size} sectors is too small for {needed} entries", path
        )
    if h.grain_dir_offset + _ceil_div(needed * 8, SECTOR_SIZE) > file_sectors:
        raise InvalidHeaderError(
            f"grain directory at sector {h.grain_dir_offset} is past the end of the file "
            f"({file_sectors} sectors)",
            path,
        )
    raw, stored = read_stored(fd, h.grain_dir_offset * SECTOR_SIZE, needed * 8, path,
                              "grain directory")
    gd = np.frombuffer(raw, dtype="<u8")
    for a, b in stored:  # holes hold no entries: only what the file stores is checked
        for at in range(a // 8, -(-b // 8), _CHECK_CHUNK):
            _check_gd_entries(gd, at, min(at + _CHECK_CHUNK, -(-b // 8)), h, file_sectors,
                              path)
    return gd
