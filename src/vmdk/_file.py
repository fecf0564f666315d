"""``VmdkFile``: an image as a Python file object (``io.RawIOBase``).

Reads and writes go straight to :class:`vmdk.image.Image`, which works on
whole requests; no buffering layer sits in between, because a disk is used
with random seeks and large blocks.
"""

from __future__ import annotations

import io
import os
from typing import IO, TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

from ._access import Resolver
from ._positioned import PositionedDisk
from .errors import OutOfRangeError
from .image import Image, MapRun


class VmdkFile(PositionedDisk):
    """A virtual disk opened for reading (mode "r") or reading and writing ("r+").

    A binary file object of ``size`` bytes (``read``, ``write``, ``seek``...), plus
    positional I/O that leaves the file position alone (``read_at``, ``write_at``...),
    safe to use from several threads as the NBD server does.
    """

    def __init__(self, image: Image) -> None:
        super().__init__()
        self.image = image
        self._pos = 0

    # io protocol ---------------------------------------------------------

    @property
    def name(self) -> str:
        """The path the image was opened by."""
        return self.image.path

    @property
    def mode(self) -> str:
        """"rb" when opened for reading, "r+b" when for writing too."""
        return "rb" if self.image.read_only else "r+b"

    @property
    def size(self) -> int:
        """Virtual size in bytes."""
        return self.image.size

    def readable(self) -> bool:
        """Always True: every image can be read."""
        self._checkClosed()
        return True

    def writable(self) -> bool:
        """Whether the disk was opened for writing ("r+")."""
        self._checkClosed()
        return not self.image.read_only

    def readinto(self, buffer: Buffer) -> int:
        """Fill ``buffer`` from the current position; returns the bytes read (fewer at the
        end of the disk, 0 past it)."""
        self._checkClosed()
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self.image.size - self._pos))
        if n:
            self.image.readinto_at(self._pos, view[:n])
            self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes from the current position (all the rest when negative)."""
        self._checkClosed()
        rest = max(0, self.image.size - self._pos)
        n = rest if size is None or size < 0 else min(size, rest)
        if not n:
            return b""
        data = self.image.read_at(self._pos, n)  # skips RawIOBase's buffer and extra copy
        self._pos += n
        return data

    def readall(self) -> bytes:
        """Everything from the current position to the end of the disk."""
        return self.read(max(0, self.image.size - self._pos))

    def write(self, data: Buffer) -> int:
        """Write ``data`` at the current position and move past it; returns its length.

        A disk does not grow: a write past its end raises ``OutOfRangeError``
        (``vmdk resize`` makes it larger).  A disk opened for reading raises
        ``ReadOnlyError``, wherever the write would go.
        """
        self._checkClosed()
        self.image._check_writable()
        view = memoryview(data).cast("B")
        if self._pos + len(view) > self.image.size:
            raise OutOfRangeError(
                f"write of {len(view)} bytes at offset {self._pos} passes the end of the "
                f"disk ({self.image.size} bytes); resize the image first", self.image.path)
        self.image.write_at(self._pos, view)
        self._pos += len(view)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        """Refused: a virtual disk has a fixed size (``vmdk resize`` changes it)."""
        raise io.UnsupportedOperation("a virtual disk has a fixed size; use vmdk resize")

    @property
    def durable(self) -> bool:
        """Whether flush and close fsync (True); False is qemu-img's "-t unsafe"."""
        return all(e.durable for e in self.image.extents)

    @durable.setter
    def durable(self, value: bool) -> None:
        for extent in self.image.extents:
            extent.durable = value

    def flush(self) -> None:
        """Write descriptor and metadata, then fsync every file (data first, then grain
        tables, then the grain directory)."""
        self._checkClosed()
        self.image.flush()

    def close(self) -> None:
        """Flush, clear the unclean-shutdown flag and release the image's locks."""
        if not self.closed:
            try:
                self.image.close()
            finally:
                super().close()

    def fileno(self) -> int:
        """Refused: an image is several files (descriptor, extents, parents)."""
        raise io.UnsupportedOperation("a VMDK image has no single file descriptor")

    def __enter__(self) -> Self:
        self._checkClosed()
        return self

    # positional API (what the NBD server and convert use) ------------------

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes from byte ``offset`` of the disk (the file position stays).

        Ranges the image does not store read from its parent, or as zeros.  A range
        outside the disk raises ``OutOfRangeError``.
        """
        self._checkClosed()
        return self.image.read_at(offset, length)

    def readinto_at(self, offset: int, buf: Buffer) -> int:
        """Fill ``buf`` from byte ``offset`` of the disk; returns the bytes read (all of
        ``buf``: a range outside the disk raises ``OutOfRangeError``)."""
        self._checkClosed()
        view = memoryview(buf).cast("B")
        self.image.readinto_at(offset, view)
        return len(view)

    def write_at(self, offset: int, data: Buffer) -> None:
        """Write ``data`` at byte ``offset`` of the disk (the file position stays).

        The first write of an open gives the image a new CID, on disk before any data
        changes.  ``ReadOnlyError`` on a disk opened for reading; ``OutOfRangeError``
        for a range outside the disk.
        """
        self._checkClosed()
        self.image.write_at(offset, memoryview(data))

    def write_zeroes_at(self, offset: int, length: int) -> None:
        """Make ``length`` bytes from ``offset`` read as zeros, storing as little as the
        image kind allows (zeroed-grain entries, holes)."""
        self._checkClosed()
        self.image.write_zeroes_at(offset, length)

    def discard_at(self, offset: int, length: int) -> None:
        """Forget a range (NBD TRIM): without a parent it reads as zeros afterwards; over
        a parent it is kept as it is."""
        self._checkClosed()
        self.image.discard_at(offset, length)

    def map(self, offset: int = 0, length: int | None = None) -> list[MapRun]:
        """Where the disk's data is: runs of one allocation state (data, zero, unstored)
        with the file and offset that holds them, as ``qemu-img map`` lists them."""
        self._checkClosed()
        return self.image.map(offset, length)

    def info(self) -> dict[str, Any]:
        """What ``vmdk info --output=json`` prints: qemu-img's keys where it has them."""
        self._checkClosed()
        return self.image.info()

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.mode
        return f"<vmdk.VmdkFile {self.image.path!r} {state} size={self.image.size}>"


