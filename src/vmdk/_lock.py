"""Image locking with open-file-description locks, on the bytes qemu uses.

qemu takes shared locks on byte 100 + n of every image file for each
permission n it holds (0 consistent read, 1 write) and on byte 200 + n for
each permission it refuses to share.  Taking the same bytes makes a writer
here and a writer (or a consistent reader) in qemu see each other.
"""

from __future__ import annotations

import fcntl
import os
import struct

from .errors import ImageInUseError

PERM_BASE = 100
SHARED_BASE = 200
READ, WRITE = 0, 1

# struct flock on Linux: l_type, l_whence (shorts), l_start, l_len (off_t), l_pid (int).
_FLOCK = struct.Struct("hhqqi4x")


def _flock(kind: int, start: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, start, 1, 0)


def _held_by_other(fd: int, byte: int) -> bool:
    """Would an exclusive lock on ``byte`` conflict with someone else's lock?"""
    out = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, byte))
    kind: int = _FLOCK.unpack(out)[0]
    return kind != fcntl.F_UNLCK


def _take(fd: int, byte: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK, byte))


def refuse_if_in_use(path: str) -> None:
    """Raise ImageInUseError when another opener (here or in qemu) holds ``path``.

    For replacing a file: deleting an image someone is writing loses what they write.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return  # nothing readable there to protect
    try:
        if _held_by_other(fd, PERM_BASE + WRITE) or _held_by_other(fd, PERM_BASE + READ):
            raise ImageInUseError("image is in use (open elsewhere): it cannot be replaced now",
                                  path)
    finally:
        os.close(fd)


def writer_elsewhere(fd: int) -> bool:
    """Whether another open file description holds the file's write permission."""
    return _held_by_other(fd, PERM_BASE + WRITE)


def lock_image_file(fd: int, filename: str, *, write: bool) -> None:
    """Lock one file of an image for reading or writing; raise ImageInUseError on a conflict.

    A writer refuses other writers and consistent readers; a reader refuses
    writers.  Any number of readers share.
    """
    if _held_by_other(fd, PERM_BASE + WRITE):
        hint = ("wait for it to close" if write else
                "force_share=True / -U reads it anyway, without consistency")
        raise ImageInUseError(
            "image is in use: it is open for writing elsewhere (another process, or another "
            f"open in this one); {hint}", filename)
    if write and _held_by_other(fd, SHARED_BASE + WRITE):
        raise ImageInUseError(
            "image is in use: it is open for reading elsewhere and readers do not allow "
            "writes meanwhile", filename)
    try:
        _take(fd, PERM_BASE + READ)
        _take(fd, SHARED_BASE + WRITE)
        if write:
            _take(fd, PERM_BASE + WRITE)
    except BlockingIOError as exc:  # lost a race with another opener
        raise ImageInUseError("image is in use by another process", filename) from exc
