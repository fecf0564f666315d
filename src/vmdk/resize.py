"""Changing a disk's virtual size.

Growing works for sparse and flat images, monolithic or split; a sparse
extent whose grain directory has no room for the new size gets a larger
directory (and preallocated tables) at the end of its file, written and
synced before the header points at it.  Shrinking is refused while any
byte past the new end is stored, so no data is ever dropped.
"""

from __future__ import annotations

import operator
import os
import stat
from array import array
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
else:
    from ._numpy import np

from .create import MAX_DISK_BYTES, MAX_SPLIT_EXTENTS, SPLIT_SECTORS, _sibling
from .descriptor import ExtentLine
from .errors import UnsupportedFormatError, VmdkError
from .extents.base import SECTOR_SIZE, pwrite_all
from .extents.flat import FlatExtent
from .extents.sparse import MAX_FILE_SECTORS, MAX_GD_ENTRIES, SparseExtent, u32_bytes
from .image import Image, MapRun, compute_geometry, io_errors


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def resize(path: str | os.PathLike[str], size: int, *, shrink: bool = False) -> None:
    """Set the virtual size of ``path`` to ``size`` bytes (rounded up to a sector)."""
    path = os.fspath(path)
    sectors = _ceil_div(operator.index(size), SECTOR_SIZE)
    if sectors < 1:
        raise VmdkError(f"a disk needs at least one sector; {size} bytes asked for", path)
    if sectors * SECTOR_SIZE > MAX_DISK_BYTES:
        raise UnsupportedFormatError(f"{size} bytes is more than any file system holds", path)
    dropped: list[str] = []
    with io_errors(path), Image.open(path, "r+") as image:
        old = image.size // SECTOR_SIZE
        if sectors == old:
            return
        if any(getattr(e, "compressed", False) for e in image.extents):
            raise UnsupportedFormatError(
                "streamOptimized images cannot be resized; convert them first", path)
        if sectors < old:
            before = [e.filename for e in image.extents if e.filename]
            _shrink(image, sectors, shrink)
            kept = {e.filename for e in image.extents[:len(image.descriptor.extents)]}
            dropped = [f for f in before if f not in kept]
        else:
            _grow(image, sectors)
        image._first_write()  # a new size is new content: the CID changes
        if image.descriptor.ddb_get("ddb.geometry.cylinders") is not None:
            c, _h, _s = compute_geometry(sectors * SECTOR_SIZE, image.adapter_type or "ide")
            image.descriptor.ddb_set("ddb.geometry.cylinders", str(c))
    # Extent files past the new end held no data (checked above) and are no longer named.
    for name in dropped:
        os.unlink(name)


def _shrink(image: Image, sectors: int, allowed: bool) -> None:
    if not allowed:
        raise VmdkError("shrinking needs shrink=True (--shrink)", image.path)
    lost = _first_nonzero(image, [r for r in image.map(sectors * SECTOR_SIZE)
                                  if r.depth == 0 and r.data])
    if lost is not None:
        raise VmdkError(
            f"refusing to shrink: data is stored at offset {lost}, past the new end "
            f"({sectors * SECTOR_SIZE} bytes)", image.path)
    lines = image.descriptor.extents
    kept: list[ExtentLine] = []
    pos = 0
    for line in lines:
        if pos >= sectors:
            break
        n = min(line.sectors, sectors - pos)
        kept.append(_with_sectors(line, n))
        pos += line.sectors
    _apply(image, kept)
    owns_flat_files = image.create_type in ("monolithicFlat", "twoGbMaxExtentFlat", "vmfs")
    flat_ends: dict[str, tuple[int, FlatExtent]] = {}  # the end the kept lines need, per file
    for line, extent in zip(kept, image.extents):
        if isinstance(extent, SparseExtent) and image.embedded is extent:
            extent.header.capacity = line.sectors
            pwrite_all(extent.fd, extent.header_bytes(), 0)
        elif isinstance(extent, FlatExtent) and extent.filename:
            end = extent.base + line.sectors * SECTOR_SIZE
            flat_ends[extent.filename] = (max(end, flat_ends.get(extent.filename, (0,))[0]),
                                          extent)
    # Give the space back, as these flat files were made for this disk; raw devices and the
    # files behind raw-disk descriptors are never cut.
    for end, extent in flat_ends.values() if owns_flat_files else ():
        if stat.S_ISREG(os.fstat(extent.fd).st_mode) and os.fstat(extent.fd).st_size > end:
            os.ftruncate(extent.fd, end)


