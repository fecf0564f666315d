"""On-disk binary structures, each declared once as a struct format plus a dataclass.

Field meanings follow VMware's "Virtual Disk Format 5.0" technical note; all
integers are little-endian.  ``unpack`` never validates semantics (that is the
extent's job, which knows the file size); it only refuses short input.
"""

from __future__ import annotations

import dataclasses
import struct
from enum import IntEnum, IntFlag
from typing import ClassVar

SECTOR_SIZE = 512

SPARSE_MAGIC = b"KDMV"
COWD_MAGIC = b"COWD"
SESPARSE_CONST_MAGIC = 0xCAFEBABE
SESPARSE_VOLATILE_MAGIC = 0xCAFECAFE

#: gdOffset value meaning "the grain directory is found through the footer".
GD_AT_END = 0xFFFFFFFFFFFFFFFF

#: Grain table entry meaning "this grain reads as zeros" (with SparseFlags.ZEROED_GTE).
ZEROED_GTE = 1


class SparseFlags(IntFlag):
    VALID_NEWLINE = 0x1
    REDUNDANT_GT = 0x2
    ZEROED_GTE = 0x4
    COMPRESSED = 0x10000
    MARKERS = 0x20000

    #: Bits a reader may ignore; anything above is an incompatible feature.
    COMPATIBLE_MASK = 0xFFFF


KNOWN_SPARSE_FLAGS = (
    SparseFlags.VALID_NEWLINE
    | SparseFlags.REDUNDANT_GT
    | SparseFlags.ZEROED_GTE
    | SparseFlags.COMPRESSED
    | SparseFlags.MARKERS
)


class CompressAlgorithm(IntEnum):
    NONE = 0
    DEFLATE = 1


class MarkerType(IntEnum):
    EOS = 0
    GRAIN_TABLE = 1
    GRAIN_DIRECTORY = 2
    FOOTER = 3
    PROGRESS = 4


#: The four bytes a text-mode transfer would mangle: "\n", " ", "\r", "\n".
NEWLINE_CHECK = b"\n \r\n"


@dataclasses.dataclass
class SparseHeader:
    """The 512-byte header of a hosted sparse extent ("KDMV")."""

    version: int = 1
    flags: int = int(SparseFlags.VALID_NEWLINE | SparseFlags.REDUNDANT_GT)
    capacity: int = 0  # sectors
    grain_size: int = 128  # sectors
    descriptor_offset: int = 0  # sector
    descriptor_size: int = 0  # sectors
    num_gtes_per_gt: int = 512
    rgd_offset: int = 0  # sector of the redundant grain directory
    gd_offset: int = 0  # sector of the grain directory, or GD_AT_END
    overhead: int = 0  # sectors before the first grain
    unclean_shutdown: int = 0
    newline_check: bytes = NEWLINE_CHECK
    compress_algorithm: int = CompressAlgorithm.NONE

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<4sIIQQQQIQQQB4sH433x")
    SIZE: ClassVar[int] = 512

    @classmethod
    def unpack(cls, data: bytes) -> SparseHeader:
        (magic, version, flags, capacity, grain, desc_off, desc_size, gtes, rgd, gd, overhead,
         unclean, newline, compress) = cls.FORMAT.unpack_from(data)
        if magic != SPARSE_MAGIC:
            raise ValueError(f"bad magic {magic!r}")
        return cls(version, flags, capacity, grain, desc_off, desc_size, gtes, rgd, gd,
                   overhead, unclean, newline, compress)

    def pack(self) -> bytes:
        return self.FORMAT.pack(
            SPARSE_MAGIC, self.version, self.flags, self.capacity, self.grain_size,
            self.descriptor_offset, self.descriptor_size, self.num_gtes_per_gt,
            self.rgd_offset, self.gd_offset, self.overhead, self.unclean_shutdown,
            self.newline_check, self.compress_algorithm,
        )

    def has(self, flag: SparseFlags) -> bool:
        return bool(self.flags & flag)


#: Offset of the uncleanShutdown byte inside SparseHeader, for the one-byte update.
SPARSE_UNCLEAN_OFFSET = 72


@dataclasses.dataclass
class GrainMarker:
    """Head of a compressed grain record: LBA (sectors) and compressed byte count."""

    lba: int
    size: int

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<QI")
    SIZE: ClassVar[int] = 12

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> GrainMarker:
        return cls(*cls.FORMAT.unpack_from(data))

    def pack(self) -> bytes:
        return self.FORMAT.pack(self.lba, self.size)


