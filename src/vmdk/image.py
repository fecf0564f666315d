"""An image: a descriptor, its extents stitched end to end, and an optional parent.

All I/O here is positional (``read_at``/``write_at``); :mod:`vmdk._file`
adds the file-object position on top.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import logging
import mmap
import os
import stat
import threading
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any, NoReturn, Self, cast

if TYPE_CHECKING:
    from uuid import UUID

from ._access import (
    FileObjectAccess,
    Folder,
    RandomAccess,
    Resolver,
    ResolverFolder,
    file_size,
    is_file_object,
    is_url,
)
from ._structs import COWD_MAGIC, SESPARSE_CONST_MAGIC, SPARSE_MAGIC, SparseFlags
from .descriptor import Descriptor, ExtentLine, canonical_create_type
from .errors import (
    ChainError,
    DescriptorError,
    ImageInUseError,
    ImageIOError,
    MissingExtentError,
    OutOfRangeError,
    ReadOnlyError,
    UnsafePathError,
    UnsupportedFormatError,
    VmdkError,
)
from .extents.base import SECTOR_SIZE, Alloc, Extent, Run, pwrite_all, zero_fill
from .extents.flat import FlatExtent, ZeroExtent
from .extents.sparse import SparseExtent, TableCache

log = logging.getLogger(__name__)

#: Separate descriptor files above this size are not descriptors (and are not read whole).
MAX_DESCRIPTOR_BYTES = 1 << 20
#: Deepest snapshot chain followed before assuming a loop or an attack.
MAX_CHAIN_DEPTH = 64
#: ``read_at`` reads up to this many bytes through a page-aligned buffer per thread, so
#: the kernel copies at full speed and one copy makes the result.
READ_SCRATCH = 4 << 20
_scratch = threading.local()
NO_PARENT_CID = 0xFFFFFFFF
#: A child's ddb key, set only while a commit into its parent runs: see pending_parent_cids.
PENDING_PARENT_CID_KEY = "ddb.pendingParentCID"

#: createType values that name a raw device or partition rather than image files.
RAW_DEVICE_TYPES = {"fullDevice", "partitionedDevice", "vmfsRaw", "vmfsRawDeviceMap",
                    "vmfsPassthroughRawDeviceMap", "vmfsRDM", "vmfsRDMP"}


@dataclasses.dataclass(frozen=True, slots=True)
class MapRun:
    """One range of ``Image.map``, with ``qemu-img map`` meanings."""

    start: int
    length: int
    data: bool  # stored in some layer of the chain
    zero: bool  # reads as zeros
    depth: int  # 0 = this image, 1 = its parent, ...
    present: bool = True  # allocated (as data or as zeros) in some layer
    offset: int | None = None  # host offset in ``filename`` when stored uncompressed
    filename: str | None = None
    compressed: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"start": self.start, "length": self.length, "depth": self.depth,
                               "present": self.present,
                               "zero": self.zero, "data": self.data}
        if self.compressed:
            out["compressed"] = True
        if self.offset is not None:
            out["offset"] = self.offset
        if self.filename is not None:
            out["filename"] = self.filename
        return out


@contextlib.contextmanager
def io_errors(filename: str | None) -> Iterator[None]:
    """Turn a bare OSError from the system into an ImageIOError naming the file."""
    try:
        yield
    except VmdkError:
        raise
    except OSError as exc:
        name = exc.filename or filename
        if exc.errno == errno.ENOENT:
            raise MissingExtentError(exc.strerror or "no such file", name) from exc
        raise ImageIOError(exc.strerror or str(exc), name, errno=exc.errno) from exc


def new_cid() -> int:
    """A random content id that is never one of the two reserved values."""
    while True:
        cid = int.from_bytes(os.urandom(4), "little")
        if cid not in (0xFFFFFFFF, 0xFFFFFFFE):
            return cid


def sniff(path: str) -> str:
    """What kind of file ``path`` is: "sparse", "cowd", "sesparse", "descriptor" or "raw"."""
    with open(path, "rb") as f:
        head = f.read(8)
    kind = _binary_kind(head)
    if kind is None:
        return "descriptor" if _looks_like_descriptor(path) else "raw"
    return kind


def _binary_kind(head: bytes) -> str | None:
    """"sparse", "cowd" or "sesparse" by the file's first 8 bytes, else None."""
    if head[:4] == SPARSE_MAGIC:
        return "sparse"
    if head[:4] == COWD_MAGIC:
        return "cowd"
    if len(head) >= 8 and int.from_bytes(head[:8], "little") == SESPARSE_CONST_MAGIC:
        return "sesparse"
    return None


def sniff_file(src: RandomAccess) -> str:
    """``sniff`` for a file that is not local: one read of its first 4 KiB."""
    head = src.pread(4096, 0)
    kind = _binary_kind(head)
    if kind is None:
        return ("descriptor" if src.size <= MAX_DESCRIPTOR_BYTES and _descriptor_text(head)
                else "raw")
    return kind


#: Other disk formats, by their magic: (offset, bytes, name).
_FOREIGN = ((0, b"QFI\xfb", "qcow2"), (0, b"QED\0", "QED"), (0, b"vhdxfile", "VHDX"),
            (0, b"conectix", "VHD"), (0x40, b"\x7f\x10\xda\xbe", "VDI"),
            (0, b"LUKS\xba\xbe", "LUKS"), (0, b"WithoutFreeSpace", "Parallels"),
            (0, b"WithouFreSpacExt", "Parallels"))


def foreign_format(path: str) -> str | None:
    """The name of another disk image format ``path`` is in, if it is one qemu-img knows."""
    with open(path, "rb") as f:
        head = f.read(0x44)
        size = f.seek(0, os.SEEK_END)
        tail = b""
        if size >= 512:
            f.seek(size - 512)
            tail = f.read(8)  # a fixed VHD: raw data with a footer
    return _foreign_in(head, tail)


def _foreign_in(head: bytes, tail: bytes) -> str | None:
    """The other format whose magic ``head`` (or, for a fixed VHD, ``tail``) holds."""
    for offset, magic, name in _FOREIGN:
        if head[offset:offset + len(magic)] == magic:
            return name
    return "VHD" if tail == b"conectix" else None


def not_vmdk(path: str) -> str:
    """Why ``path`` (which ``sniff`` calls raw) is no VMDK image, in words a user can act on:
    what it is instead, when that can be told."""
    with open(path, "rb") as f:
        head = f.read(512)
    return _not_vmdk_in(head, foreign_format(path))


def _not_vmdk_in(head: bytes, other: str | None) -> str:
    """``not_vmdk`` for a file whose first 512 bytes are ``head``, of format ``other``."""
    if other:
        return f"a {other} image, not VMDK: convert it with qemu-img first"
    if not head:
        return "an empty file, not a VMDK image"
    if len(head) == 512 and head[257:262] == b"ustar":
        return ("a tar archive (an OVA package?), not a VMDK image: 'vmdk info' shows a "
                "package and 'vmdk convert' reads its disk")
    return "not a VMDK image (no descriptor or known header)"


