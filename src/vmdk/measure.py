"""How large an image will be: ``vmdk measure``, with ``qemu-img measure``'s meaning.

Two numbers.  ``required`` is the length of the files that converting the given
content makes (or creating an empty image, when only a size is given);
``fully_allocated`` is their length once every byte of the disk is stored.  A
length is a file's length (``du --apparent-size``), summed over every file of
the image: descriptor and extents.  That is what qemu-img measure reports:
for a raw output both numbers are the disk's size, holes or not.

For a VMDK output the source's stored ranges are read, as convert reads them,
and the grains convert would store are counted with the rules of the writers
(an all-zero grain is not stored; a grain written in part is), so the numbers
are exact for every subformat measured here but streamOptimized, whose grains
are compressed: each stored grain counts at the most a grain can take (zlib's
compressBound, which the stream writer keeps to), so its ``required`` is an
upper bound.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
else:
    from ._numpy import np

from ._deflate import deflate_bound
from ._structs import SECTOR_SIZE, GrainMarker, MetadataMarker
from .convert import DEFAULT_SPARSE_SIZE, Source, copy, open_source
from .create import (
    ALIASES,
    CreateOptions,
    _check_options,
    extent_layout,
    new_descriptor,
)
from .errors import UnsupportedFormatError, VmdkError
from .extents.sparse import SparseLayout
from .stream import GTES_PER_GT, stream_header

#: The subformats a size is computed for: those convert writes from a disk's content.
MEASURED_SUBFORMATS = ("monolithicSparse", "twoGbMaxExtentSparse", "monolithicFlat",
                       "twoGbMaxExtentFlat", "vmfs", "streamOptimized")
_SPARSE = ("monolithicSparse", "twoGbMaxExtentSparse")

Progress = Callable[[int], None]


@dataclasses.dataclass(frozen=True)
class Measurement:
    """Bytes of files an output needs: for its content, and with every byte stored."""

    required: int
    fully_allocated: int

    def to_json(self) -> dict[str, int]:
        """qemu-img measure's JSON keys."""
        return {"required": self.required, "fully-allocated": self.fully_allocated}


def measure(source: str | os.PathLike[str] | None = None, *, size: int | None = None,
            src_format: str | None = None, out_format: str = "vmdk",
            subformat: str = "monolithicSparse", target: str = "disk.vmdk",
            progress: Progress | None = None, allow_external: bool = False,
            force_share: bool = False, ignore_cid: bool = False,
            missing_as_zeros: bool = False, **create_options: Any) -> Measurement:
    """The file sizes converting ``source`` (or creating an image of ``size`` bytes) needs.

    ``out_format`` is "vmdk" (with ``subformat`` and :func:`vmdk.create`'s options)
    or "raw".  ``target`` is the output's file name: descriptors name their extent
    files after it, so a few bytes of a text descriptor depend on its length.  The
    source is opened as :func:`vmdk.convert.convert` opens it (a snapshot is
    flattened) and, for a VMDK output, its stored ranges are read.
    """
    if (source is None) == (size is None):
        raise ValueError("measure takes either a source image or a size, not both or neither")
    if out_format not in ("raw", "vmdk"):
        raise VmdkError(f"unknown output format {out_format!r} (raw or vmdk)")
    subformat = ALIASES.get(subformat, subformat)
    if out_format == "vmdk" and subformat not in MEASURED_SUBFORMATS:
        raise UnsupportedFormatError(f"measure knows the subformats "
                                     f"{', '.join(MEASURED_SUBFORMATS)}, not {subformat!r}")
    if source is None:
        assert size is not None
        return _measure_empty(size, out_format, subformat, target, create_options)
    flags = ({"allow_external": allow_external, "force_share": force_share,
              "ignore_cid": ignore_cid, "missing_as_zeros": missing_as_zeros}
             if src_format != "raw" else {})
    opened = open_source(os.fspath(source), src_format, **flags)
    try:
        if out_format == "raw":  # as qemu-img: a raw file is as long as the disk
            return Measurement(opened.size, opened.size)
        return _measure_content(opened, subformat, target, create_options, progress)
    finally:
        opened.close()


