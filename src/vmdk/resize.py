"""Changing a disk's virtual size.

Growing works for sparse and flat images, monolithic or split; a sparse
extent whose grain directory has no room for the new size gets a larger
directory (and preallocated tables), written and synced before the header
points at it.  Shrinking is refused while any byte past the new end is
stored, so no data is ever dropped.

A resize killed at any moment can be run again to finish it, and leaves
one size that we and qemu agree on meanwhile.  Everything that can refuse
is checked before the first change.  Then, growing: new extent files are
made under a temporary name and renamed into place (a file the descriptor
does not name and that holds no data, left by an earlier attempt, is
replaced), the last extent grows, and only then does the descriptor name
the new size.  Shrinking: the descriptor first, then the headers, then the
dropped files are deleted.  In between, a sparse extent reads as large as
its header's capacity says, as qemu reads it (see ``image._open_extent``).

New tables go into free sectors below the first grain where they fit, the
rest at the end of the file, which is then rounded up to a whole grain:
the next grain anyone appends (qemu rounds up too) starts right there and
leaves no gap behind it.
"""

from __future__ import annotations

import dataclasses
import logging
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
from .extents.base import SECTOR_SIZE, Alloc, Extent, pwrite_all
from .extents.flat import FlatExtent
from .extents.sparse import (
    MAX_FILE_SECTORS,
    MAX_GD_ENTRIES,
    Directory,
    SparseExtent,
    grown_directory,
    u32_bytes,
)
from .image import Image, MapRun, compute_geometry, io_errors, sniff

CHUNK = 8 << 20
#: Suffix of an extent file while it is being made; renamed away once complete.
TEMP_SUFFIX = ".resize-tmp"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def resize(path: str | os.PathLike[str], size: int, *, shrink: bool = False) -> None:
    """Set the virtual size of ``path`` to ``size`` bytes (rounded up to a sector).

    Run again after an interruption, it finishes the job.
    """
    resize_with_cid(path, size, shrink=shrink, cid=None)


def resize_with_cid(path: str | os.PathLike[str], size: int, *, shrink: bool,
                    cid: int | None) -> None:
    """:func:`resize`, the image taking ``cid`` as its new CID (a commit names it first)."""
    path = os.fspath(path)
    sectors = _ceil_div(operator.index(size), SECTOR_SIZE)
    if sectors < 1:
        raise VmdkError(f"a disk needs at least one sector; {size} bytes asked for", path)
    if sectors * SECTOR_SIZE > MAX_DISK_BYTES:
        raise UnsupportedFormatError(f"{size} bytes is more than any file system holds", path)
    logging.getLogger(__name__).info("%s: resizing to %d bytes", path, sectors * SECTOR_SIZE)
    dropped: list[str] = []
    with io_errors(path), Image.open(path, "r+") as image:
        if any(getattr(e, "compressed", False) for e in image.extents):
            raise UnsupportedFormatError(
                "streamOptimized images cannot be resized; convert them first", path)
        lines = _current_lines(image)
        old = image.size // SECTOR_SIZE
        if sectors == old:
            # Run again after an interruption: the lines catch up with the extents, and
            # what a killed shrink left to delete goes.
            if lines != image.descriptor.extents:
                _apply(image, lines)
            dropped = _leftovers(image, lines)
        elif sectors < old:
            kept = _plan_shrink(image, lines, sectors, shrink)
            dropped = _leftovers(image, lines)
            image._first_write(cid)  # a new size is new content: the CID changes first
            dropped += _shrink(image, kept)
        else:
            plan = _plan_grow(image, lines, sectors)
            image._first_write(cid)
            _grow(image, plan)
        if image.descriptor.ddb_get("ddb.geometry.cylinders") is not None:
            c, _h, _s = compute_geometry(sectors * SECTOR_SIZE, image.adapter_type or "ide")
            image.descriptor.ddb_set("ddb.geometry.cylinders", str(c))
    # Extent files past the new end held no data (checked above) and are no longer named.
    for name in dropped:
        os.unlink(name)


