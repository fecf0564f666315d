"""``vmdk mount``: a virtual disk and its partitions as files in a directory (FUSE).

The directory holds ``disk``, every byte of the virtual disk, and one file per
partition its MBR (logical partitions included) or GPT lists, named as Linux
numbers them: ``p1``, ``p2``, ``p5``...  Any image the package reads can be
mounted (every VMDK kind, snapshot chains, the first disk of an OVA); read-only
by default, written through to the image with ``read_write`` (the image is
opened "r+", with its locks).

Several FUSE threads serve requests at once; calls into the disk are made one at
a time under one lock, as the NBD server serializes them (the image keeps
caches that are not safe to change from two threads).  ``SEEK_DATA`` and
``SEEK_HOLE`` are answered from the disk's allocation map and ``st_blocks``
counts the stored bytes, so ``cp --sparse`` and backup tools skip holes.

The FUSE binding (mfusepy over libfuse 3) lives in :mod:`vmdk._fuse` and is
imported only when mounting: ``pip install 'vmdk[mount]'`` and Debian's ``fuse3``.

``vmdk umount`` runs ``fusermount3 -u`` and then waits until the process that
served the mount has closed the image (flushed it and released its locks).  It
learns that through an abstract Unix socket that process listens on, named
after the mount's device number: the connection closes when the image is closed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ._positioned import PositionedDisk
from .errors import OutOfRangeError, ReadOnlyError, VmdkError
from .partitions import EXTENDED_TYPES, PartitionTableError, partition_table_of

if TYPE_CHECKING:
    from typing_extensions import Buffer

log = logging.getLogger(__name__)

FUSE_DEVICE = "/dev/fuse"
#: The file system's type is "fuse.vmdk" in /proc/mounts: how umount tells our mounts.
SUBTYPE = "vmdk"
#: The allocation map is read this much at a time when seeking data or holes, so a
#: SEEK_HOLE near the start of a large disk does not map all of it.
MAP_WINDOW = 1 << 30
#: How long ``unmount`` waits for the serving process to close the image.
UNMOUNT_WAIT = 60.0
#: Idle FUSE threads kept for the next burst of requests (more start as needed).
IDLE_THREADS = 4
MOUNTINFO = "/proc/self/mountinfo"


class MountError(VmdkError):
    """FUSE is missing, the directory cannot take (or does not hold) a mount, or the
    mount itself failed."""


class Disk(Protocol):
    """What a mount serves: an image opened by the package, or an OVA's disk."""

    @property
    def size(self) -> int: ...
    def readinto_at(self, offset: int, buf: memoryview) -> Any: ...
    def write_at(self, offset: int, data: bytes | memoryview) -> None: ...
    def flush(self) -> None: ...
    def map(self, offset: int = 0, length: int | None = None) -> Sequence[Any]: ...
    def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class DiskFile:
    """One file of a mount: a range of the disk."""

    name: str   # "disk", "p1", ...
    start: int  # bytes from the start of the disk
    size: int


# --------------------------------------------------------------------- the files


class _DiskReader(PositionedDisk):
    """A disk as a read-only file object, for reading its partition table."""

    def __init__(self, disk: Disk) -> None:
        super().__init__()
        self._disk = disk
        self._pos = 0

    @property
    def size(self) -> int:
        return self._disk.size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._disk.size - self._pos))
        if n:
            self._disk.readinto_at(self._pos, view[:n])
            self._pos += n
        return n


def disk_files(disk: Disk, name: str) -> list[DiskFile]:
    """``disk``, then a file per partition of its MBR or GPT (an extended partition is only
    the box of the logical ones: it gets none).  A damaged table is a warning and leaves the
    whole disk alone; a disk without one has no partition files."""
    files = [DiskFile("disk", 0, disk.size)]
    reader = io.BufferedReader(_DiskReader(disk))
    if reader.read(512)[510:512] != b"\x55\xaa":
        return files  # never partitioned (or a bare file system): nothing to warn about
    try:
        table = partition_table_of(reader, disk.size, name)
    except PartitionTableError as exc:
        log.warning("%s; only the whole disk is mounted", exc)
        return files
    for p in table.partitions:
        if table.scheme == "mbr" and int(p.type, 16) in EXTENDED_TYPES:
            continue
        files.append(DiskFile(f"p{p.number}", p.start, p.size))
    return files