def _measure_empty(size: int, out_format: str, subformat: str, target: str,
                   create_options: dict[str, Any]) -> Measurement:
    if size < 0:
        raise ValueError("size must not be negative")
    if out_format == "raw":  # qemu-img rounds a size given for a raw file up to a sector
        length = -(-size // SECTOR_SIZE) * SECTOR_SIZE
        return Measurement(length, length)
    layout = _Layout.plan(subformat, size, target, create_options)
    return Measurement(layout.length(layout.empty()), layout.length(layout.full()))


def _measure_content(source: Source, subformat: str, target: str,
                     create_options: dict[str, Any], progress: Progress | None) -> Measurement:
    layout = _Layout.plan(subformat, source.size, target, create_options)
    stored = layout.empty()
    if subformat in _SPARSE or subformat == "streamOptimized":
        counter = _GrainCounter(layout, stored)
        # The zero detection convert uses for these targets (see convert._vmdk_target).
        block = max(DEFAULT_SPARSE_SIZE, layout.grain)
        copy(source, counter.write_at, sparse_size=block, progress=progress)
    return Measurement(layout.length(stored), layout.length(layout.full()))


@dataclasses.dataclass
class _Layout:
    """The files of a new image: fixed bytes, plus grains that count once stored."""

    subformat: str
    fixed: int  # bytes that do not depend on the content: descriptor, overheads, flat files
    extent_sizes: list[int]  # bytes of each grain-holding extent (empty for flat images)
    grain: int

    @classmethod
    def plan(cls, subformat: str, size: int, target: str,
             create_options: dict[str, Any]) -> _Layout:
        unknown = set(create_options) - {f.name for f in dataclasses.fields(CreateOptions)}
        if unknown:
            raise VmdkError(f"option {min(unknown)!r} does not apply to measure")
        opts = CreateOptions(**create_options)
        _check_options(size, opts)
        if opts.preallocate and subformat not in ("monolithicFlat", "twoGbMaxExtentFlat", "vmfs"):
            raise UnsupportedFormatError(
                f"preallocation applies to flat subformats; {subformat} grows as it is written")
        sectors = -(-size // SECTOR_SIZE)
        files = extent_layout(subformat, target, sectors)
        lines = [line for _, line in files]
        descriptor = len(new_descriptor(subformat, lines, sectors, opts).to_bytes())
        grain = opts.cluster_size
        sizes = [line.sectors * SECTOR_SIZE for line in lines]
        if subformat == "streamOptimized":
            fixed = _stream_fixed(sectors, grain, descriptor)
        elif subformat == "monolithicSparse":
            fixed = _sparse_overhead(sectors, grain, descriptor)
        elif subformat == "twoGbMaxExtentSparse":
            fixed = descriptor + sum(_sparse_overhead(line.sectors, grain, None) for line in lines)
        else:  # flat files are as long as their extent, written or not
            return cls(subformat, descriptor + sum(sizes), [], grain)
        return cls(subformat, fixed, sizes, grain)

    def empty(self) -> list[np.ndarray]:
        """One flag a grain, for each grain-holding extent: nothing stored yet."""
        return [np.zeros(-(-n // self.grain), dtype=bool) for n in self.extent_sizes]

    def full(self) -> list[np.ndarray]:
        return [np.ones(-(-n // self.grain), dtype=bool) for n in self.extent_sizes]

    def length(self, stored: list[np.ndarray]) -> int:
        """The image's bytes with the grains flagged in ``stored``."""
        grains = sum(int(np.count_nonzero(flags)) for flags in stored)
        if self.subformat != "streamOptimized":
            return self.fixed + grains * self.grain  # every grain takes a whole grain
        tables = sum(len(np.unique(np.flatnonzero(flags) // GTES_PER_GT)) for flags in stored)
        record = _round_up(GrainMarker.SIZE + deflate_bound(self.grain), SECTOR_SIZE)
        table = MetadataMarker.SIZE + _round_up(GTES_PER_GT * 4, SECTOR_SIZE)
        return self.fixed + grains * record + tables * table


def _sparse_overhead(sectors: int, grain: int, descriptor: int | None) -> int:
    """Bytes of a new sparse extent before its first grain (its whole length when empty)."""
    layout = SparseLayout.plan(sectors, grain_size=grain // SECTOR_SIZE,
                               descriptor_bytes=descriptor)
    return layout.overhead * SECTOR_SIZE


def _stream_fixed(sectors: int, grain: int, descriptor: int) -> int:
    """Header and descriptor, then the trailer: GD marker and GD, footer marker and
    footer, end-of-stream marker (see :mod:`vmdk.stream`)."""
    header = stream_header(sectors, grain // SECTOR_SIZE, descriptor)
    grains = -(-sectors // header.grain_size)
    directory = _round_up(-(-grains // GTES_PER_GT) * 4, SECTOR_SIZE)
    return (header.overhead * SECTOR_SIZE + MetadataMarker.SIZE + directory
            + 2 * MetadataMarker.SIZE + SECTOR_SIZE)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class _GrainCounter:
    """Flags the grains a sparse or stream target stores for the writes convert makes.

    The rules are the writers': a sparse extent stores every grain a write covers
    in part (completed with zeros, whatever it holds) and every wholly written
    grain that is not all zeros; a stream stores each grain holding a non-zero byte.
    """

    def __init__(self, layout: _Layout, stored: list[np.ndarray]) -> None:
        self.grain = layout.grain
        self.stored = stored
        self.partial_stored = layout.subformat != "streamOptimized"
        self.starts = [sum(layout.extent_sizes[:i]) for i in range(len(layout.extent_sizes))]
        self.sizes = layout.extent_sizes

    def write_at(self, offset: int, data: memoryview) -> None:
        """The write convert makes at ``offset``, cut at extent ends as an image cuts it."""
        end = offset + len(data)
        for index, (start, size) in enumerate(zip(self.starts, self.sizes)):
            lo, hi = max(offset, start), min(end, start + size)
            if lo < hi:
                self._mark(index, lo - start, data[lo - offset:hi - offset])

    def _mark(self, index: int, inner: int, piece: memoryview) -> None:
        g = self.grain
        first = inner // g
        data = np.frombuffer(piece, dtype=np.uint8)
        head = min(len(data), (-inner) % g)  # bytes before the first grain boundary
        whole = (len(data) - head) // g * g
        flags: list[np.ndarray] = []
        if head:
            flags.append(np.array([self.partial_stored or bool(data[:head].any())]))
        if whole:
            grains = data[head:head + whole].reshape(-1, g)
            flags.append(grains.max(axis=1) != 0)
        if head + whole < len(data):
            flags.append(np.array([self.partial_stored or bool(data[head + whole:].any())]))
        marks = np.concatenate(flags)
        self.stored[index][first:first + len(marks)] |= marks
