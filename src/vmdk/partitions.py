"""Partition tables (MBR with logical partitions, and GPT) of a raw disk or disk file.

A ``partitionedDevice`` image exposes chosen partitions of a real disk to a
virtual machine, as ``VBoxManage createmedium ... --property RawDrive=...
--property Partitions=1,5`` does: the partition tables (and the boot code before
the first partition) are copied into a ``-pt.vmdk`` file the guest may change
freely, the chosen partitions map onto the device, and everything else reads
as zeros.  This module reads the tables and turns a choice of partition numbers
into those ranges.  Numbers follow Linux: MBR primaries 1-4, logical partitions
from 5 in chain order; GPT entries by their slot, from 1.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import uuid
import zlib
from collections.abc import Sequence
from typing import BinaryIO, ClassVar

from .create import RawRange, device_size
from .errors import VmdkError

SECTOR = 512
#: Boot code and tables before the first partition are copied up to this size; beyond
#: it only the tables themselves are (a first partition far out is rare).
MAX_LEADING_COPY = 16 << 20
MAX_LOGICAL = 128  # logical partitions followed along an MBR chain before giving up
MAX_GPT_ENTRIES = 1024
EXTENDED_TYPES = (0x05, 0x0F, 0x85)
GPT_PROTECTIVE = 0xEE


class PartitionTableError(VmdkError):
    """The disk's partition table is missing or damaged, or a partition is not there."""


@dataclasses.dataclass(frozen=True)
class MbrEntry:
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<B3sB3sII")
    status: int
    chs_first: bytes
    type: int
    chs_last: bytes
    lba: int
    sectors: int

    @classmethod
    def table(cls, sector: bytes) -> list[MbrEntry]:
        """The four entries of an MBR or EBR sector."""
        return [cls(*cls.FORMAT.unpack_from(sector, 446 + 16 * i)) for i in range(4)]


@dataclasses.dataclass(frozen=True)
class GptHeader:
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<8sIIIIQQQQ16sQIII")
    signature: bytes
    revision: int
    header_size: int
    header_crc: int
    reserved: int
    current_lba: int
    backup_lba: int
    first_usable: int
    last_usable: int
    disk_guid: bytes
    entries_lba: int
    num_entries: int
    entry_size: int
    entries_crc: int

    @classmethod
    def unpack(cls, sector: bytes) -> GptHeader:
        return cls(*cls.FORMAT.unpack_from(sector))


@dataclasses.dataclass(frozen=True)
class GptEntry:
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<16s16sQQQ72s")
    type_guid: bytes
    unique_guid: bytes
    first_lba: int
    last_lba: int
    attributes: int
    name: bytes


@dataclasses.dataclass(frozen=True)
class Partition:
    number: int
    start: int  # bytes from the start of the disk
    size: int   # bytes
    type: str   # "0x83" for MBR, the type GUID for GPT
    name: str = ""


@dataclasses.dataclass(frozen=True)
class PartitionTable:
    scheme: str                          # "mbr" or "gpt"
    partitions: list[Partition]
    tables: list[tuple[int, int]]        # (start, size) in bytes of every table structure
    disk_size: int
    sector_size: int = SECTOR

    def partition(self, number: int, path: str) -> Partition:
        for p in self.partitions:
            if p.number == number:
                return p
        have = ", ".join(str(p.number) for p in self.partitions) or "none"
        raise PartitionTableError(f"no partition {number} in its {self.scheme.upper()} table "
                                  f"(partitions: {have})", path)


