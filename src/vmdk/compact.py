"""Giving space back: drop all-zero grains, move grains into gaps, truncate the file.

Every move copies the grain first, syncs, and only then repoints the grain
table, so a crash in the middle leaves at worst a copy nobody references.
"""

from __future__ import annotations

import dataclasses
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
from .extents.sparse import SparseExtent
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


def _used_intervals(extent: SparseExtent) -> list[tuple[int, int]]:
    """Sector ranges grains must not move into: the metadata, and all before the data area."""
    return [(0, max(1, extent.header.overhead)), *extent.metadata_areas()]


def _free_slots(used: list[tuple[int, int]], size: int, limit: int) -> list[int]:
    """Start sectors of grain-sized gaps below ``limit`` not overlapping ``used``."""
    slots: list[int] = []
    pos = 0
    for start, end in sorted(used):
        while start - pos >= size and pos + size <= limit:
            slots.append(pos)
            pos += size
        pos = max(pos, end)
    return slots


def defragment(extent: SparseExtent) -> int:
    """Move the last grains of the file into gaps before them, then truncate; returns moves."""
    extent.flush()
    gs = extent.header.grain_size
    numbers, sectors = extent.stored_grains()
    meta = _used_intervals(extent)
    used = meta + [(int(s), int(s) + gs) for s in sectors]
    order = np.argsort(-sectors, kind="stable")
    slots = _free_slots(used, gs, int(sectors.max()) if sectors.size else 0)
    moves: list[tuple[int, int, int]] = []  # (grain number, from sector, to sector)
    for i, slot in zip(order.tolist(), slots):
        if slot >= sectors[i]:
            break
        moves.append((int(numbers[i]), int(sectors[i]), slot))
    buf = bytearray(extent.grain_bytes)
    for _number, src, dst in moves:
        pread_exact(extent.fd, memoryview(buf), src * SECTOR_SIZE, extent.filename)
        pwrite_all(extent.fd, memoryview(buf), dst * SECTOR_SIZE)
    if moves:
        os.fdatasync(extent.fd)  # the copies are durable before any table points at them
        for number, _src, dst in moves:
            extent._set_entry(number, dst)
        extent.flush()
    _truncate_unused(extent)
    return len(moves)


def _truncate_unused(extent: SparseExtent) -> None:
    gs = extent.header.grain_size
    _numbers, sectors = extent.stored_grains()
    ends = [end for _start, end in _used_intervals(extent)] + [int(s) + gs for s in sectors]
    end = max(ends) * SECTOR_SIZE
    if end < extent.file_size:
        os.ftruncate(extent.fd, end)
        os.fsync(extent.fd)
        extent.file_size = end
        extent._end = end // SECTOR_SIZE
