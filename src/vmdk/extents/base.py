"""The one small interface every extent kind implements.

An extent maps byte offsets inside itself (0 .. size) to storage.  The image
stitches extents together and handles the parent chain, so an extent only
reports which of its ranges are unallocated ("holes") and lets the image fill
those from the parent or with zeros.
"""

from __future__ import annotations

import abc
import ctypes
import dataclasses
import enum
import errno
import mmap
import os
import threading
from collections.abc import Callable, Iterator

from .._access import Readable
from ..errors import CorruptImageError, OutOfRangeError, ReadOnlyError

SECTOR_SIZE = 512

#: Reads ``len(buf)`` bytes of the parent (or zeros) at an extent-relative
#: offset: used to complete a partial grain on its first write.
BackingReader = Callable[[int, memoryview], None]


class Alloc(enum.Enum):
    DATA = "data"  # stored in this extent
    ZERO = "zero"  # reads as zeros without reaching a parent (ZERO extent, zeroed GTE)
    HOLE = "hole"  # a hole in a flat file: this layer's, reading as zeros (qemu: data + zero)
    UNALLOCATED = "unallocated"  # not stored here: the parent's bytes, or zeros


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    """A range of an extent with one allocation state.

    ``host_offset`` is where the bytes start in ``filename`` when they are
    stored uncompressed and contiguous, else ``None``.
    """

    offset: int
    length: int
    alloc: Alloc
    host_offset: int | None = None
    filename: str | None = None
    compressed: bool = False


class Extent(abc.ABC):
    """Base of FLAT, ZERO, SPARSE, stream, COWD and seSparse extents."""

    #: The file holding this extent's data (None for ZERO).
    filename: str | None = None
    #: Nominal size in bytes, as the descriptor's extent line gives it.
    size: int
    read_only: bool = True
    #: False skips every fsync (qemu-img's "-t unsafe"): the write order still protects
    #: against a crash of this process, no longer against a crash of the machine.
    durable: bool = True

    @abc.abstractmethod
    def read_into(self, offset: int, buf: memoryview) -> list[tuple[int, int]]:
        """Fill ``buf`` from ``offset``; return the unallocated holes as (start, length) in buf.

        Holes are left untouched in ``buf``: the caller fills them from the
        parent or with zeros.
        """

    @abc.abstractmethod
    def status(self, offset: int, length: int) -> list[Run]:
        """Allocation runs covering ``offset .. offset+length``, merged where alike."""

    def write(self, offset: int, data: memoryview, backing: BackingReader | None = None) -> None:
        raise ReadOnlyError(f"{type(self).__name__} extents cannot be written", self.filename)

    def write_zeroes(self, offset: int, length: int, backing: BackingReader | None = None) -> None:
        """Make a range read as zeros; kinds that can mark zeros cheaply override this."""
        chunk = memoryview(bytes(min(length, 1 << 22)))
        while length:
            n = min(length, len(chunk))
            self.write(offset, chunk[:n], backing)
            offset += n
            length -= n

    def flush(self) -> None:
        """Push buffered state to the file and fsync it."""

    def begin_writing(self) -> None:
        """Make the changes opening for writing makes (unclean flag, repairs).

        Extents opened with ``defer_writes=True`` wait for this call, which the
        image makes once it holds the write lock: a refused opener changes nothing.
        """

    def close(self) -> None:
        """Release the file; a writable extent is flushed first."""

    @property
    def allocated_bytes(self) -> int:
        """Bytes the extent's file occupies on the host (for "actual-size")."""
        if self.filename is None:
            return 0
        try:
            return os.stat(self.filename).st_blocks * 512
        except OSError:
            return 0

    def info(self) -> dict[str, object]:
        """The extent's entry in ``info()['format-specific']['data']['extents']``."""
        return {"filename": self.filename, "virtual-size": self.size}

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRangeError(
                f"request {offset}+{length} is outside the extent of {self.size} bytes",
                self.filename,
            )

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError("extent is read-only", self.filename)


def merge_runs(runs: list[Run]) -> list[Run]:
    """Join neighbouring runs whose state continues (same kind, contiguous host bytes)."""
    merged: list[Run] = []
    for run in runs:
        if merged:
            last = merged[-1]
            if (
                last.alloc == run.alloc
                and last.filename == run.filename
                and last.compressed == run.compressed
                and last.offset + last.length == run.offset
                and (
                    (last.host_offset is None and run.host_offset is None)
                    or (
                        last.host_offset is not None
                        and run.host_offset is not None
                        and last.host_offset + last.length == run.host_offset
                    )
                )
            ):
                merged[-1] = dataclasses.replace(last, length=last.length + run.length)
                continue
        merged.append(run)
    return merged