def read_partition_table(path: str | os.PathLike[str]) -> PartitionTable:
    """The partitions of the disk or disk file ``path``, from its GPT or MBR."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return partition_table_of(f, device_size(path), path)
    except OSError as exc:
        raise PartitionTableError(exc.strerror or str(exc), path) from exc


def partition_table_of(f: BinaryIO, size: int, name: str) -> PartitionTable:
    """The partitions of a disk of ``size`` bytes read through ``f`` (a virtual disk opened
    by the package, say); ``name`` names it in errors."""
    mbr = _read(f, 0, SECTOR, name)
    if mbr[510:512] != b"\x55\xaa":
        raise PartitionTableError("no partition table (no MBR signature)", name)
    entries = MbrEntry.table(mbr)
    if any(e.type == GPT_PROTECTIVE for e in entries):
        return _read_gpt(f, name, size)
    return _read_mbr(f, name, size, entries)


def _read(f: BinaryIO, offset: int, length: int, path: str) -> bytes:
    f.seek(offset)
    data = f.read(length)
    if len(data) < length:
        raise PartitionTableError(f"the disk ends inside its partition table (at byte {offset})",
                                  path)
    return data


def _read_mbr(f: BinaryIO, path: str, size: int, entries: list[MbrEntry]) -> PartitionTable:
    parts: list[Partition] = []
    tables = [(0, SECTOR)]
    extended: MbrEntry | None = None
    for number, e in enumerate(entries, 1):
        if e.type == 0 or e.sectors == 0:
            continue
        if e.type in EXTENDED_TYPES:
            extended = e
        parts.append(_mbr_partition(number, e, 0, path, size))
    if extended is not None:
        parts += _read_logical(f, path, size, extended, tables)
    return PartitionTable("mbr", parts, tables, size)


def _mbr_partition(number: int, e: MbrEntry, base: int, path: str, size: int) -> Partition:
    start, length = (base + e.lba) * SECTOR, e.sectors * SECTOR
    if start + length > size:
        raise PartitionTableError(f"partition {number} ends past the end of the disk "
                                  f"({start + length} > {size} bytes)", path)
    return Partition(number, start, length, f"0x{e.type:02x}")


def _read_logical(f: BinaryIO, path: str, size: int, extended: MbrEntry,
                  tables: list[tuple[int, int]]) -> list[Partition]:
    """Follow the chain of extended boot records; logical partitions count from 5."""
    parts: list[Partition] = []
    seen: set[int] = set()
    ebr = extended.lba
    while ebr and len(parts) < MAX_LOGICAL:
        if ebr in seen or ebr * SECTOR + SECTOR > size:
            raise PartitionTableError(f"the chain of logical partitions loops or leaves the disk "
                                      f"(at sector {ebr})", path)
        seen.add(ebr)
        record = _read(f, ebr * SECTOR, SECTOR, path)
        if record[510:512] != b"\x55\xaa":
            raise PartitionTableError(f"extended boot record at sector {ebr} has no signature",
                                      path)
        tables.append((ebr * SECTOR, SECTOR))
        logical, following = MbrEntry.table(record)[:2]
        if logical.type and logical.sectors:
            parts.append(_mbr_partition(5 + len(parts), logical, ebr, path, size))
        ebr = extended.lba + following.lba if following.type in EXTENDED_TYPES else 0
    return parts


def _read_gpt(f: BinaryIO, path: str, size: int) -> PartitionTable:
    faults = []
    for sector_size in (SECTOR, 4096):
        for lba in (1, size // sector_size - 1):  # the primary header, then the backup
            try:
                header, entries = _gpt_at(f, path, size, sector_size, lba)
            except PartitionTableError as exc:
                faults.append(exc.args[0])
                continue
            return _gpt_table(header, entries, path, size, sector_size)
    raise PartitionTableError(f"no valid GPT ({faults[0]})", path)


def _gpt_at(f: BinaryIO, path: str, size: int, sector_size: int, lba: int
            ) -> tuple[GptHeader, list[GptEntry]]:
    raw = _read(f, lba * sector_size, sector_size, path)
    header = GptHeader.unpack(raw)
    if header.signature != b"EFI PART":
        raise PartitionTableError(f"no GPT header at sector {lba}", path)
    if not 92 <= header.header_size <= sector_size:
        raise PartitionTableError(f"GPT header at sector {lba} has a bad size", path)
    check = bytearray(raw[:header.header_size])
    check[16:20] = bytes(4)
    if zlib.crc32(check) != header.header_crc:
        raise PartitionTableError(f"GPT header at sector {lba} fails its checksum", path)
    if header.entry_size < 128 or header.entry_size % 8 or header.entry_size > 4096:
        raise PartitionTableError(f"GPT entries of {header.entry_size} bytes", path)
    if header.num_entries > MAX_GPT_ENTRIES:
        raise PartitionTableError(f"GPT claims {header.num_entries} entries", path)
    length = header.num_entries * header.entry_size
    if header.entries_lba * sector_size + length > size:
        raise PartitionTableError("GPT entries lie past the end of the disk", path)
    table = _read(f, header.entries_lba * sector_size, length, path)
    if zlib.crc32(table) != header.entries_crc:
        raise PartitionTableError(f"GPT entries at sector {header.entries_lba} fail their "
                                  "checksum", path)
    entries = [GptEntry(*GptEntry.FORMAT.unpack_from(table, i * header.entry_size))
               for i in range(header.num_entries)]
    return header, entries


def _gpt_table(header: GptHeader, entries: list[GptEntry], path: str, size: int,
               sector_size: int) -> PartitionTable:
    parts = []
    for number, e in enumerate(entries, 1):
        if e.type_guid == bytes(16):
            continue
        start, end = e.first_lba * sector_size, (e.last_lba + 1) * sector_size
        if end <= start or end > size:
            raise PartitionTableError(f"GPT partition {number} is empty or ends past the end "
                                      "of the disk", path)
        name = e.name.decode("utf-16-le", "replace").split("\0", 1)[0]
        parts.append(Partition(number, start, end - start, str(uuid.UUID(bytes_le=e.type_guid)),
                               name))
    entries_bytes = _ceil(header.num_entries * header.entry_size, sector_size)
    tables = [(0, sector_size),  # the protective MBR, then the header read and its entries
              (header.current_lba * sector_size, sector_size),
              (header.entries_lba * sector_size, entries_bytes)]
    # The other copy, where this header says it is (a disk grown since may have it inside);
    # primary entries follow their header, backup entries precede theirs.
    other = header.backup_lba
    if 0 < other and (other + 1) * sector_size <= size:
        other_entries = (other + 1 if other < header.current_lba
                         else other - entries_bytes // sector_size)
        tables += [(other * sector_size, sector_size),
                   (other_entries * sector_size, entries_bytes)]
    tables = [(a, n) for a, n in tables if a >= 0 and a + n <= size]
    return PartitionTable("gpt", parts, tables, size, sector_size)


def _ceil(n: int, to: int) -> int:
    return -(-n // to) * to


def partitioned_ranges(device: str, numbers: Sequence[int],
                       table: PartitionTable | None = None) -> list[RawRange]:
    """The ranges of a ``partitionedDevice`` image exposing partitions ``numbers``.

    Partition tables (and the boot code before the first partition) become copies
    in the ``-pt.vmdk`` file; each chosen partition maps onto ``device``; the rest
    of the disk reads as zeros.
    """
    table = table or read_partition_table(device)
    chosen = sorted({n: table.partition(n, device) for n in numbers}.values(),
                    key=lambda p: p.start)
    if any(p.type in ("0x05", "0x0f", "0x85") for p in chosen):
        raise PartitionTableError("an extended partition holds the logical ones: choose those "
                                  "(5 and up) instead", device)
    copies = list(table.tables)
    data_starts = [p.start for p in table.partitions if p.type not in ("0x05", "0x0f", "0x85")]
    first = min(data_starts, default=0)
    if 0 < first <= MAX_LEADING_COPY:
        copies.append((0, first))  # boot code lives between the MBR and the first partition
    ranges: list[RawRange] = []
    with open(device, "rb") as f:
        for start, length in _merge(copies):
            if any(p.start < start + length and start < p.start + p.size for p in chosen):
                continue  # never shadow a chosen partition with a copy
            data = _read(f, start, length, device)
            ranges.append(RawRange(start, length, data=data))
    ranges += [RawRange(p.start, p.size, device=device, device_offset=p.start) for p in chosen]
    return sorted(ranges, key=lambda r: r.start)


def _merge(areas: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sector-aligned areas, overlapping or touching ones joined."""
    out: list[tuple[int, int]] = []
    for start, length in sorted(areas):
        start, end = start - start % SECTOR, _ceil(start + length, SECTOR)
        if out and start <= out[-1][0] + out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][0] + out[-1][1], end) - out[-1][0])
        else:
            out.append((start, end - start))
    return out


__all__ = ["Partition", "PartitionTable", "PartitionTableError", "partition_table_of",
           "partitioned_ranges", "read_partition_table"]
