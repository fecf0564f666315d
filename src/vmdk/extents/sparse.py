"""Hosted sparse extents ("KDMV"): monolithicSparse, split sparse and streamOptimized reads.

Lookup is two-level: the grain directory (GD) points at grain tables (GT),
whose entries (GTE) give the sector of each grain.  Requests are mapped to
runs of grains whose host sectors are contiguous, so a large read or write
costs one system call per run.  The directory and tables are stdlib arrays of
u32: reading and mapping need no numpy (which costs more to import than most
images take to open); bulk work on them goes through numpy views of the same
memory.

Crash safety: grain data is written first; changed grain tables are kept in
the cache, marked dirty, and reach the file only after the data was synced
(on ``flush`` or when the cache must evict one); grain directory entries are
written last.  A crash therefore leaves at worst unused space at the end of
the file, never a table that points at garbage.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
import os
import struct
import sys
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
else:
    from .._numpy import np

from .. import _deflate
from .._access import RandomAccess, Readable, pread, release
from .._structs import (
    GD_AT_END,
    KNOWN_SPARSE_FLAGS,
    NEWLINE_CHECK,
    SPARSE_MAGIC,
    ZEROED_GTE,
    CompressAlgorithm,
    GrainMarker,
    MarkerType,
    MetadataMarker,
    SparseFlags,
    SparseHeader,
)
from ..errors import (
    CorruptImageError,
    InvalidHeaderError,
    MissingExtentError,
    UnsupportedFormatError,
)
from .base import (
    SECTOR_SIZE,
    Alloc,
    BackingReader,
    Extent,
    Run,
    merge_runs,
    pread_exact,
    pwrite_all,
    pwritev_all,
    read_pieces,
    read_stored,
    zero_fill,
    zeroed_buffer,
)
from .table_scan import TableBatch, in_holes, read_tables

log = logging.getLogger(__name__)

MAX_VERSION = 3
#: Grains above 32 MiB are refused: real tools use 4-1024 KiB, and a grain is a buffer.
MAX_GRAIN_SECTORS = 1 << 16
MAX_GTES_PER_GT = 1 << 16
#: u32 sector numbers cannot address past 2 TiB of extent file.
MAX_FILE_SECTORS = 1 << 32
#: qemu refuses grain directories above 32 Mi entries ("L1 size too big").
MAX_GD_ENTRIES = 32 << 20
#: Embedded descriptors above 1 MiB are refused before reading.
MAX_DESCRIPTOR_SECTORS = 2048
#: Default memory budget for cached grain tables (bytes).
DEFAULT_GT_CACHE_BYTES = 16 << 20
#: Decompressed grains kept for small reads that hit the same grain again.
GRAIN_CACHE_ENTRIES = 16

#: Mapping this many tables or more first looks for those lying in holes of the file.
_HOLE_SCAN_TABLES = 16
#: Tables read together by scan_tables (4 MiB of the usual 2 KiB tables, per copy).
SCAN_BATCH_BYTES = 4 << 20
SCAN_STEPS = 16

# GTE classes used by the run mapper.
_UNALLOC, _ZERO, _DATA, _COMPRESSED = 0, 1, 2, 3


#: Directories longer than this are validated with numpy (only tiny grains get there).
_BULK_ENTRIES = 1 << 20
#: Bulk work on a directory goes this many entries at a time: temporaries stay bounded.
_BULK_CHUNK = 1 << 20

if array("I").itemsize != 4:  # pragma: no cover - every platform Python runs on today
    raise ImportError("vmdk needs a 4-byte C unsigned int for its grain tables")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def u32_array(raw: bytes) -> array[int]:
    """Little-endian u32 entries (as a directory or table holds them) as an array."""
    table = array("I")
    table.frombytes(raw)
    if sys.byteorder == "big":
        table.byteswap()
    return table


#: A grain directory in memory: native u32 entries (``len``, indexing, ``np.frombuffer``).
Directory = memoryview


def zeroed_directory(count: int) -> Directory:
    """``count`` u32 zeros that cost memory only where entries are written."""
    return zeroed_buffer(count * 4).cast("I")


def grown_directory(directory: Directory, more: array[int]) -> Directory:
    """A new directory: ``directory``'s entries followed by ``more``."""
    out = zeroed_directory(len(directory) + len(more))
    out[:len(directory)] = directory
    out[len(directory):] = memoryview(more)
    return out


def u32_bytes(table: array[int] | Directory) -> bytes:
    """The entries as they are stored: little-endian u32."""
    if sys.byteorder == "big":
        table = array("I", table)
        table.byteswap()
    return table.tobytes()


def u32_view(table: array[int] | Directory) -> np.ndarray:
    """A numpy view of a directory or table, for bulk work (writes go through to it)."""
    return np.frombuffer(table, dtype=np.uint32)


def _misplaced(entries: array[int] | Directory, limit: int, areas: list[tuple[int, int]],
               span: int) -> list[int]:
    """Indexes of the non-zero entries whose ``span`` sectors pass ``limit`` or overlap
    one of ``areas`` (half-open sector ranges)."""
    if len(entries) > _BULK_ENTRIES:
        found: list[int] = []
        for at in range(0, len(entries), _BULK_CHUNK):  # bounded temporaries
            v = u32_view(entries[at:at + _BULK_CHUNK]).astype(np.int64)
            wrong = v + span > limit
            for a, b in areas:
                wrong |= (v < b) & (v + span > a)
            found += (np.flatnonzero(wrong & (v != 0)) + at).tolist()
        return found
    values = sorted(entries)  # one pass in C for the usual ascending directory
    nonzero = bisect.bisect_right(values, 0)
    bad = set(values[max(nonzero, bisect.bisect_right(values, limit - span)):])
    for a, b in areas:
        bad.update(values[max(nonzero, bisect.bisect_right(values, a - span)):
                          bisect.bisect_left(values, b)])
    return [i for i, v in enumerate(entries) if v in bad] if bad else []


def _mismatched(gd: Directory, rgd: Directory) -> list[int]:
    """Indexes where one directory has a table and the other has none."""
    if len(gd) > _BULK_ENTRIES:
        found: list[int] = []
        for at in range(0, len(gd), _BULK_CHUNK):  # bounded temporaries
            a, b = u32_view(gd[at:at + _BULK_CHUNK]), u32_view(rgd[at:at + _BULK_CHUNK])
            found += (np.flatnonzero((a == 0) != (b == 0)) + at).tolist()
        return found
    if not _has_zero(gd) and not _has_zero(rgd):
        return []
    return [i for i, (a, b) in enumerate(zip(gd, rgd)) if (a == 0) != (b == 0)]


#: Directory entries compared with zeros at a time while skipping empty slots.
_SKIP_SLOTS = 1 << 14
_ZERO_SLOTS = bytes(4 * _SKIP_SLOTS)


def next_table(directory: Directory, start: int, stop: int) -> int:
    """The first index of ``start .. stop`` whose entry is not zero, or ``stop``.

    Long stretches of empty slots (a huge, mostly empty disk) are skipped a block at a
    time at memory speed, not entry by entry.
    """
    for i in range(start, min(stop, start + 32)):  # a table in nearly every slot is usual
        if directory[i]:
            return i
    i = min(stop, start + 32)
    raw = directory.cast("B")
    while i < stop:
        n = min(_SKIP_SLOTS, stop - i)
        block = raw[4 * i:4 * (i + n)].tobytes()
        if block != _ZERO_SLOTS[:4 * n]:
            return i + (len(block) - len(block.lstrip(b"\0"))) // 4
        i += n
    return stop


def _slots_with_tables(directory: Directory, start: int, stop: int) -> Iterator[int]:
    """The indexes of ``start .. stop`` whose entries are not zero."""
    i = next_table(directory, start, stop)
    while i < stop:
        yield i
        i = next_table(directory, i + 1, stop)


def nonzero_slots(directory: Directory) -> list[int]:
    """Indexes of the directory's non-zero entries (the tables it has)."""
    if len(directory) > _BULK_ENTRIES:
        found: list[int] = []
        for at in range(0, len(directory), _BULK_CHUNK):
            found += (np.flatnonzero(u32_view(directory[at:at + _BULK_CHUNK])) + at).tolist()
        return found
    return [i for i, sector in enumerate(directory) if sector]


