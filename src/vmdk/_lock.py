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
import time

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
    # Shared locks never block each other: taking one cannot fail on a conflict, only
    # the test that follows can see one.
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


#: A lost race is retried after a short random pause, this many times: two openers that
#: lock at the same moment both see the other and both step back; one of the retries wins.
RACE_RETRIES = 5
RACE_PAUSE = 0.002  # seconds, the mean of the first pause; it doubles on each retry


def lock_image_file(fd: int, filename: str, *, write: bool) -> None:
    """Lock one file of an image for reading or writing; raise ImageInUseError on a conflict.

    A writer refuses other writers and consistent readers; a reader refuses
    writers.  Any number of readers share.  The locks are taken first and the
    conflicts tested after, as qemu does: testing first would let two openers
    both pass the test before either had locked.
    """
    pause = RACE_PAUSE
    for attempt in range(RACE_RETRIES + 1):
        try:
            _take_all(fd, write)
        except BlockingIOError:  # only an exclusive lock on our bytes blocks a shared one
            conflict: ImageInUseError | None = ImageInUseError(
                "image is in use by another process")
        else:
            conflict = _conflict(fd, write)
        if conflict is None:
            return
        _release_all(fd)
        if attempt < RACE_RETRIES:
            time.sleep(pause * (0.5 + os.urandom(1)[0] / 255))  # jitter: racers drift apart
            pause *= 2
    assert conflict is not None
    raise ImageInUseError(conflict.reason, filename, opt_in=conflict.opt_in)


def _take_all(fd: int, write: bool) -> None:
    _take(fd, PERM_BASE + READ)
    _take(fd, SHARED_BASE + WRITE)
    if write:
        _take(fd, PERM_BASE + WRITE)


def _release_all(fd: int) -> None:
    for byte in (PERM_BASE + READ, PERM_BASE + WRITE, SHARED_BASE + WRITE):
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, byte))


#: What a reader refused by a writer may do instead.
_SHARE = ("force_share", "reads it anyway, without consistency")


def _conflict(fd: int, write: bool) -> ImageInUseError | None:
    """What another opener holds that our locks cannot live with (our own locks on this
    open file description never conflict with themselves)."""
    if _held_by_other(fd, PERM_BASE + WRITE):
        busy = ("image is in use: it is open for writing elsewhere (another process, or "
                "another open in this one)")
        if write:
            return ImageInUseError(f"{busy}; wait for it to close")
        return ImageInUseError(busy, opt_in=_SHARE)
    if write and _held_by_other(fd, SHARED_BASE + WRITE):
        return ImageInUseError("image is in use: it is open for reading elsewhere and readers "
                               "do not allow writes meanwhile")
    return None