def _check_openable(path: str) -> None:
    """Refuse what would hang or mislead a reader: pipes, sockets, folders."""
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise UnsupportedFormatError("is a folder, not an image", path)
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        raise UnsupportedFormatError("is a pipe or socket, not an image file", path)


def _looks_like_descriptor(path: str) -> bool:
    try:
        if os.path.getsize(path) > MAX_DESCRIPTOR_BYTES:
            return False
        with open(path, "rb") as f:
            text = f.read(4096)
    except OSError:
        return False
    return _descriptor_text(text)


def _descriptor_text(text: bytes) -> bool:
    """Whether a file beginning with ``text`` is a descriptor."""
    # The text ends at the first NUL, as qemu and VMware read it: qemu pads descriptor files
    # with NULs and, when a rewritten CID is shorter, leaves the old text's tail after the NUL.
    text = text.partition(b"\0")[0]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        return line.replace(b" ", b"").startswith(b"version=")
    return False


class Image:
    """A VMDK image opened for positional I/O."""

    def __init__(self, path: str, descriptor: Descriptor, extents: list[Extent], *,
                 read_only: bool, embedded: SparseExtent | None, parent: Image | None,
                 allow_external: bool, stores_descriptor: bool = True) -> None:
        self.path = path
        self.descriptor = descriptor
        #: False for a bare extent opened on its own: its descriptor was made up here and
        #: has no place in the file (writing it would overwrite the extent's header).
        self.stores_descriptor = stores_descriptor
        self.extents = extents
        self.read_only = read_only
        self.embedded = embedded
        self.parent = parent
        self.allow_external = allow_external
        self._starts: list[int] = []
        pos = 0
        for extent in extents:
            self._starts.append(pos)
            pos += extent.size
        self.size = pos
        self._descriptor_bytes = descriptor.to_bytes()
        self._written = False
        #: The caller accepted that a write drops changed block tracking (see open()).
        self._drop_tracking = False
        self._lock_fds: list[int] = []
        #: Where the files of an image that is no local path are found (None: local).
        self.folder: Folder | None = None
        self.closed = False

    # ------------------------------------------------------------------ open

    @classmethod
    def open(cls, path: str | os.PathLike[str] | IO[bytes], mode: str = "r", *,
             allow_external: bool = False, ignore_cid: bool = False, force_share: bool = False,
             open_parent: bool = True, repair: bool = False,
             drop_change_tracking: bool = False, missing_as_zeros: bool = False,
             share_parents: bool = False, resolver: Resolver | None = None,
             storage_options: dict[str, Any] | None = None,
             _depth: int = 0, _seen: frozenset[str] = frozenset()) -> Image:
        """Open an image; ``force_share`` reads it (and its parents) without locks, and
        ``share_parents`` only its parents (a snapshot made of a parent in use).

        ``path`` may also be a seekable binary file object (borrowed: left open), whose
        other files ``resolver`` opens by name, or a URL read through fsspec with
        ``storage_options``; both open read-only, without locks (see vmdk.remote).
        """
        if is_file_object(path) or is_url(path):
            return cls._open_elsewhere(path, mode, resolver=resolver,
                                       storage_options=storage_options,
                                       allow_external=allow_external, ignore_cid=ignore_cid,
                                       open_parent=open_parent,
                                       missing_as_zeros=missing_as_zeros)
        path = os.fspath(cast("str | os.PathLike[str]", path))
        if force_share and "+" in mode:
            raise ValueError("force_share reads without locks: a writer must hold its lock "
                             "(open with mode 'r' to read an image in use)")
        for attempt in range(REPLACED_RETRIES + 1):
            try:
                with io_errors(path):
                    image = cls._open(path, mode, allow_external=allow_external,
                                      ignore_cid=ignore_cid, force_share=force_share,
                                      open_parent=open_parent, repair=repair,
                                      drop_change_tracking=drop_change_tracking,
                                      missing_as_zeros=missing_as_zeros,
                                      share_parents=share_parents or force_share,
                                      _depth=_depth, _seen=_seen)
            except _Replaced:
                if attempt == REPLACED_RETRIES:
                    raise ImageInUseError("image is in use: it was replaced again and again "
                                          "while being opened", path) from None
                continue
            image._drop_tracking = drop_change_tracking
            log.info("%s: opened for %s: %s, %d bytes, %d extent%s%s", path,
                     "writing" if "+" in mode else "reading", image.create_type, image.size,
                     len(image.extents), "" if len(image.extents) == 1 else "s",
                     f", parent {image.parent.path}" if image.parent is not None else "")
            return image
        raise AssertionError("unreachable")

    @classmethod
    def _open(cls, path: str, mode: str, *, allow_external: bool, ignore_cid: bool,
              force_share: bool, open_parent: bool, repair: bool, drop_change_tracking: bool,
              missing_as_zeros: bool, share_parents: bool, _depth: int,
              _seen: frozenset[str]) -> Image:
        if mode not in ("r", "r+", "rb", "r+b", "rb+"):
            raise ValueError(f"invalid mode {mode!r}: use 'r' or 'r+'")
        read_only = "+" not in mode
        real = os.path.realpath(path)
        if real in _seen:
            raise ChainError("snapshot chain loops back to this image", path)
        if _depth > MAX_CHAIN_DEPTH:
            raise ChainError(f"snapshot chain is deeper than {MAX_CHAIN_DEPTH} images", path)
        _check_openable(path)
        opened = os.stat(path)  # the file read below: still the one under its name, once locked?
        kind = sniff(path)
        embedded: SparseExtent | None = None
        extents: list[Extent] = []
        parent: Image | None = None
        locks: list[int] = []
        try:
            if kind == "sparse":
                embedded = SparseExtent.open(path, read_only=read_only, strict=not repair,
                                             defer_writes=True)
                descriptor = _embedded_descriptor(embedded, path)
            elif kind == "descriptor":
                with open(path, "rb") as f:
                    descriptor = Descriptor.parse(f.read(MAX_DESCRIPTOR_BYTES), filename=path)
            elif kind in ("cowd", "sesparse"):
                descriptor = _synthesize_descriptor(path, kind)
            else:
                raise UnsupportedFormatError(not_vmdk(path), path)
            if canonical_create_type(descriptor.create_type) is None:
                raise UnsupportedFormatError(
                    f"unknown createType {descriptor.create_type!r}", path)
            if not read_only and not drop_change_tracking:
                _refuse_tracked_write(descriptor, path)
            extents = _open_extents(path, descriptor, embedded, read_only, allow_external,
                                    strict=not repair, missing_as_zeros=missing_as_zeros)
            if not force_share:
                locks = _lock_files(path, extents, write=not read_only)
                if not _still_named(path, opened, extents):
                    raise _Replaced
            if open_parent:
                parent = _open_parent(path, descriptor, allow_external, ignore_cid,
                                      _depth, _seen | {real}, share_parents,
                                      missing_as_zeros=missing_as_zeros)
                if (parent is not None and parent.cid != descriptor.parent_cid and not read_only
                        and parent.cid not in pending_parent_cids(descriptor)):
                    raise ChainError(
                        "a snapshot whose parent changed (CID mismatch) opens read-only only",
                        path)
            # Only now, holding the lock and with nothing left to refuse, may opening change
            # a file or call it unclean.
            for extent in extents:
                if not (read_only and force_share and _written_elsewhere(extent)):
                    _warn_if_unclean(extent)
                extent.begin_writing()
        except BaseException:
            # The first failure is the one to report; closing must not stop halfway and
            # keep a lock held.
            _close_quietly(extents, embedded, parent)
            for fd in locks:
                os.close(fd)
            raise
        image = cls(path, descriptor, extents, read_only=read_only, embedded=embedded,
                    parent=parent, allow_external=allow_external,
                    stores_descriptor=_stores_descriptor(kind, embedded))
        image._lock_fds = locks
        return image

    @classmethod
    def _open_elsewhere(cls, where: object, mode: str, *, resolver: Resolver | None,
                        storage_options: dict[str, Any] | None, allow_external: bool,
                        ignore_cid: bool, open_parent: bool, missing_as_zeros: bool) -> Image:
        """An image in a file object or behind a URL: read-only, nothing to lock."""
        name = where if isinstance(where, str) else getattr(where, "name", None)
        if mode in ("r+", "r+b", "rb+"):
            raise UnsupportedFormatError(
                "an image that is not a local file opens read-only: convert it to a local "
                "file to change it", name if isinstance(name, str) else None)
        if mode not in ("r", "rb"):
            raise ValueError(f"invalid mode {mode!r}: use 'r' or 'r+'")
        folder: Folder
        access: RandomAccess
        if isinstance(where, str):
            from .remote import open_url

            folder, access = open_url(where, storage_options)
        else:
            access = FileObjectAccess(cast("IO[bytes]", where))
            folder = ResolverFolder(resolver)
        image = cls._open_in(folder, access, allow_external=allow_external,
                             ignore_cid=ignore_cid, open_parent=open_parent,
                             missing_as_zeros=missing_as_zeros, depth=0, seen=frozenset())
        log.info("%s: opened for reading: %s, %d bytes, %d extent%s%s", image.path,
                 image.create_type, image.size, len(image.extents),
                 "" if len(image.extents) == 1 else "s",
                 f", parent {image.parent.path}" if image.parent is not None else "")
        return image

    @classmethod
    def _open_in(cls, folder: Folder, access: RandomAccess, *, allow_external: bool,
                 ignore_cid: bool, open_parent: bool, missing_as_zeros: bool, depth: int,
                 seen: frozenset[str]) -> Image:
        """Open the image read from ``access``, whose other files ``folder`` finds.

        ``access`` belongs to the image from here on: released with it, or on failure.
        """
        name = access.name
        embedded: SparseExtent | None = None
        extents: list[Extent] = []
        parent: Image | None = None
        try:
            if name in seen:
                raise ChainError("snapshot chain loops back to this image", name)
            if depth > MAX_CHAIN_DEPTH:
                raise ChainError(f"snapshot chain is deeper than {MAX_CHAIN_DEPTH} images", name)
            kind = sniff_file(access)
            if kind == "sparse":
                embedded = SparseExtent.open(name, source=access, defer_writes=True)
                descriptor = _embedded_descriptor(embedded, name)
            elif kind == "descriptor":
                descriptor = Descriptor.parse(access.pread(MAX_DESCRIPTOR_BYTES, 0),
                                              filename=name)
                access.close()
            elif kind in ("cowd", "sesparse"):
                extents = [_open_bare(name, kind, access)]
                descriptor = _synthesize_descriptor(name, kind, extents[0])
            else:
                tail = access.pread(8, access.size - 512) if access.size >= 512 else b""
                head = access.pread(512, 0)
                raise UnsupportedFormatError(_not_vmdk_in(head, _foreign_in(head, tail)), name)
            if canonical_create_type(descriptor.create_type) is None:
                raise UnsupportedFormatError(
                    f"unknown createType {descriptor.create_type!r}", name)
            if not extents:
                extents = _open_extents(name, descriptor, embedded, True, allow_external,
                                        missing_as_zeros=missing_as_zeros, folder=folder)
            if open_parent:
                parent = _open_parent(name, descriptor, allow_external, ignore_cid, depth,
                                      seen | {name}, missing_as_zeros=missing_as_zeros,
                                      folder=folder)
        except BaseException:
            _close_quietly(extents, embedded, parent)
            access.close()  # once more is harmless: a failure may come before an extent has it
            raise
        image = cls(name, descriptor, extents, read_only=True, embedded=embedded,
                    parent=parent, allow_external=allow_external,
                    stores_descriptor=_stores_descriptor(kind, embedded))
        image.folder = folder
        return image

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        # A copy would share open file descriptors that the original closes: refuse, as files do.
        raise TypeError("cannot pickle or copy an open 'Image'")

    # ------------------------------------------------------------- addressing

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[Extent, int, int, int]]:
        """(extent, offset in extent, length, offset in request) covering a request."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRangeError(
                f"request of {length} bytes at offset {offset} is outside the disk of "
                f"{self.size} bytes", self.path)
        done = 0
        i = bisect.bisect_right(self._starts, offset) - 1
        while done < length:
            while self.extents[i].size == 0 or offset + done >= self._starts[i] + self.extents[i].size:
                i += 1
            extent = self.extents[i]
            inner = offset + done - self._starts[i]
            n = min(length - done, extent.size - inner)
            yield extent, inner, n, done
            done += n

    # ------------------------------------------------------------------- read

    def readinto_at(self, offset: int, buf: memoryview | bytearray) -> None:
        view = memoryview(buf).cast("B")
        for extent, inner, n, at in self._pieces(offset, len(view)):
            with io_errors(extent.filename):
                holes = extent.read_into(inner, view[at:at + n])
            for start, count in holes:
                self._fill_hole(offset + at + start, view[at + start:at + start + count])

    def _fill_hole(self, offset: int, view: memoryview) -> None:
        if self.parent is not None and offset < self.parent.size:
            n = min(len(view), self.parent.size - offset)
            self.parent.readinto_at(offset, view[:n])
            if n < len(view):
                zero_fill(view[n:])
        else:
            zero_fill(view)

    def read_at(self, offset: int, length: int) -> bytes:
        if length < 0:
            raise OutOfRangeError(f"negative read length {length}", self.path)
        if length < 64 << 10 or length > READ_SCRATCH:
            buf = bytearray(length)
            self.readinto_at(offset, buf)
            return bytes(buf)
        scratch = getattr(_scratch, "view", None)
        if scratch is None:
            scratch = _scratch.view = memoryview(mmap.mmap(-1, READ_SCRATCH))
        self.readinto_at(offset, scratch[:length])
        return bytes(scratch[:length])

    # ------------------------------------------------------------------ write

    def _check_writable(self) -> None:
        if self.read_only or self.closed:
            raise ReadOnlyError("image is open read-only", self.path)

    def _first_write(self, cid: int | None = None) -> None:
        """Give the image its new CID on disk before the first byte of new content.

        A child opens only when its parentCID matches, so a writer killed at any
        later moment leaves children that know their parent changed (as qemu
        does on its first write).  Once per open.  ``cid`` is the one to take
        when the caller chose it in advance (a commit names it in its child first).
        """
        if self._written:
            return
        self.descriptor.cid = new_cid() if cid is None else cid
        if self._drop_tracking:  # the tracking file no longer tells what changed
            self.descriptor.remove(CHANGE_TRACK_KEY)
        with io_errors(self.path):
            self._write_descriptor(sync=True)
        self._written = True

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_writable()
        view = memoryview(data).cast("B")
        pieces = list(self._pieces(offset, len(view)))  # a refused request changes nothing
        self._first_write()
        for extent, inner, n, at in pieces:
            with io_errors(extent.filename):
                extent.write(inner, view[at:at + n], self._backing_for(extent))

    def write_zeroes_at(self, offset: int, length: int) -> None:
        self._check_writable()
        pieces = list(self._pieces(offset, length))
        self._first_write()
        for extent, inner, n, _at in pieces:
            with io_errors(extent.filename):
                extent.write_zeroes(inner, n, self._backing_for(extent))

    def discard_at(self, offset: int, length: int) -> None:
        """Forget a range (NBD TRIM); without a parent it reads as zeros afterwards."""
        if self.parent is None:
            self.write_zeroes_at(offset, length)

    def _backing_for(self, extent: Extent) -> Any:
        if self.parent is None:
            return None
        start = self._starts[self.extents.index(extent)]

        def backing(inner: int, view: memoryview) -> None:
            self._fill_hole(start + inner, view)

        return backing

    # ----------------------------------------------------------------- status

    def map(self, offset: int = 0, length: int | None = None) -> list[MapRun]:
        """Allocation of the whole chain over a range, as ``qemu-img map`` reports it."""
        if length is None:
            length = self.size - offset
        out: list[MapRun] = []
        for extent, inner, n, at in self._pieces(offset, length):
            base = offset + at - inner
            for run in extent.status(inner, n):
                out.extend(self._map_run(base, run))
        return _merge_map(out)

    def _map_run(self, base: int, run: Run) -> list[MapRun]:
        start = base + run.offset
        if run.alloc is Alloc.DATA:
            return [MapRun(start, run.length, True, False, 0, True, run.host_offset,
                           run.filename, run.compressed)]
        if run.alloc is Alloc.ZERO:
            return [MapRun(start, run.length, False, True, 0, True)]
        if run.alloc is Alloc.HOLE:
            return [MapRun(start, run.length, True, True, 0, True, run.host_offset, run.filename)]
        if self.parent is None or start >= self.parent.size:
            return [MapRun(start, run.length, False, True, 0, False)]
        end = min(start + run.length, self.parent.size)
        below = [dataclasses.replace(r, depth=r.depth + 1)
                 for r in self.parent.map(start, end - start)]
        if end < start + run.length:  # past the parent's end, as qemu reports it: depth 0
            below.append(MapRun(end, start + run.length - end, False, True, 0, False))
        return below

    # ---------------------------------------------------------------- flushing

    def flush(self) -> None:
        if self.read_only or self.closed:
            return
        with io_errors(self.path):
            self._write_descriptor()
        for extent in self.extents:
            with io_errors(extent.filename):
                extent.flush()

    def _write_descriptor(self, sync: bool = False) -> None:
        """Write the descriptor back where it came from, if it changed (``sync``: durably
        now; otherwise the extent's flush syncs it)."""
        data = self.descriptor.to_bytes()
        if data == self._descriptor_bytes or not self.stores_descriptor:
            return
        if self.embedded is not None:
            size = self.embedded.header.descriptor_size * SECTOR_SIZE
            self.embedded.write_descriptor(self.descriptor.to_bytes_padded(size))
            if sync and self.embedded.durable:
                os.fsync(self.embedded.fd)
        else:
            _replace_file(self.path, data)
        self._descriptor_bytes = data

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.flush()
        finally:
            self.closed = True
            try:
                for extent in self.extents:
                    with io_errors(extent.filename):
                        extent.close()
                if self.parent is not None:
                    self.parent.close()
            finally:
                for fd in self._lock_fds:
                    os.close(fd)
                self._lock_fds = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- metadata

    @property
    def create_type(self) -> str:
        return self.descriptor.create_type

    @property
    def cid(self) -> int:
        return self.descriptor.cid

    @property
    def parent_cid(self) -> int:
        return self.descriptor.parent_cid

    @property
    def adapter_type(self) -> str | None:
        return self.descriptor.ddb_get("ddb.adapterType")

    @adapter_type.setter
    def adapter_type(self, value: str) -> None:
        from .create import ADAPTER_TYPES

        if value not in ADAPTER_TYPES:
            raise ValueError(f"adapter type {value!r} is not one of {', '.join(ADAPTER_TYPES)}")
        self.set_metadata("ddb.adapterType", value)

    @property
    def hardware_version(self) -> str | None:
        return self.descriptor.ddb_get("ddb.virtualHWVersion")

    @hardware_version.setter
    def hardware_version(self, value: str) -> None:
        if not str(value).isdigit():
            raise ValueError(f"hardware version {value!r} is not a number")
        self.set_metadata("ddb.virtualHWVersion", str(value))

    @property
    def geometry(self) -> tuple[int, int, int]:
        """Physical (cylinders, heads, sectors); computed as qemu-img does when absent."""
        ddb = self.descriptor
        try:
            c = int(ddb.ddb_get("ddb.geometry.cylinders") or "")
            h = int(ddb.ddb_get("ddb.geometry.heads") or "")
            s = int(ddb.ddb_get("ddb.geometry.sectors") or "")
            if h > 0 and s > 0:
                return c, h, s
        except ValueError:
            pass
        return compute_geometry(self.size, self.adapter_type or "ide")

    def set_geometry(self, cylinders: int, heads: int, sectors: int) -> None:
        """Set the physical geometry (cylinders >= 1, heads 1-255, sectors 1-63)."""
        if not (cylinders >= 1 and 1 <= heads <= 255 and 1 <= sectors <= 63):
            raise ValueError(f"geometry {cylinders}/{heads}/{sectors} is out of range "
                             "(cylinders >= 1, heads 1-255, sectors 1-63)")
        self.set_many_metadata({"ddb.geometry.cylinders": str(cylinders),
                                "ddb.geometry.heads": str(heads),
                                "ddb.geometry.sectors": str(sectors)})

    @property
    def bios_geometry(self) -> tuple[int, int, int] | None:
        d = self.descriptor
        try:
            return (int(d.ddb_get("ddb.geometry.biosCylinders") or ""),
                    int(d.ddb_get("ddb.geometry.biosHeads") or ""),
                    int(d.ddb_get("ddb.geometry.biosSectors") or ""))
        except ValueError:
            return None

    @property
    def bios_translation(self) -> str:
        """"lba" or "none", as the reference derives it from the geometry."""
        c, h, _s = self.geometry
        return "lba" if c >= 1024 or h != 16 else "none"

    def _uuid(self, key: str) -> UUID | None:
        value = self.descriptor.ddb_get(key)
        if not value:
            return None
        try:
            return _as_uuid(value.replace(" ", "").replace("-", ""))
        except ValueError:
            return None

    @property
    def uuid(self) -> UUID | None:
        return self._uuid("ddb.uuid.image") or self._uuid("ddb.uuid")

    @uuid.setter
    def uuid(self, value: UUID) -> None:
        self.set_metadata("ddb.uuid.image", str(_as_uuid(str(value))))  # refuses non-UUIDs

    @property
    def modification_uuid(self) -> UUID | None:
        return self._uuid("ddb.uuid.modification")

    @modification_uuid.setter
    def modification_uuid(self, value: UUID) -> None:
        self.set_metadata("ddb.uuid.modification", str(_as_uuid(str(value))))  # refuses non-UUIDs

    @property
    def parent_uuid(self) -> UUID | None:
        return self._uuid("ddb.uuid.parent")

    @parent_uuid.setter
    def parent_uuid(self, value: UUID) -> None:
        self.set_metadata("ddb.uuid.parent", str(_as_uuid(str(value))))  # refuses non-UUIDs

    @property
    def comment(self) -> str | None:
        """``ddb.comment``, with VirtualBox's escapes (``\\n``, ``\\r``, ``\\\\``) undone."""
        raw = self.descriptor.ddb_get("ddb.comment")
        return None if raw is None else decode_comment(raw)

    @comment.setter
    def comment(self, value: str) -> None:
        self.set_metadata("ddb.comment", encode_comment(value))

    def set_metadata(self, key: str, value: str) -> None:
        """Set a disk database key (``ddb.`` is added when missing).

        Raises DescriptorSpaceError at once, changing nothing, when the descriptor
        would no longer fit the space embedded in the extent.
        """
        self.set_many_metadata({key: value})

    def set_many_metadata(self, items: dict[str, str]) -> None:
        """Set several disk database keys together: all of them, or none."""
        self._check_writable()
        before = self.descriptor.copy()
        try:
            for key, value in items.items():
                self.descriptor.ddb_set(key if key.startswith("ddb.") else "ddb." + key, value)
            if self.embedded is not None:
                self.descriptor.to_bytes_padded(self.embedded.header.descriptor_size * SECTOR_SIZE)
        except BaseException:
            self.descriptor = before
            raise

    @property
    def dirty(self) -> bool:
        return any(isinstance(e, SparseExtent) and e.header.unclean_shutdown for e in self.extents)

    @property
    def cluster_size(self) -> int | None:
        sizes = [getattr(e, "grain_bytes", None) for e in self.extents]
        known = [s for s in sizes if s]
        return known[0] if known else None

    def actual_size(self) -> int:
        if self.folder is not None:  # no blocks to count: the files' sizes
            return _stored_size(self)
        seen: set[str] = {self.path}
        total = _allocated(self.path)
        for extent in self.extents:
            if extent.filename and extent.filename not in seen:
                seen.add(extent.filename)
                total += extent.allocated_bytes
        return total

    def info(self) -> dict[str, Any]:
        """What ``vmdk info --output=json`` prints, with qemu-img's keys where it has them."""
        compressed = any(getattr(e, "compressed", False) for e in self.extents)
        data: dict[str, Any] = {
            "cid": self.cid,
            "parent-cid": self.parent_cid,
            "create-type": self.create_type,
            "extents": [self._extent_info(e, line)
                        for e, line in zip(self.extents, self.descriptor.extents)],
        }
        hint = self.descriptor.parent_file_name_hint
        if hint:
            data["parent-filename-hint"] = hint
        out: dict[str, Any] = {
            "filename": self.path,
            "format": "vmdk",
            "virtual-size": self.size,
            "actual-size": self.actual_size(),
            "dirty-flag": self.dirty,
            "format-specific": {"type": "vmdk", "data": data},
            "compressed": compressed,
        }
        if self.cluster_size:
            out["cluster-size"] = self.cluster_size
        if hint and self.descriptor.parent_cid != NO_PARENT_CID:
            # Shown whether or not the parent opens (or exists), as qemu-img info does.
            out["backing-filename"] = hint
            full = self.parent.path if self.parent is not None else self.parent_path()
            if full is not None:
                out["full-backing-filename"] = full
            out["backing-filename-format"] = "vmdk"
        c, h, s = self.geometry
        out["geometry"] = {"cylinders": c, "heads": h, "sectors": s}
        for key, value in (("adapter-type", self.adapter_type),
                           ("hardware-version", self.hardware_version),
                           ("uuid", self.uuid), ("parent-uuid", self.parent_uuid),
                           ("modification-uuid", self.modification_uuid),
                           ("comment", self.comment)):
            if value is not None:
                out[key] = str(value)
        return out

    def parent_path(self) -> str | None:
        """Where the parent named by ``parentFileNameHint`` is, whether or not it was opened
        (or exists); None without a parent or when the name may not be followed."""
        hint = self.descriptor.parent_file_name_hint
        if self.descriptor.parent_cid == NO_PARENT_CID or not hint:
            return None
        try:
            found = find_parent(self.path, hint, allow_external=self.allow_external,
                                folder=self.folder)
            if found is not None or self.folder is not None:
                return found
            return resolve_extent_path(self.path, hint, allow_external=self.allow_external)
        except UnsafePathError:
            return None

    def _extent_info(self, extent: Extent, line: ExtentLine) -> dict[str, Any]:
        """An extent as qemu-img info shows it: its file named as the descriptor names it
        (beside the image's path as given), its kind as the descriptor's line says."""
        info = dict(extent.info())
        info.setdefault("format", type(extent).__name__)
        if line.filename:
            info["filename"] = (self.path if self.embedded is not None else
                                os.path.join(os.path.dirname(self.path), line.filename))
        if line.type in ("VMFS", "VMFSRDM", "VMFSRAW"):
            info["format"] = line.type
        return info

    def chain(self) -> list[Image]:
        images: list[Image] = []
        node: Image | None = self
        while node is not None:
            images.append(node)
            node = node.parent
        return images


_COMMENT_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r"}


def _as_uuid(text: str) -> UUID:
    import uuid  # on first use: it costs 4 ms at start-up (it imports platform)

    return uuid.UUID(text)


def encode_comment(text: str) -> str:
    """Escape a free-text comment for one descriptor line, as VirtualBox writes ddb.comment.

    A double quote cannot be escaped in the format and is refused (DescriptorError).
    """
    return "".join(_COMMENT_ESCAPES.get(ch, ch) for ch in text)


def decode_comment(raw: str) -> str:
    out: list[str] = []
    chars = iter(raw)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            out.append({"n": "\n", "r": "\r", "\\": "\\"}.get(nxt, "\\" + nxt))
        else:
            out.append(ch)
    return "".join(out)


def _merge_map(runs: list[MapRun]) -> list[MapRun]:
    out: list[MapRun] = []
    for run in runs:
        if out:
            last = out[-1]
            same = (last.data, last.zero, last.depth, last.present, last.filename,
                    last.compressed) == (run.data, run.zero, run.depth, run.present,
                                         run.filename, run.compressed)
            contiguous = (last.offset is None and run.offset is None) or (
                last.offset is not None and run.offset is not None
                and last.offset + last.length == run.offset)
            if same and contiguous and last.start + last.length == run.start:
                out[-1] = dataclasses.replace(last, length=last.length + run.length)
                continue
        out.append(run)
    return out


def compute_geometry(size: int, adapter: str) -> tuple[int, int, int]:
    """Cylinders/heads/sectors as qemu-img writes them: 16 heads for IDE, else 255."""
    heads = 16 if adapter == "ide" else 255
    sectors = 63
    cylinders = size // (heads * sectors * SECTOR_SIZE)
    return cylinders, heads, sectors


def _stored_size(image: Image) -> int:
    """The bytes of an image's files that are not local: their sizes, each file once."""
    sizes: dict[str, int] = {}
    for extent in image.extents:
        src = getattr(extent, "src", getattr(extent, "_src", None))
        if extent.filename and isinstance(src, RandomAccess):
            sizes[extent.filename] = file_size(src)
    if image.embedded is None:
        sizes.setdefault(image.path, len(image._descriptor_bytes))
    return sum(sizes.values())


def _allocated(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def _replace_file(path: str, data: bytes) -> None:
    """Rewrite a small descriptor file in place.

    In place, not by rename: the file's locks live on its inode, and a new inode
    would silently drop them.  A descriptor is a few hundred bytes, written in
    one call before the file is cut to length.
    """
    fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        # A shorter text is NUL-padded over the old one: killed before the cut, the file
        # reads as the new text (readers stop at the first NUL), not with the old one's tail.
        pwrite_all(fd, data + bytes(max(0, os.fstat(fd).st_size - len(data))), 0)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)


def _embedded_descriptor(extent: SparseExtent, path: str) -> Descriptor:
    raw = extent.read_descriptor()
    if raw is None or not raw.strip():
        if raw is not None and extent.header.descriptor_size:
            raise DescriptorError("embedded descriptor is empty", path)
        return _synthesize_descriptor(path, "sparse", extent)
    return Descriptor.parse(raw, filename=path)


def _synthesize_descriptor(path: str, kind: str, extent: Extent | None = None) -> Descriptor:
    """A descriptor for a bare extent file opened on its own (split part, ESX delta);
    ``extent`` is the file opened already (a sparse one always is)."""
    name = os.path.basename(path)
    if isinstance(extent, SparseExtent):
        compressed = extent.header.has(SparseFlags.COMPRESSED)
        line = ExtentLine("RW", extent.header.capacity, "SPARSE", name, None)
        create_type = "streamOptimized" if compressed else "monolithicSparse"
    else:
        if extent is None:
            extent = _open_bare(path, kind)
            try:
                sectors = extent.size // SECTOR_SIZE
            finally:
                extent.close()
        else:
            sectors = extent.size // SECTOR_SIZE
        cowd = kind == "cowd"
        line = ExtentLine("RW", sectors, "VMFSSPARSE" if cowd else "SESPARSE", name, None)
        create_type = "vmfsSparse" if cowd else "seSparse"
    return Descriptor.new(create_type, [line], cid=0xFFFFFFFE)


def _open_bare(path: str, kind: str, source: RandomAccess | None = None) -> Extent:
    """An ESX delta ("cowd" or "sesparse") file opened read-only on its own."""
    if kind == "cowd":
        from .extents.cowd import CowdExtent

        return CowdExtent.open(path, source=source)
    from .extents.sesparse import SESparseExtent

    return SESparseExtent.open(path, source=source)


def _named_by_bytes(folder: str, name: str, target: str) -> tuple[str, str]:
    """A descriptor that names no encoding and is not UTF-8 is read as latin-1 (Windows
    tools wrote cp1252); a name in it may still be the raw bytes of a file name that is
    not UTF-8.  Where the name as text finds no file, the same bytes as a file name may."""
    try:
        raw = name.encode("latin-1")
    except UnicodeEncodeError:
        return name, target
    other = os.fsdecode(raw)
    found = os.path.normpath(os.path.join(folder, other))
    return (other, found) if other != name and os.path.lexists(found) else (name, target)


def _close_quietly(extents: list[Extent], embedded: SparseExtent | None,
                   parent: Image | None) -> None:
    """Close what a failed open had opened; a second failure must not hide the first."""
    for extent in extents + ([embedded] if embedded and embedded not in extents else []):
        with contextlib.suppress(Exception):
            extent.close()
    if parent is not None:
        with contextlib.suppress(Exception):
            parent.close()


def _stores_descriptor(kind: str, embedded: SparseExtent | None) -> bool:
    """Whether the image has a place for its descriptor (a file of its own, or the area
    embedded in a monolithic sparse file); a bare extent's is made up and not written."""
    return kind == "descriptor" or (embedded is not None and bool(
        embedded.header.descriptor_offset and embedded.header.descriptor_size))


#: What allow_external does for a name outside the image's folder.
_TRUST_IT = ("allow_external", "trusts it")


def resolve_extent_path(image_path: str, name: str, *, allow_external: bool) -> str:
    """Where an extent or parent named in a descriptor lives; refuses escapes by default."""
    folder = os.path.dirname(os.path.abspath(image_path))
    if "\0" in name:
        raise UnsafePathError(f"file name {name!r} contains a NUL byte", image_path)
    target = os.path.normpath(os.path.join(folder, name))
    if not os.path.lexists(target):
        name, target = _named_by_bytes(folder, name, target)
    if allow_external:
        return target
    if os.path.isabs(name):
        raise UnsafePathError(f"refers to the absolute path {name!r}", image_path,
                              opt_in=_TRUST_IT)
    real_folder = os.path.realpath(folder)
    real = os.path.realpath(target)
    if os.path.commonpath([real_folder, real]) != real_folder:
        raise UnsafePathError(f"refers to {name!r}, outside the image's folder", image_path,
                              opt_in=_TRUST_IT)
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        return target
    if not stat.S_ISREG(mode):
        raise UnsafePathError(f"refers to {name!r}, which is not a regular file", image_path,
                              opt_in=_TRUST_IT)
    return target


def _open_extents(path: str, descriptor: Descriptor, embedded: SparseExtent | None,
                  read_only: bool, allow_external: bool, strict: bool = True,
                  missing_as_zeros: bool = False, folder: Folder | None = None) -> list[Extent]:
    lines = descriptor.extents
    if embedded is not None:
        # A monolithic file is its own extent, whatever name the descriptor still carries
        # (renamed files are common).
        if len(lines) != 1 or lines[0].type != "SPARSE":
            raise UnsupportedFormatError(
                "a sparse file with an embedded descriptor must describe exactly one "
                "SPARSE extent", path)
        if lines[0].sectors > embedded.header.capacity:
            raise DescriptorError(
                f"extent of {lines[0].sectors} sectors is larger than the sparse capacity "
                f"{embedded.header.capacity}", path)
        embedded.size = _sparse_size(lines[0], embedded)
        return [embedded]
    extents: list[Extent] = []
    tables = TableCache()  # one budget for the grain tables of all the image's extents
    named: dict[tuple[int, int], str] = {}
    try:
        for line in lines:
            if folder is None:
                extent = _open_extent(path, line, descriptor, read_only, allow_external,
                                      strict, missing_as_zeros, tables)
            else:
                extent = _open_extent_in(folder, path, line, descriptor, allow_external,
                                         missing_as_zeros, tables)
            extents.append(extent)
            _refuse_second_naming(path, extent, named)
    except BaseException:
        for extent in extents:
            extent.close()
        raise
    return extents


def _refuse_second_naming(path: str, extent: Extent, named: dict[tuple[int, int], str]) -> None:
    """A file with its own allocation map (not flat) holds one extent: named twice, every
    read and write of one line would land in the other's data too."""
    fd = getattr(extent, "fd", getattr(extent, "_fd", getattr(extent, "_src", None)))
    if isinstance(extent, (FlatExtent, ZeroExtent)) or not isinstance(fd, int) or fd < 0:
        return
    st = os.fstat(fd)
    first = named.setdefault((st.st_dev, st.st_ino), extent.filename or "")
    if first != extent.filename:
        raise DescriptorError(
            f"extent file {os.path.basename(extent.filename or '')!r} is named more than once "
            f"(also as {os.path.basename(first)!r}): a sparse extent can back one line only",
            path)


def _open_extent(path: str, line: ExtentLine, descriptor: Descriptor, read_only: bool,
                 allow_external: bool, strict: bool = True,
                 missing_as_zeros: bool = False, tables: TableCache | None = None) -> Extent:
    ro = read_only or line.access != "RW"
    if line.type == "ZERO":
        return ZeroExtent(line.sectors)
    if line.filename is None:
        raise DescriptorError(f"{line.type} extent has no file name", path)
    raw_device = (canonical_create_type(descriptor.create_type) in RAW_DEVICE_TYPES
                  or line.type in ("VMFSRDM", "VMFSRAW"))
    target = resolve_extent_path(path, line.filename, allow_external=allow_external)
    if raw_device and not allow_external and not os.path.isfile(target):
        raise UnsafePathError(f"raw-disk extent {line.filename!r} names a device", path,
                              opt_in=("allow_external", "opens it"))
    if line.type in ("FLAT", "VMFS", "VMFSRDM", "VMFSRAW"):
        return FlatExtent(target, line.sectors, line.offset or 0, read_only=ro,
                          missing_as_zeros=missing_as_zeros)
    kind = sniff(target) if os.path.exists(target) else "missing"
    if kind == "missing":
        raise MissingExtentError(f"extent file {line.filename!r} does not exist", path)
    if kind == "sparse":
        sparse = SparseExtent.open(target, read_only=ro, nominal_sectors=line.sectors,
                                   strict=strict, defer_writes=True, table_cache=tables)
        sparse.size = _sparse_size(line, sparse)
        return sparse
    if kind == "cowd":
        from .extents.cowd import CowdExtent

        return CowdExtent.open(target, read_only=ro, nominal_sectors=line.sectors,
                               defer_writes=True)
    if kind == "sesparse":
        from .extents.sesparse import SESparseExtent

        if not ro:
            raise UnsupportedFormatError("seSparse extents can only be opened read-only", target)
        return SESparseExtent.open(target, nominal_sectors=line.sectors)
    raise UnsupportedFormatError(f"{line.type} extent {line.filename!r} has no known header", path)


def _open_extent_in(folder: Folder, path: str, line: ExtentLine, descriptor: Descriptor,
                    allow_external: bool, missing_as_zeros: bool,
                    tables: TableCache) -> Extent:
    """``_open_extent`` for an image that is no local path: its extent files are found
    by ``folder``, under the same rules, and opened read-only."""
    if line.type == "ZERO":
        return ZeroExtent(line.sectors)
    if line.filename is None:
        raise DescriptorError(f"{line.type} extent has no file name", path)
    if (canonical_create_type(descriptor.create_type) in RAW_DEVICE_TYPES
            or line.type in ("VMFSRDM", "VMFSRAW")):
        raise UnsupportedFormatError(f"raw-disk extent {line.filename!r} names a device, "
                                     "which only an image on this machine can read", path)
    target = folder.locate(path, line.filename, allow_external=allow_external)
    access = folder.open(target)
    try:
        if line.type in ("FLAT", "VMFS"):
            return FlatExtent(target, line.sectors, line.offset or 0,
                              missing_as_zeros=missing_as_zeros, source=access)
        kind = sniff_file(access)
        if kind == "sparse":
            sparse = SparseExtent.open(target, nominal_sectors=line.sectors, defer_writes=True,
                                       table_cache=tables, source=access)
            sparse.size = _sparse_size(line, sparse)
            return sparse
        if kind == "cowd":
            from .extents.cowd import CowdExtent

            return CowdExtent.open(target, nominal_sectors=line.sectors, source=access)
        if kind == "sesparse":
            from .extents.sesparse import SESparseExtent

            return SESparseExtent.open(target, nominal_sectors=line.sectors, source=access)
    except BaseException:
        access.close()
        raise
    access.close()
    raise UnsupportedFormatError(f"{line.type} extent {line.filename!r} has no known header", path)


CHANGE_TRACK_KEY = "changeTrackPath"


#: The way to write a tracked image anyway, and what it costs.
_DROP_TRACKING = ("drop_change_tracking",
                  "writes and drops the tracking (the next backup must then be a full one)")


def _refuse_tracked_write(descriptor: Descriptor, path: str) -> None:
    """Writes would leave VMware's changed block tracking stale: backups would miss them."""
    tracking = descriptor.get(CHANGE_TRACK_KEY)
    if tracking:
        raise UnsupportedFormatError(
            f"the image has changed block tracking (changeTrackPath {tracking!r}), which this "
            "package cannot update: a write would leave the tracking file stale and the next "
            "incremental backup would miss the change. Read it, or convert it to a new image "
            "('vmdk convert')", path,
            opt_in=_DROP_TRACKING)


def _sparse_size(line: ExtentLine, extent: SparseExtent) -> int:
    """A hosted sparse extent is as large as its header's capacity, as qemu reads it.

    A line may lag behind it only: a resize writes the two one after the other,
    and killed in between, both tools then report one size.
    """
    return max(line.sectors, extent.header.capacity) * SECTOR_SIZE


#: How often an open starts again when the image was replaced while it was being opened.
REPLACED_RETRIES = 3


class _Replaced(Exception):
    """The files opened are no longer the ones under their names (see _still_named)."""


def _still_named(path: str, opened: os.stat_result, extents: list[Extent]) -> bool:
    """Whether the image file and every extent opened are still the files under their names.

    A replacement (convert or create over an image) holds the old files' write locks
    until it renames the new ones into place: an opener that opened the old files
    just before the rename and locked them just after would otherwise go on writing
    files that no longer have a name.
    """
    files = [(path, opened)]
    for extent in extents:
        fd = getattr(extent, "fd", None)
        if extent.filename and isinstance(fd, int):
            files.append((extent.filename, os.fstat(fd)))
    for name, known in files:
        try:
            now = os.stat(name)
        except FileNotFoundError:
            return False
        if (now.st_dev, now.st_ino) != (known.st_dev, known.st_ino):
            return False
    return True


def _warn_if_unclean(extent: Extent) -> None:
    warn = getattr(extent, "warn_if_unclean", None)
    if warn is not None:
        warn()


def _written_elsewhere(extent: Extent) -> bool:
    """A writer holds the file (a set unclean flag then means in use, not crashed)."""
    from ._lock import writer_elsewhere

    fd = getattr(extent, "fd", None)
    return isinstance(fd, int) and fd >= 0 and writer_elsewhere(fd)


def _lock_files(path: str, extents: list[Extent], *, write: bool) -> list[int]:
    """Lock the descriptor and every extent file through descriptors kept for that purpose."""
    from ._lock import lock_image_file

    fds: list[int] = []
    # One lock per file, however many names it has: a bare extent opened on its own is
    # also "the image", hard links are one file, and two open file descriptions of one
    # file would refuse each other (and each more lock on one file makes every lock test
    # and close on it slower).
    seen: set[tuple[int, int]] = set()
    try:
        for name in [path] + [e.filename for e in extents if e.filename]:
            fd = os.open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in seen:
                os.close(fd)
                continue
            seen.add((st.st_dev, st.st_ino))
            fds.append(fd)
            lock_image_file(fd, name, write=write)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def pending_parent_cids(descriptor: Descriptor) -> set[int]:
    """The CIDs a parent may carry while a commit into it is unfinished (see chain.commit).

    Every range a commit copies is still stored in the child, so the child reads
    the same under any of them; any other CID than its parentCID is refused.
    """
    out: set[int] = set()
    for word in (descriptor.ddb_get(PENDING_PARENT_CID_KEY) or "").split():
        with contextlib.suppress(ValueError):
            out.add(int(word, 16))
    return out - {NO_PARENT_CID}


def find_parent(path: str, hint: str, *, allow_external: bool,
                folder: Folder | None = None) -> str | None:
    """The file a child at ``path`` finds as its parent through ``hint`` (its
    parentFileNameHint), or None when there is none; UnsafePathError as for extents.
    ``folder`` finds the files of a child that is no local path."""
    candidates = [hint]
    base = hint.replace("\\", "/").rsplit("/", 1)[-1]
    if base != hint:
        candidates.insert(0, base)  # Windows and absolute hints: try next to the child first
    for name in candidates:
        try:
            resolved = (resolve_extent_path(path, name, allow_external=allow_external)
                        if folder is None else
                        folder.locate(path, name, allow_external=allow_external))
        except UnsafePathError:
            if name is candidates[-1]:
                raise
            continue
        if os.path.exists(resolved) if folder is None else folder.exists(resolved):
            return resolved
    return None


def _open_parent(path: str, descriptor: Descriptor, allow_external: bool, ignore_cid: bool,
                 depth: int, seen: frozenset[str], force_share: bool = False, *,
                 missing_as_zeros: bool = False, folder: Folder | None = None) -> Image | None:
    hint = descriptor.parent_file_name_hint
    if descriptor.parent_cid == NO_PARENT_CID or not hint:
        return None
    target = find_parent(path, hint, allow_external=allow_external, folder=folder)
    if target is None:
        raise ChainError(f"parent image {hint!r} was not found", path)
    if folder is not None:
        parent = Image._open_in(folder, folder.open(target), allow_external=allow_external,
                                ignore_cid=ignore_cid, open_parent=True,
                                missing_as_zeros=missing_as_zeros, depth=depth + 1, seen=seen)
    else:
        parent = Image.open(target, "r", allow_external=allow_external, ignore_cid=ignore_cid,
                            force_share=force_share, missing_as_zeros=missing_as_zeros,
                            _depth=depth + 1, _seen=seen)
    if parent.cid != descriptor.parent_cid and parent.cid in pending_parent_cids(descriptor):
        log.warning("%s: a commit into its parent %r was interrupted; this image reads as it "
                    "did before, and 'vmdk commit' on it again finishes the commit", path, target)
    elif parent.cid != descriptor.parent_cid and not ignore_cid:
        parent.close()
        raise ChainError(
            f"parentCID {descriptor.parent_cid:08x} does not match the CID {parent.cid:08x} of "
            f"parent {target!r}: the parent changed after this snapshot was taken", path,
            opt_in=("ignore_cid", "opens it anyway, read-only"))
    return parent


__all__ = ["Image", "MapRun", "VmdkError", "compute_geometry", "resolve_extent_path", "sniff"]
