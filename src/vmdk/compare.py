"""Comparing two disks by what they store, as ``qemu-img compare`` does (``vmdk compare``).

The allocation maps of both sides (``Source.spans``) are walked together.  A range
neither side stores reads as zeros in both: equal, and never read.  A range only
one side stores is read from that side alone and must hold only zeros.  Only the
ranges both sides store are read twice and compared.  So the cost follows the
data present, not the virtual size: two empty 16 GiB images compare without
reading a byte.  Past the end of the shorter disk, its side reads as zeros.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator
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
    """
    buffers = (memoryview(mmap.mmap(-1, CHUNK)), memoryview(mmap.mmap(-1, CHUNK)))
    for lo, hi, in_a, in_b in _pieces(a, b):
        if in_a or in_b:
            sides = [s for s, stored in ((a, in_a), (b, in_b)) if stored]
            found = _first_difference_in(sides, lo, hi, buffers, progress)
            if found is not None:
                return found
        elif progress:
            progress(hi - lo)
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


def _first_difference_in(sides: list[Source], lo: int, hi: int,
                         buffers: tuple[memoryview, memoryview],
                         progress: Callable[[int], None] | None) -> int | None:
    """Compare ``lo .. hi`` of two sides, or check it holds only zeros when one side is
    given (the other stores nothing there), a chunk at a time."""
    for pos in range(lo, hi, CHUNK):
        n = min(CHUNK, hi - pos)
        views = [buffer[:n] for buffer in buffers[:len(sides)]]
        for side, view in zip(sides, views):
            side.readinto_at(pos, view)
        found = _first_nonzero(views[0]) if len(views) == 1 else _first_unequal(*views)
        if found is not None:
            return pos + found
        if progress:
            progress(n)
    return None


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
