"""ESX vmfsSparse extents ("COWD"), read and write.

Layout: a 2048-byte header, then the grain directory (GD) at ``gdOffset``:
``numGDEntries`` u32 sector numbers of grain tables (GT), 0 meaning "no table".
Each GT holds 4096 u32 sector numbers of grains, 0 meaning "not stored here"
(the parent's bytes show through).  Tables and grains are both allocated at
``freeSector``, which the header records as the first unused sector.

Crash safety of a write: a new GT is written zeroed, then the grain data, then
the changed GT entries, then the GD entry, then ``freeSector``.  Allocation
starts at the larger of ``freeSector`` and the file's end, so space written
before a crash (the file grew, the header did not) is never reused.

This module also holds :class:`GrainMappedExtent`, the run mapper shared with
the seSparse reader: it turns a byte request into runs of grains with one
state and contiguous host bytes, with numpy over whole tables.
"""

from __future__ import annotations

import abc
import contextlib
import os
import struct
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
else:
    from .._numpy import np

from .._access import RandomAccess, Readable, file_size, release
from .._structs import COWD_MAGIC, CowdHeader
from ..errors import (
    CorruptImageError,
    InvalidHeaderError,
    OutOfRangeError,
    UnsupportedFormatError,
)
from .base import SECTOR_SIZE, Alloc, BackingReader, Extent, Run, pread_exact, pwrite_all

#: Grain states in the run mapper.
HOLE, ZERO, DATA = 0, 1, 2
_ALLOC = {HOLE: Alloc.UNALLOCATED, ZERO: Alloc.ZERO, DATA: Alloc.DATA}

GT_ENTRIES = CowdHeader.GT_ENTRIES
GT_SECTORS = GT_ENTRIES * 4 // SECTOR_SIZE
MAX_GRAIN_SECTORS = 2048
#: Sector numbers are u32: nothing can be allocated at or past this sector.
MAX_FILE_SECTORS = 1 << 32
DEFAULT_GT_CACHE = 256

_U32 = struct.Struct("<I")
_FREE_SECTOR_AT = 28
_UNCLEAN_AT = 1648


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def split_runs(
    kinds: np.ndarray, hosts: np.ndarray, grain_bytes: int
) -> Iterator[tuple[int, int, int, int]]:
    """Cut per-grain states into runs: ``(first index, count, kind, host byte of first)``.

    A run continues while the kind stays the same and, for DATA, while each
    grain's host offset follows the previous one.
    """
    if not len(kinds):
        return
    breaks = np.empty(len(kinds), dtype=bool)
    breaks[0] = True
    breaks[1:] = (kinds[1:] != kinds[:-1]) | (
        (kinds[1:] == DATA) & (hosts[1:] != hosts[:-1] + grain_bytes)
    )
    starts = np.flatnonzero(breaks).tolist()
    ends = starts[1:] + [len(kinds)]
    for start, end in zip(starts, ends):
        yield start, end - start, int(kinds[start]), int(hosts[start])