def fuse_errno(exc: BaseException) -> int:
    """The errno a failed disk call gives the reader or writer of a mounted file."""
    if isinstance(exc, ReadOnlyError):
        return errno.EROFS
    if isinstance(exc, OutOfRangeError):
        return errno.ENOSPC
    if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno > 0:
        return exc.errno
    return errno.EIO


class MountedDisk:
    """A mount's files and what can be done with them, apart from FUSE.

    Every call into the disk holds one lock: FUSE serves requests from several
    threads, and an image's grain-table caches and allocation are not safe to
    change from two at once.  Errors are ``OSError`` with the errno to report.
    """

    def __init__(self, disk: Disk, files: Sequence[DiskFile], *, writable: bool,
                 mtime: float) -> None:
        self.disk = disk
        self.files = {f.name: f for f in files}
        self.writable = writable
        self.mtime = mtime
        self._lock = threading.Lock()
        self._stored: dict[str, int] = {}  # stored bytes per file (for st_blocks)
        self._writes = 0  # writes so far: a count made across one is stale

    def file(self, name: str) -> DiskFile:
        try:
            return self.files[name]
        except KeyError:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT)) from None

    @contextlib.contextmanager
    def _disk_call(self) -> Iterator[None]:
        with self._lock:
            try:
                yield
            except (OSError, VmdkError) as exc:
                if isinstance(exc, VmdkError):
                    log.warning("%s", exc)  # the reader only sees the errno: say what it was
                raise OSError(fuse_errno(exc), str(exc)) from exc

    def read(self, f: DiskFile, offset: int, view: memoryview) -> int:
        """Fill ``view`` from ``offset`` of ``f``; fewer bytes at its end, none past it."""
        n = max(0, min(len(view), f.size - offset))
        if n:
            with self._disk_call():
                self.disk.readinto_at(f.start + offset, view[:n])
        return n

    def write(self, f: DiskFile, offset: int, data: bytes | memoryview) -> int:
        """Write what fits before the end of ``f`` (a disk does not grow: ENOSPC past it,
        as a block device says)."""
        if not self.writable:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        if not data:
            return 0
        n = min(len(data), f.size - offset)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        with self._disk_call():
            self.disk.write_at(f.start + offset, memoryview(data)[:n])
            self._writes += 1
            self._stored.clear()
        return n

    def flush(self) -> None:
        """Make what was written durable (fsync of a mounted file)."""
        if self.writable:
            with self._disk_call():
                self.disk.flush()

    def stored_runs(self, f: DiskFile, offset: int = 0) -> Iterator[tuple[int, int]]:
        """(start, end) of the ranges of ``f`` from ``offset`` on that the image stores
        (any layer of a chain), in order; the rest reads as zeros."""
        pos = offset
        while pos < f.size:
            n = min(MAP_WINDOW, f.size - pos)
            with self._disk_call():
                runs = self.disk.map(f.start + pos, n)
            for run in runs:
                if run.data and not run.zero:  # holes of a flat file need no reading
                    start = max(run.start - f.start, pos)
                    end = min(run.start + run.length - f.start, pos + n)
                    if start < end:
                        yield start, end
            pos += n

    def stored_bytes(self, f: DiskFile) -> int:
        """How much of ``f`` the image stores: its ``st_blocks``, which tells copying tools
        that it has holes worth seeking."""
        known = self._stored.get(f.name)
        if known is None:
            writes = self._writes
            known = sum(end - start for start, end in self.stored_runs(f))
            if writes == self._writes:
                self._stored[f.name] = known
        return known

    def seek(self, f: DiskFile, offset: int, whence: int) -> int:
        """``lseek`` with SEEK_DATA or SEEK_HOLE: the next stored byte, or the next byte
        that is not (the end of the file counts as a hole); ENXIO past the end or when no
        data follows."""
        if offset >= f.size or offset < 0:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        if whence == os.SEEK_DATA:
            for start, _end in self.stored_runs(f, offset):
                return max(start, offset)
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        if whence == os.SEEK_HOLE:
            pos = offset
            for start, end in self.stored_runs(f, offset):
                if start > pos:
                    break
                pos = max(pos, end)
            return min(pos, f.size)
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    def attributes(self, name: str) -> dict[str, int]:
        """``stat`` of the root ("") or of a file: owned by whoever mounted, dated as the
        image, writable only in a read-write mount."""
        write = 0o200 if self.writable else 0
        common = {"st_uid": os.getuid(), "st_gid": os.getgid(),
                  "st_atime": int(self.mtime * 1e9), "st_mtime": int(self.mtime * 1e9),
                  "st_ctime": int(self.mtime * 1e9)}
        if name == "":
            return common | {"st_mode": stat.S_IFDIR | 0o555 | write, "st_nlink": 2}
        f = self.file(name)
        blocks = -(-self.stored_bytes(f) // 512)
        return common | {"st_mode": stat.S_IFREG | 0o444 | write, "st_nlink": 1,
                         "st_size": f.size, "st_blocks": blocks, "st_blksize": 1 << 20}


# ---------------------------------------------------------------------- checks


def load_fuse() -> Any:
    """The FUSE glue module, or a MountError saying what to install."""
    try:
        from . import _fuse
    except ImportError as exc:
        raise MountError("FUSE support is not installed: pip install 'vmdk[mount]' "
                         f"(it needs mfusepy: {exc})") from exc
    except (OSError, AttributeError) as exc:  # mfusepy found no libfuse 3, or a wrong one
        raise MountError(f"libfuse 3 is not available ({exc}): install it (Debian: "
                         "apt-get install fuse3)") from exc
    return _fuse


def check_fuse_device() -> None:
    """Refuse early, in one line, where the kernel offers no FUSE or this user cannot
    mount (libfuse would say so in lines of its own, after starting)."""
    device = FUSE_DEVICE
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MountError(f"FUSE is not available: {device} is missing (load the fuse kernel "
                         "module; a container needs the device passed in)") from None
    except OSError as exc:
        raise MountError(f"FUSE is not available: cannot open {device}: "
                         f"{exc.strerror or exc}") from None
    os.close(fd)
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        # Only root mounts by itself; others go through the setuid helper.
        raise MountError("FUSE is not available: fusermount3 is not installed (Debian: "
                         "apt-get install fuse3)")


@dataclasses.dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    device: str  # "major:minor", unique among live mounts
    point: str
    fstype: str
    source: str


def _unescape(field: bytes) -> str:
    """Mountinfo writes space, tab, newline and backslash as octal escapes."""
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), field))