def _has_zero(table: array[int] | Directory) -> bool:
    # Four zero bytes in a row are rare in sector numbers: memchr-speed ruling out first.
    return b"\0\0\0\0" in table.tobytes() and 0 in table


def _sequence(first: int, count: int, step: int) -> array[int]:
    """``first, first + step, ...`` (``count`` u32 entries): contiguous grains or tables."""
    return array("I", range(first, first + count * step, step))


def _union(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Half-open ranges sorted and merged where they touch or overlap."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


#: Tables any single operation may still be holding: never evicted below this many.
_MIN_CACHED_TABLES = 4
_serials = itertools.count()


class TableCache:
    """Grain tables in memory for the extents of one image, least recently used out first,
    within one budget of bytes however many extents share it.

    A table changed in memory (dirty) leaves only after its extent wrote it back,
    which syncs the grain data first: eviction never loses a write or reorders it.
    Several threads may read one image at once (convert and compare read ahead), so
    the bookkeeping is done under a lock.
    """

    def __init__(self, budget: int = DEFAULT_GT_CACHE_BYTES) -> None:
        self.budget = budget
        self._tables: OrderedDict[tuple[int, int], tuple[SparseExtent, array[int]]] = (
            OrderedDict())
        self._bytes = 0
        self._lock = threading.RLock()  # re-entered: eviction writes dirty tables back

    def get(self, extent: SparseExtent, index: int) -> array[int] | None:
        key = (extent._serial, index)
        with self._lock:
            hit = self._tables.get(key)
            if hit is None:
                return None
            self._tables.move_to_end(key)
            return hit[1]

    def put(self, extent: SparseExtent, index: int, table: array[int]) -> None:
        with self._lock:
            self.pop(extent, index)
            self._tables[(extent._serial, index)] = (extent, table)
            self._bytes += table.itemsize * len(table)
            self._evict()

    def pop(self, extent: SparseExtent, index: int) -> None:
        with self._lock:
            hit = self._tables.pop((extent._serial, index), None)
            if hit is not None:
                self._bytes -= hit[1].itemsize * len(hit[1])

    def has(self, extent: SparseExtent, index: int) -> bool:
        return (extent._serial, index) in self._tables

    def indexes(self, extent: SparseExtent) -> list[int]:
        with self._lock:
            return [index for serial, index in self._tables if serial == extent._serial]

    def drop(self, extent: SparseExtent) -> None:
        """Forget every table of a closed extent."""
        with self._lock:
            for index in self.indexes(extent):
                self.pop(extent, index)

    def _evict(self) -> None:
        while self._bytes > self.budget and len(self._tables) > _MIN_CACHED_TABLES:
            (_serial, index), (extent, _table) = next(iter(self._tables.items()))
            if index in extent._gt_dirty:
                extent._write_back_tables()
            self.pop(extent, index)


def _rows_differing(primary: np.ndarray, backup: np.ndarray | None) -> np.ndarray:
    """Rows (tables) where the two copies differ; a fresh image's are all zeros."""
    if backup is None or not (primary.any() or backup.any()):
        return np.zeros(0, dtype=np.int64)
    rows: np.ndarray = np.flatnonzero((primary != backup).any(axis=1))
    return rows


_pool: ThreadPoolExecutor | None = None


def _inflate_pool() -> ThreadPoolExecutor:
    """Shared workers for inflating grains, made on first use."""
    global _pool
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="vmdk-inflate")
    return _pool


@dataclasses.dataclass(frozen=True)
class SparseLayout:
    """Where :meth:`SparseExtent.create` puts each structure (sectors), and the overhead
    before the first grain: a new extent's file is exactly ``overhead`` sectors long."""

    gd_entries: int
    gt_sectors: int
    descriptor_offset: int
    descriptor_sectors: int
    rgd_offset: int
    rgts: int
    gd_offset: int
    gts: int
    overhead: int

    @classmethod
    def plan(cls, capacity: int, *, grain_size: int = 128, num_gtes_per_gt: int = 512,
             descriptor_bytes: int | None = None, descriptor_sectors: int = 20,
             redundant: bool = True, filename: str | None = None) -> SparseLayout:
        """Header, embedded descriptor, redundant GD, redundant GTs, GD, GTs, then grains
        from the first grain-aligned sector, as VMware lays it out."""
        gt_sectors = _ceil_div(num_gtes_per_gt * 4, SECTOR_SIZE)
        gd_entries = _ceil_div(capacity, num_gtes_per_gt * grain_size)
        if gd_entries > MAX_GD_ENTRIES:
            limit = MAX_GD_ENTRIES * num_gtes_per_gt * grain_size * SECTOR_SIZE
            raise UnsupportedFormatError(
                f"a sparse extent of this grain size holds at most {limit >> 40} TiB (qemu and "
                "VMware refuse larger grain directories); use a larger cluster size", filename)
        gd_sectors = _ceil_div(gd_entries * 4, SECTOR_SIZE)
        sector = 1
        desc_offset = desc_size = 0
        if descriptor_bytes is not None:
            desc_size = max(descriptor_sectors, _ceil_div(descriptor_bytes, SECTOR_SIZE))
            desc_offset, sector = sector, sector + desc_size
        rgd_offset = rgts = 0
        if redundant:
            rgd_offset, sector = sector, sector + gd_sectors
            rgts, sector = sector, sector + gd_entries * gt_sectors
        gd_offset, sector = sector, sector + gd_sectors
        gts, sector = sector, sector + gd_entries * gt_sectors
        overhead = _ceil_div(sector, grain_size) * grain_size
        if overhead > MAX_FILE_SECTORS:
            raise UnsupportedFormatError("disk is too large for one sparse extent", filename)
        return cls(gd_entries, gt_sectors, desc_offset, desc_size, rgd_offset, rgts, gd_offset,
                   gts, overhead)


