"""The FUSE side of ``vmdk mount``: mfusepy (ctypes over libfuse 3) serving a MountedDisk.

Imported only to mount (``pip install 'vmdk[mount]'``).  libfuse runs its
multi-threaded loop; each request calls into :class:`vmdk.mount.MountedDisk`,
which does the work and says which errno to answer.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import os
from collections.abc import Callable
from typing import Any

from .mount import IDLE_THREADS, SUBTYPE, MountedDisk, MountError, mount_at

#: Readahead of the mount's files.  The kernel starts FUSE mounts at 128 KiB, so a
#: sequential reader gets 128 KiB requests, each a trip through Python; at 1 MiB (the
#: largest request libfuse 3 takes) reading the disk ran twice as fast.
READAHEAD_KB = 1024


def _import_mfusepy() -> Any:
    """mfusepy, bound to libfuse 3: it would take libfuse 2 where both are installed, and
    only 3 has ``lseek`` (SEEK_DATA/SEEK_HOLE) and requests up to 1 MiB."""
    choose = "FUSE_LIBRARY_PATH" not in os.environ and "FUSE_LIBRARY_NAME" not in os.environ
    if choose:
        os.environ["FUSE_LIBRARY_NAME"] = "fuse3"
    try:
        module = importlib.import_module("mfusepy")
    finally:
        if choose:
            del os.environ["FUSE_LIBRARY_NAME"]
    if module.fuse_version_major != 3:
        raise AttributeError(f"libfuse {module.fuse_version_major}.{module.fuse_version_minor} "
                             "was found; vmdk mount needs libfuse 3")
    return module


mfusepy = _import_mfusepy()
# Untyped classes of an untyped module: the subclasses below type what they add.
_OperationsBase: Any = mfusepy.Operations
_FuseBase: Any = mfusepy.FUSE


def _failure(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class _Operations(_OperationsBase):  # type: ignore[misc]
    """The root directory and its files, with mfusepy's names and arguments."""

    use_ns = True  # times in nanoseconds (mfusepy's float seconds are deprecated)

    def __init__(self, fs: MountedDisk, point: str, on_ready: Callable[[], None]) -> None:
        self.fs = fs
        self.point = point
        self.on_ready = on_ready
        self.mounted = False
        self._readahead_set = False

    def init_with_config(self, conn: Any, config: Any) -> None:
        # Called for the kernel's first request: the mount is there and being served.
        self.mounted = True
        self.on_ready()

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        return self.fs.attributes(path.lstrip("/"))

    def readdir(self, path: str, fh: int) -> list[str]:
        if path != "/":
            raise _failure(errno.ENOTDIR)
        return [".", "..", *self.fs.files]

    def open(self, path: str, flags: int) -> int:
        # O_TRUNC is left alone, as a block device leaves it: 'cp image DIR/disk' writes
        # over the disk (libfuse 3 hands it to open instead of truncating first).
        self.fs.file(path.lstrip("/"))
        if not self._readahead_set:
            self._readahead_set = True
            _raise_readahead(self.point)
        return 0

    def read(self, path: str, view: memoryview, offset: int) -> int:
        # Called by _Fuse.read with libfuse's own buffer: the disk reads straight into it.
        return self.fs.read(self.fs.file(path.lstrip("/")), offset, view)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return self.fs.write(self.fs.file(path.lstrip("/")), offset, data)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        if length != self.fs.file(path.lstrip("/")).size:
            raise _failure(errno.EINVAL)  # a disk has a fixed size ('vmdk resize' changes it)
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        self.fs.flush()
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        block = 4096
        return {"f_bsize": block, "f_frsize": block,
                "f_blocks": -(-self.fs.files["disk"].size // block), "f_bfree": 0,
                "f_bavail": 0, "f_files": len(self.fs.files), "f_ffree": 0, "f_namemax": 255}

    def lseek(self, path: str, offset: int, whence: int) -> int:
        return self.fs.seek(self.fs.file(path.lstrip("/")), offset, whence)


def _raise_readahead(point: str) -> None:
    """Raise the mount's readahead to READAHEAD_KB, where allowed (root may).

    Done at the first open: the kernel lowers it to its own start value when the mount
    is set up (after our init), and each open file copies the value in force.
    """
    entry = mount_at(point)
    if entry is None:
        return
    try:
        with open(f"/sys/class/bdi/{entry.device}/read_ahead_kb", "w") as f:
            f.write(str(READAHEAD_KB))
    except OSError:
        pass  # not root: reads stay at 128 KiB, only slower


class _Fuse(_FuseBase):  # type: ignore[misc]
    """mfusepy's glue, with the two calls it lacks: a read into libfuse's buffer (mfusepy
    copies from a bytes object) and lseek, which it declares but does not pass on."""

    def read(self, path: bytes, buf: Any, size: int, offset: int, fip: Any) -> int:
        view = memoryview((ctypes.c_char * size).from_address(ctypes.addressof(buf.contents)))
        n: int = self.operations.read(os.fsdecode(path), view.cast("B"), offset)
        return n

    def lseek(self, path: bytes, offset: int, whence: int, fip: Any) -> int:
        pos: int = self.operations.lseek(os.fsdecode(path), offset, whence)
        return pos


def serve(fs: MountedDisk, point: str, *, fsname: str, on_ready: Callable[[], None]) -> None:
    """Mount ``fs`` on ``point`` and serve it until unmounted or interrupted (SIGINT,
    SIGTERM, SIGHUP: libfuse's handlers end the loop and unmount)."""
    operations = _Operations(fs, point, on_ready)
    options: dict[str, Any] = {
        "fsname": fsname, "subtype": SUBTYPE, "ro": not fs.writable,
        "default_permissions": True,  # the files' modes apply: read-only files refuse writes
        # A read-only image does not change (its lock keeps writers out): cached pages stay
        # valid from one open to the next.  In a read-write mount the files overlap (disk
        # holds p1...), each with pages of its own: an open drops what the file had cached,
        # so what was written through another file shows, as with /dev/sda and /dev/sda1.
        "kernel_cache": not fs.writable,
        # Also keeps libfuse 3.14 from warning about its own default at start.
        "max_idle_threads": IDLE_THREADS,
    }
    try:
        _Fuse(operations, point, foreground=True, **options)
    except RuntimeError as exc:
        if operations.mounted:
            return  # a signal ended the loop: libfuse reports that as a failure too
        raise MountError(f"cannot mount (libfuse status {exc}; its message is above)",
                         point) from exc