def mounts(mountinfo: str = MOUNTINFO) -> list[MountEntry]:
    out = []
    with open(mountinfo, "rb") as f:
        for line in f:
            fields = line.split()
            sep = fields.index(b"-")  # optional fields come before it
            out.append(MountEntry(fields[2].decode(), _unescape(fields[4]),
                                  fields[sep + 1].decode(), _unescape(fields[sep + 2])))
    return out


def mount_at(point: str) -> MountEntry | None:
    """The mount on top at ``point`` (an absolute, resolved path), if any."""
    found = [m for m in mounts() if m.point == point]
    return found[-1] if found else None


def _resolved(directory: str) -> str:
    """``directory`` as the kernel lists mount points, without looking inside it: a mount
    there could be one whose process is gone (ENOTCONN) or stuck."""
    path = os.path.abspath(directory)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def check_mount_point(directory: str) -> str:
    """The resolved path of an empty directory that holds no mount yet."""
    point = _resolved(directory)
    busy = mount_at(point)
    if busy is not None:
        if busy.fstype == f"fuse.{SUBTYPE}":
            raise MountError(f"already mounted ({busy.source} is mounted there; "
                             f"'vmdk umount {directory}' unmounts it)", directory)
        raise MountError(f"busy: already a mount point ({busy.fstype} of {busy.source})",
                         directory)
    try:
        if not stat.S_ISDIR(os.stat(point).st_mode):
            raise MountError("not a directory", directory)
        if os.listdir(point):
            raise MountError("not empty: the mount would hide its files; choose an empty "
                             "directory", directory)
    except OSError as exc:
        raise MountError(exc.strerror or str(exc), directory) from None
    return point


