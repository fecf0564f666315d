"""Reading a streamOptimized extent front to back, from a file that need not seek.

Pipes, downloads and OVA members are read once, from the first byte to the
last.  Such a reader cannot look at the end of the file first, so it must see
the stream's end itself before it may call the disk whole; a stream cut at a
record boundary would otherwise pass for a disk whose last grains are zeros.
What "whole" means depends on the layout (see :mod:`vmdk.stream` for the
writer of the first one):

(a) spec layout (our writer, VirtualBox, vmdktool): grain records, a grain
    table (GT) after the grains of each table's range, then the grain
    directory (GD), the footer and the end-of-stream (EOS) marker, each behind
    its marker.  Whole once GD, footer and EOS arrived in that order; every GT
    must list exactly the grain records just before it, and the GD exactly the
    GTs seen.
(b) VMware (vmdk-convert, vdiskmanager): the header gives the real gdOffset;
    GD and every GT sit before the first grain; grains; EOS; no other markers.
(c) qemu-img: like (b) with a redundant GD too, and no EOS marker at all.
    In (b) and (c) the tables promise every grain record by its file sector,
    so the stream is whole once each promised record arrived, where the
    tables say.

A cut raises :class:`~vmdk.errors.CorruptImageError` naming the byte where the
input ended and the last complete record; with ``recover=True`` the grains
before it have already been handed out, which is what ``vmdk convert
--recover`` keeps (a grain whose compressed data is damaged is skipped and the
walk goes on: each grain is compressed on its own).  Memory grows only with the bytes that arrived: every size
read from the stream is capped, and long blocks are read in chunks.
"""

from __future__ import annotations

import abc
import logging
import struct
from array import array
from collections.abc import Iterator
from typing import IO

from . import _deflate
from ._structs import (
    GD_AT_END,
    KNOWN_SPARSE_FLAGS,
    NEWLINE_CHECK,
    SECTOR_SIZE,
    ZEROED_GTE,
    CompressAlgorithm,
    GrainMarker,
    MarkerType,
    MetadataMarker,
    SparseFlags,
    SparseHeader,
)
from .errors import CorruptImageError, UnsupportedFormatError
from .extents.sparse import (
    MAX_GD_ENTRIES,
    MAX_GRAIN_SECTORS,
    MAX_GTES_PER_GT,
    MAX_VERSION,
    u32_array,
)

log = logging.getLogger(__name__)

#: Largest metadata block a marker may announce (a GD of 8 Mi tables: 256 TiB of 64 KiB grains).
MAX_METADATA_SECTORS = 1 << 16
#: Bytes asked of the input per call, so a size read from the stream allocates only what came.
READ_CHUNK = 1 << 20
#: Largest disk the header may claim, as for random access (2^47 sectors is 64 PiB).
MAX_CAPACITY_SECTORS = 1 << 47

HINT = "the download or pipe was cut; 'vmdk convert --recover' keeps the grains that arrived"


class TruncatedStreamError(CorruptImageError):
    """The input ended before the stream was whole (a cut download or pipe)."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class _Input:
    """The input and how many bytes of it were consumed; reads loop over short pipe reads."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.pos = 0

    def read(self, n: int) -> bytes:
        """``n`` bytes, or fewer only where the input ends."""
        parts = []
        left = n
        while left > 0:
            chunk = self._f.read(min(left, READ_CHUNK))
            if not chunk:
                break
            parts.append(chunk)
            left -= len(chunk)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.pos += len(data)
        return data

    def skip(self, n: int) -> bool:
        """Drop ``n`` bytes; False when the input ended first."""
        while n > 0:
            chunk = self.read(min(n, READ_CHUNK))
            if not chunk:
                return False
            n -= len(chunk)
        return True


