"""Reading many grain tables at once, the way the file holds them.

A sparse extent has many small tables: 2 KiB each for the usual 512 entries, and
327,680 of them (plus as many redundant copies) in a 10 TiB extent.  Read one
``pread`` at a time, they cost more than any work done on them.  Tools make the
tables of a new image by extending the file, so until a table's first entry is
written it lies in a hole and reads as zeros.  Here a table in a hole is known to
be empty without reading it (one SEEK_DATA/SEEK_HOLE walk answers for a whole
batch), and the stored ones are read in a few large reads, each spanning
neighbouring tables.

``in_holes`` needs no numpy, for the mapping path (``SparseExtent.status``),
which never loads it; ``read_tables`` is the bulk path of checks and repairs.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
else:
    from .._numpy import np

from .._access import Readable, pread
from .base import SECTOR_SIZE, stored_ranges


@dataclasses.dataclass(frozen=True)
class TableBatch:
    """Tables of a sparse extent read together (``SparseExtent.scan_tables``)."""

    indexes: np.ndarray  # their directory slots, in the order the file holds the tables
    primary: np.ndarray  # (len(indexes), entries): the tables as the extent reads them
    #: The redundant copies as stored (the primary where a table has no copy of its own),
    #: or None in an extent without redundant tables.
    backup: np.ndarray | None
    differ: np.ndarray  # the rows whose redundant copy differs from the primary
    covered: int  # virtual bytes the tables map


#: One read spans neighbouring stored tables up to about this many bytes...
WINDOW_BYTES = 8 << 20
#: ...and reads through a gap between two of them up to this size, rather than make
#: another system call (a gap holds grains when tables were allocated on demand).
GAP_BYTES = 64 << 10


def in_holes(fd: Readable, offsets: Sequence[int], size: int, file_size: int) -> list[bool]:
    """For each ``size``-byte area at ``offsets``, whether it lies wholly in a hole of the
    file, so reads as zeros.  An area reaching past the end of the file is not in a hole:
    reading it is an error the caller reports."""
    if not offsets:
        return []
    lo, hi = min(offsets), min(max(offsets) + size, file_size)
    starts, ends = [], []
    for a, b in stored_ranges(fd, lo, hi):
        starts.append(a)
        ends.append(b)
    holes = []
    for off in offsets:
        i = bisect.bisect_left(starts, off + size) - 1  # the last data starting before its end
        holes.append(off + size <= file_size and (i < 0 or ends[i] <= off))
    return holes


def read_tables(fd: Readable, sectors: np.ndarray, entries: int) -> np.ndarray:
    """The tables of ``entries`` u32 each stored at ``sectors``, as the file holds them:
    a (len(sectors), entries) array, zeros where the file has holes or ends, and for
    sector 0 (no table: the header is there)."""
    size = entries * 4
    out = np.zeros((len(sectors), entries), dtype=np.uint32)
    sectors = sectors.astype(np.int64)
    if not np.any(sectors):
        return out
    starts = np.where(sectors != 0, sectors * SECTOR_SIZE, -1)
    order = np.argsort(starts, kind="stable")
    order = order[starts[order] >= 0]
    ordered = starts[order]
    stored = _holding_data(fd, ordered, size)
    rows, offsets = order[stored], ordered[stored]
    for first, last in _windows(offsets, size):
        lo, hi = int(offsets[first]), int(offsets[last - 1]) + size
        raw = pread(fd, hi - lo, lo)
        window = np.frombuffer(raw.ljust(hi - lo, b"\0"), dtype="<u4")
        at = (offsets[first:last] - lo) // 4
        out[rows[first:last]] = window[at[:, None] + np.arange(entries)]
    return out


def _holding_data(fd: Readable, ordered: np.ndarray, size: int) -> np.ndarray:
    """Which of the ``size``-byte areas at the sorted offsets hold any stored byte."""
    end = os.fstat(fd).st_size if isinstance(fd, int) else fd.size
    lo, hi = int(ordered[0]), min(int(ordered[-1]) + size, end)
    ranges = np.array(list(stored_ranges(fd, lo, hi)), dtype=np.int64).reshape(-1, 2)
    if not ranges.size:
        return np.zeros(ordered.shape, dtype=bool)
    i = np.searchsorted(ranges[:, 0], ordered + size, "left") - 1
    held: np.ndarray = (i >= 0) & (ranges[np.maximum(i, 0), 1] > ordered)
    return held


def _windows(offsets: np.ndarray, size: int) -> list[tuple[int, int]]:
    """Split sorted table offsets into [first, last) runs, each one read: a run breaks
    at a wide gap and where it would pass a WINDOW_BYTES boundary."""
    if not offsets.size:
        return []
    breaks = ((offsets[1:] - offsets[:-1] - size > GAP_BYTES)
              | (offsets[1:] // WINDOW_BYTES != offsets[:-1] // WINDOW_BYTES))
    cuts = [0, *(np.flatnonzero(breaks) + 1).tolist(), int(offsets.size)]
    return list(itertools.pairwise(cuts))