# -------------------------------------------------------------------- mounting


def open_disk(image: str, *, read_write: bool, **open_args: Any) -> Disk:
    """The image to mount: any VMDK (a chain with its parents), or an OVA's first disk."""
    from ._file import open as open_image
    from .ova import is_ova

    if open_args.get("force_share") and read_write:
        raise MountError("-U reads an image in use without its lock; a read-write mount "
                         "holds the lock, so the two do not go together")
    if is_ova(image):
        if read_write:
            raise MountError("a disk inside an OVA is read-only: mount it without "
                             "--read-write, or 'vmdk convert' it to a VMDK first", image)
        from .ova.disk import OvaDisk

        return OvaDisk(image)
    return open_image(image, "r+" if read_write else "r", **open_args)


def _fsname(image: str) -> str:
    """The image's path as the mount's source in /proc/mounts; libfuse splits options at
    commas unless escaped."""
    return image.replace("\\", "\\\\").replace(",", "\\,")


def mount(image: str, directory: str, *, read_write: bool = False, foreground: bool = False,
          open_args: dict[str, Any] | None = None,
          announce: Callable[[str], None] | None = None) -> int:
    """Mount ``image`` on ``directory`` until it is unmounted; returns an exit status.

    In the foreground, returns once the mount is gone (``vmdk umount``,
    ``fusermount3 -u``, SIGINT or SIGTERM).  Otherwise forks: the calling process
    returns 0 once the mount is up, or the status of a child that failed before
    (which printed why), and the child serves the mount, away from the terminal,
    until it is unmounted and then returns too.  ``announce`` is given one line
    once the mount is up.
    """
    check_fuse_device()
    fuse = load_fuse()
    point = check_mount_point(directory)
    image = image if "://" in image else os.path.abspath(image)  # a daemon leaves the cwd
    detached = None
    if not foreground:
        forked = _fork_until_ready()
        if isinstance(forked, int):
            return forked
        detached = forked
    disk = open_disk(image, read_write=read_write, **(open_args or {}))
    beacon = _ReleaseBeacon()
    try:
        files = disk_files(disk, image)
        fs = MountedDisk(disk, files, writable=read_write, mtime=_mtime(image))

        def ready() -> None:
            beacon.listen(point)
            if announce is not None:
                mode = "read-write" if read_write else "read-only"
                announce(f"mounted {image} on {directory} ({mode}): "
                         f"{', '.join(f.name for f in files)}")
            if detached is not None:
                detached.ready()

        with _libfuse_signals():
            fuse.serve(fs, point, fsname=_fsname(image), on_ready=ready)
    finally:
        try:
            disk.close()  # flushes and releases the image's locks
        finally:
            beacon.close()  # now 'vmdk umount' may return
    return 0


def _mtime(image: str) -> float:
    try:
        return os.stat(image).st_mtime
    except (OSError, ValueError):
        return time.time()


