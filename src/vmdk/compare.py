"""Comparing two disks by what they store, as ``qemu-img compare`` does (``vmdk compare``).

The allocation maps of both sides (``Source.spans``) are walked together.  A range
neither side stores reads as zeros in both: equal, and never read.  A range only
one side stores is read from that side alone and must hold only zeros.  Only the
ranges both sides store are read twice and compared.  So the cost follows the
data present, not the virtual size: two empty 16 GiB images compare without
reading a byte.  Past the end of the shorter disk, its side reads as zeros.
"""

from __future__ import annotations

import collections
import mmap
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
else:
    from ._numpy import np

from .convert import CHUNK, Source, Span


def first_difference(a: Source, b: Source,
                     progress: Callable[[int], None] | None = None) -> int | None:
    """The offset of the first byte where ``a`` and ``b`` differ, the shorter disk read as
    zeros past its end; None when they read the same.

    ``progress`` hears the bytes of the longer disk compared so far, range by range.
    Chunks are read ahead on worker threads (as many as the sources take at once: more
    for a URL) while the ones before are compared.
    """
    ahead = max(1, *(int(getattr(side, "read_ahead", 1)) for side in (a, b)))
    buffers = [(memoryview(mmap.mmap(-1, CHUNK)), memoryview(mmap.mmap(-1, CHUNK)))
               for _ in range(ahead + 1 if ahead > 1 else 1)]

    def read(turn: int, pos: int, n: int, sides: list[Source]) -> list[memoryview] | None:
        if not sides:
            return None
        views = [buffer[:n] for buffer in buffers[turn % len(buffers)][:len(sides)]]
        for side, view in zip(sides, views):
            side.readinto_at(pos, view)
        return views

    if ahead == 1:  # local files: reading ahead saves no time here, and costs the buffers
        for pos, n, sides in _chunks(a, b):
            if (found := _settle(pos, n, read(0, pos, n, sides), progress)) is not None:
                return found
        return None
    pending: collections.deque[tuple[int, int, Future[list[memoryview] | None]]] = (
        collections.deque())
    pool = ThreadPoolExecutor(ahead, thread_name_prefix="vmdk-read-ahead")
    try:
        # A chunk's buffers are used again ahead + 1 chunks later, once it was compared.
        for turn, (pos, n, sides) in enumerate(_gathered(_chunks(a, b), (a, b))):
            pending.append((pos, n, pool.submit(read, turn, pos, n, sides)))
            if len(pending) > ahead:
                pos, n, reading = pending.popleft()
                if (found := _settle(pos, n, reading.result(), progress)) is not None:
                    return found
        for pos, n, reading in pending:
            if (found := _settle(pos, n, reading.result(), progress)) is not None:
                return found
        return None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _chunks(a: Source, b: Source) -> Iterator[tuple[int, int, list[Source]]]:
    """(offset, length, the sides that store it) of every chunk to compare, in order: one
    side alone must hold zeros there; no side, nothing to read."""
    for lo, hi, in_a, in_b in _pieces(a, b):
        sides = [side for side, stored in ((a, in_a), (b, in_b)) if stored]
        if not sides:
            yield lo, hi - lo, sides
            continue
        for pos in range(lo, hi, CHUNK):
            yield pos, min(CHUNK, hi - pos), sides


def _gathered(chunks: Iterator[tuple[int, int, list[Source]]], order: tuple[Source, Source]
              ) -> Iterator[tuple[int, int, list[Source]]]:
    """Neighbouring chunks read as one, up to CHUNK bytes from the first's start, from
    every side that stores any of them: for a source behind a URL, whose file then fetches
    the stored runs of many small spans as few large ranges (and reads what lies between
    them as zeros, without a fetch).  What one side does not store reads as zeros there,
    so comparing the sides over the whole is the same test."""
    start, end, sides = -1, -1, set[int]()
    for pos, n, these in chunks:
        if start >= 0 and pos + n - start > CHUNK:
            yield start, end - start, [s for i, s in enumerate(order) if i in sides]
            start = -1
        if start < 0:
            start, sides = pos, set()
        end = pos + n
        sides.update(i for i, side in enumerate(order) if any(side is t for t in these))
    if start >= 0:
        yield start, end - start, [s for i, s in enumerate(order) if i in sides]


def _settle(pos: int, n: int, views: list[memoryview] | None,
            progress: Callable[[int], None] | None) -> int | None:
    """The first difference in a chunk read from two sides, or from one side that must
    hold zeros there (None: neither side stores it)."""
    if views is not None:
        found = _first_nonzero(views[0]) if len(views) == 1 else _first_unequal(*views)
        if found is not None:
            return pos + found
    if progress:
        progress(n)
    return None


def _pieces(a: Source, b: Source) -> Iterator[tuple[int, int, bool, bool]]:
    """[lo, hi) ranges of the longer disk, each stored or not as a whole in each side."""
    side_a, side_b = _spans_to(a, b.size), _spans_to(b, a.size)
    span_a, span_b = next(side_a, None), next(side_b, None)
    while span_a is not None and span_b is not None:
        lo = max(span_a.start, span_b.start)
        hi = min(span_a.start + span_a.length, span_b.start + span_b.length)
        yield lo, hi, span_a.data, span_b.data
        if span_a.start + span_a.length == hi:
            span_a = next(side_a, None)
        if span_b.start + span_b.length == hi:
            span_b = next(side_b, None)


def _spans_to(source: Source, size: int) -> Iterator[Span]:
    """The source's spans, then (if it is the shorter disk) zeros up to ``size``."""
    yield from (span for span in source.spans() if span.length)
    if source.size < size:
        yield Span(source.size, size - source.size, False)


def _words(view: memoryview) -> np.ndarray:
    """The bytes as 8-byte words where they divide evenly: numpy scans those fastest."""
    return np.frombuffer(view, dtype=np.uint64 if len(view) % 8 == 0 else np.uint8)


def _first_nonzero(view: memoryview) -> int | None:
    if not _words(view).any():
        return None
    return int(np.flatnonzero(np.frombuffer(view, dtype=np.uint8))[0])


def _first_unequal(a: memoryview, b: memoryview) -> int | None:
    if np.array_equal(_words(a), _words(b)):
        return None
    bytes_a, bytes_b = np.frombuffer(a, dtype=np.uint8), np.frombuffer(b, dtype=np.uint8)
    return int(np.flatnonzero(bytes_a != bytes_b)[0])
