"""Giving space back: drop all-zero grains, move grains into gaps, truncate the file.

Every move copies the grain first, syncs, and only then repoints the grain
table, so a crash in the middle leaves at worst a copy nobody references.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
else:
    from ._numpy import np

from ._structs import ZEROED_GTE
from .errors import UnsupportedFormatError
from .extents.base import SECTOR_SIZE, pread_exact, pwrite_all
from .extents.sparse import SparseExtent, u32_bytes, u32_view
from .image import Image

Progress = Callable[[int], None]
#: Bytes of contiguous grains read per system call while looking for zero grains.
RUN_BYTES = 8 << 20


@dataclasses.dataclass
class CompactResult:
    zero_grains_dropped: int = 0
    grains_moved: int = 0
    bytes_before: int = 0
    bytes_after: int = 0


def compact(path: str | os.PathLike[str], *, progress: Progress | None = None) -> CompactResult:
    """Compact every sparse extent of an image in place."""
    result = CompactResult()
    with Image.open(path, "r+") as image:
        if not any(isinstance(e, SparseExtent) for e in image.extents):
            raise UnsupportedFormatError(
                f"compact applies to sparse images: a {image.create_type} image stores every "
                "byte in place and has no grains to drop (its files' holes take no space "
                "already)", image.path)
        has_parent = image.parent is not None
        for extent in image.extents:
            if not isinstance(extent, SparseExtent):
                continue
            if extent.compressed:
                raise UnsupportedFormatError("streamOptimized images are already compact",
                                             extent.filename)
            result.bytes_before += extent.file_size
            result.zero_grains_dropped += drop_zero_grains(extent, has_parent, progress)
            result.grains_moved += defragment(extent)
            result.bytes_after += extent.file_size
    logging.getLogger(__name__).info(
        "%s: dropped %d zero grains, moved %d; %d bytes -> %d bytes", path,
        result.zero_grains_dropped, result.grains_moved, result.bytes_before, result.bytes_after)
    return result


def drop_zero_grains(extent: SparseExtent, has_parent: bool,
                     progress: Progress | None = None) -> int:
    """Unmap stored grains that hold only zeros; returns how many."""
    if has_parent and not extent.zeroed_gte:
        return 0  # unmapping would expose the parent's bytes
    marker = ZEROED_GTE if has_parent else 0
    numbers, sectors = extent.stored_grains()
    order = np.argsort(sectors, kind="stable")
    numbers, sectors = numbers[order], sectors[order]
    g, step = extent.grain_bytes, extent.header.grain_size
    # Grains that follow each other in the file are read together, a run per system call.
    breaks = np.flatnonzero(np.diff(sectors) != step) + 1
    dropped = 0
    for run in np.split(np.arange(sectors.size), breaks):
        for part in np.array_split(run, -(-run.size * g // RUN_BYTES)) if run.size else []:
            buf = bytearray(part.size * g)
            pread_exact(extent.fd, memoryview(buf), int(sectors[part[0]]) * SECTOR_SIZE,
                        extent.filename)
            words = np.frombuffer(buf, dtype=np.uint64).reshape(part.size, g // 8)
            for i in np.flatnonzero(words.max(axis=1) == 0):
                extent._set_entry(int(numbers[part[int(i)]]), marker)
                dropped += 1
            if progress:
                progress(part.size * g)
    extent.flush()
    return dropped


def next_grain_sector(extent: SparseExtent) -> int:
    """Where a grain appended to the file goes: its end, rounded up to a grain boundary
    where the image's grains sit on boundaries (qemu puts its next grain there too)."""
    return _round_up(extent._end, _alignment(extent))


def _alignment(extent: SparseExtent) -> int:
    h = extent.header
    return h.grain_size if h.overhead % h.grain_size == 0 else 1