def open(path: str | os.PathLike[str] | IO[bytes], mode: str = "r", *,
         allow_external: bool = False, ignore_cid: bool = False, force_share: bool = False,
         drop_change_tracking: bool = False, missing_as_zeros: bool = False,
         resolver: Resolver | None = None,
         storage_options: dict[str, Any] | None = None) -> VmdkFile:
    """Open a VMDK image (descriptor, monolithic or bare extent file) as a file object.

    ``path`` is a local path, a URL (``https://``, ``s3://``, ``gs://``, ``az://`` or any
    fsspec protocol; needs ``pip install 'vmdk[remote]'``, with fsspec's
    ``storage_options``), or a seekable binary file object (borrowed: it stays open),
    whose other files, if its descriptor names any, ``resolver(name)`` opens (what it
    returns is closed with the image).  URLs and file objects open read-only.

    ``mode`` is "r" (the default) or "r+" to write.  ``allow_external`` lets
    the descriptor name files outside the image's folder or devices, which is
    refused by default; ``ignore_cid`` opens a snapshot whose parent changed;
    ``force_share`` reads an image another process is writing (no lock is taken).
    An image with VMware's changed block tracking (``changeTrackPath``) is not
    opened for writing unless ``drop_change_tracking=True``: the first write
    then removes the claim from the descriptor, as the tracking file goes stale.
    Reading past the end of a flat extent file shorter than the descriptor says
    raises ``CorruptImageError`` unless ``missing_as_zeros=True``.
    """
    return VmdkFile(Image.open(path, mode, allow_external=allow_external, ignore_cid=ignore_cid,
                               force_share=force_share,
                               drop_change_tracking=drop_change_tracking,
                               missing_as_zeros=missing_as_zeros, resolver=resolver,
                               storage_options=storage_options))