#: The kernel's copy from the page cache (and glibc's memcpy below its non-temporal
#: threshold) runs four times slower when the destination sits 1-63 bytes past the
#: source modulo a page, as a bytearray's data does against a page-aligned offset.
#: Such reads go through a bounce buffer placed half a page away from both sides,
#: in pieces small enough to stay in the core's cache between the two copies.
BOUNCE_SIZE = 512 << 10
_BOUNCE_MIN = 64 << 10
_PAGE = 4096
_bounce = threading.local()


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _slow_copy(destination: int, source: int) -> bool:
    return 0 < (destination - source) % _PAGE < 64


def _bounce_buffer(offset: int) -> memoryview:
    """A bounce buffer half a page away, modulo a page, from file ``offset``."""
    area = getattr(_bounce, "view", None)
    if area is None:
        area = _bounce.view = memoryview(mmap.mmap(-1, BOUNCE_SIZE + _PAGE))
    start = (offset + _PAGE // 2) % _PAGE
    return area[start:start + BOUNCE_SIZE]


def pread_exact(fd: Readable, buf: memoryview, offset: int, filename: str | None) -> int:
    """Read into ``buf`` at ``offset``; bytes past the file's end read as zeros.

    Returns how many bytes came from the file.  A flat extent file shorter than
    its nominal size reads as zeros past its end, as qemu does.
    """
    if not isinstance(fd, int):
        got = fd.readinto(buf, offset)
        zero_fill(buf[got:])
        return got
    total = len(buf)
    bounce = None
    if total >= _BOUNCE_MIN and not buf.readonly and _slow_copy(_address(buf), offset):
        bounce = _bounce_buffer(offset)
    done = 0
    while done < total:
        if bounce is None:
            n = os.preadv(fd, [buf[done:]], offset + done)
        else:  # every piece but the last is a multiple of pages: the placement holds
            want = min(total - done, len(bounce))
            n = os.preadv(fd, [bounce[:want]], offset + done)
            buf[done:done + n] = bounce[:n]
        if n == 0:
            zero_fill(buf[done:])
            break
        done += n
    return done


def read_pieces(src: Readable, pieces: list[tuple[memoryview, int]],
                filename: str | None) -> list[int]:
    """``pread_exact`` for each (buffer, offset): a remote file fetches neighbouring
    pieces in one request, a local one reads them one by one as ever."""
    if isinstance(src, int):
        return [pread_exact(src, buf, offset, filename) for buf, offset in pieces]
    got = src.read_pieces(pieces)
    for (buf, _offset), n in zip(pieces, got):
        zero_fill(buf[n:])
    return got


def zero_fill(view: memoryview) -> None:
    """Set a buffer to zeros without allocating a zero buffer of its size."""
    if len(view) <= 4096:
        view[:] = bytes(len(view))
    else:
        ctypes.memset(_address(view), 0, len(view))


def pwritev_all(fd: int, buffers: list[memoryview | bytearray], offset: int) -> None:
    """Write several buffers back to back in one system call (more only if it falls short)."""
    total = sum(len(b) for b in buffers)
    done = os.pwritev(fd, buffers, offset)
    if done < total:
        rest = memoryview(b"".join(bytes(b) for b in buffers))[done:]
        pwrite_all(fd, rest, offset + done)


def pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def stored_ranges(fd: Readable, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The (start, end) byte ranges of ``start .. end`` that the file stores; the rest
    are holes, which read as zeros.

    Found with SEEK_DATA/SEEK_HOLE, so the cost follows what is stored, not the
    range's size.  Where the file system cannot tell (a device, some network file
    systems), the whole range counts as stored; so does all of a file that is not local,
    up to its end.
    """
    if not isinstance(fd, int):
        if start < min(end, fd.size):
            yield start, min(end, fd.size)
        return
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only holes from here to the end of the file
                return
            yield pos, end  # no hole support here
            return
        if data >= end:
            return
        try:
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        except OSError:
            hole = end
        yield data, hole
        pos = hole


def zeroed_buffer(size: int) -> memoryview:
    """``size`` zero bytes whose memory the system supplies only where they are written.

    Untouched pages of a private anonymous mapping cost nothing (reads see the
    shared zero page): a table whose size is a number in a header costs what is
    written into it, not what the header claims.
    """
    if size == 0:
        return memoryview(bytearray())
    return memoryview(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))


def read_stored(fd: Readable, offset: int, size: int, filename: str | None, what: str
                ) -> tuple[memoryview, list[tuple[int, int]]]:
    """Bytes ``offset .. offset+size`` of the file, reading only what it stores (its holes
    read as zeros), and the (start, end) ranges of the result that were read.  A short
    read means a truncated ``what``."""
    out = zeroed_buffer(size)
    stored: list[tuple[int, int]] = []
    for lo, hi in stored_ranges(fd, offset, offset + size):
        a, b = lo - offset, hi - offset
        if pread_exact(fd, out[a:b], lo, filename) < b - a:
            raise CorruptImageError(f"{what} is truncated", filename)
        stored.append((a, b))
    return out, stored