def _round_up(sector: int, step: int) -> int:
    return -(-sector // step) * step


def unused_sectors(overhead: int, starts: np.ndarray, ends: np.ndarray,
                   file_sectors: int) -> int:
    """Sectors between the overhead and the end of the file that no [start, end) covers."""
    if overhead >= file_sectors:  # (a header may claim any overhead)
        return 0
    starts = np.clip(starts.astype(np.int64), overhead, file_sectors)
    ends = np.clip(ends.astype(np.int64), overhead, file_sectors)
    some = ends > starts
    if not some.any():
        return max(0, file_sectors - overhead)
    order = np.argsort(starts[some], kind="stable")
    starts, ends = starts[some][order], np.maximum.accumulate(ends[some][order])
    gaps = int(np.maximum(starts[1:] - ends[:-1], 0).sum())
    return int(starts[0]) - overhead + gaps + file_sectors - int(ends[-1])


def _used_intervals(extent: SparseExtent) -> list[tuple[int, int]]:
    """Sector ranges grains must not move into: the metadata, and all before the data area."""
    return [(0, max(1, extent.header.overhead)), *extent.metadata_areas()]


def _free_slots(used: list[tuple[int, int]], size: int, limit: int, align: int,
                count: int) -> list[int]:
    """Up to ``count`` start sectors, multiples of ``align``, of grain-sized gaps that end
    by ``limit`` and overlap nothing in ``used``."""
    slots: list[int] = []
    pos = 0
    for start, end in sorted(used):
        pos = _round_up(pos, align)
        while pos + size <= min(start, limit) and len(slots) < count:
            slots.append(pos)
            pos += size
        pos = max(pos, end)
    return slots


def defragment(extent: SparseExtent) -> int:
    """Move grains into the gaps before them and truncate the file at a grain boundary;
    returns the moves.

    Gaps each smaller than a grain, left between grain tables and grains (as when new
    tables end the file off a grain boundary and the next grain goes to the boundary),
    can add up to grains of space: then the tables past the overhead are packed after
    the last grain, so that less than a grain of the file stays unused.
    """
    extent.flush()
    moves = _fill_gaps(extent)
    _truncate_unused(extent)
    if _unused(extent) >= extent.header.grain_size and _movable_metadata(extent):
        moves += _repack(extent)
        _truncate_unused(extent)
    return moves


def _fill_gaps(extent: SparseExtent) -> int:
    total = 0
    for _ in range(4):  # a grain moved off a misaligned place frees room for another pass
        moved = _fill_gaps_once(extent)
        total += moved
        if not moved:
            break
    return total


def _fill_gaps_once(extent: SparseExtent) -> int:
    """Move the last grains into free grain-sized places before them, and grains off a
    grain boundary onto one (where the image's grains sit on boundaries)."""
    gs, align = extent.header.grain_size, _alignment(extent)
    numbers, sectors = extent.stored_grains()
    if not sectors.size:
        return 0
    used = _used_intervals(extent) + [(int(s), int(s) + gs) for s in sectors]
    off = np.flatnonzero(sectors % align != 0)
    on = np.flatnonzero(sectors % align == 0)
    order = np.concatenate((off, on[np.argsort(-sectors[on], kind="stable")]))
    slots = _free_slots(used, gs, int(sectors.max()) + gs, align, order.size)
    # A grain off a boundary with no free place before the end goes after it: the room it
    # leaves is filled on the next pass.
    end = next_grain_sector(extent)
    slots += range(end, end + gs * max(0, off.size - len(slots)), gs)
    moves: list[tuple[int, int, int]] = []  # (grain number, from sector, to sector)
    for i, slot in zip(order.tolist(), slots):
        if slot >= sectors[i] and sectors[i] % align == 0:
            break
        moves.append((int(numbers[i]), int(sectors[i]), slot))
    buf = bytearray(extent.grain_bytes)
    for _number, src, dst in moves:
        pread_exact(extent.fd, memoryview(buf), src * SECTOR_SIZE, extent.filename)
        pwrite_all(extent.fd, memoryview(buf), dst * SECTOR_SIZE)
        extent._end = max(extent._end, dst + gs)
    extent.file_size = max(extent.file_size, extent._end * SECTOR_SIZE)
    if moves:
        os.fdatasync(extent.fd)  # the copies are durable before any table points at them
        for number, _src, dst in moves:
            extent._set_entry(number, dst)
        extent.flush()
    return len(moves)


def _used_end(extent: SparseExtent, skip: frozenset[tuple[int, int]] = frozenset()) -> int:
    """The sector after the last metadata or grain in use (ignoring the areas in ``skip``)."""
    _numbers, sectors = extent.stored_grains()
    ends = [end for start, end in _used_intervals(extent) if (start, end) not in skip]
    if sectors.size:
        ends.append(int(sectors.max()) + extent.header.grain_size)
    return max(ends)


def _truncate_unused(extent: SparseExtent) -> None:
    """Cut the file after the last sector in use, at a grain boundary where the image's
    grains sit on boundaries (so the next grain leaves no gap before it)."""
    align = _alignment(extent)
    file_sectors = -(-extent.file_size // SECTOR_SIZE)
    end = min(_round_up(_used_end(extent), align), _round_up(file_sectors, align))
    if end * SECTOR_SIZE != extent.file_size:
        os.ftruncate(extent.fd, end * SECTOR_SIZE)
        os.fsync(extent.fd)
        extent.file_size = end * SECTOR_SIZE
        extent._end = end


def _unused(extent: SparseExtent) -> int:
    _numbers, sectors = extent.stored_grains()
    areas = np.array(extent.metadata_areas(), dtype=np.int64).reshape(-1, 2)
    starts = np.concatenate((areas[:, 0], sectors))
    ends = np.concatenate((areas[:, 1], sectors + extent.header.grain_size))
    return unused_sectors(extent.header.overhead, starts, ends,
                          -(-extent.file_size // SECTOR_SIZE))


@dataclasses.dataclass(frozen=True)
class _Piece:
    """Metadata that may move: a grain table (of either directory) or a directory."""

    kind: str  # "gt", "rgt" (a table of the primary or redundant directory), "gd", "rgd"
    index: int  # the table's directory entry (-1 for a directory)
    start: int
    size: int


def _movable_metadata(extent: SparseExtent) -> list[_Piece]:
    """The tables and directories that reach past the overhead, where grains could be,
    by sector."""
    h = extent.header
    gt_sectors = -(-h.num_gtes_per_gt * 4 // SECTOR_SIZE)
    gd_sectors = -(-len(extent.gd) * 4 // SECTOR_SIZE)
    pieces = []
    for kind, table in (("gt", extent.gd), ("rgt", extent.rgd)):
        if table is not None:
            entries = u32_view(table)
            pieces += [_Piece(kind, i, int(entries[i]), gt_sectors)
                       for i in np.flatnonzero(
                           (entries != 0) & (entries.astype(np.int64) + gt_sectors > h.overhead)
                       ).tolist()]
    for kind, sector in (("gd", h.gd_offset), ("rgd", h.rgd_offset)):
        if sector + gd_sectors > h.overhead and (kind == "gd" or extent.rgd is not None):
            pieces.append(_Piece(kind, -1, sector, gd_sectors))
    return sorted(pieces, key=lambda p: p.start)


def _repack(extent: SparseExtent) -> int:
    """Move the tables and directories past the overhead out of the way (after the end of
    the file), the grains into the room they left, then the tables back right after the
    last grain.  Every copy is synced before anything points at it.  Returns grain moves."""
    extent.flush()
    pieces = _movable_metadata(extent)
    offsets = np.cumsum([0] + [p.size for p in pieces]).tolist()
    out_of_the_way = max(extent._end, *(p.start + p.size for p in pieces))
    _move_pieces(extent, pieces, [out_of_the_way + o for o in offsets[:-1]])
    moves = _fill_gaps(extent)
    pieces = _movable_metadata(extent)
    floor = _used_end(extent, frozenset((p.start, p.start + p.size) for p in pieces))
    if floor + offsets[-1] > pieces[0].start:  # some would land on themselves: hop past
        hop = max(extent._end, floor + offsets[-1])
        _move_pieces(extent, pieces, [hop + o for o in offsets[:-1]])
        pieces = _movable_metadata(extent)
    _move_pieces(extent, pieces, [floor + o for o in offsets[:-1]])
    return moves


def _lands_on(starts: np.ndarray, sizes: np.ndarray, targets: np.ndarray) -> bool:
    """Whether any [target, target + size) overlaps any [start, start + size)."""
    order = np.argsort(starts, kind="stable")
    a, b = starts[order], np.maximum.accumulate((starts + sizes)[order])
    i = np.searchsorted(a, targets + sizes, "left") - 1  # the last piece starting before
    return bool(np.any((i >= 0) & (b[np.maximum(i, 0)] > targets)))


def _move_pieces(extent: SparseExtent, pieces: list[_Piece], targets: list[int]) -> None:
    """Copy each piece to its target (none overlapping a piece's current place), sync,
    then repoint the directories at the tables and the header at the directories."""
    sizes = np.array([p.size for p in pieces], dtype=np.int64)
    if _lands_on(np.array([p.start for p in pieces], dtype=np.int64), sizes,
                 np.array(targets, dtype=np.int64)):  # a crash mid-copy must leave them intact
        raise AssertionError("metadata would be copied over metadata still in use")
    fd = extent.fd
    tables = [(p, t) for p, t in zip(pieces, targets) if p.kind in ("gt", "rgt")]
    for piece, target in tables:
        raw = os.pread(fd, piece.size * SECTOR_SIZE, piece.start * SECTOR_SIZE)
        pwrite_all(fd, raw.ljust(piece.size * SECTOR_SIZE, b"\0"), target * SECTOR_SIZE)
    end = max(t + p.size for p, t in zip(pieces, targets))
    if end * SECTOR_SIZE > extent.file_size:
        os.ftruncate(fd, end * SECTOR_SIZE)  # room for the directories too
        extent.file_size = end * SECTOR_SIZE
    extent._end = max(extent._end, end)
    os.fdatasync(fd)
    for piece, target in tables:
        directory = extent.gd if piece.kind == "gt" else extent.rgd
        assert directory is not None
        directory[piece.index] = target
        extent._gd_dirty.add(piece.index)
    extent._meta = None  # the tables moved: recompute what writes must not touch
    extent.flush()
    moved = [(p, t) for p, t in zip(pieces, targets) if p.kind in ("gd", "rgd")]
    for piece, target in moved:  # written whole, with the tables' new places
        directory = extent.gd if piece.kind == "gd" else extent.rgd
        assert directory is not None
        pwrite_all(fd, u32_bytes(directory).ljust(piece.size * SECTOR_SIZE, b"\0"),
                   target * SECTOR_SIZE)
    if moved:
        os.fdatasync(fd)
        for piece, target in moved:
            if piece.kind == "gd":
                extent.header.gd_offset = target
            else:
                extent.header.rgd_offset = target
        pwrite_all(fd, extent.header_bytes(), 0)
        os.fsync(fd)
        extent._meta = None