class GrainMappedExtent(Extent):
    """Reads and status for extents addressed through a GD of fixed-size tables."""

    #: What reads go through: a local file's descriptor or a file elsewhere; -1 once closed.
    _src: Readable
    _grain_bytes: int
    _gt_entries: int

    @abc.abstractmethod
    def _present_tables(self) -> np.ndarray:
        """Sorted indices of the tables that exist (as an int64 array)."""

    @abc.abstractmethod
    def _decoded(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-grain (kind int8, host byte offset int64) arrays of one existing table."""

    def _check_open(self) -> None:
        if self._src == -1:
            raise ValueError("I/O operation on closed extent")

    def _grain_runs(self, first: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
        """Runs over grains ``first .. stop`` as (grain, count, kind, host byte offset)."""
        per = self._gt_entries
        present = self._present_tables()
        while first < stop:
            table = first // per
            pos = int(np.searchsorted(present, table))
            if pos == len(present) or present[pos] != table:
                # Absent tables: one hole up to the next table that exists.
                nxt = int(present[pos]) * per if pos < len(present) else stop
                end = min(stop, nxt)
                yield first, end - first, HOLE, 0
                first = end
                continue
            end = min(stop, (table + 1) * per)
            kinds, hosts = self._decoded(table)
            lo = first - table * per
            for start, count, kind, host in split_runs(
                kinds[lo : lo + end - first], hosts[lo : lo + end - first], self._grain_bytes
            ):
                yield first + start, count, kind, host
            first = end

    def _byte_runs(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """Merged runs of ``offset .. offset+length`` as (offset, length, kind, host byte)."""
        if length <= 0:
            return
        gb = self._grain_bytes
        end = offset + length
        pending: list[int] | None = None
        for grain, count, kind, host in self._grain_runs(offset // gb, _ceil_div(end, gb)):
            start = max(offset, grain * gb)
            stop = min(end, (grain + count) * gb)
            if kind == DATA:
                host += start - grain * gb
            if (
                pending is not None
                and pending[2] == kind
                and (kind != DATA or pending[3] + pending[1] == host)
            ):
                pending[1] += stop - start
                continue
            if pending is not None:
                yield pending[0], pending[1], pending[2], pending[3]
            pending = [start, stop - start, kind, host]
        if pending is not None:
            yield pending[0], pending[1], pending[2], pending[3]

    def read_into(self, offset: int, buf: memoryview) -> list[tuple[int, int]]:
        self._check_open()
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        holes: list[tuple[int, int]] = []
        for start, length, kind, host in self._byte_runs(offset, len(view)):
            part = view[start - offset : start - offset + length]
            if kind == DATA:
                pread_exact(self._src, part, host, self.filename)
            elif kind == ZERO:
                part[:] = bytes(length)
            else:
                holes.append((start - offset, length))
        return holes

    def status(self, offset: int, length: int) -> list[Run]:
        self._check_open()
        self._check_range(offset, length)
        return [
            Run(
                start,
                count,
                _ALLOC[kind],
                host if kind == DATA else None,
                self.filename if kind == DATA else None,
            )
            for start, count, kind, host in self._byte_runs(offset, length)
        ]


class CowdExtent(GrainMappedExtent):
    """One vmfsSparse ("COWD") extent file."""

    def __init__(
        self,
        filename: str,
        fd: Readable,
        header: CowdHeader,
        gd: np.ndarray,
        *,
        read_only: bool,
        nominal_sectors: int | None,
        file_sectors: int,
    ) -> None:
        self.filename = filename
        self.header = header
        self.read_only = read_only
        self.size = (
            header.num_sectors if nominal_sectors is None else nominal_sectors
        ) * SECTOR_SIZE
        self._src = fd
        self._fd = fd if isinstance(fd, int) else -1  # writes: local files only
        self._gd = gd
        self._present: np.ndarray | None = None
        self._grain_sectors = header.grain_size
        self._grain_bytes = header.grain_size * SECTOR_SIZE
        self._gt_entries = GT_ENTRIES
        self._capacity_bytes = header.num_sectors * SECTOR_SIZE
        self._file_sectors = file_sectors
        self._free = max(header.free_sector, file_sectors)
        self._tables: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_size = DEFAULT_GT_CACHE
        #: Whether the header said the file was not closed cleanly when opened.
        self.was_unclean = bool(header.unclean_shutdown)
        self._writing = False  # begin_writing() ran: close() then clears the flag

    def begin_writing(self) -> None:
        if self.read_only or self._writing:
            return
        pwrite_all(self._fd, _U32.pack(1), _UNCLEAN_AT)
        self._writing = True

    # -- opening and creating -------------------------------------------------

    @classmethod
    def open(
        cls, path: str, *, read_only: bool = True, nominal_sectors: int | None = None,
        defer_writes: bool = False, source: RandomAccess | None = None,
    ) -> CowdExtent:
        """Open ``path``, or read it from ``source`` (read-only), which the extent then owns."""
        path = os.fspath(path)
        fd: Readable = (source if source is not None else
                        os.open(path, os.O_RDONLY if read_only else os.O_RDWR))
        try:
            file_sectors = file_size(fd) // SECTOR_SIZE
            header = _read_header(fd, path, file_sectors)
            gd = _read_gd(fd, path, header, file_sectors)
            extent = cls(
                path,
                fd,
                header,
                gd,
                read_only=read_only,
                nominal_sectors=nominal_sectors,
                file_sectors=file_sectors,
            )
            if not defer_writes:
                extent.begin_writing()
        except BaseException:
            release(fd)
            raise
        return extent

    @classmethod
    def create(
        cls,
        path: str,
        capacity_sectors: int,
        *,
        grain_size: int = 1,
        parent_file_name: str | None = None,
    ) -> CowdExtent:
        """Write a new, empty extent (replacing any file at ``path``) and open it for writing."""
        if not 0 < capacity_sectors < MAX_FILE_SECTORS:
            raise ValueError(f"capacity must be 1 .. {MAX_FILE_SECTORS - 1} sectors")
        if not 0 < grain_size <= MAX_GRAIN_SECTORS:
            raise ValueError(f"grain size must be 1 .. {MAX_GRAIN_SECTORS} sectors")
        parent = (parent_file_name or "").encode()
        if len(parent) > 1023 or b"\0" in parent:
            raise ValueError("parent file name must be at most 1023 bytes without NUL")
        num_gd = _ceil_div(capacity_sectors, GT_ENTRIES * grain_size)
        gd_sectors = _ceil_div(num_gd * 4, SECTOR_SIZE)
        header = CowdHeader(
            num_sectors=capacity_sectors,
            grain_size=grain_size,
            gd_offset=4,
            num_gd_entries=num_gd,
            free_sector=4 + gd_sectors,
            parent_file_name=parent,
        )
        path = os.fspath(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            pwrite_all(fd, header.pack() + bytes(gd_sectors * SECTOR_SIZE), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        return cls.open(path, read_only=False)

    # -- tables -----------------------------------------------------------------

    def _present_tables(self) -> np.ndarray:
        if self._present is None:
            self._present = np.flatnonzero(self._gd)
        return self._present

    def _table(self, index: int) -> np.ndarray:
        """The raw u32 entries of an existing table, through the LRU cache."""
        table = self._tables.get(index)
        if table is not None:
            with contextlib.suppress(KeyError):  # another reader may have just evicted it
                self._tables.move_to_end(index)
            return table
        table = _read_gt(
            self._src,
            self.filename or "",
            index,
            int(self._gd[index]),
            self._data_start,
            self._grain_sectors,
            self._file_sectors,
        )
        self._tables[index] = table
        if len(self._tables) > self._cache_size:
            self._tables.popitem(last=False)
        return table

    @property
    def _data_start(self) -> int:
        return self.header.gd_offset + _ceil_div(len(self._gd) * 4, SECTOR_SIZE)

    def _decoded(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        table = self._table(index)
        kinds = np.where(table != 0, DATA, HOLE).astype(np.int8)
        return kinds, table.astype(np.int64) * SECTOR_SIZE

    # -- writing ------------------------------------------------------------------

    def write(self, offset: int, data: memoryview, backing: BackingReader | None = None) -> None:
        self._check_open()
        self._check_writable()
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        if offset + len(view) > self._capacity_bytes:
            raise OutOfRangeError(
                f"write {offset}+{len(view)} reaches past the header's capacity of "
                f"{self.header.num_sectors} sectors",
                self.filename,
            )
        span = GT_ENTRIES * self._grain_bytes
        free_before = self._free
        pos = 0
        try:
            while pos < len(view):
                cur = offset + pos
                n = min(len(view) - pos, span - cur % span)
                self._write_in_table(cur // span, cur, view[pos : pos + n], backing)
                pos += n
        finally:
            if self._free != free_before:
                pwrite_all(self._fd, _U32.pack(self._free), _FREE_SECTOR_AT)
                self.header.free_sector = self._free

    def _write_in_table(
        self, index: int, offset: int, data: memoryview, backing: BackingReader | None
    ) -> None:
        gb = self._grain_bytes
        first = offset // gb
        stop = _ceil_div(offset + len(data), gb)
        base = index * GT_ENTRIES
        exists = bool(self._gd[index])
        table = self._table(index) if exists else np.zeros(GT_ENTRIES, dtype="<u4")
        entries = table[first - base : stop - base]
        # Grains already stored here are overwritten in place, one write per run.
        kinds = np.where(entries != 0, DATA, HOLE).astype(np.int8)
        hosts = entries.astype(np.int64) * SECTOR_SIZE
        for start, count, kind, host in split_runs(kinds, hosts, gb):
            if kind == DATA:
                lo = max(offset, (first + start) * gb)
                hi = min(offset + len(data), (first + start + count) * gb)
                pwrite_all(
                    self._fd, data[lo - offset : hi - offset], host + lo - (first + start) * gb
                )
        new = np.flatnonzero(entries == 0)
        if not new.size:
            return
        # Built first, so a failing backing reader allocates nothing.
        grains = self._new_grains(offset, data, first + new, backing)
        if exists:
            gt_sector = int(self._gd[index])
        else:
            gt_sector = self._allocate(GT_SECTORS)
            pwrite_all(self._fd, bytes(GT_SECTORS * SECTOR_SIZE), gt_sector * SECTOR_SIZE)
        sector = self._allocate(len(new) * self._grain_sectors)
        pwrite_all(self._fd, memoryview(grains), sector * SECTOR_SIZE)
        slots = first - base + new
        table[slots] = sector + np.arange(len(new), dtype=np.int64) * self._grain_sectors
        lo, hi = int(slots[0]), int(slots[-1]) + 1
        pwrite_all(self._fd, table[lo:hi].tobytes(), gt_sector * SECTOR_SIZE + lo * 4)
        if not exists:
            pwrite_all(
                self._fd, _U32.pack(gt_sector), self.header.gd_offset * SECTOR_SIZE + index * 4
            )
            self._gd[index] = gt_sector
            self._present = None
            self._tables[index] = table
            if len(self._tables) > self._cache_size:
                self._tables.popitem(last=False)

    def _new_grains(
        self, offset: int, data: memoryview, grains: np.ndarray, backing: BackingReader | None
    ) -> bytearray:
        """Bytes of the new ``grains``: ``data`` laid over the parent's bytes (or zeros)."""
        gb = self._grain_bytes
        end = offset + len(data)
        limit = min(self.size, self._capacity_bytes)  # the backing ends here
        out = bytearray(len(grains) * gb)
        view = memoryview(out)
        ones = np.ones(len(grains), dtype=np.int8) * DATA
        for start, count, _kind, _host in split_runs(ones, grains.astype(np.int64) * gb, gb):
            vstart = int(grains[start]) * gb
            vend = vstart + count * gb
            dst = view[start * gb : (start + count) * gb]
            lo, hi = max(offset, vstart), min(end, vend)
            dst[lo - vstart : hi - vstart] = data[lo - offset : hi - offset]
            if backing is not None:
                if vstart < lo:
                    backing(vstart, dst[: lo - vstart])
                if hi < min(vend, limit):
                    backing(hi, dst[hi - vstart : min(vend, limit) - vstart])
        return out

    def _allocate(self, sectors: int) -> int:
        start = self._free
        if start + sectors > MAX_FILE_SECTORS:
            raise UnsupportedFormatError(
                f"allocating {sectors} sectors at sector {start} passes the 2 TiB limit of "
                "u32 sector numbers",
                self.filename,
            )
        self._free = start + sectors
        self._file_sectors = max(self._file_sectors, self._free)
        return start

    # -- lifecycle -------------------------------------------------------------------

    def flush(self) -> None:
        self._check_open()
        if not self.read_only:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._src == -1:
            return
        src, fd, self._src, self._fd = self._src, self._fd, -1, -1
        try:
            if self._writing:
                os.fsync(fd)
                pwrite_all(fd, _U32.pack(0), _UNCLEAN_AT)
                os.fsync(fd)
        finally:
            release(src)
            self._tables.clear()

    def info(self) -> dict[str, object]:
        return {
            "filename": self.filename,
            "virtual-size": self.size,
            "format": "COWD",
            "cluster-size": self._grain_bytes,
        }


def _read_header(fd: Readable, path: str, file_sectors: int) -> CowdHeader:
    raw = bytearray(CowdHeader.SIZE)
    got = pread_exact(fd, memoryview(raw), 0, path)
    if got < CowdHeader.SIZE:
        raise InvalidHeaderError(
            f"file is {got} bytes, shorter than the {CowdHeader.SIZE}-byte COWD header", path
        )
    if raw[:4] != COWD_MAGIC:
        raise InvalidHeaderError(f"bad magic {bytes(raw[:4])!r}, expected {COWD_MAGIC!r}", path)
    header = CowdHeader.unpack(bytes(raw))
    if header.version != 1:
        raise UnsupportedFormatError(f"COWD version {header.version} (only 1 is known)", path)
    if not 0 < header.grain_size <= MAX_GRAIN_SECTORS:
        raise InvalidHeaderError(
            f"grain size {header.grain_size} sectors is outside 1 .. {MAX_GRAIN_SECTORS}", path
        )
    expected = _ceil_div(header.num_sectors, GT_ENTRIES * header.grain_size)
    if header.num_gd_entries != expected:
        raise InvalidHeaderError(
            f"numGDEntries is {header.num_gd_entries}, but {header.num_sectors} sectors in "
            f"grains of {header.grain_size} need {expected}",
            path,
        )
    gd_end = header.gd_offset + _ceil_div(expected * 4, SECTOR_SIZE)
    if header.gd_offset < CowdHeader.SIZE // SECTOR_SIZE:
        raise InvalidHeaderError(
            f"grain directory at sector {header.gd_offset} overlaps the header", path
        )
    if gd_end > file_sectors:
        raise InvalidHeaderError(
            f"grain directory at sector {header.gd_offset} ({expected} entries) is past the "
            f"end of the file ({file_sectors} sectors)",
            path,
        )
    return header


def _read_gd(fd: Readable, path: str, header: CowdHeader, file_sectors: int) -> np.ndarray:
    raw = bytearray(header.num_gd_entries * 4)
    pread_exact(fd, memoryview(raw), header.gd_offset * SECTOR_SIZE, path)
    gd = np.frombuffer(raw, dtype="<u4")
    data_start = header.gd_offset + _ceil_div(len(gd) * 4, SECTOR_SIZE)
    bad = np.flatnonzero(
        (gd != 0) & ((gd < data_start) | (gd.astype(np.int64) + GT_SECTORS > file_sectors))
    )
    if bad.size:
        i = int(bad[0])
        raise CorruptImageError(
            f"grain directory entry {i} points to sector {int(gd[i])}, outside the data area "
            f"(sectors {data_start} .. {file_sectors} of the file)",
            path,
        )
    return gd


def _read_gt(
    fd: Readable,
    path: str,
    index: int,
    sector: int,
    data_start: int,
    grain_sectors: int,
    file_sectors: int,
) -> np.ndarray:
    raw = bytearray(GT_ENTRIES * 4)
    pread_exact(fd, memoryview(raw), sector * SECTOR_SIZE, path)
    table = np.frombuffer(raw, dtype="<u4")
    bad = np.flatnonzero(
        (table != 0)
        & ((table < data_start) | (table.astype(np.int64) + grain_sectors > file_sectors))
    )
    if bad.size:
        i = int(bad[0])
        raise CorruptImageError(
            f"grain table {index} (sector {sector}) entry {i} points to sector {int(table[i])}, "
            f"outside the data area (sectors {data_start} .. {file_sectors} of the file)",
            path,
        )
    return table