class StreamReader:
    """Read a streamOptimized extent sequentially: its header, then its grains.

    ``f`` needs only ``read``; ``name`` names it in errors (``<stdin>``, a
    path, ``pkg.ova:disk.vmdk``).  The header is read and checked here;
    :meth:`grains` reads the rest.  With ``recover``, tables at the front
    that cannot be trusted are set aside with a warning (grains are then
    taken from their markers alone), and errors leave out the hint to use
    ``--recover``.
    """

    def __init__(self, f: IO[bytes], name: str, *, recover: bool = False) -> None:
        self.name = name
        self.recover = recover
        self._in = _Input(f)
        self.header = self._read_header()
        h = self.header
        self.grain_bytes = h.grain_size * SECTOR_SIZE
        self.capacity = h.capacity * SECTOR_SIZE
        self.num_grains = _ceil_div(h.capacity, h.grain_size)
        self.gd_entries = _ceil_div(self.num_grains, h.num_gtes_per_gt)
        self.gt_sectors = _ceil_div(h.num_gtes_per_gt * 4, SECTOR_SIZE)
        #: The tables come before the grains (layouts b and c) rather than after them (a).
        self.tables_first = h.gd_offset != GD_AT_END and h.gd_offset < h.overhead
        self.last = "the header"  # the last complete record, for messages
        self.last_end = SECTOR_SIZE  # the byte where it ends
        #: (byte offset, compressed size) of the grain record last read: while a grain is
        #: handed out, where it is stored (random readers of an OVA index them so).
        self.grain_record = (0, 0)

    # -- the header -----------------------------------------------------------------------

    def _read_header(self) -> SparseHeader:
        head = self._in.read(SECTOR_SIZE)
        if len(head) < SECTOR_SIZE:
            raise TruncatedStreamError(
                f"stream ends at byte {len(head)}, inside the {SECTOR_SIZE}-byte header"
                + ("" if not head else ": the download or pipe was cut"), self.name)
        try:
            header = SparseHeader.unpack(head)
        except ValueError as exc:
            raise CorruptImageError("not a sparse VMDK (no KDMV header)", self.name) from exc
        self._check_header(header)
        return header

    def _check_header(self, h: SparseHeader) -> None:
        name = self.name
        if not h.has(SparseFlags.COMPRESSED) or not h.has(SparseFlags.MARKERS):
            raise UnsupportedFormatError(
                "only streamOptimized disks (compressed, with markers) can be read sequentially",
                name)
        if not 1 <= h.version <= MAX_VERSION:
            raise UnsupportedFormatError(f"sparse header version {h.version} is not supported",
                                         name)
        unknown = h.flags & ~int(KNOWN_SPARSE_FLAGS) & ~int(SparseFlags.COMPATIBLE_MASK)
        if unknown:
            raise UnsupportedFormatError(f"unknown incompatible header flags {unknown:#x}", name)
        if h.compress_algorithm != CompressAlgorithm.DEFLATE:
            raise UnsupportedFormatError(f"unknown compression algorithm {h.compress_algorithm}",
                                         name)
        if h.has(SparseFlags.VALID_NEWLINE) and h.newline_check != NEWLINE_CHECK:
            raise CorruptImageError("newline check bytes are damaged: the file was probably "
                                    "transferred in text mode", name)
        if not 1 <= h.grain_size <= MAX_GRAIN_SECTORS or h.grain_size & (h.grain_size - 1):
            raise CorruptImageError(f"invalid grain size {h.grain_size}", name)
        if not 1 <= h.num_gtes_per_gt <= MAX_GTES_PER_GT:
            raise CorruptImageError(f"invalid number of entries per grain table "
                                    f"{h.num_gtes_per_gt}", name)
        if h.capacity >= MAX_CAPACITY_SECTORS:
            raise CorruptImageError(f"capacity of {h.capacity} sectors is not plausible", name)
        if h.overhead < 1:
            raise CorruptImageError(f"invalid overhead {h.overhead}", name)

    # -- the walk -------------------------------------------------------------------------

    def grains(self) -> Iterator[tuple[int, bytes]]:
        """(byte offset in the disk, grain data) in stream order, until the stream is whole.

        Raises ``CorruptImageError`` at the first fault or where the input ends early;
        every grain before it has been yielded.
        """
        walk: _Walk = _TablesFirst(self) if self.tables_first else _TablesAfter(self)
        yield from walk.run()

    def skip_to_sector(self, sector: int, what: str) -> None:
        """Drop the bytes up to ``sector`` (metadata this reader does not need)."""
        start = self._in.pos
        if not self._in.skip(sector * SECTOR_SIZE - start):
            raise self.cut_inside(what, start, sector * SECTOR_SIZE)

    def read_sectors(self, sectors: int, what: str) -> bytes:
        start = self._in.pos
        data = self._in.read(sectors * SECTOR_SIZE)
        if len(data) < sectors * SECTOR_SIZE:
            raise self.cut_inside(what, start, start + sectors * SECTOR_SIZE)
        return data

    def next_record(self, walk: _Walk) -> bool:
        """Read one record and hand it to ``walk``; False at the end of the input."""
        start = self._in.pos
        head = self._in.read(SECTOR_SIZE)
        if not head or (len(head) < SECTOR_SIZE and walk.whole()):
            return False  # (a cut inside a trailing EOS marker loses nothing)
        if len(head) < GrainMarker.SIZE:
            raise self.cut_inside("marker", start)
        marker = GrainMarker.unpack(head)
        if marker.size == 0:
            if len(head) < SECTOR_SIZE:
                raise self.cut_inside("metadata marker", start)
            meta = MetadataMarker.unpack(head)
            walk.metadata(start, meta)
        else:
            walk.grain(start, marker.lba, self._grain_payload(start, marker, head))
        return True

    def _grain_payload(self, start: int, marker: GrainMarker, head: bytes) -> bytes:
        if marker.size > 2 * self.grain_bytes:
            raise CorruptImageError(f"grain record at byte {start}: bad compressed size "
                                    f"{marker.size}", self.name)
        record = GrainMarker.SIZE + marker.size
        self.grain_record = (start, marker.size)
        if record <= len(head):
            return head[GrainMarker.SIZE:record]
        if len(head) < SECTOR_SIZE:
            raise self.cut_inside("grain record", start, start + record)
        body = self._in.read(record - SECTOR_SIZE)
        if len(body) < record - SECTOR_SIZE:
            raise self.cut_inside("grain record", start, start + record)
        # The padding to the next sector may be all that is missing where the input ends.
        self._in.skip(-record % SECTOR_SIZE)
        return head[GrainMarker.SIZE:] + body

    def read_block(self, start: int, meta: MetadataMarker, what: str) -> bytes:
        """The block behind a metadata marker (its size capped before anything is read)."""
        if meta.num_sectors > MAX_METADATA_SECTORS:
            raise CorruptImageError(f"{what} marker at byte {start} announces "
                                    f"{meta.num_sectors} sectors", self.name)
        n = meta.num_sectors * SECTOR_SIZE
        block = self._in.read(n)
        if len(block) < n:
            raise self.cut_inside(what, start, start + SECTOR_SIZE + n)
        return block

    def inflate(self, start: int, lba: int, payload: bytes) -> bytes:
        try:
            return _deflate.inflate_bounded(payload, self.grain_bytes)
        except ValueError as exc:
            raise CorruptImageError(f"grain record at byte {start} (disk sector {lba}): {exc}",
                                    self.name) from exc

    def check_grain(self, start: int, lba: int) -> int:
        """The disk offset of a grain record's grain, after checking its marker's sector."""
        if lba % self.header.grain_size or lba >= self.header.capacity:
            raise CorruptImageError(f"grain record at byte {start} names disk sector {lba}, "
                                    "outside the disk or not at a grain's start", self.name)
        return lba * SECTOR_SIZE

    def complete(self, what: str) -> None:
        """Note that the record ``what`` arrived whole."""
        self.last = what
        self.last_end = self._in.pos

    @property
    def pos(self) -> int:
        return self._in.pos

    # -- messages -------------------------------------------------------------------------

    def _hint(self) -> str:
        return "the download or pipe was cut" if self.recover else HINT

    def cut_inside(self, what: str, start: int, until: int | None = None
                   ) -> TruncatedStreamError:
        """The input ended inside the record ``what`` that starts at byte ``start``."""
        where = f"bytes {start}-{until}" if until is not None else f"byte {start}"
        return TruncatedStreamError(
            f"stream ends at byte {self._in.pos}, inside the {what} at {where}; the last "
            f"complete record ({self.last}) ends at byte "
            f"{self.last_end}: {self._hint()}", self.name)

    def cut_after(self, missing: str) -> TruncatedStreamError:
        """The input ended at a record boundary before the stream was whole."""
        return TruncatedStreamError(
            f"stream ends at byte {self._in.pos}, after the last complete record "
            f"({self.last}); {missing}: {self._hint()}", self.name)

    def corrupt(self, message: str) -> CorruptImageError:
        return CorruptImageError(message, self.name)