def _first_nonzero(image: Image, runs: list[MapRun]) -> int | None:
    """Offset of the first non-zero byte stored in ``runs`` (stored zeros are not data)."""
    chunk = 8 << 20
    for run in runs:
        pos, end = run.start, run.start + run.length
        while pos < end:
            n = min(chunk, end - pos)
            data = np.frombuffer(image.read_at(pos, n), dtype=np.uint8)
            hits = np.flatnonzero(data)
            if hits.size:
                found: int = pos + int(hits[0])
                return found
            pos += n
    return None


def _with_sectors(line: ExtentLine, sectors: int) -> ExtentLine:
    return ExtentLine(line.access, sectors, line.type, line.filename, line.offset, line.extra)


def _apply(image: Image, lines: list[ExtentLine]) -> None:
    image.descriptor.set_extents(lines)
    image.size = sum(line.sectors for line in lines) * SECTOR_SIZE


def _grow(image: Image, sectors: int) -> None:
    lines = image.descriptor.extents
    extents = image.extents
    last, extent = lines[-1], extents[-1]
    extra = sectors - image.size // SECTOR_SIZE
    create_type = image.create_type
    split = create_type.startswith(("twoGb", "2Gb"))
    room = (SPLIT_SECTORS - last.sectors) if split else extra
    room = max(0, min(room, extra))
    if split and len(lines) + _ceil_div(extra - room, SPLIT_SECTORS) > MAX_SPLIT_EXTENTS:
        raise UnsupportedFormatError(
            f"growing by {extra * SECTOR_SIZE >> 40} TiB would need more than "
            f"{MAX_SPLIT_EXTENTS} extent files", image.path)
    if room:
        if isinstance(extent, SparseExtent):
            _grow_sparse(extent, last.sectors + room)
        elif isinstance(extent, FlatExtent):
            _grow_flat(extent, last.sectors + room)
        else:
            kind = getattr(extent, "kind", None) or last.type
            raise UnsupportedFormatError(f"{kind} extents (vmfsSparse snapshots, seSparse) "
                                         "cannot grow here; convert the image first",
                                         image.path)
        lines[-1] = _with_sectors(last, last.sectors + room)
        extra -= room
    n = len(lines)
    while extra:
        part = min(extra, SPLIT_SECTORS)
        n += 1
        lines.append(_new_split_extent(image, last, n, part))
        extra -= part
    _apply(image, lines)


def _new_split_extent(image: Image, like: ExtentLine, number: int, sectors: int) -> ExtentLine:
    if like.type == "SPARSE":
        full, base = _sibling(image.path, f"-s{number:03d}")
        if os.path.exists(full):
            raise VmdkError(f"cannot add extent {base}: the file exists", image.path)
        last = image.extents[-1]
        grain = last.header.grain_size if isinstance(last, SparseExtent) else 128
        SparseExtent.create(full, sectors, grain_size=grain).close()
        return ExtentLine("RW", sectors, "SPARSE", base, None)
    full, base = _sibling(image.path, f"-f{number:03d}")
    if os.path.exists(full):
        raise VmdkError(f"cannot add extent {base}: the file exists", image.path)
    FlatExtent.create(full, sectors).close()
    return ExtentLine("RW", sectors, "FLAT", base, 0)