class SparseExtent(Extent):
    """One hosted sparse extent file."""

    def __init__(
        self,
        filename: str,
        fd: Readable,
        header: SparseHeader,
        *,
        read_only: bool,
        nominal_sectors: int | None,
        gt_cache_bytes: int = DEFAULT_GT_CACHE_BYTES,
        table_cache: TableCache | None = None,
        strict: bool = True,
        defer_writes: bool = False,
    ) -> None:
        self.filename = filename
        self._writing = False  # begin_writing() ran: close() then writes the header back
        self._meta: tuple[list[int], list[int]] | None = None  # see _metadata_areas
        #: Refuse to write when redundant metadata disagrees (off only while repairing).
        self.strict = strict
        #: What reads go through: the descriptor of a local file, or a file elsewhere
        #: (read-only: writes go through ``fd``, which is then -1).
        self.src = fd
        self.fd = fd if isinstance(fd, int) else -1
        self.header = header
        self.read_only = read_only
        self.file_size = os.fstat(fd).st_size if isinstance(fd, int) else fd.size
        #: A writer died with the file open: disagreeing redundant copies are then the
        #: expected trace of an interrupted update, repaired from the primary, not an error.
        self.was_unclean = bool(header.unclean_shutdown)
        self._rgd_mismatch: list[int] = []
        self._validate_header()
        self.grain_bytes = header.grain_size * SECTOR_SIZE
        self.gt_coverage = header.num_gtes_per_gt * header.grain_size  # sectors per GT
        self.gd_entries = _ceil_div(header.capacity, self.gt_coverage)
        self.compressed = header.has(SparseFlags.COMPRESSED)
        self.markers = header.has(SparseFlags.MARKERS)
        self.zeroed_gte = header.has(SparseFlags.ZEROED_GTE)
        sectors = header.capacity if nominal_sectors is None else nominal_sectors
        if sectors > header.capacity:
            raise CorruptImageError(
                f"descriptor gives {sectors} sectors but the header's capacity is "
                f"{header.capacity}", filename)
        self.size = sectors * SECTOR_SIZE
        self._resolve_footer()
        #: Faults found in the directories and worked around with the redundant copy;
        #: ``vmdk check`` reports them as corruptions and ``check -r all`` rewrites them.
        self.directory_faults: list[str] = []
        if self.gd_entries > MAX_GD_ENTRIES:
            raise InvalidHeaderError(
                f"grain directory of {self.gd_entries} entries is larger than any tool "
                f"accepts ({MAX_GD_ENTRIES}; capacity {header.capacity} sectors in tables "
                f"of {header.num_gtes_per_gt} grains of {header.grain_size} sectors)", filename)
        self.gd, gd_bad, stored = self._read_directory(self.header.gd_offset, "grain directory")
        self.rgd: Directory | None = None
        rgd_bad: list[int] = []
        if header.has(SparseFlags.REDUNDANT_GT) and header.rgd_offset and not self.compressed:
            self.rgd, rgd_bad, rstored = self._read_directory(header.rgd_offset,
                                                              "redundant grain directory")
            stored = _union(stored + rstored)
        self._use_redundant_for(gd_bad, rgd_bad)
        if self.rgd is not None:
            self._compare_directories(stored)
        #: Grain tables in memory: the image's cache, shared by all its extents.
        self._tables = table_cache if table_cache is not None else TableCache(gt_cache_bytes)
        self._serial = next(_serials)
        self._gt_dirty: set[int] = set()
        self._gd_dirty: set[int] = set()
        self._grain_cache: OrderedDict[int, bytes] = OrderedDict()
        self._data_unsynced = False
        self._end = _ceil_div(self.file_size, SECTOR_SIZE)  # next free sector
        if not read_only and self.compressed:
            raise UnsupportedFormatError(
                "compressed (streamOptimized) extents are append-only and cannot be "
                "opened for writing; convert the image first", filename)
        if not defer_writes:
            self.warn_if_unclean()
            self.begin_writing()

    def warn_if_unclean(self) -> None:
        if self.was_unclean and not self.compressed:
            log.warning("%s: the image was not closed cleanly; 'vmdk check -r all' verifies "
                        "it and clears the flag", self.filename)

    def begin_writing(self) -> None:
        if self.read_only or self._writing:
            return
        if self._rgd_mismatch:
            self._recover_directories()
        self._mark_unclean(True)
        self._writing = True

    # ----------------------------------------------------------------- opening

    @classmethod
    def open(
        cls,
        filename: str,
        *,
        read_only: bool = True,
        nominal_sectors: int | None = None,
        gt_cache_bytes: int = DEFAULT_GT_CACHE_BYTES,
        table_cache: TableCache | None = None,
        strict: bool = True,
        defer_writes: bool = False,
        source: RandomAccess | None = None,
    ) -> SparseExtent:
        """Open ``filename``, or read it from ``source`` (a file not on this machine,
        read-only), which the extent then owns."""
        fd: Readable
        if source is not None:
            fd = source
        else:
            flags = (os.O_RDONLY if read_only else os.O_RDWR) | getattr(os, "O_CLOEXEC", 0)
            try:
                fd = os.open(filename, flags)
            except FileNotFoundError as exc:
                raise MissingExtentError("extent file does not exist", filename) from exc
        try:
            raw = pread(fd, SparseHeader.SIZE, 0)
            if raw[:4] != SPARSE_MAGIC:
                raise InvalidHeaderError("not a hosted sparse extent (no KDMV header)", filename)
            if len(raw) < SparseHeader.SIZE:
                raise InvalidHeaderError(
                    f"the file is cut short: {len(raw)} bytes, less than its "
                    f"{SparseHeader.SIZE}-byte header", filename)
            header = SparseHeader.unpack(raw)
            return cls(filename, fd, header, read_only=read_only,
                       nominal_sectors=nominal_sectors, gt_cache_bytes=gt_cache_bytes,
                       table_cache=table_cache, strict=strict, defer_writes=defer_writes)
        except BaseException:
            release(fd)
            raise

    def _validate_header(self) -> None:
        h, name = self.header, self.filename
        if h.version < 1 or h.version > MAX_VERSION:
            raise UnsupportedFormatError(f"sparse header version {h.version} is not supported", name)
        unknown = h.flags & ~int(KNOWN_SPARSE_FLAGS)
        if unknown & ~int(SparseFlags.COMPATIBLE_MASK):
            raise UnsupportedFormatError(f"unknown incompatible header flags {unknown:#x}", name)
        if h.has(SparseFlags.VALID_NEWLINE) and h.newline_check != NEWLINE_CHECK:
            raise CorruptImageError(
                "newline check bytes are damaged: the file was probably transferred in text mode",
                name)
        if h.grain_size < 1 or h.grain_size > MAX_GRAIN_SECTORS or h.grain_size & (h.grain_size - 1):
            raise InvalidHeaderError(f"invalid grain size {h.grain_size} sectors", name)
        if not 1 <= h.num_gtes_per_gt <= MAX_GTES_PER_GT:
            raise InvalidHeaderError(f"invalid number of entries per grain table {h.num_gtes_per_gt}",
                                     name)
        if h.has(SparseFlags.COMPRESSED) and h.compress_algorithm != CompressAlgorithm.DEFLATE:
            raise UnsupportedFormatError(f"unknown compression algorithm {h.compress_algorithm}", name)
        if h.capacity >= 1 << 47:
            raise InvalidHeaderError(f"capacity of {h.capacity} sectors is not plausible", name)
        if h.descriptor_offset:
            self._check_area(h.descriptor_offset, h.descriptor_size, "embedded descriptor")
            if h.descriptor_size > MAX_DESCRIPTOR_SECTORS:
                raise InvalidHeaderError(
                    f"embedded descriptor of {h.descriptor_size} sectors is too large", name)

    def _check_area(self, sector: int, sectors: int, what: str) -> None:
        end = (sector + sectors) * SECTOR_SIZE
        if sector <= 0 or end > self.file_size:
            raise InvalidHeaderError(
                f"{what} at sector {sector} ({sectors} sectors) lies outside the file "
                f"of {self.file_size} bytes", self.filename)

    def _resolve_footer(self) -> None:
        """Streams written front to back keep the real header in a footer before EOS."""
        if self.header.gd_offset != GD_AT_END:
            return
        name = self.filename
        if self.file_size < 3 * SECTOR_SIZE:
            raise CorruptImageError("stream is too short to hold a footer", name)
        tail = pread(self.src, 3 * SECTOR_SIZE, self.file_size - 3 * SECTOR_SIZE)
        try:
            marker = MetadataMarker.unpack(tail[:SECTOR_SIZE])
            eos = MetadataMarker.unpack(tail[2 * SECTOR_SIZE:])
            footer = SparseHeader.unpack(tail[SECTOR_SIZE:2 * SECTOR_SIZE])
        except ValueError as exc:
            raise CorruptImageError(
                "stream has no valid footer (truncated or not finished writing)", name) from exc
        if marker.type != MarkerType.FOOTER or eos.type != MarkerType.EOS or eos.num_sectors:
            raise CorruptImageError(
                "stream has no valid footer (truncated or not finished writing)", name)
        if footer.gd_offset == GD_AT_END:
            raise CorruptImageError("stream footer does not give the grain directory offset", name)
        if (footer.capacity, footer.grain_size, footer.num_gtes_per_gt) != (
                self.header.capacity, self.header.grain_size, self.header.num_gtes_per_gt):
            raise CorruptImageError("stream footer contradicts the header", name)
        self.header.gd_offset = footer.gd_offset
        self.header.rgd_offset = footer.rgd_offset

    def _read_directory(self, sector: int, what: str
                        ) -> tuple[Directory, list[int], list[tuple[int, int]]]:
        """The directory at ``sector``, the indexes of its entries past the file's end or
        inside the header, the descriptor or a directory (a table there would be written
        over them), and the index ranges the file stores (elsewhere it has holes: zeros).

        Only what the file stores is read and checked, so a directory that is mostly
        holes costs what it holds, not what its header claims.
        """
        count = self.gd_entries
        gd_sectors = _ceil_div(count * 4, SECTOR_SIZE)
        if count == 0:
            return zeroed_directory(0), [], []
        self._check_area(sector, gd_sectors, what)
        raw, stored_bytes = read_stored(self.src, sector * SECTOR_SIZE, count * 4,
                                        self.filename, what)
        gd = raw.cast("I")
        stored = [(a // 4, _ceil_div(b, 4)) for a, b in stored_bytes]
        if sys.byteorder == "big":
            for a, b in stored:
                swapped = array("I", gd[a:b])
                swapped.byteswap()
                gd[a:b] = memoryview(swapped)
        h = self.header
        fixed = [(0, 1), (h.gd_offset, h.gd_offset + gd_sectors)]
        if h.descriptor_offset:
            fixed.append((h.descriptor_offset, h.descriptor_offset + h.descriptor_size))
        if h.has(SparseFlags.REDUNDANT_GT) and h.rgd_offset:
            fixed.append((h.rgd_offset, h.rgd_offset + gd_sectors))
        gt_sectors = _ceil_div(h.num_gtes_per_gt * 4, SECTOR_SIZE)
        limit = _ceil_div(self.file_size, SECTOR_SIZE)
        bad = [a + i for a, b in stored for i in _misplaced(gd[a:b], limit, fixed, gt_sectors)]
        return gd, bad, stored

    def _use_redundant_for(self, gd_bad: list[int], rgd_bad: list[int]) -> None:
        """Directory entries pointing past the end: fall back on the other copy where it can."""
        name = self.filename
        if rgd_bad:
            assert self.rgd is not None
            self.directory_faults.append(
                f"redundant grain directory entry {rgd_bad[0]} points past the end of the "
                f"file or into metadata ({len(rgd_bad)} entries)")
            for i in rgd_bad:
                self.rgd[i] = 0  # only a copy: the primary still knows these tables
        if not gd_bad:
            return
        first = gd_bad[0]
        msg = (f"grain directory entry {first} points at sector {int(self.gd[first])}, past the "
               f"end of the file or into metadata ({len(gd_bad)} entries)")
        rgd = self.rgd
        if rgd is None or not all(rgd[i] for i in gd_bad):
            raise CorruptImageError(msg, name)
        for i in gd_bad:
            self.gd[i] = rgd[i]
        self.directory_faults.append(msg + "; the redundant copy is used instead")
        if not self.read_only and self.strict:
            raise CorruptImageError(msg + "; run 'vmdk check -r all'", name)
        log.warning("%s: %s; reading the redundant copy", name, msg)

    def _compare_directories(self, stored: list[tuple[int, int]]) -> None:
        """Where either directory stores entries, both must agree on which tables exist
        (elsewhere both read as zeros)."""
        assert self.rgd is not None
        mismatch = [a + i for a, b in stored for i in _mismatched(self.gd[a:b], self.rgd[a:b])]
        if mismatch:
            msg = (f"grain directory and its redundant copy disagree at entry {mismatch[0]} "
                   f"({len(mismatch)} entries); run 'vmdk check -r all'")
            if not self.read_only and self.strict and not self.was_unclean:
                raise CorruptImageError(msg, self.filename)
            log.warning("%s: %s", self.filename, msg)
            self._rgd_mismatch = mismatch

    def _recover_directories(self) -> None:
        """Give every table the primary directory knows a fresh redundant copy (after a crash)."""
        assert self.rgd is not None
        self._meta = None
        gt_sectors = _ceil_div(self.header.num_gtes_per_gt * 4, SECTOR_SIZE)
        for i in self._rgd_mismatch:
            if self.gd[i] == 0:
                self.gd[i] = self.rgd[i]  # only the copy survived: it becomes the primary
            self.rgd[i] = self._end
            self._end += gt_sectors
            self._gt(i)
            self._gt_dirty.add(i)
            self._gd_dirty.add(i)
        os.ftruncate(self.fd, max(self.file_size, self._end * SECTOR_SIZE))
        self.file_size = max(self.file_size, self._end * SECTOR_SIZE)
        self._rgd_mismatch = []

    @classmethod
    def create(
        cls,
        filename: str,
        capacity: int,
        *,
        grain_size: int = 128,
        num_gtes_per_gt: int = 512,
        descriptor: bytes | None = None,
        descriptor_sectors: int = 20,
        redundant: bool = True,
        zeroed_grain: bool = False,
    ) -> SparseExtent:
        """Create a sparse extent with every grain table preallocated, as VMware lays it out.

        Layout: header, embedded descriptor, redundant GD, redundant GTs, GD,
        GTs, then grains from the first grain-aligned sector.  The tables are
        left as holes of zeros in the file, so even a 2 TiB extent is created
        at once.
        """
        lay = SparseLayout.plan(capacity, grain_size=grain_size, num_gtes_per_gt=num_gtes_per_gt,
                                descriptor_bytes=None if descriptor is None else len(descriptor),
                                descriptor_sectors=descriptor_sectors, redundant=redundant,
                                filename=filename)
        flags = SparseFlags.VALID_NEWLINE
        if redundant:
            flags |= SparseFlags.REDUNDANT_GT
        if zeroed_grain:
            flags |= SparseFlags.ZEROED_GTE
        header = SparseHeader(
            version=2 if zeroed_grain else 1, flags=int(flags), capacity=capacity,
            grain_size=grain_size, descriptor_offset=lay.descriptor_offset,
            descriptor_size=lay.descriptor_sectors, num_gtes_per_gt=num_gtes_per_gt,
            rgd_offset=lay.rgd_offset, gd_offset=lay.gd_offset, overhead=lay.overhead)
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            os.ftruncate(fd, lay.overhead * SECTOR_SIZE)
            if descriptor is not None:
                pwrite_all(fd, descriptor.ljust(lay.descriptor_sectors * SECTOR_SIZE, b"\0"),
                           SECTOR_SIZE)
            if redundant:
                pwrite_all(fd, u32_bytes(_sequence(lay.rgts, lay.gd_entries, lay.gt_sectors)),
                           lay.rgd_offset * SECTOR_SIZE)
            pwrite_all(fd, u32_bytes(_sequence(lay.gts, lay.gd_entries, lay.gt_sectors)),
                       lay.gd_offset * SECTOR_SIZE)
            pwrite_all(fd, header.pack(), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        return cls.open(filename, read_only=False)

    # ------------------------------------------------------------- descriptor

    def read_descriptor(self) -> bytes | None:
        h = self.header
        if not h.descriptor_offset or not h.descriptor_size:
            return None
        raw = pread(self.src, h.descriptor_size * SECTOR_SIZE, h.descriptor_offset * SECTOR_SIZE)
        return raw.split(b"\0", 1)[0]

    def write_descriptor(self, data: bytes) -> None:
        """Rewrite the embedded descriptor in place (``data`` already padded to its area)."""
        self._check_writable()
        h = self.header
        if len(data) != h.descriptor_size * SECTOR_SIZE:
            raise ValueError("descriptor must be padded to the embedded area")
        pwrite_all(self.fd, data, h.descriptor_offset * SECTOR_SIZE)

    # ----------------------------------------------------------- grain tables

    def _gt(self, index: int) -> array[int]:
        """The grain table of GD slot ``index`` (all zeros when the slot is empty)."""
        table = self._tables.get(self, index)
        if table is not None:
            return table
        n = self.header.num_gtes_per_gt
        sector = int(self.gd[index])
        if sector == 0:
            return self._absent_table()  # not cached: it holds nothing
        raw = pread(self.src, n * 4, sector * SECTOR_SIZE)
        if len(raw) != n * 4:
            raise CorruptImageError(f"grain table {index} at sector {sector} is truncated",
                                    self.filename)
        table = u32_array(raw)
        self._compare_redundant_table(index, raw)
        self._tables.put(self, index, table)
        return table

    def _cached_table(self, index: int) -> array[int] | None:
        """The table of slot ``index`` if it is in memory (it may be newer than the file's)."""
        return self._tables.get(self, index)

    def _forget_table(self, index: int) -> None:
        """Drop the in-memory table of slot ``index`` unwritten (the file's is right)."""
        self._tables.pop(self, index)
        self._gt_dirty.discard(index)

    def _cached_tables(self) -> list[int]:
        return self._tables.indexes(self)

    def _compare_redundant_table(self, index: int, raw: bytes) -> None:
        """A grain table must equal its redundant copy (checked as each table is first used)."""
        if self.rgd is None or not self.rgd[index]:
            return
        backup = pread(self.src, len(raw), int(self.rgd[index]) * SECTOR_SIZE)
        if backup != raw:
            self._copy_differs(index)

    def _copy_differs(self, index: int) -> None:
        msg = (f"grain table {index} differs from its redundant copy; "
               "run 'vmdk check -r all'")
        if not self.read_only and self.strict and not self.was_unclean:
            raise CorruptImageError(msg, self.filename)
        log.warning("%s: %s", self.filename, msg)
        if not self.read_only:
            self._gt_dirty.add(index)  # the next flush rewrites the copy from the primary

    def _absent_table(self) -> array[int]:
        # Shared and never written: _set_entries allocates a real table first.
        table: array[int] | None = getattr(self, "_absent", None)
        if table is None:
            table = self._absent = array("I", bytes(4 * self.header.num_gtes_per_gt))
        return table

    def _entries(self, first: int, last: int) -> array[int]:
        """Grain table entries for grains ``first .. last`` inclusive, as a new array."""
        n = self.header.num_gtes_per_gt
        index, slot = divmod(first, n)
        out = self._gt(index)[slot:slot + (last + 1 - first)]  # slicing copies
        while len(out) < last + 1 - first:
            index += 1
            out.extend(self._gt(index)[:last + 1 - first - len(out)])
        return out

    def _runs(self, gtes: array[int]) -> list[tuple[int, int, int]]:
        """Split grains into (first, count, kind) runs; data runs have contiguous sectors."""
        n = len(gtes)
        if n == 0:
            return []
        first = gtes[0]
        if n > 32:  # whole tables are often one run: recognise that in C before looping
            if not first and not any(gtes):
                return [(0, n, _UNALLOC)]
            step = self.header.grain_size
            if (self._kind(first) == _DATA and first + (n - 1) * step < MAX_FILE_SECTORS
                    and gtes == _sequence(first, n, step)):
                return [(0, n, _DATA)]
        return self._runs_listed(gtes.tolist())

    def _kind(self, entry: int) -> int:
        if entry == 0:
            return _UNALLOC
        if entry == ZEROED_GTE and self.zeroed_gte:
            return _ZERO
        return _COMPRESSED if self.compressed else _DATA

    def _runs_listed(self, entries: list[int]) -> list[tuple[int, int, int]]:
        if self.compressed or self.zeroed_gte:
            return self._runs_listed_any(entries)
        # Plain hosted sparse: only holes (0) and data; a data run breaks where sectors jump.
        step = self.header.grain_size
        runs: list[tuple[int, int, int]] = []
        start, prev = 0, entries[0]
        for i in range(1, len(entries)):
            entry = entries[i]
            if (entry != prev + step or not prev) if entry else prev:
                runs.append((start, i - start, _DATA if prev else _UNALLOC))
                start = i
            prev = entry
        runs.append((start, len(entries) - start, _DATA if prev else _UNALLOC))
        return runs

    def _runs_listed_any(self, entries: list[int]) -> list[tuple[int, int, int]]:
        step = self.header.grain_size
        runs: list[tuple[int, int, int]] = []
        start, kind = 0, self._kind(entries[0])
        for i in range(1, len(entries)):
            k = self._kind(entries[i])
            if k != kind or k == _COMPRESSED or (k == _DATA and entries[i] != entries[i - 1] + step):
                runs.append((start, i - start, kind))
                start, kind = i, k
        runs.append((start, len(entries) - start, kind))
        return runs

    # -------------------------------------------------------------------- read

    def read_into(self, offset: int, buf: memoryview) -> list[tuple[int, int]]:
        self._check_range(offset, len(buf))
        if not len(buf):
            return []
        g = self.grain_bytes
        first, last = offset // g, (offset + len(buf) - 1) // g
        gtes = self._entries(first, last)
        holes: list[tuple[int, int]] = []
        compressed: list[tuple[int, int, int]] = []
        stored: list[tuple[memoryview, int]] = []
        for start, count, kind in self._runs(gtes):
            lo = max(offset, (first + start) * g)
            hi = min(offset + len(buf), (first + start + count) * g)
            piece = buf[lo - offset:hi - offset]
            if kind == _UNALLOC:
                holes.append((lo - offset, hi - lo))
            elif kind == _ZERO:
                zero_fill(piece)
            elif kind == _DATA:
                stored.append((piece, int(gtes[start]) * SECTOR_SIZE + (lo - (first + start) * g)))
            else:
                compressed.append((first + start, lo, hi))
        if stored:
            self._pread_grains(stored)
        if compressed:
            self._read_compressed(compressed, buf, offset, gtes, first)
        return holes

    def _pread_grains(self, pieces: list[tuple[memoryview, int]]) -> None:
        """Read runs of stored grains (buffer, host offset): all at once, so a remote
        file fetches neighbouring runs in one request."""
        got = (read_pieces(self.src, pieces, self.filename) if len(pieces) > 1 else
               [pread_exact(self.src, pieces[0][0], pieces[0][1], self.filename)])
        for (piece, host), n in zip(pieces, got):
            if n < len(piece):
                raise CorruptImageError(
                    f"grain data at byte {host} ({len(piece)} bytes) lies past the end of the "
                    "file", self.filename)

    def _read_compressed(self, grains: list[tuple[int, int, int]], buf: memoryview, offset: int,
                         gtes: array[int], first: int) -> None:
        found: dict[int, bytes] = {}
        missing: list[tuple[int, int]] = []
        for grain, _lo, _hi in grains:
            data = self._grain_cache.get(grain)
            if data is None:
                missing.append((grain, int(gtes[grain - first])))
            else:
                found[grain] = data
        if missing:
            records = self._fetch_records(missing)
            if len(records) >= 4:  # the deflate engines release the GIL: inflate on all cores
                workers = os.cpu_count() or 1
                step = -(-len(records) // workers)  # one batch per worker: tasks cost too
                batches = [records[i:i + step] for i in range(0, len(records), step)]
                inflated = [data for batch in _inflate_pool().map(
                    lambda b: [self._inflate(*r) for r in b], batches) for data in batch]
            else:
                inflated = [self._inflate(*r) for r in records]
            for (grain, _sector, _payload), data in zip(records, inflated):
                found[grain] = data
            for grain, _sector, _payload in records[-GRAIN_CACHE_ENTRIES:]:
                self._grain_cache[grain] = found[grain]
            while len(self._grain_cache) > GRAIN_CACHE_ENTRIES:
                self._grain_cache.popitem(last=False)
        for grain, lo, hi in grains:
            base = grain * self.grain_bytes
            buf[lo - offset:hi - offset] = memoryview(found[grain])[lo - base:hi - base]

    def _fetch_records(self, grains: list[tuple[int, int]]) -> list[tuple[int, int, memoryview]]:
        """The compressed payload of each (grain, sector), reading neighbours in one go."""
        g = self.grain_bytes
        head = GrainMarker.SIZE if self.markers else 4
        ordered = sorted(grains, key=lambda x: x[1])
        lo = ordered[0][1] * SECTOR_SIZE
        hi = ordered[-1][1] * SECTOR_SIZE + head + 2 * g  # incompressible data grows a little
        bound = self._record_bound(*ordered[-1])
        if bound is not None:  # no byte past the last record: a remote file fetches no more
            hi = min(hi, bound * SECTOR_SIZE)
        window = memoryview(b"")
        if hi - lo <= max(3 * len(ordered) * g, 1 << 20) and hi - lo <= 64 << 20:
            window = memoryview(pread(self.src, hi - lo, lo))  # sliced, never copied
        return [(grain, sector, self._record(grain, sector, window, lo)) for grain, sector in grains]

    def _record_bound(self, grain: int, sector: int) -> int | None:
        """The first sector after ``sector`` known to hold something else: another grain
        of ``grain``'s table, or the table itself (a stream writes it after its grains).
        The record at ``sector`` ends there at the latest."""
        index = grain // self.header.num_gtes_per_gt
        table = self._tables.get(self, index)  # in memory: the read just looked it up
        later = [s for s in table if s > sector] if table is not None else []
        if self.gd[index] > sector:
            later.append(int(self.gd[index]))
        return min(later) if later else None

    def _record(self, grain: int, sector: int, window: memoryview,
                window_start: int) -> memoryview:
        """One compressed grain record's payload, from ``window`` when it holds the record."""
        name, g = self.filename, self.grain_bytes
        head_len = GrainMarker.SIZE if self.markers else 4
        host = sector * SECTOR_SIZE
        at = host - window_start
        if window and 0 <= at and at + head_len <= len(window):
            raw = window[at:at + head_len + 2 * g]
        else:
            # One read usually covers the whole record: compressed grains are smaller.
            raw = memoryview(pread(self.src, head_len + g, host))
        if len(raw) < head_len:
            raise CorruptImageError(f"grain {grain} at sector {sector} lies past the end of the file",
                                    name)
        if self.markers:
            marker = GrainMarker.unpack(raw)
            size = marker.size
            if marker.lba != grain * self.header.grain_size:
                raise CorruptImageError(
                    f"grain {grain} at sector {sector}: marker names sector {marker.lba}", name)
        else:
            size = int.from_bytes(raw[:4], "little")
        if size == 0 or size > 2 * g:
            raise CorruptImageError(f"grain {grain} at sector {sector}: bad compressed size {size}",
                                    name)
        if head_len + size > len(raw):
            raw = memoryview(pread(self.src, head_len + size, host))
            if len(raw) < head_len + size:
                raise CorruptImageError(f"grain {grain} at sector {sector} is truncated", name)
        return raw[head_len:head_len + size]

    def _inflate(self, grain: int, sector: int, payload: memoryview) -> bytes:
        g = self.grain_bytes
        try:
            data = _deflate.inflate_bounded(payload, g)
        except ValueError as exc:
            raise CorruptImageError(f"grain {grain} at sector {sector}: {exc}",
                                    self.filename) from exc
        # A short last grain (qemu writes those) is completed with zeros.
        return data if len(data) == g else data + bytes(g - len(data))

    def status(self, offset: int, length: int) -> list[Run]:
        """Runs over the range, one grain table at a time so memory stays bounded.

        Stretches of empty directory slots, and of tables lying in holes of the file,
        become one unallocated run without reading any table, so mapping a huge,
        mostly empty disk is cheap.
        """
        self._check_range(offset, length)
        if not length:
            return []
        g = self.grain_bytes
        span = self.header.num_gtes_per_gt * g  # bytes covered by one grain table
        end = offset + length
        out: list[Run] = []
        index = offset // span
        last = (end - 1) // span
        empty = self._empty_tables(index, last)
        self._load_tables(index, last)
        while index <= last:
            if self.gd[index] == 0 or index in empty:
                stop = index + 1
                while stop <= last:  # empty slots skipped a block at a time
                    if self.gd[stop] == 0:
                        stop = next_table(self.gd, stop, last + 1)
                    elif stop in empty:
                        stop += 1
                    else:
                        break
                lo, hi = max(offset, index * span), min(end, stop * span)
                out.append(Run(lo, hi - lo, Alloc.UNALLOCATED))
                index = stop
                continue
            lo, hi = max(offset, index * span), min(end, (index + 1) * span)
            out.extend(self._table_status(lo, hi))
            index += 1
        return merge_runs(out)

    def _empty_tables(self, first: int, last: int) -> set[int]:
        """Tables of slots ``first .. last`` that lie in holes of the file: all zeros, known
        without reading them (a fresh image's tables are).  Cached tables are never in
        this set, as their newest entries may not be written yet.  A few tables are
        cheaper to read (and are cached then) than to look for holes."""
        if last - first < _HOLE_SCAN_TABLES or not isinstance(self.src, int):
            return set()  # a file elsewhere tells no holes: its tables are read as needed
        slots = [i for i in _slots_with_tables(self.gd, first, last + 1)
                 if not self._tables.has(self, i)]
        size = self.header.num_gtes_per_gt * 4
        holes = in_holes(self.fd, [int(self.gd[i]) * SECTOR_SIZE for i in slots], size,
                         self.file_size)
        return {i for i, hole in zip(slots, holes) if hole}

    def _load_tables(self, first: int, last: int) -> None:
        """Bring the tables of slots ``first .. last`` (and their redundant copies) into
        memory together, as many as the cache holds: from a file elsewhere, in as few
        requests as their places allow, not one request per table."""
        if isinstance(self.src, int):
            return  # a local file reads each table as it is used, at no cost worth saving
        n = self.header.num_gtes_per_gt
        room = max(1, self._tables.budget // (n * 4) // 2)
        slots = [i for i in itertools.islice(_slots_with_tables(self.gd, first, last + 1), room)
                 if not self._tables.has(self, i)]
        if not slots:
            return
        copies = [self.rgd is not None and bool(self.rgd[i]) for i in slots]
        pieces = [(memoryview(bytearray(n * 4)), int(self.gd[i]) * SECTOR_SIZE) for i in slots]
        pieces += [(memoryview(bytearray(n * 4)), int(self.rgd[i]) * SECTOR_SIZE)
                   for i, has in zip(slots, copies) if has and self.rgd is not None]
        got = read_pieces(self.src, pieces, self.filename)
        backups = iter(pieces[len(slots):])
        for i, (buf, _at), n_read, has in zip(slots, pieces, got, copies):
            if n_read < n * 4:
                raise CorruptImageError(f"grain table {i} at sector {int(self.gd[i])} is "
                                        "truncated", self.filename)
            raw = bytes(buf)
            if has and bytes(next(backups)[0]) != raw:
                self._copy_differs(i)
            self._tables.put(self, i, u32_array(raw))

    def _table_status(self, lo: int, hi: int) -> list[Run]:
        g = self.grain_bytes
        first, last = lo // g, (hi - 1) // g
        gtes = self._entries(first, last)
        spans: list[list[int]] = []  # [start, end, kind, host]; neighbours merged as they come
        for start, count, kind in self._runs(gtes):
            a = max(lo, (first + start) * g)
            b = min(hi, (first + start + count) * g)
            host = -1
            if kind == _DATA:
                host = int(gtes[start]) * SECTOR_SIZE + (a - (first + start) * g)
            prev = spans[-1] if spans else None
            if prev is not None and prev[2] == kind and prev[1] == a and (
                    kind != _DATA or prev[3] + (prev[1] - prev[0]) == host):
                prev[1] = b
            else:
                spans.append([a, b, kind, host])
        return [self._as_run(a, b, kind, host) for a, b, kind, host in spans]

    def _as_run(self, a: int, b: int, kind: int, host: int) -> Run:
        if kind == _UNALLOC:
            return Run(a, b - a, Alloc.UNALLOCATED)
        if kind == _ZERO:
            return Run(a, b - a, Alloc.ZERO)
        if kind == _DATA:
            return Run(a, b - a, Alloc.DATA, host, self.filename)
        return Run(a, b - a, Alloc.DATA, None, self.filename, compressed=True)

    # ------------------------------------------------------------------- write

    def write(self, offset: int, data: memoryview, backing: BackingReader | None = None) -> None:
        self._check_writable()
        self._check_range(offset, len(data))
        if not len(data):
            return
        g = self.grain_bytes
        first, last = offset // g, (offset + len(data) - 1) // g
        gtes = self._entries(first, last)  # a copy: writes below change the tables
        for start, count, kind in self._runs(gtes):
            lo = max(offset, (first + start) * g)
            hi = min(offset + len(data), (first + start + count) * g)
            piece = data[lo - offset:hi - offset]
            if kind == _DATA:
                self._check_data_run(first + start, int(gtes[start]), count)
                host = int(gtes[start]) * SECTOR_SIZE + (lo - (first + start) * g)
                pwrite_all(self.fd, piece, host)
                self._data_unsynced = True
            else:
                self._allocate_and_write(first + start, count, lo, piece,
                                         backing if kind == _UNALLOC else None)

    def _check_data_run(self, grain: int, sector: int, count: int) -> None:
        """Refuse to write through entries that point past the file or into metadata.

        Reads of such entries fail or return table bytes; a write would grow the file
        without bound or overwrite a table, making the damage worse.
        """
        end = sector + count * self.header.grain_size
        fault = None
        if end > self._end:
            fault = "past the end of the file"
        else:
            starts, ends = self._metadata_areas()
            i = bisect.bisect_left(starts, end) - 1
            if i >= 0 and ends[i] > sector:
                fault = "into the image's metadata"
        if fault:
            raise CorruptImageError(f"grain {grain} points at sector {sector}, {fault}; writes "
                                    "there are refused (run 'vmdk check -r all')", self.filename)

    def metadata_areas(self, tables: bool = True) -> list[tuple[int, int]]:
        """Sector ranges of the header, descriptor, both directories and (unless ``tables``
        is False) every table."""
        h = self.header
        gd_sectors = _ceil_div(len(self.gd) * 4, SECTOR_SIZE)
        gt_sectors = _ceil_div(h.num_gtes_per_gt * 4, SECTOR_SIZE)
        areas = [(0, 1), (h.gd_offset, h.gd_offset + gd_sectors)]
        if h.descriptor_offset:
            areas.append((h.descriptor_offset, h.descriptor_offset + h.descriptor_size))
        if self.rgd is not None:
            areas.append((h.rgd_offset, h.rgd_offset + gd_sectors))
        for table in (self.gd, self.rgd) if tables else ():
            if table is not None:
                areas += [(table[i], table[i] + gt_sectors) for i in nonzero_slots(table)]
        return areas

    def _metadata_areas(self) -> tuple[list[int], list[int]]:
        """``metadata_areas`` sorted and merged, kept until a table is allocated."""
        if self._meta is None:
            starts: list[int] = []
            ends: list[int] = []
            for a, b in sorted(self.metadata_areas()):
                if starts and a <= ends[-1]:
                    ends[-1] = max(ends[-1], b)
                else:
                    starts.append(a)
                    ends.append(b)
            self._meta = (starts, ends)
        return self._meta

    def _allocate_and_write(self, grain0: int, count: int, lo: int, piece: memoryview,
                            backing: BackingReader | None) -> None:
        """Write grains ``grain0 ..`` that have no storage yet, appending them to the file."""
        g = self.grain_bytes
        span_lo, span_hi = grain0 * g, (grain0 + count) * g
        head, tail = lo - span_lo, span_hi - (lo + len(piece))
        skip = self._zero_grains(grain0, count, head, tail, piece, backing)
        keep = np.flatnonzero(~skip)
        if keep.size == 0:
            return
        # Grains that stay unallocated split the span; each kept run is appended contiguously.
        breaks = np.flatnonzero(np.diff(keep) != 1) + 1
        for run in np.split(keep, breaks):
            a, b = int(run[0]), int(run[-1]) + 1
            self._append_grains(grain0 + a, b - a, lo, piece, backing)

    def _zero_grains(self, grain0: int, count: int, head: int, tail: int, piece: memoryview,
                     backing: BackingReader | None) -> np.ndarray:
        """Which wholly written grains are all zeros and need no storage."""
        skip = np.zeros(count, dtype=bool)
        g = self.grain_bytes
        full_first = 1 if head else 0
        full_last = count - (1 if tail else 0)
        if full_last <= full_first or (backing is not None and not self.zeroed_gte):
            return skip
        start = full_first * g - head
        words = np.frombuffer(piece[start:start + (full_last - full_first) * g], dtype=np.uint64)
        zero = words.reshape(full_last - full_first, g // 8).max(axis=1) == 0
        skip[full_first:full_last] = zero
        if backing is not None:  # a parent exists: mark the grains as zero instead of storing
            marks = array("I", (ZEROED_GTE if z else 0 for z in zero.tolist()))
            self._set_entries(grain0 + full_first, marks)
        return skip

    def _append_grains(self, grain0: int, count: int, lo: int, piece: memoryview,
                       backing: BackingReader | None) -> None:
        g = self.grain_bytes
        span_lo, span_hi = grain0 * g, (grain0 + count) * g
        plo, phi = max(lo, span_lo), min(lo + len(piece), span_hi)
        src = piece[plo - lo:phi - lo]
        host = self._end * SECTOR_SIZE
        if self._end + count * self.header.grain_size > MAX_FILE_SECTORS:
            raise UnsupportedFormatError("extent file would grow past 2 TiB (u32 sector numbers)",
                                         self.filename)
        pwritev_all(self.fd, self._grain_buffers(span_lo, span_hi, plo, src, backing), host)
        self._data_unsynced = True
        sector = self._end
        self._end += count * self.header.grain_size
        step = self.header.grain_size
        self._set_entries(grain0, _sequence(sector, count, step))

    def _grain_buffers(self, span_lo: int, span_hi: int, plo: int, src: memoryview,
                       backing: BackingReader | None) -> list[memoryview | bytearray]:
        """The new grains as buffers: the caller's bytes as they are, with only a partly
        written first or last grain completed (from the parent, or zeros) in a buffer of its own.
        """
        g = self.grain_bytes
        phi = plo + len(src)
        if plo == span_lo and phi == span_hi:
            return [src]
        if span_hi - span_lo == g:
            return [self._partial_grain(span_lo, plo, src, backing)]
        out: list[memoryview | bytearray] = []
        pos = plo
        if plo > span_lo:
            head = span_lo + g
            out.append(self._partial_grain(span_lo, plo, src[:head - plo], backing))
            pos = head
        middle_end = span_hi - g if phi < span_hi else span_hi
        if middle_end > pos:
            out.append(src[pos - plo:middle_end - plo])
        if phi < span_hi:
            out.append(self._partial_grain(span_hi - g, middle_end, src[middle_end - plo:],
                                           backing))
        return out

    def _partial_grain(self, grain_lo: int, at: int, data: memoryview,
                       backing: BackingReader | None) -> bytearray:
        block = bytearray(self.grain_bytes)
        if backing is not None:
            backing(grain_lo, memoryview(block))
        block[at - grain_lo:at - grain_lo + len(data)] = data
        return block

    def _set_entries(self, grain0: int, values: array[int]) -> None:
        """Set the entries of grains ``grain0 ..`` from an array, one table slice at a time."""
        n = self.header.num_gtes_per_gt
        pos = 0
        while pos < len(values):
            index, slot = divmod(grain0 + pos, n)
            take = min(len(values) - pos, n - slot)
            chunk = values[pos:pos + take]
            pos += take
            if self.gd[index] == 0:
                if not any(chunk):
                    continue  # an absent table already reads as unallocated
                self._allocate_table(index)
            self._gt(index)[slot:slot + take] = chunk
            self._gt_dirty.add(index)

    def _set_entry(self, grain: int, value: int) -> None:
        self._set_entries(grain, array("I", [value]))

    def _allocate_table(self, index: int) -> None:
        """Reserve space for a new grain table (and its redundant copy) at the end of the file."""
        gt_sectors = _ceil_div(self.header.num_gtes_per_gt * 4, SECTOR_SIZE)
        if self._end + 2 * gt_sectors > MAX_FILE_SECTORS:
            raise UnsupportedFormatError("extent file would grow past 2 TiB (u32 sector numbers)",
                                         self.filename)
        self._meta = None
        self.gd[index] = self._end
        self._end += gt_sectors
        if self.rgd is not None:
            self.rgd[index] = self._end
            self._end += gt_sectors
        # The new tables are written (zero-filled where unused) before the GD entry.
        os.ftruncate(self.fd, max(self.file_size, self._end * SECTOR_SIZE))
        self.file_size = max(self.file_size, self._end * SECTOR_SIZE)
        self._gd_dirty.add(index)

    def write_zeroes(self, offset: int, length: int, backing: BackingReader | None = None) -> None:
        """Make a range read as zeros, storing as little as possible.

        Stored grains are zeroed in place (unmapping them would leak their
        space); unallocated grains stay unallocated when nothing shows
        through them, and become zeroed-grain entries over a parent when the
        header allows it.
        """
        self._check_writable()
        self._check_range(offset, length)
        if not length:
            return
        g = self.grain_bytes
        first, last = offset // g, (offset + length - 1) // g
        gtes = self._entries(first, last)
        for start, count, kind in self._runs(gtes):
            lo = max(offset, (first + start) * g)
            hi = min(offset + length, (first + start + count) * g)
            if kind == _DATA:
                self._check_data_run(first + start, int(gtes[start]), count)
                host = int(gtes[start]) * SECTOR_SIZE + (lo - (first + start) * g)
                self._pwrite_zeros(host, hi - lo)
            elif kind == _UNALLOC and backing is not None:
                self._zero_over_parent(lo, hi, backing)

    def _pwrite_zeros(self, host: int, length: int) -> None:
        zeros = memoryview(bytes(min(length, 4 << 20)))
        done = 0
        while done < length:
            n = min(length - done, len(zeros))
            pwrite_all(self.fd, zeros[:n], host + done)
            done += n
        self._data_unsynced = True

    def _zero_over_parent(self, lo: int, hi: int, backing: BackingReader) -> None:
        g = self.grain_bytes
        full_lo, full_hi = _ceil_div(lo, g), hi // g
        if not self.zeroed_gte or full_hi <= full_lo:
            super().write_zeroes(lo, hi - lo, backing)
            return
        if lo < full_lo * g:
            super().write_zeroes(lo, full_lo * g - lo, backing)
        self._set_entries(full_lo, array("I", [ZEROED_GTE]) * (full_hi - full_lo))
        if hi > full_hi * g:
            super().write_zeroes(full_hi * g, hi - full_hi * g, backing)

    # ---------------------------------------------------------------- flushing

    def _write_back_tables(self) -> None:
        """Sync grain data, then write every dirty grain table (both copies)."""
        if not self._gt_dirty:
            return
        if self._data_unsynced and self.durable:
            os.fdatasync(self.fd)
            self._data_unsynced = False
        n = self.header.num_gtes_per_gt
        for index in sorted(self._gt_dirty):
            table = self._tables.get(self, index)
            if table is not None:
                raw = u32_bytes(table)
                pwrite_all(self.fd, raw, int(self.gd[index]) * SECTOR_SIZE)
            else:  # only its copy is stale (check -r all marks every table): copy the primary
                raw = os.pread(self.fd, n * 4, int(self.gd[index]) * SECTOR_SIZE).ljust(n * 4, b"\0")
            if self.rgd is not None and self.rgd[index]:
                pwrite_all(self.fd, raw, int(self.rgd[index]) * SECTOR_SIZE)
        self._gt_dirty.clear()

    def _write_back_directory(self) -> None:
        if not self._gd_dirty:
            return
        if self.durable:
            os.fdatasync(self.fd)  # the tables must be durable before anything points at them
        for index in sorted(self._gd_dirty):
            for table, sector in ((self.gd, self.header.gd_offset), (self.rgd, self.header.rgd_offset)):
                if table is not None:
                    pwrite_all(self.fd, struct.pack("<I", table[index]),
                               sector * SECTOR_SIZE + index * 4)
        self._gd_dirty.clear()

    def flush(self) -> None:
        if self.read_only or self.fd < 0:
            return
        self._write_back_tables()
        self._write_back_directory()
        if self.durable:
            os.fsync(self.fd)
            self._data_unsynced = False

    def _mark_unclean(self, unclean: bool) -> None:
        self.header.unclean_shutdown = int(unclean)
        pwrite_all(self.fd, self.header_bytes(), 0)
        if self.durable:
            os.fsync(self.fd)

    def header_bytes(self) -> bytes:
        """The header as it belongs at sector 0 (the footer's gdOffset is not copied back)."""
        return self.header.pack()

    def close(self) -> None:
        if self.src == -1:
            return
        try:
            if self._writing:
                self.flush()
                self._mark_unclean(False)
        finally:
            self._tables.drop(self)
            release(self.src)
            self.src = self.fd = -1

    # -------------------------------------------------------------------- info

    def stored_grains(self, progress: Callable[[int], None] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """(grain numbers, sectors) of every grain stored in the extent, in grain order.

        ``progress`` hears the virtual bytes covered by each batch of tables read.
        """
        numbers, sectors = [], []
        first_data = 2 if self.zeroed_gte else 1
        for batch in self.scan_tables():
            if progress:
                progress(batch.covered)
            if batch.primary.any():
                rows, slots = np.nonzero(batch.primary >= first_data)
                numbers.append(batch.indexes[rows] * self.header.num_gtes_per_gt + slots)
                sectors.append(batch.primary[rows, slots].astype(np.int64))
        if not numbers:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        number, sector = np.concatenate(numbers), np.concatenate(sectors)
        order = np.argsort(number, kind="stable")  # batches come in the file's order
        return number[order], sector[order]

    def scan_tables(self) -> Iterator[TableBatch]:
        """Every table the directory names, in batches, read in bulk in the order the file
        holds them (see table_scan).  Each primary table is as ``_gt`` gives it: the cached
        one if cached, else the file's, checked against its redundant copy as ``_gt``
        checks it.  Nothing is cached: a scan would only evict the working tables."""
        n = self.header.num_gtes_per_gt
        gd = u32_view(self.gd)
        rgd = u32_view(self.rgd) if self.rgd is not None else None
        used = np.array(nonzero_slots(self.gd), dtype=np.int64)  # what exists, not the claim
        used = used[np.argsort(gd[used], kind="stable")]
        # At least SCAN_STEPS batches where there are as many tables: a progress bar moves.
        step = max(1, min(SCAN_BATCH_BYTES // (n * 4), -(-used.size // SCAN_STEPS)))
        span = n * self.grain_bytes
        for k in range(0, used.size, step):
            indexes = used[k:k + step]
            sectors = gd[indexes].astype(np.int64)
            self._refuse_truncated_tables(indexes, sectors)
            primary = read_tables(self.src, sectors, n)
            backup = None if rgd is None else self._copies_of(
                sectors, rgd[indexes].astype(np.int64), primary)
            differ = _rows_differing(primary, backup)
            for row in differ.tolist():
                if not self._tables.has(self, int(indexes[row])):  # as _gt checks one it reads
                    self._copy_differs(int(indexes[row]))
            if self._use_cached_tables(indexes, primary):
                differ = _rows_differing(primary, backup)  # the newest entries against the copy
            covered = int(np.clip(self.size - indexes * span, 0, span).sum())
            yield TableBatch(indexes, primary, backup, differ, covered)

    def _copies_of(self, sectors: np.ndarray, copies: np.ndarray,
                   primary: np.ndarray) -> np.ndarray:
        """The redundant copies (at ``copies``) of the tables at ``sectors``; a table without
        a copy of its own (none, or the directories name one table) gets the primary."""
        own = (copies != 0) & (copies != sectors)
        backup = read_tables(self.src, np.where(own, copies, 0), self.header.num_gtes_per_gt)
        if not own.all():
            backup[~own] = primary[~own]
        return backup

    def _refuse_truncated_tables(self, indexes: np.ndarray, sectors: np.ndarray) -> None:
        past = np.flatnonzero(sectors * SECTOR_SIZE + self.header.num_gtes_per_gt * 4
                              > self.file_size)
        for row in past.tolist():
            index = int(indexes[row])
            if not self._tables.has(self, index):
                raise CorruptImageError(f"grain table {index} at sector {int(sectors[row])} is "
                                        "truncated", self.filename)

    def _use_cached_tables(self, indexes: np.ndarray, tables: np.ndarray) -> bool:
        """Put the cached tables (the newest, maybe not yet written) in place of the file's;
        returns whether there were any."""
        found = False
        if self._tables.indexes(self):
            for row, index in enumerate(indexes.tolist()):
                cached = self._tables.get(self, index)
                if cached is not None:
                    tables[row] = u32_view(cached)
                    found = True
        return found

    def verify_compressed(self) -> tuple[int, str | None]:
        """Inflate every stored grain: (how many are damaged, the first fault)."""
        numbers, sectors = self.stored_grains()
        pairs = list(zip(numbers.tolist(), sectors.tolist()))
        bad, first = 0, None
        for i in range(0, len(pairs), 256):
            batch = pairs[i:i + 256]
            try:  # neighbours in one read (one request from a file elsewhere)
                records = self._fetch_records(batch)
            except CorruptImageError:  # a damaged record: each on its own, to count them
                records = None
            for k, pair in enumerate(batch):
                try:
                    self._inflate(*(records[k] if records else self._fetch_records([pair])[0]))
                except CorruptImageError as exc:
                    bad += 1
                    first = first or exc.reason
        return bad, first

    @property
    def allocated_grains(self) -> int:
        total = 0
        for index in nonzero_slots(self.gd):
            table = self._gt(index)
            total += len(table) - table.count(0) - (table.count(1) if self.zeroed_gte else 0)
        return total

    def info(self) -> dict[str, object]:
        return {
            "filename": self.filename,
            "virtual-size": self.size,
            "format": "SPARSE",
            "cluster-size": self.grain_bytes,
            "compressed": self.compressed,
        }