class _Walk(abc.ABC):
    """What one layout does with each record; ``run`` yields the grains."""

    def __init__(self, reader: StreamReader) -> None:
        self.r = reader
        self.out: list[tuple[int, bytes]] = []  # grains of the record just read
        self.done = False

    def run(self) -> Iterator[tuple[int, bytes]]:
        r = self.r
        self.front()
        r.complete("the header and what precedes the first grain")
        while not self.done:
            if not r.next_record(self):
                self.at_end_of_input()
                return
            if self.out:
                yield from self.out
                self.out.clear()

    @abc.abstractmethod
    def front(self) -> None:
        """Read what lies between the header and the first grain."""

    @abc.abstractmethod
    def grain(self, start: int, lba: int, payload: bytes) -> None: ...

    @abc.abstractmethod
    def metadata(self, start: int, meta: MetadataMarker) -> None: ...

    def whole(self) -> bool:
        """Whether every grain of the disk has arrived, so the input may end here."""
        return False

    @abc.abstractmethod
    def at_end_of_input(self) -> None:
        """The input ended at a record boundary: raise unless the stream is whole."""

    def end_of_stream(self, start: int, meta: MetadataMarker) -> None:
        if meta.num_sectors:
            raise self.r.corrupt(f"end-of-stream marker at byte {start} announces "
                                 f"{meta.num_sectors} sectors")
        self.r.complete(f"the end-of-stream marker at byte {start}")
        self.done = True

    def emit(self, start: int, lba: int, payload: bytes) -> None:
        r = self.r
        offset = lba * SECTOR_SIZE
        try:
            data = r.inflate(start, lba, payload)
        except CorruptImageError as exc:
            if not r.recover:
                raise
            # Each grain is compressed on its own, with its own checksum, and its marker
            # says where the next record starts: a damaged grain is lost alone.
            log.warning("%s; that grain reads as zeros", exc)
            r.complete(f"the damaged grain record at byte {start}, disk offset {offset}")
            return
        r.complete(f"the grain record at byte {start}, disk offset {offset}")
        self.out.append((offset, data[:r.capacity - offset]))