def _grow_flat(extent: FlatExtent, sectors: int) -> None:
    need = extent.base + sectors * SECTOR_SIZE
    if os.fstat(extent.fd).st_size < need:
        os.ftruncate(extent.fd, need)
    extent.size = sectors * SECTOR_SIZE


def _grow_sparse(extent: SparseExtent, sectors: int) -> None:
    """Raise a sparse extent's capacity, moving its grain directory if it must grow."""
    h = extent.header
    entries = _ceil_div(sectors, extent.gt_coverage)
    if entries > MAX_GD_ENTRIES:  # checked before any table is allocated
        limit = MAX_GD_ENTRIES * extent.gt_coverage * SECTOR_SIZE
        raise UnsupportedFormatError(
            f"a sparse extent of this grain size holds at most {limit >> 40} TiB (qemu and "
            "VMware refuse larger grain directories)", extent.filename)
    extent.flush()
    if entries > len(extent.gd) and _ceil_div(entries * 4, SECTOR_SIZE) > _ceil_div(
            len(extent.gd) * 4, SECTOR_SIZE):
        _relocate_directories(extent, entries)
    elif entries > len(extent.gd):
        _extend_in_place(extent, entries)
    h.capacity = sectors
    extent.gd_entries = entries
    extent.size = sectors * SECTOR_SIZE
    pwrite_all(extent.fd, extent.header_bytes(), 0)
    os.fsync(extent.fd)


def _new_tables(extent: SparseExtent, count: int) -> array[int]:
    """Reserve ``count`` zeroed grain tables at the end of the file; their sectors."""
    gt_sectors = _ceil_div(extent.header.num_gtes_per_gt * 4, SECTOR_SIZE)
    first = extent._end
    if first + count * gt_sectors > MAX_FILE_SECTORS:
        raise UnsupportedFormatError("extent file would grow past 2 TiB (u32 sector numbers)",
                                     extent.filename)
    extent._end += count * gt_sectors
    return array("I", range(first, first + count * gt_sectors, gt_sectors))


def _extend_in_place(extent: SparseExtent, entries: int) -> None:
    """The directory's last sector has room: append entries for new, preallocated tables."""
    added = entries - len(extent.gd)
    gd = extent.gd + _new_tables(extent, added)
    rgd = None
    if extent.rgd is not None:
        rgd = extent.rgd + _new_tables(extent, added)
    _finish_tables(extent, gd, rgd, extent.header.gd_offset, extent.header.rgd_offset)


def _relocate_directories(extent: SparseExtent, entries: int) -> None:
    added = entries - len(extent.gd)
    gd_sectors = _ceil_div(entries * 4, SECTOR_SIZE)
    gd = extent.gd + _new_tables(extent, added)
    rgd = None
    if extent.rgd is not None:
        rgd = extent.rgd + _new_tables(extent, added)
    gd_at = extent._end
    extent._end += gd_sectors
    rgd_at = 0
    if rgd is not None:
        rgd_at = extent._end
        extent._end += gd_sectors
    _finish_tables(extent, gd, rgd, gd_at, rgd_at)


def _finish_tables(extent: SparseExtent, gd: array[int], rgd: array[int] | None,
                   gd_at: int, rgd_at: int) -> None:
    """Write the directories, sync, and only then let the header point at them."""
    os.ftruncate(extent.fd, max(extent.file_size, extent._end * SECTOR_SIZE))
    extent.file_size = max(extent.file_size, extent._end * SECTOR_SIZE)
    pwrite_all(extent.fd, u32_bytes(gd), gd_at * SECTOR_SIZE)
    if rgd is not None:
        pwrite_all(extent.fd, u32_bytes(rgd), rgd_at * SECTOR_SIZE)
    os.fsync(extent.fd)
    extent.gd, extent.rgd = gd, rgd
    extent.header.gd_offset, extent.header.rgd_offset = gd_at, rgd_at
