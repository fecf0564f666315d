"""Writer for streamOptimized sparse extents, in the footer layout of the VMware spec.

The file is produced front to back and never seeked, so the target may be a
pipe or a socket as well as a regular file::

    header (gdOffset = GD_AT_END)  descriptor  zero padding up to overHead
    for every grain-table range that holds data:
        grain records in ascending LBA   (GrainMarker + zlib data, padded to a sector)
        GT marker + GT                   (sector of each grain record, 0 = absent)
    GD marker + GD                       (sector of each GT, 0 = range not stored)
    footer marker + footer               (the header again, with the real gdOffset)
    EOS marker

Every grain is compressed at its full size (the last grain of the disk is
zero-padded) because VirtualBox refuses grains that inflate to less, and
all-zero grains are not stored.  Grains are compressed on a thread pool and
written in submission order, so the output does not depend on the thread count.
Reading such a file front to back (from a pipe, or out of an OVA) is
:mod:`vmdk.stream_read`.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import stat
import sys
import zlib
from array import array
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any, BinaryIO, Self

from ._deflate import deflate_bound
from ._positioned import PositionedDisk
from ._structs import (
    GD_AT_END,
    SECTOR_SIZE,
    CompressAlgorithm,
    GrainMarker,
    MarkerType,
    MetadataMarker,
    SparseFlags,
    SparseHeader,
)
from .errors import OutOfRangeError, UnsupportedFormatError

try:
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover - the tests monkeypatch this to None instead
    _isal_zlib = None  # type: ignore[assignment]

#: ISA-L knows levels 0..3 only; higher levels are clamped to this one.
ISAL_MAX_LEVEL = 3

GTES_PER_GT = 512
FLAGS = int(SparseFlags.VALID_NEWLINE | SparseFlags.COMPRESSED | SparseFlags.MARKERS)
#: The spec wants grains above 8 sectors (libvmdk refuses 8); qemu refuses more than 0x200000.
MIN_GRAIN_SECTORS = 16
MAX_GRAIN_SECTORS = 0x200000
#: GT and GD entries are u32 sector numbers, so the file must stay below 2 TiB.
MAX_FILE_SECTOR = 0xFFFFFFFF
#: Output is collected in memory and handed to the file in chunks of about this size.
FLUSH_BYTES = 4 << 20
#: Grains travel to the workers in batches of about this many bytes, so the GIL
#: changes hands once per batch rather than once per grain.
BATCH_BYTES = 1 << 20
#: Batches in flight per worker thread; with BATCH_BYTES this bounds the memory held.
WINDOW_PER_THREAD = 2

PathOrFile = str | bytes | os.PathLike[str] | os.PathLike[bytes] | BinaryIO
Compressor = Callable[[bytes | memoryview], bytes]


def _sectors(nbytes: int) -> int:
    return -(-nbytes // SECTOR_SIZE)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def make_compressor(level: int) -> Compressor:
    """Return ``data -> zlib stream``: ISA-L when importable (level clamped to 3), else zlib.

    ISA-L's output may exceed zlib's compressBound (its level 0 codes random bytes in up
    to 11 bits each); such a grain is stored uncompressed in a zlib stream instead, which
    is smaller, and keeps every grain within the bound ``vmdk measure`` counts with.
    """
    if _isal_zlib is not None:
        isal, isal_level = _isal_zlib, min(level, ISAL_MAX_LEVEL)

        def compress(data: bytes | memoryview) -> bytes:
            out: bytes = isal.compress(data, isal_level)
            return out if len(out) <= deflate_bound(len(data)) else zlib.compress(data, 0)

        return compress
    return lambda data: zlib.compress(data, level)


class StreamWriter:
    """Write a streamOptimized VMDK sequentially, grain by grain or byte by byte.

    ``fileobj_or_path`` is a path (created or truncated, closed by :meth:`close`)
    or a binary object with ``write`` positioned at the start of the extent
    (left open; its ``write`` must take whole buffers, as ``io.BufferedIOBase`` does).  ``descriptor`` is the embedded descriptor text, stored from
    sector 1 and padded to whole sectors.  ``compression_level`` is 0..9; with
    ISA-L levels above 3 act as 3.  ``threads`` is the number of compression
    workers (default: ``os.cpu_count()``).

    Leaving a ``with`` block through an exception abandons the image without
    its footer, so every reader rejects it instead of reading a short disk.
    Not thread-safe: feed it from one thread.
    """

    def __init__(
        self,
        fileobj_or_path: PathOrFile,
        capacity_sectors: int,
        descriptor: bytes,
        *,
        grain_size: int = 128,
        compression_level: int = 1,
        threads: int | None = None,
    ) -> None:
        threads = (os.cpu_count() or 1) if threads is None else threads
        _check_arguments(capacity_sectors, descriptor, grain_size, compression_level, threads)
        self._compress = make_compressor(compression_level)
        self._grain_bytes = grain_size * SECTOR_SIZE
        self._capacity_bytes = capacity_sectors * SECTOR_SIZE
        self._num_grains = -(-capacity_sectors // grain_size)
        self._zero_grain = bytes(self._grain_bytes)
        self._header = stream_header(capacity_sectors, grain_size, len(descriptor))
        self._gd = _u32_zeros(-(-self._num_grains // GTES_PER_GT))
        self._gt = _u32_zeros(GTES_PER_GT)
        self._gt_index = -1  # grain-table range being filled; -1 before the first grain
        self._next_grain = 0  # lowest grain index still acceptable
        self._offset = 0  # byte position of write(); bytes below it are final
        self._partial = bytearray()  # bytes of the grain holding _offset, up to _offset
        self._batch_grains = max(1, BATCH_BYTES // self._grain_bytes)
        self._window = WINDOW_PER_THREAD * threads
        #: Batch buffers, used in turn: the one being filled and one per batch in flight.
        #: Grains are copied into them once, and their pages are touched only once.
        self._buffers: list[bytearray] = []
        self._buffer_turn = 0
        self._batch: list[int] = []  # indexes of the non-zero grains in the current buffer
        self._pending: collections.deque[tuple[list[int], Future[tuple[bytes, list[int]]]]] = (
            collections.deque())
        #: Output not yet handed to the file: whole records, written with one writev.
        self._out: list[bytes] = []
        self._queued = 0  # bytes in _out
        self._flushed = 0  # bytes already handed to the file
        self._closed = False
        #: Bytes of the disk that the stored (non-zero) grains cover: an OVF's populatedSize.
        self.stored_bytes = 0

        #: False skips the final fsync (qemu-img's "-t unsafe").
        self.durable = True
        self.name = _display_name(fileobj_or_path)
        self._file, self._owns_file = _open_target(fileobj_or_path)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="vmdk-deflate")

        head = self._header.pack() + descriptor
        self._queue(head + bytes(self._header.overhead * SECTOR_SIZE - len(head)))

    # -- public API ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def write_grain(self, grain_index: int, data: bytes | bytearray | memoryview) -> None:
        """Store one grain; indexes must ascend.  All-zero grains are dropped.

        ``data`` is a whole grain, except for the last grain of a disk whose
        capacity is not a multiple of the grain, which may also be just the
        bytes up to the end of the disk.
        """
        self._check_open()
        self._seal_partial()
        self._check_grain_index(grain_index)
        self._submit(grain_index, data)
        self._offset = min((grain_index + 1) * self._grain_bytes, self._capacity_bytes)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at byte ``offset``; offsets must not go backwards.

        Bytes skipped between writes read as zeros.  A partial grain is held
        until it is completed or the writer is closed.
        """
        self._check_open()
        view = memoryview(data).cast("B")
        if offset < self._offset:
            raise UnsupportedFormatError(
                "streamOptimized images are written sequentially: write at offset "
                f"{offset} is below the current position {self._offset}", self.name)
        if offset + len(view) > self._capacity_bytes:
            raise OutOfRangeError(
                f"write of {len(view)} bytes at offset {offset} passes the end of the disk "
                f"({self._capacity_bytes} bytes)", self.name)
        self._skip_to(offset)
        while view:
            taken = self._take(view)
            view = view[taken:]

    def close(self) -> None:
        """Store the held partial grain, then the trailing GT, GD, footer and EOS; fsync."""
        if self._closed:
            return
        try:
            self._seal_partial()
            self._dispatch()
            while self._pending:
                self._emit_oldest()
            self._finish_gt()
            self._write_trailer()
            self._drain()
            self._file.flush()
            if self.durable:
                _fsync_if_regular(self._file)
        finally:
            self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abandon()

    # -- input side ------------------------------------------------------------------------

    def _grain_length(self, grain_index: int) -> int:
        """Bytes of the disk covered by a grain (less than a grain only for the last one)."""
        return min(self._grain_bytes, self._capacity_bytes - grain_index * self._grain_bytes)

    def _check_grain_index(self, grain_index: int) -> None:
        if not 0 <= grain_index < self._num_grains:
            raise OutOfRangeError(
                f"grain {grain_index} is outside the disk ({self._num_grains} grains)", self.name)
        if grain_index < self._next_grain:
            raise UnsupportedFormatError(
                "streamOptimized images are written sequentially: grain "
                f"{grain_index} does not come after grain {self._next_grain - 1}", self.name)

    def _submit(self, grain_index: int, data: bytes | bytearray | memoryview) -> None:
        """Copy a grain into the batch buffer at full grain size, unless it is all zeros.

        A batch never spans two grain tables, so each table follows its own grains.
        """
        view = memoryview(data).cast("B")
        length = self._checked_length(grain_index, len(view))
        self._next_grain = grain_index + 1
        if self._batch and grain_index // GTES_PER_GT != self._batch[0] // GTES_PER_GT:
            self._dispatch()
        buffer = self._buffer()
        start = len(self._batch) * self._grain_bytes
        end = start + self._grain_bytes
        buffer[start:start + length] = view[:length]
        if length < self._grain_bytes:  # the last grain, or a disk part of it: zero-padded
            buffer[start + length:end] = self._zero_grain[length:]
        if buffer.startswith(self._zero_grain, start):  # compares in place, stopping early
            return
        self.stored_bytes += self._grain_length(grain_index)
        self._batch.append(grain_index)
        if len(self._batch) >= self._batch_grains:
            self._dispatch()

    def _checked_length(self, grain_index: int, length: int) -> int:
        """The bytes of a grain given as ``length`` bytes that are on the disk: a whole grain
        may be given for the last one, which the disk's end cuts short."""
        disk_part = self._grain_length(grain_index)
        if length == self._grain_bytes or length == disk_part:
            return min(length, disk_part)  # past the disk's end a grain is stored as zeros
        raise ValueError(
            f"grain {grain_index} must be {self._grain_bytes} bytes"
            + (f" or {disk_part}" if disk_part != self._grain_bytes else "")
            + f", got {length}")

    def _buffer(self) -> bytearray:
        """The batch buffer being filled: free, since at most the window is in flight."""
        if self._buffer_turn == len(self._buffers):
            self._buffers.append(bytearray(self._batch_grains * self._grain_bytes))
        return self._buffers[self._buffer_turn]

    def _dispatch(self) -> None:
        """Hand the collected grains to a worker, first waiting for room in the window."""
        if not self._batch:
            return
        if len(self._pending) >= self._window:
            self._emit_oldest()
        indexes, self._batch = self._batch, []
        view = memoryview(self._buffer())[:len(indexes) * self._grain_bytes]
        self._buffer_turn = (self._buffer_turn + 1) % (self._window + 1)
        lbas = [index * self._header.grain_size for index in indexes]
        self._pending.append((indexes, self._pool.submit(
            _records, self._compress, view, self._grain_bytes, lbas)))

    def _take(self, view: memoryview) -> int:
        """Consume the start of ``view`` at ``_offset``; return how many bytes were used."""
        grain_index, within = divmod(self._offset, self._grain_bytes)
        grain_length = self._grain_length(grain_index)
        if within == 0 and len(view) >= grain_length:
            self._submit(grain_index, view[:grain_length])
            taken = grain_length
        else:
            taken = min(len(view), grain_length - within)
            self._partial += view[:taken]
            if len(self._partial) == grain_length:
                self._submit(grain_index, self._partial)
                self._partial.clear()
        self._offset += taken
        return taken

    def _skip_to(self, offset: int) -> None:
        """Advance ``_offset`` to ``offset``, treating the skipped bytes as zeros."""
        if offset == self._offset:
            return
        grain_start = self._offset - len(self._partial)
        if self._partial and offset >= grain_start + self._grain_bytes:
            self._seal_partial()
        grain_start = offset - offset % self._grain_bytes
        if not self._partial:
            self._offset = grain_start
        self._partial += bytes(offset - self._offset)
        self._offset = offset

    def _seal_partial(self) -> None:
        """Store the held partial grain with its unwritten rest as zeros."""
        if self._partial:
            grain_index = (self._offset - 1) // self._grain_bytes
            self._partial.extend(bytes(self._grain_bytes - len(self._partial)))
            self._submit(grain_index, self._partial)
            self._partial.clear()
            self._offset = min((grain_index + 1) * self._grain_bytes, self._capacity_bytes)

    # -- output side -----------------------------------------------------------------------

    def _sector(self) -> int:
        """File sector where the next record starts (output is always sector-aligned)."""
        return self._reachable((self._flushed + self._queued) // SECTOR_SIZE)

    def _reachable(self, sector: int) -> int:
        """``sector``, if a table entry can point at it."""
        if sector > MAX_FILE_SECTOR:
            raise UnsupportedFormatError(
                "the image grew past 2 TiB, beyond the reach of the u32 sector numbers in "
                "grain tables", self.name)
        return sector

    def _emit_oldest(self) -> None:
        """Queue the oldest batch's records (made whole by a worker) and note where each lies."""
        indexes, future = self._pending.popleft()
        records, sectors = future.result()
        gt_index = indexes[0] // GTES_PER_GT  # one table per batch: see _submit
        if gt_index != self._gt_index:
            self._finish_gt()
            self._gt_index = gt_index
        sector = self._sector()
        for grain_index, count in zip(indexes, sectors, strict=True):
            self._gt[grain_index % GTES_PER_GT] = sector
            sector += count
        self._reachable(sector - sectors[-1])
        self._queue(records)
        if self._queued >= FLUSH_BYTES:
            self._drain()

    def _queue(self, data: bytes) -> None:
        self._out.append(data)
        self._queued += len(data)

    def _finish_gt(self) -> None:
        """Write the grain table of the range being filled, if any, and point the GD at it."""
        if self._gt_index < 0:
            return
        self._write_metadata(MarkerType.GRAIN_TABLE, _le_bytes(self._gt))
        self._gd[self._gt_index] = self._sector() - _sectors(4 * len(self._gt))
        self._gt = _u32_zeros(GTES_PER_GT)
        self._gt_index = -1

    def _write_metadata(self, kind: MarkerType, block: bytes) -> None:
        sectors = _sectors(len(block))
        self._queue(MetadataMarker(sectors, kind).pack()
                    + block.ljust(sectors * SECTOR_SIZE, b"\0"))

    def _write_trailer(self) -> None:
        gd_sector = self._sector() + 1
        self._write_metadata(MarkerType.GRAIN_DIRECTORY, _le_bytes(self._gd))
        footer = dataclasses.replace(self._header, gd_offset=gd_sector)
        self._write_metadata(MarkerType.FOOTER, footer.pack())
        self._queue(MetadataMarker(0, MarkerType.EOS).pack())

    def _drain(self) -> None:
        """Hand the queued records to the file: one writev where it is ours, and no
        copy of the compressed data into a buffer first."""
        if self._owns_file:
            _writev_all(self._file.fileno(), self._out)
        else:  # a borrowed object promises write() only: few writes, large ones uncopied
            for chunk in _coalesced(self._out):
                self._file.write(chunk)
        self._flushed += self._queued
        self._out, self._queued = [], 0

    # -- teardown --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("I/O operation on closed file")

    def _abandon(self) -> None:
        """Stop without writing the trailer; the partial image fails every reader's checks."""
        if self._closed:
            return
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        self._batch.clear()
        self._release()
        self._buffers.clear()

    def _release(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=True)
        if self._owns_file:
            self._file.close()


def stream_header(capacity_sectors: int, grain_size: int, descriptor_bytes: int) -> SparseHeader:
    """The header of a footer-layout stream image (the footer differs only in gdOffset).

    The descriptor area always ends with at least one NUL, because readers
    that take a fixed window of sectors read the descriptor as a C string.
    Grains start at overHead, the end of the descriptor rounded up to a
    grain, as VirtualBox lays out its stream images.
    """
    desc_sectors = _sectors(descriptor_bytes + 1)
    return SparseHeader(
        version=3, flags=FLAGS, capacity=capacity_sectors, grain_size=grain_size,
        descriptor_offset=1, descriptor_size=desc_sectors, num_gtes_per_gt=GTES_PER_GT,
        rgd_offset=0, gd_offset=GD_AT_END, overhead=_round_up(1 + desc_sectors, grain_size),
        compress_algorithm=CompressAlgorithm.DEFLATE,
    )


def _open_target(fileobj_or_path: PathOrFile) -> tuple[BinaryIO, bool]:
    """The object to write to, and whether the writer opened it (and so closes it).

    A file of its own is unbuffered: records go to it with writev, as they are.
    """
    if hasattr(fileobj_or_path, "write"):
        return fileobj_or_path, False  # type: ignore[return-value]
    return open(fileobj_or_path, "wb", buffering=0), True


def _records(compress: Compressor, grains: memoryview, grain_bytes: int,
             lbas: list[int]) -> tuple[bytes, list[int]]:
    """The batch's grains as whole records (marker, compressed data, padding to a sector),
    joined, and the sectors each takes.  Made by the worker that compressed them, so the
    writing thread queues one buffer per batch."""
    parts: list[bytes] = []
    sectors: list[int] = []
    for i, lba in enumerate(lbas):
        data = compress(grains[i * grain_bytes:(i + 1) * grain_bytes])
        size = GrainMarker.SIZE + len(data)
        parts += (GrainMarker(lba, len(data)).pack(), data, _ZEROS[:-size % SECTOR_SIZE])
        sectors.append(_sectors(size))
    return b"".join(parts), sectors


_ZEROS = bytes(SECTOR_SIZE)
#: The most buffers one writev takes (IOV_MAX on Linux).
_IOV_MAX = 1024


def _coalesced(chunks: list[bytes], least: int = 1 << 16) -> Iterator[bytes]:
    """``chunks`` with each run of ones under ``least`` bytes joined into one."""
    small: list[bytes] = []
    for chunk in chunks:
        if len(chunk) < least:
            small.append(chunk)
            continue
        if small:
            yield b"".join(small)
            small = []
        yield chunk
    if small:
        yield b"".join(small)


def _u32_zeros(n: int) -> array[int]:
    return array("I", bytes(4 * n))


def _le_bytes(entries: array[int]) -> bytes:
    """Table or directory entries as the file holds them: little-endian u32."""
    if sys.byteorder == "big":
        entries = array("I", entries)
        entries.byteswap()
    return entries.tobytes()


def _writev_all(fd: int, chunks: list[bytes]) -> None:
    """Write every chunk, in order, with as few system calls as the kernel allows."""
    views = [memoryview(c) for c in chunks]
    i = 0
    while i < len(views):
        done = os.writev(fd, views[i:i + _IOV_MAX])
        while i < len(views) and done >= len(views[i]):  # past what went out whole
            done -= len(views[i])
            i += 1
        if done:  # a short write ended inside a chunk
            views[i] = views[i][done:]


def _check_arguments(capacity_sectors: int, descriptor: bytes, grain_size: int,
                     compression_level: int, threads: int) -> None:
    if capacity_sectors < 1:
        raise ValueError(f"capacity must be at least one sector, got {capacity_sectors}")
    if not isinstance(descriptor, bytes | bytearray):
        raise TypeError(f"descriptor must be bytes, not {type(descriptor).__name__}")
    if b"\0" in descriptor:
        raise ValueError("descriptor must not contain NUL bytes")
    if not MIN_GRAIN_SECTORS <= grain_size <= MAX_GRAIN_SECTORS or grain_size & (grain_size - 1):
        raise ValueError(
            f"grain size must be a power of two from {MIN_GRAIN_SECTORS} to {MAX_GRAIN_SECTORS} "
            f"sectors, got {grain_size}")
    if not 0 <= compression_level <= 9:
        raise ValueError(f"compression level must be 0..9, got {compression_level}")
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")


def _display_name(fileobj_or_path: PathOrFile) -> str | None:
    if hasattr(fileobj_or_path, "write"):
        name = getattr(fileobj_or_path, "name", None)
        return os.fsdecode(name) if isinstance(name, str | bytes) else None
    return os.fsdecode(fileobj_or_path)


def _fsync_if_regular(fileobj: BinaryIO) -> None:
    """fsync a regular file; pipes, sockets and in-memory objects are left alone."""
    try:
        fd = fileobj.fileno()
    except (AttributeError, OSError):  # io.UnsupportedOperation is an OSError
        return
    if stat.S_ISREG(os.fstat(fd).st_mode):
        os.fsync(fd)


class StreamFile(PositionedDisk):
    """A streamOptimized image being written front to back, as a write-only file object.

    What ``vmdk.create(..., subformat="streamOptimized")`` returns: ``write``
    and forward ``seek`` work; going back raises ``UnsupportedFormatError``
    (the format is append-only: rewrite the image with ``vmdk convert``).
    """

    def __init__(self, target: PathOrFile, capacity_sectors: int, descriptor: bytes, *,
                 grain_size: int = 128, compression_level: int = 1,
                 threads: int | None = None) -> None:
        super().__init__()
        self._writer = StreamWriter(target, capacity_sectors, descriptor, grain_size=grain_size,
                                    compression_level=compression_level, threads=threads)
        self.path: str = self._writer.name or "<stream>"
        self._size = capacity_sectors * SECTOR_SIZE
        self._pos = 0

    @property
    def name(self) -> str:
        return self.path

    @property
    def size(self) -> int:
        return self._size

    @property
    def mode(self) -> str:
        return "wb"

    def readable(self) -> bool:
        return False

    def writable(self) -> bool:
        self._checkClosed()
        return True

    def read(self, size: int | None = -1) -> bytes:
        raise io.UnsupportedOperation("a streamOptimized image being written is write-only")

    def readinto(self, buffer: Any) -> int:
        raise io.UnsupportedOperation("a streamOptimized image being written is write-only")

    def __repr__(self) -> str:
        state = "closed" if self.closed else "writing"
        return f"<vmdk.StreamFile {self.path!r} {state} at byte {self._pos} of {self._size}>"

    def write(self, data: Any) -> int:
        self._checkClosed()
        view = memoryview(data).cast("B")
        self._writer.write(self._pos, view)
        self._pos += len(view)
        return len(view)

    def write_at(self, offset: int, data: Any) -> None:
        self._checkClosed()
        self._writer.write(offset, data)
        self._pos = offset + len(memoryview(data).cast("B"))

    def flush(self) -> None:
        """Nothing to do before close: a stream is only valid once its footer is written."""

    @property
    def stored_bytes(self) -> int:
        """Bytes of the disk held by the grains stored so far (all-zero grains are not)."""
        return self._writer.stored_bytes

    @property
    def durable(self) -> bool:
        return self._writer.durable

    @durable.setter
    def durable(self, value: bool) -> None:
        self._writer.durable = value

    def close(self) -> None:
        if not self.closed:
            try:
                self._writer.close()
            finally:
                super().close()

    def abandon(self) -> None:
        """Stop without writing the footer: the partial file is left unreadable on purpose."""
        if not self.closed:
            self._writer._abandon()
            super().close()

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()