@contextlib.contextmanager
def _libfuse_signals() -> Iterator[None]:
    """Let libfuse take SIGINT, SIGTERM and SIGHUP: it installs its handlers (which end
    the loop, so the mount comes down cleanly) only over the default action, and a
    Python handler would never run while the main thread waits inside libfuse."""
    try:
        before = {sig: signal.signal(sig, signal.SIG_DFL)
                  for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    except ValueError:  # not the main thread: libfuse's handlers are not ours to give
        yield
        return
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


class _Detached:
    """The child of :func:`_fork_until_ready`, which tells its parent when the mount is up."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def ready(self) -> None:
        """Leave the terminal and the working directory, then let the parent exit."""
        os.setsid()
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        os.write(self._fd, b"ok")
        os.close(self._fd)


def _fork_until_ready() -> int | _Detached:
    """Fork.  The parent waits and returns 0 once the child is ready, or the child's exit
    status if it ends first (having printed its error on the shared stderr); the child
    gets the :class:`_Detached` to call when ready."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        return _Detached(write_end)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        said = pipe.read()
    if said == b"ok":
        return 0
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code  # killed by a signal: as a shell reports it


# ------------------------------------------------------------------ unmounting


def _beacon_name(device: str) -> bytes:
    """The abstract socket of the process serving mount ``device`` ("major:minor")."""
    return f"\0vmdk-mount/{device}".encode()


class _ReleaseBeacon:
    """An abstract Unix socket the serving process listens on once mounted; its
    connections close when the image has been closed, which is what umount waits for."""

    def __init__(self) -> None:
        self._listener: socket.socket | None = None
        self._held: list[socket.socket] = []

    def listen(self, point: str) -> None:
        entry = mount_at(point)
        if entry is None:
            return
        try:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(_beacon_name(entry.device))
            listener.listen()
        except OSError as exc:  # umount will not wait: nothing else depends on it
            log.info("no release notice for %s: %s", point, exc)
            return
        self._listener = listener
        threading.Thread(target=self._accept, name="vmdk-umount-beacon", daemon=True).start()

    def _accept(self) -> None:
        listener = self._listener
        while listener is not None:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed
            self._held.append(conn)

    def close(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        for conn in self._held:
            conn.close()


def _fusermount() -> list[str]:
    for tool in ("fusermount3", "fusermount"):
        path = shutil.which(tool)
        if path:
            return [path, "-u"]
    if os.geteuid() == 0 and shutil.which("umount"):
        return ["umount"]
    raise MountError("cannot unmount: fusermount3 is not installed (Debian: apt-get install "
                     "fuse3)")


def unmount(directory: str, *, wait: float = UNMOUNT_WAIT) -> None:
    """Unmount a vmdk mount, and wait (up to ``wait`` seconds) until the process that served
    it has flushed and closed the image, so that it can be opened again at once."""
    point = _resolved(directory)
    entry = mount_at(point) or mount_at(os.path.realpath(directory))
    if entry is None:
        raise MountError("not mounted", directory)
    if entry.fstype != f"fuse.{SUBTYPE}":
        raise MountError(f"not a vmdk mount (it is {entry.fstype} of {entry.source})",
                         directory)
    beacon = _connect_beacon(entry.device)
    try:
        done = subprocess.run([*_fusermount(), entry.point], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, errors="replace", check=False)
        if done.returncode != 0:
            raise MountError(_unmount_failure(done.stderr), directory)
        if beacon is not None and not _closed_within(beacon, wait):
            raise MountError(f"unmounted, but the process serving it has not closed "
                             f"{entry.source} after {wait:g} s", directory)
    finally:
        if beacon is not None:
            beacon.close()


def _connect_beacon(device: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(_beacon_name(device))
    except OSError:  # its process is gone (a dead mount) or predates the beacon
        sock.close()
        return None
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(64):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass  # reset: closed all the same
    return True


def _unmount_failure(stderr: str) -> str:
    said = (stderr.strip().splitlines() or ["unknown error"])[-1]
    if "busy" in said.lower():
        return ("busy: a file in it is open (close it first, or detach it now with "
                "fusermount3 -u -z and let it go when the last file closes)")
    return f"cannot unmount: {said.removeprefix('fusermount3: ').removeprefix('umount: ')}"


__all__ = ["DiskFile", "MountError", "MountedDisk", "disk_files", "mount", "unmount"]