@dataclasses.dataclass
class MetadataMarker:
    """A sector-sized marker announcing a metadata block (size field is 0)."""

    num_sectors: int
    type: int

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<QII496x")
    SIZE: ClassVar[int] = 512

    @classmethod
    def unpack(cls, data: bytes) -> MetadataMarker:
        num, size, mtype = cls.FORMAT.unpack_from(data)
        if size != 0:
            raise ValueError("not a metadata marker")
        return cls(num, mtype)

    def pack(self) -> bytes:
        return self.FORMAT.pack(self.num_sectors, 0, self.type)


@dataclasses.dataclass
class CowdHeader:
    """The 2048-byte header of an ESX vmfsSparse ("COWD") extent."""

    version: int = 1
    flags: int = 3
    num_sectors: int = 0
    grain_size: int = 1  # sectors
    gd_offset: int = 4  # sector
    num_gd_entries: int = 0
    free_sector: int = 0
    # Root disks store geometry here; child disks store the parent's file name.
    cylinders: int = 0
    heads: int = 0
    sectors: int = 0
    parent_file_name: bytes = b""
    parent_generation: int = 0
    generation: int = 0
    name: bytes = b""
    description: bytes = b""
    saved_generation: int = 0
    unclean_shutdown: int = 0

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<4sIIIIIII1024sII60s512sI8xI396x")
    SIZE: ClassVar[int] = 2048
    GT_ENTRIES: ClassVar[int] = 4096

    @classmethod
    def unpack(cls, data: bytes) -> CowdHeader:
        (magic, version, flags, num_sectors, grain, gd_off, num_gd, free, union,
         parent_gen, generation, name, description, saved_gen, unclean) = cls.FORMAT.unpack_from(data)
        if magic != COWD_MAGIC:
            raise ValueError(f"bad magic {magic!r}")
        # The area holds a root disk's geometry or a child's parent name; a name starts
        # with a printable character, a geometry with a small binary number.
        parent = union.split(b"\0", 1)[0]
        if parent and parent[0] >= 0x20:
            cylinders = heads = sectors = 0
        else:
            parent = b""
            cylinders, heads, sectors = struct.unpack_from("<III", union)
        return cls(version, flags, num_sectors, grain, gd_off, num_gd, free, cylinders, heads,
                   sectors, parent, parent_gen, generation,
                   name.split(b"\0", 1)[0], description.split(b"\0", 1)[0], saved_gen, unclean)

    def pack(self) -> bytes:
        if self.parent_file_name:
            union = self.parent_file_name.ljust(1024, b"\0")
        else:
            union = struct.pack("<III", self.cylinders, self.heads, self.sectors).ljust(1024, b"\0")
        return self.FORMAT.pack(
            COWD_MAGIC, self.version, self.flags, self.num_sectors, self.grain_size,
            self.gd_offset, self.num_gd_entries, self.free_sector, union, self.parent_generation,
            self.generation, self.name, self.description, self.saved_generation,
            self.unclean_shutdown,
        )


@dataclasses.dataclass
class SESparseConstHeader:
    """The constant header of an ESXi seSparse extent; every field is a u64, offsets in sectors."""

    magic: int
    version: int
    capacity: int
    grain_size: int
    grain_table_size: int
    flags: int
    volatile_header_offset: int
    volatile_header_size: int
    journal_header_offset: int
    journal_header_size: int
    journal_offset: int
    journal_size: int
    grain_dir_offset: int
    grain_dir_size: int
    grain_tables_offset: int
    grain_tables_size: int
    free_bitmap_offset: int
    free_bitmap_size: int
    backmap_offset: int
    backmap_size: int
    grains_offset: int
    grains_size: int

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<6Q32x16Q304x")
    SIZE: ClassVar[int] = 512

    @classmethod
    def unpack(cls, data: bytes) -> SESparseConstHeader:
        return cls(*cls.FORMAT.unpack_from(data))

    def pack(self) -> bytes:
        return self.FORMAT.pack(*dataclasses.astuple(self))


@dataclasses.dataclass
class SESparseVolatileHeader:
    magic: int
    free_gt_number: int
    next_txn_seq_number: int
    replay_journal: int

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<4Q480x")
    SIZE: ClassVar[int] = 512

    @classmethod
    def unpack(cls, data: bytes) -> SESparseVolatileHeader:
        return cls(*cls.FORMAT.unpack_from(data))

    def pack(self) -> bytes:
        return self.FORMAT.pack(*dataclasses.astuple(self))


assert SparseHeader.FORMAT.size == SparseHeader.SIZE
assert CowdHeader.FORMAT.size == CowdHeader.SIZE
assert SESparseConstHeader.FORMAT.size == SESparseConstHeader.SIZE
assert MetadataMarker.FORMAT.size == MetadataMarker.SIZE