def _current_lines(image: Image) -> list[ExtentLine]:
    """The extent lines at the sizes the extents have: a line an interrupted resize left
    behind its sparse extent's capacity takes the capacity."""
    return [line if line.sectors * SECTOR_SIZE == extent.size
            else _with_sectors(line, extent.size // SECTOR_SIZE)
            for line, extent in zip(image.descriptor.extents, image.extents)]


def _with_sectors(line: ExtentLine, sectors: int) -> ExtentLine:
    return ExtentLine(line.access, sectors, line.type, line.filename, line.offset, line.extra)


def _apply(image: Image, lines: list[ExtentLine]) -> None:
    image.descriptor.set_extents(lines)
    image.size = sum(line.sectors for line in lines) * SECTOR_SIZE


# ----------------------------------------------------------------- shrinking


def _plan_shrink(image: Image, lines: list[ExtentLine], sectors: int,
                 allowed: bool) -> list[ExtentLine]:
    """The lines that remain; refuses unless allowed and nothing past the end is stored."""
    if not allowed:
        raise VmdkError("the new size is smaller: data past it would be lost", image.path,
                        opt_in=("shrink", "allows it where nothing past the new end is stored"))
    lost = _first_nonzero(image, [r for r in image.map(sectors * SECTOR_SIZE)
                                  if r.depth == 0 and r.data and not r.zero])  # not holes
    if lost is not None:
        raise VmdkError(
            f"refusing to shrink to {sectors * SECTOR_SIZE} bytes: byte {lost} holds data, "
            "and everything from the new size on would be lost", image.path)
    kept: list[ExtentLine] = []
    pos = 0
    for line in lines:
        if pos >= sectors:
            break
        kept.append(_with_sectors(line, min(line.sectors, sectors - pos)))
        pos += line.sectors
    return kept


def _shrink(image: Image, kept: list[ExtentLine]) -> list[str]:
    """Shrink to ``kept``; the extent files no longer named, to delete once closed."""
    before = [e.filename for e in image.extents if e.filename]
    _apply(image, kept)
    # The descriptor first: until the headers follow, each sparse extent still reads at its
    # capacity, for us as for qemu, so both see the same (larger) size meanwhile.
    image.flush()
    owns_flat_files = image.create_type in ("monolithicFlat", "twoGbMaxExtentFlat", "vmfs")
    flat_ends: dict[str, tuple[int, FlatExtent]] = {}  # the end the kept lines need, per file
    for line, extent in zip(kept, image.extents):
        if isinstance(extent, SparseExtent) and extent.header.capacity > line.sectors:
            extent.header.capacity = line.sectors
            extent.size = line.sectors * SECTOR_SIZE
            pwrite_all(extent.fd, extent.header_bytes(), 0)
            os.fsync(extent.fd)
        elif isinstance(extent, FlatExtent) and extent.filename:
            end = extent.base + line.sectors * SECTOR_SIZE
            flat_ends[extent.filename] = (max(end, flat_ends.get(extent.filename, (0,))[0]),
                                          extent)
    # Give the space back, as these flat files were made for this disk; raw devices and the
    # files behind raw-disk descriptors are never cut.
    for end, extent in flat_ends.values() if owns_flat_files else ():
        if stat.S_ISREG(os.fstat(extent.fd).st_mode) and os.fstat(extent.fd).st_size > end:
            os.ftruncate(extent.fd, end)
    kept_names = {e.filename for e in image.extents[:len(kept)]}
    return [f for f in before if f not in kept_names]


def _first_nonzero(image: Image, runs: list[MapRun]) -> int | None:
    """Offset of the first non-zero byte stored in ``runs`` (stored zeros are not data)."""
    for run in runs:
        pos, end = run.start, run.start + run.length
        while pos < end:
            n = min(CHUNK, end - pos)
            data = np.frombuffer(image.read_at(pos, n), dtype=np.uint8)
            hits = np.flatnonzero(data)
            if hits.size:
                found: int = pos + int(hits[0])
                return found
            pos += n
    return None


# ------------------------------------------------------------------- growing


@dataclasses.dataclass
class _NewExtent:
    """An extent file a grow adds; ``line`` names it in the descriptor."""

    line: ExtentLine
    path: str
    grain: int  # sectors, for a sparse extent


@dataclasses.dataclass
class _Growth:
    lines: list[ExtentLine]  # the descriptor's lines afterwards
    last_sectors: int  # the last existing extent's new size; its old one when it keeps it
    tables: _Tables | None  # the last extent's new tables, when it is sparse and grows
    new: list[_NewExtent]


def _plan_grow(image: Image, lines: list[ExtentLine], sectors: int) -> _Growth:
    """Everything a grow does, decided (and refused) before any of it is done."""
    last, extent = lines[-1], image.extents[-1]
    extra = sectors - image.size // SECTOR_SIZE
    split = image.create_type.startswith(("twoGb", "2Gb"))
    room = (SPLIT_SECTORS - last.sectors) if split else extra
    room = max(0, min(room, extra))
    if split and len(lines) + _ceil_div(extra - room, SPLIT_SECTORS) > MAX_SPLIT_EXTENTS:
        raise UnsupportedFormatError(
            f"growing by {extra * SECTOR_SIZE >> 40} TiB would need more than "
            f"{MAX_SPLIT_EXTENTS} extent files", image.path)
    tables = None
    if room and isinstance(extent, SparseExtent):
        tables = _plan_tables(extent, last.sectors + room)
    elif room and not isinstance(extent, FlatExtent):
        kind = getattr(extent, "kind", None) or last.type
        raise UnsupportedFormatError(f"{kind} extents (vmfsSparse snapshots, seSparse) "
                                     "cannot grow here; convert the image first", image.path)
    out = [*lines[:-1], _with_sectors(last, last.sectors + room)]
    grain = extent.header.grain_size if isinstance(extent, SparseExtent) else 128
    new: list[_NewExtent] = []
    extra -= room
    while extra:
        part = min(extra, SPLIT_SECTORS)
        new.append(_plan_split_extent(image, last, len(out) + 1, part, grain))
        out.append(new[-1].line)
        extra -= part
    return _Growth(out, last.sectors + room, tables, new)


def _plan_split_extent(image: Image, like: ExtentLine, number: int, sectors: int,
                       grain: int) -> _NewExtent:
    full, base = _sibling(image.path, _split_suffix(like, number))
    _refuse_occupied(image, full, base)
    line = (ExtentLine("RW", sectors, "SPARSE", base, None) if like.type == "SPARSE"
            else ExtentLine("RW", sectors, "FLAT", base, 0))
    return _NewExtent(line, full, grain)


def _leftovers(image: Image, lines: list[ExtentLine]) -> list[str]:
    """The extent files after the last line that nothing names and that read as zeros."""
    if not image.create_type.startswith(("twoGb", "2Gb")):
        return []
    found: list[str] = []
    # A killed deletion stops anywhere: every name a grow could use is looked at.
    for name in sorted(os.listdir(os.path.dirname(os.path.abspath(image.path)))):
        number = _split_number(image.path, lines[-1], name)
        if number is None or not len(lines) < number <= MAX_SPLIT_EXTENTS:
            continue
        full = _sibling(image.path, _split_suffix(lines[-1], number))[0]
        try:
            _refuse_occupied(image, full, name)
        except VmdkError:
            continue
        found.append(full)
    return found


def _split_number(path: str, like: ExtentLine, name: str) -> int | None:
    """N when ``name`` is what a grow of ``path`` calls its extent N."""
    one = _sibling(path, _split_suffix(like, 1))[1]
    head, tail = one[:-len("001.vmdk")], ".vmdk"
    digits = name[len(head):-len(tail)] if name.startswith(head) and name.endswith(tail) else ""
    if not digits.isdigit() or name != _sibling(path, _split_suffix(like, int(digits)))[1]:
        return None
    return int(digits)


def _split_suffix(like: ExtentLine, number: int) -> str:
    return f"-s{number:03d}" if like.type == "SPARSE" else f"-f{number:03d}"


def _refuse_occupied(image: Image, full: str, base: str) -> None:
    """A file may stand where a new extent goes only if nothing names it and it reads as
    zeros: what an interrupted resize, or a shrink's deletion, leaves behind."""
    if not os.path.lexists(full):
        return
    named = {os.path.realpath(p) for p in [image.path] + [e.filename for e in image.extents
                                                           if e.filename]}
    if (os.path.realpath(full) in named or os.path.islink(full) or not os.path.isfile(full)
            or _holds_data(full)):
        raise VmdkError(f"cannot add extent {base}: a file of that name exists that this "
                        "image names, that is not a regular file, or that holds data; move "
                        "it away first", image.path)


def _holds_data(path: str) -> bool:
    """Whether the file at ``path`` reads as anything but zeros (unreadable counts as data)."""
    extent: Extent
    try:
        if sniff(path) == "sparse":
            extent = SparseExtent.open(path, defer_writes=True)  # no unclean-flag warning
        else:
            size = os.path.getsize(path)
            if size % SECTOR_SIZE:
                return True
            extent = FlatExtent(path, size // SECTOR_SIZE)
    except (OSError, VmdkError):
        return True
    try:
        return _extent_holds_data(extent)
    except (OSError, VmdkError):
        return True
    finally:
        extent.close()


def _extent_holds_data(extent: Extent) -> bool:
    buf = bytearray(CHUNK)
    for run in extent.status(0, extent.size):
        if run.alloc is not Alloc.DATA:
            continue
        pos, end = run.offset, run.offset + run.length
        while pos < end:
            view = memoryview(buf)[:min(CHUNK, end - pos)]
            extent.read_into(pos, view)
            if np.any(np.frombuffer(view, dtype=np.uint8)):
                return True
            pos += len(view)
    return False


def _grow(image: Image, plan: _Growth) -> None:
    # The new files first: until the descriptor names them they are nobody's, and a second
    # run replaces them.
    _make_extent_files(plan.new)
    extent = image.extents[-1]
    if plan.last_sectors * SECTOR_SIZE == extent.size:
        pass  # the last extent is full: only new ones add room
    elif isinstance(extent, SparseExtent):
        _apply_tables(extent, plan.tables, plan.last_sectors)
    elif isinstance(extent, FlatExtent):
        _grow_flat(extent, plan.last_sectors)
    _apply(image, plan.lines)  # the descriptor, written when the image closes


def _make_extent_files(new: list[_NewExtent]) -> None:
    """Make each file complete under a temporary name, then rename it into place."""
    for item in new:
        temp = item.path + TEMP_SUFFIX
        if os.path.lexists(temp):
            os.unlink(temp)  # a file only a killed resize makes
        if item.line.type == "SPARSE":
            SparseExtent.create(temp, item.line.sectors, grain_size=item.grain).close()
        else:
            FlatExtent.create(temp, item.line.sectors).close()
            _fsync_path(temp)
        os.replace(temp, item.path)
    if new:
        _fsync_path(os.path.dirname(os.path.abspath(new[0].path)))


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _grow_flat(extent: FlatExtent, sectors: int) -> None:
    need = extent.base + sectors * SECTOR_SIZE
    if os.fstat(extent.fd).st_size < need:
        os.ftruncate(extent.fd, need)
    extent.size = sectors * SECTOR_SIZE


# --------------------------------------------------------- sparse tables


@dataclasses.dataclass
class _Tables:
    """Where a growing sparse extent's new tables and directories go."""

    gd: Directory  # the whole new directory
    rgd: Directory | None
    gd_at: int  # sector of the directory (moved, or where it was)
    rgd_at: int
    in_slack: list[int]  # sectors of the new tables below the first grain: zeroed by hand
    end: int  # the file's new end, in sectors, on a grain boundary


def _grow_sparse(extent: SparseExtent, sectors: int) -> None:
    """Raise a sparse extent's capacity, moving its grain directory if it must grow."""
    _apply_tables(extent, _plan_tables(extent, sectors), sectors)


def _plan_tables(extent: SparseExtent, sectors: int) -> _Tables | None:
    """Lay out the tables ``sectors`` of capacity need (None: the directory has them)."""
    h = extent.header
    entries = _ceil_div(sectors, extent.gt_coverage)
    if entries > MAX_GD_ENTRIES:  # checked before any table is allocated
        limit = MAX_GD_ENTRIES * extent.gt_coverage * SECTOR_SIZE
        raise UnsupportedFormatError(
            f"a sparse extent of this grain size holds at most {limit >> 40} TiB (qemu and "
            "VMware refuse larger grain directories)", extent.filename)
    have = len(extent.gd)
    if entries <= have:
        return None
    gt_sectors = _ceil_div(h.num_gtes_per_gt * 4, SECTOR_SIZE)
    copies = 1 if extent.rgd is None else 2
    added = entries - have
    spots = _slack(extent, gt_sectors, added * copies)
    in_slack = list(spots)
    end = extent._end
    at_end = added * copies - len(spots)
    spots += range(end, end + at_end * gt_sectors, gt_sectors)
    end += at_end * gt_sectors
    gd_at, rgd_at = h.gd_offset, h.rgd_offset
    gd_sectors = _ceil_div(entries * 4, SECTOR_SIZE)
    if gd_sectors > _ceil_div(have * 4, SECTOR_SIZE):  # no room in place: both move
        gd_at, end = end, end + gd_sectors
        if extent.rgd is not None:
            rgd_at, end = end, end + gd_sectors
    end = _ceil_div(end, h.grain_size) * h.grain_size
    if end > MAX_FILE_SECTORS:
        raise UnsupportedFormatError("extent file would grow past 2 TiB (u32 sector numbers)",
                                     extent.filename)
    gd = grown_directory(extent.gd, array("I", spots[:added]))
    rgd = None if extent.rgd is None else grown_directory(extent.rgd, array("I", spots[added:]))
    return _Tables(gd, rgd, gd_at, rgd_at, in_slack, end)


def _slack(extent: SparseExtent, size: int, count: int) -> list[int]:
    """Up to ``count`` free ``size``-sector places below the first grain.

    The space between the tables a file was created with and its first grain
    (the header's overhead) is reserved and unused; tables there cost no file
    space.  Below the lowest stored grain too, should a writer have put one lower.
    """
    limit = min(extent.header.overhead, extent._end)
    spots = _free_places(extent.metadata_areas(), limit, size, count)
    if spots:
        _numbers, grains = extent.stored_grains()
        if grains.size:
            spots = [s for s in spots if s + size <= int(grains.min())]
    return spots


def _free_places(areas: list[tuple[int, int]], limit: int, size: int, count: int) -> list[int]:
    """Up to ``count`` places of ``size`` sectors below ``limit`` that no area touches."""
    spots: list[int] = []
    pos = 1
    for a, b in sorted(areas) + [(limit, limit)]:
        while pos + size <= min(a, limit) and len(spots) < count:
            spots.append(pos)
            pos += size
        pos = max(pos, b)
    return spots


def _apply_tables(extent: SparseExtent, tables: _Tables | None, sectors: int) -> None:
    """Write the tables and directories, sync, and only then let the header grow."""
    extent.flush()
    if tables is not None:
        _write_tables(extent, tables)
    extent.header.capacity = sectors
    extent.gd_entries = _ceil_div(sectors, extent.gt_coverage)
    extent.size = sectors * SECTOR_SIZE
    pwrite_all(extent.fd, extent.header_bytes(), 0)
    os.fsync(extent.fd)


def _write_tables(extent: SparseExtent, tables: _Tables) -> None:
    gt_bytes = _ceil_div(extent.header.num_gtes_per_gt * 4, SECTOR_SIZE) * SECTOR_SIZE
    size = max(extent.file_size, tables.end * SECTOR_SIZE)
    os.ftruncate(extent.fd, size)  # the tables past the old end are zeros already
    extent.file_size = size
    extent._end = tables.end
    zeros = bytes(gt_bytes)
    for sector in tables.in_slack:
        pwrite_all(extent.fd, zeros, sector * SECTOR_SIZE)
    pwrite_all(extent.fd, u32_bytes(tables.gd), tables.gd_at * SECTOR_SIZE)
    if tables.rgd is not None:
        pwrite_all(extent.fd, u32_bytes(tables.rgd), tables.rgd_at * SECTOR_SIZE)
    os.fsync(extent.fd)
    extent.gd, extent.rgd = tables.gd, tables.rgd
    extent.header.gd_offset, extent.header.rgd_offset = tables.gd_at, tables.rgd_at
    extent._meta = None  # the metadata areas changed