class _TablesAfter(_Walk):
    """Layout (a): GT after each range's grains, then GD, footer and EOS."""

    def __init__(self, reader: StreamReader) -> None:
        super().__init__(reader)
        self.state = "grains"  # then "directory" (GD seen), then "footer" (footer seen)
        self.next_grain = 0  # grains must ascend
        self.pending: list[tuple[int, int]] = []  # (grain index, sector) since the last GT
        self.tables: dict[int, int] = {}  # GT sector -> its range, -1 for an empty table
        self.gd_sector = 0

    def front(self) -> None:
        self.r.skip_to_sector(self.r.header.overhead, "descriptor area")

    def grain(self, start: int, lba: int, payload: bytes) -> None:
        r = self.r
        if self.state != "grains":
            raise r.corrupt(f"grain record at byte {start} after the grain directory")
        r.check_grain(start, lba)
        index = lba // r.header.grain_size
        if index < self.next_grain:
            raise r.corrupt(f"grain record at byte {start} names disk sector {lba}, out of "
                            "order (grains of a stream ascend)")
        if self.pending and self.pending[0][0] // r.header.num_gtes_per_gt != (
                index // r.header.num_gtes_per_gt):
            raise r.corrupt(f"grain record at byte {start} starts a new grain-table range "
                            "before the grain table of the previous one")
        self.next_grain = index + 1
        self.pending.append((index, start // SECTOR_SIZE))
        self.emit(start, lba, payload)

    def metadata(self, start: int, meta: MetadataMarker) -> None:
        r = self.r
        kind = meta.type
        if kind == MarkerType.EOS:
            self._end_of_stream(start, meta)
        elif kind == MarkerType.GRAIN_TABLE:
            self._grain_table(start, r.read_block(start, meta, "grain table"))
        elif kind == MarkerType.GRAIN_DIRECTORY:
            self._directory(start, r.read_block(start, meta, "grain directory"))
        elif kind == MarkerType.FOOTER:
            self._footer(start, r.read_block(start, meta, "footer"))
        else:  # progress markers (VMware exports) and the like carry nothing we need
            r.read_block(start, meta, f"type-{kind} metadata")
            r.complete(f"the type-{kind} metadata at byte {start}")

    def _grain_table(self, start: int, block: bytes) -> None:
        r = self.r
        gtes = r.header.num_gtes_per_gt
        if self.state != "grains":
            raise r.corrupt(f"grain table at byte {start} after the grain directory")
        if len(block) < gtes * 4:
            raise r.corrupt(f"grain table marker at byte {start} announces "
                            f"{len(block) // SECTOR_SIZE} sectors, less than a table")
        table = _without_zeroed(u32_array(block[:gtes * 4]), r.header)
        expected = array("I", bytes(gtes * 4))
        for index, sector in self.pending:
            expected[index % gtes] = sector
        if table != expected:
            raise r.corrupt(self._table_mismatch(start, table, expected))
        sector = start // SECTOR_SIZE + 1
        self.tables[sector] = self.pending[0][0] // gtes if self.pending else -1
        self.pending.clear()
        r.complete(f"the grain table at byte {start}")

    def _table_mismatch(self, start: int, table: array[int], expected: array[int]) -> str:
        slot = next(i for i, (a, b) in enumerate(zip(table, expected)) if a != b)
        if expected[slot] == 0:
            return (f"grain table at byte {start}: entry {slot} lists sector {table[slot]}, "
                    "where the stream had no grain record of that range")
        return (f"grain table at byte {start}: entry {slot} gives sector {table[slot]}, but its "
                f"grain record came at sector {expected[slot]}")

    def _directory(self, start: int, block: bytes) -> None:
        r = self.r
        if self.state != "grains":
            raise r.corrupt(f"second grain directory at byte {start}")
        if self.pending:
            raise r.corrupt(f"grain directory at byte {start}: the {len(self.pending)} grain "
                            "records before it are in no grain table")
        if len(block) < r.gd_entries * 4:
            raise r.corrupt(f"grain directory at byte {start} is too short for the "
                            f"{r.gd_entries} grain tables of the disk")
        sector = start // SECTOR_SIZE + 1
        gd_offset = r.header.gd_offset
        if gd_offset != GD_AT_END and gd_offset != sector:
            raise r.corrupt(f"grain directory found at sector {sector}, but the header gives "
                            f"sector {gd_offset}")
        gd = u32_array(block[:r.gd_entries * 4])
        self._check_directory(start, gd)
        self.gd_sector = sector
        self.state = "directory"
        r.complete(f"the grain directory at byte {start}")

    def _check_directory(self, start: int, gd: array[int]) -> None:
        r = self.r
        for index, sector in enumerate(gd):
            if sector and self.tables.get(sector, index) not in (index, -1):
                raise r.corrupt(f"grain directory at byte {start}: entry {index} points at the "
                                f"grain table of range {self.tables[sector]}")
            if sector and sector not in self.tables:
                raise r.corrupt(f"grain directory at byte {start}: entry {index} gives sector "
                                f"{sector}, where the stream had no grain table")
        for sector, index in self.tables.items():
            if index >= 0 and (index >= len(gd) or gd[index] != sector):
                raise r.corrupt(f"grain directory at byte {start} does not point at the grain "
                                f"table at sector {sector}")

    def _footer(self, start: int, block: bytes) -> None:
        r = self.r
        if self.state != "directory":
            raise r.corrupt(f"footer at byte {start} " + (
                "before the grain directory" if self.state == "grains" else "comes twice"))
        try:
            footer = SparseHeader.unpack(block)
        except (ValueError, struct.error) as exc:
            raise r.corrupt(f"footer at byte {start} is not a header") from exc
        h = r.header
        if (footer.capacity, footer.grain_size, footer.num_gtes_per_gt) != (
                h.capacity, h.grain_size, h.num_gtes_per_gt):
            raise r.corrupt(f"footer at byte {start} contradicts the header (capacity, grain "
                            "size or table size)")
        if footer.gd_offset != self.gd_sector:
            raise r.corrupt(f"footer at byte {start} gives the grain directory at sector "
                            f"{footer.gd_offset}, but it came at sector {self.gd_sector}")
        self.state = "footer"
        r.complete(f"the footer at byte {start}")

    def _end_of_stream(self, start: int, meta: MetadataMarker) -> None:
        r = self.r
        # A footer is what random readers need where the header says GD_AT_END.
        needed = "footer" if r.header.gd_offset == GD_AT_END else "directory"
        if self.state != "footer" and self.state != needed:
            missing = ("the grain directory and footer" if self.state == "grains"
                       else "the footer")
            raise r.corrupt(f"end-of-stream marker at byte {start} comes before {missing}")
        self.end_of_stream(start, meta)

    def at_end_of_input(self) -> None:
        missing = {"grains": "the grain directory, footer and end-of-stream marker",
                   "directory": "the footer and end-of-stream marker",
                   "footer": "the end-of-stream marker"}[self.state]
        if self.state == "grains" and self.pending:
            missing = "the grain table of the last grains, " + missing
        raise self.r.cut_after(f"{missing} did not arrive")


class _TablesFirst(_Walk):
    """Layouts (b) and (c): GD and GTs before the grains promise every grain record."""

    def __init__(self, reader: StreamReader) -> None:
        super().__init__(reader)
        self.tables: dict[int, array[int]] = {}  # range -> GT; matched entries are zeroed
        self.promised = 0
        self.arrived = 0
        self.trusted = True

    def front(self) -> None:
        r = self.r
        try:
            self._read_tables()
        except TruncatedStreamError:
            raise
        except CorruptImageError as exc:
            if not r.recover:
                raise
            log.warning("%s; the grains are taken from their markers alone", exc)
            self.trusted = False
            self.tables.clear()
        else:
            r.complete("the grain directory and tables")
        r.skip_to_sector(r.header.overhead, "padding before the first grain")

    # -- the tables at the front ----------------------------------------------------------

    def _read_tables(self) -> None:
        r, h = self.r, self.r.header
        gd_sectors = _ceil_div(r.gd_entries * 4, SECTOR_SIZE)
        if r.gd_entries > MAX_GD_ENTRIES or gd_sectors > MAX_METADATA_SECTORS:
            raise r.corrupt(f"a grain directory of {r.gd_entries} entries is too large")
        if h.gd_offset < 1 or h.gd_offset + gd_sectors > h.overhead:
            raise r.corrupt(f"grain directory at sector {h.gd_offset} ({gd_sectors} sectors) "
                            f"does not lie before the first grain (sector {h.overhead})")
        if r.gd_entries * r.gt_sectors > h.overhead:
            raise r.corrupt(f"{r.gd_entries} grain tables cannot fit in the {h.overhead} "
                            "sectors before the first grain")
        r.skip_to_sector(h.gd_offset, "area before the grain directory")
        gd = u32_array(r.read_sectors(gd_sectors, "grain directory")[:r.gd_entries * 4])
        for sector, index in self._table_order(gd, h.gd_offset + gd_sectors):
            r.skip_to_sector(sector, f"area before the grain table at sector {sector}")
            raw = r.read_sectors(r.gt_sectors, f"grain table at sector {sector}")
            self._add_table(index, raw[:h.num_gtes_per_gt * 4], sector)

    def _table_order(self, gd: array[int], first: int) -> list[tuple[int, int]]:
        """(sector, range) of the tables in file order, checked to lie one after another
        between the directory and the first grain."""
        r = self.r
        order = sorted((sector, index) for index, sector in enumerate(gd) if sector)
        end = first
        for sector, index in order:
            if sector < end:
                raise r.corrupt(f"grain table of range {index} at sector {sector} overlaps "
                                "the directory or another table (or lies before them)")
            end = sector + r.gt_sectors
            if end > r.header.overhead:
                raise r.corrupt(f"grain table of range {index} at sector {sector} does not lie "
                                f"before the first grain (sector {r.header.overhead})")
        return order

    def _add_table(self, index: int, raw: bytes, sector: int) -> None:
        r = self.r
        table = _without_zeroed(u32_array(raw), r.header)
        gtes = r.header.num_gtes_per_gt
        beyond = r.num_grains - index * gtes  # slots of the last table past the disk's end
        if beyond < gtes and any(table[beyond:]):
            raise r.corrupt(f"grain table at sector {sector} lists grains past the end of the "
                            "disk")
        self.promised += gtes - table.count(0)
        self.tables[index] = table

    # -- the records ----------------------------------------------------------------------

    def grain(self, start: int, lba: int, payload: bytes) -> None:
        r = self.r
        offset = r.check_grain(start, lba)
        if self.trusted:
            range_index, slot = divmod(lba // r.header.grain_size, r.header.num_gtes_per_gt)
            table = self.tables.get(range_index)
            sector = start // SECTOR_SIZE
            if table is None or table[slot] != sector:
                given = table[slot] if table is not None else 0
                raise r.corrupt(
                    f"grain record at sector {sector} holds disk offset {offset}, but the grain "
                    + (f"table gives sector {given} for it" if given else
                       "tables list no grain there (or it came twice)"))
            table[slot] = 0
            self.arrived += 1
        self.emit(start, lba, payload)

    def metadata(self, start: int, meta: MetadataMarker) -> None:
        r = self.r
        if meta.type != MarkerType.EOS:  # nothing else is needed here; skip it, bounded
            r.read_block(start, meta, f"type-{meta.type} metadata")
            r.complete(f"the type-{meta.type} metadata at byte {start}")
            return
        if self.trusted and self.arrived < self.promised:
            self._refuse_passed()
            raise r.corrupt(f"end-of-stream marker at byte {start}, but {self._missing()}")
        self.end_of_stream(start, meta)

    def whole(self) -> bool:
        return self.trusted and self.arrived == self.promised

    def at_end_of_input(self) -> None:
        r = self.r
        if not self.trusted:
            raise r.cut_after("without grain tables to go by, the end of the disk cannot be "
                              "told from a cut")
        if self.arrived == self.promised:
            return  # layout (c) ends so; (b) may have lost only its EOS marker
        self._refuse_passed()
        raise r.cut_after(self._missing())

    def _missing(self) -> str:
        return (f"{self.promised - self.arrived} of the {self.promised} grains the grain tables "
                "list did not arrive")

    def _refuse_passed(self) -> None:
        """A grain the tables promise at a sector the walk went past is a table error, not a
        cut: say so."""
        here = self.r.pos // SECTOR_SIZE
        low = min((s for t in self.tables.values() for s in t if s), default=None)
        if low is not None and low < here:
            raise self.r.corrupt(f"the grain tables list a grain record at sector {low}, which "
                                 "the stream passed without one there")


def _without_zeroed(table: array[int], header: SparseHeader) -> array[int]:
    """The table with zeroed-grain entries (value 1) cleared: they promise no record."""
    if header.has(SparseFlags.ZEROED_GTE) and ZEROED_GTE in table:
        return array("I", (0 if e == ZEROED_GTE else e for e in table))
    return table


def iter_stream_grains(f: IO[bytes], name: str, *, recover: bool = False
                       ) -> tuple[SparseHeader, Iterator[tuple[int, bytes]]]:
    """The header of a stream read front to back, and its (byte offset, grain data)."""
    reader = StreamReader(f, name, recover=recover)
    return reader.header, reader.grains()


__all__ = ["StreamReader", "TruncatedStreamError", "iter_stream_grains"]
