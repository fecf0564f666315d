"""Positional reads from what is not a local file: file objects and remote files.

Local files are read through their descriptors with ``os.pread``, as they always
were: nothing here stands between a local read and the kernel.  Everything else
an image can live in (a file object handed in, an object in a bucket, a file
behind a web server) is a :class:`RandomAccess`, and the read helpers of the
extents take either (:data:`Readable`).

A :class:`Folder` finds the other files an image names (extents, parents) where
the image itself was found, under the same rules as local files: a name may not
lead out of the image's folder unless ``allow_external`` trusts it.
"""

from __future__ import annotations

import abc
import os
import posixpath
import re
import threading
from collections.abc import Callable
from typing import IO

from .errors import ImageIOError, MissingExtentError, UnsafePathError, UnsupportedFormatError


class RandomAccess(abc.ABC):
    """A read-only file of ``size`` bytes, read at any offset from any thread."""

    #: How the file is named in messages (a URL, a file object's name).
    name: str
    size: int
    #: How many reads of it are worth running side by side (a copy reads that many
    #: chunks ahead): one for a file object, several for a file behind a URL.
    parallel_reads = 1

    @abc.abstractmethod
    def readinto(self, buf: memoryview, offset: int) -> int:
        """Fill ``buf`` from ``offset``; returns the bytes read, fewer only at the end."""

    def read_pieces(self, pieces: list[tuple[memoryview, int]]) -> list[int]:
        """Fill each (buffer, offset); returns the bytes read into each.  Remote files
        fetch neighbouring pieces together; the default reads them one by one."""
        return [self.readinto(buf, offset) for buf, offset in pieces]

    def pread(self, n: int, offset: int) -> bytes:
        """Up to ``n`` bytes from ``offset`` (fewer at the end of the file)."""
        buf = bytearray(max(0, min(n, self.size - offset)))
        got = self.readinto(memoryview(buf), offset) if buf else 0
        return bytes(buf[:got])

    def close(self) -> None:
        """Let go of the file (a borrowed file object is left open)."""


#: A local file's descriptor, or anything else to read from.
Readable = int | RandomAccess


def pread(src: Readable, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes at ``offset`` of a descriptor or a RandomAccess."""
    if isinstance(src, int):
        return os.pread(src, n, offset)
    return src.pread(n, offset)


def file_size(src: Readable) -> int:
    """The size in bytes of a file (a device's too, where fstat says 0)."""
    if isinstance(src, int):
        return os.lseek(src, 0, os.SEEK_END)
    return src.size


def release(src: Readable) -> None:
    """Close a descriptor, or let go of a RandomAccess."""
    if isinstance(src, int):
        os.close(src)
    else:
        src.close()


class FileObjectAccess(RandomAccess):
    """A seekable binary file object (``open(..., "rb")``, ``io.BytesIO``, ``gzip.open``...).

    File objects keep one position: reads from several threads take turns.  The
    object is closed with the image only when ``owned`` (one a resolver opened);
    one handed in by the caller is borrowed and left open, as ``gzip.open`` does.
    """

    def __init__(self, f: IO[bytes], name: str | None = None, *, owned: bool = False) -> None:
        if not _is_readable(f):
            raise UnsupportedFormatError("a file object needs read() and seek() to be "
                                         "opened as an image", _object_name(f))
        self._f = f
        self.name = name or _object_name(f)
        self._owned = owned
        self._lock = threading.Lock()
        try:
            self.size = f.seek(0, os.SEEK_END)
        except (OSError, ValueError) as exc:  # io.UnsupportedOperation is both
            raise UnsupportedFormatError("the file object cannot seek: an image is read at "
                                         "random, not front to back", self.name) from exc

    def readinto(self, buf: memoryview, offset: int) -> int:
        done = 0
        with self._lock:
            self._f.seek(offset)
            while done < len(buf):
                n = _readinto(self._f, buf[done:])
                if not n:
                    break
                done += n
        return done

    def close(self) -> None:
        if self._owned:
            self._f.close()


def _readinto(f: IO[bytes], view: memoryview) -> int:
    readinto = getattr(f, "readinto", None)
    if readinto is not None:
        n = readinto(view)
        return int(n or 0)
    data = f.read(len(view))
    view[:len(data)] = data
    return len(data)


def _is_readable(f: object) -> bool:
    return callable(getattr(f, "read", None)) and callable(getattr(f, "seek", None))


def is_file_object(obj: object) -> bool:
    """Whether ``obj`` is a file object rather than a path."""
    return not isinstance(obj, (str, bytes, os.PathLike)) and _is_readable(obj)


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: object) -> bool:
    """Whether ``path`` is a URL ("https://...", "s3://..."), read through fsspec."""
    return isinstance(path, str) and _URL.match(path) is not None


def _object_name(f: object) -> str:
    name = getattr(f, "name", None)
    return name if isinstance(name, str) and name else f"<{type(f).__name__}>"


class Folder(abc.ABC):
    """Where an image that is not a local path finds the files its descriptor names."""

    #: As RandomAccess.parallel_reads, for the files found here.
    parallel_reads = 1

    @abc.abstractmethod
    def locate(self, image: str, name: str, *, allow_external: bool) -> str:
        """The full name of the file ``name`` that ``image`` refers to; UnsafePathError
        for a name leading out of the image's folder unless ``allow_external``."""

    @abc.abstractmethod
    def open(self, name: str) -> RandomAccess:
        """The file ``name`` (as ``locate`` gave it); MissingExtentError when absent."""

    @abc.abstractmethod
    def exists(self, name: str) -> bool:
        """Whether the file ``name`` (as ``locate`` gave it) exists."""


#: What allow_external does for a name outside the image's folder.
TRUST_IT = ("allow_external", "trusts it")


def relative_target(folder: str, image: str, name: str, *, allow_external: bool) -> str:
    """``name`` joined to ``folder`` with "/" separators, refusing names that leave it
    (absolute, or through "..") unless ``allow_external``: a remote image's rules are
    a local one's (see image.resolve_extent_path)."""
    if "\0" in name:
        raise UnsafePathError(f"file name {name!r} contains a NUL byte", image)
    if name.startswith("/"):
        if allow_external:
            return posixpath.normpath(name).lstrip("/")
        raise UnsafePathError(f"refers to the absolute path {name!r}", image, opt_in=TRUST_IT)
    target = posixpath.normpath(posixpath.join(folder, name)) if folder else (
        posixpath.normpath(name))
    if folder:
        inside = target == folder or target.startswith(folder + "/")
    else:
        inside = target != ".." and not target.startswith("../")
    if not inside and not allow_external:
        raise UnsafePathError(f"refers to {name!r}, outside the image's folder", image,
                              opt_in=TRUST_IT)
    return target


#: Opens a file that an image handed in as a file object names (relative to the image).
Resolver = Callable[[str], IO[bytes]]


class ResolverFolder(Folder):
    """The files named by an image opened from a file object, opened by a caller's function.

    The resolver gets the name as the descriptor gives it, made relative and checked
    as a local name is; what it returns is closed with the image.  Without a resolver,
    only one-file images open.
    """

    def __init__(self, resolver: Resolver | None) -> None:
        self.resolver = resolver

    def locate(self, image: str, name: str, *, allow_external: bool) -> str:
        return relative_target("", image, name, allow_external=allow_external)

    def open(self, name: str) -> RandomAccess:
        if self.resolver is None:
            raise MissingExtentError("an image opened from a file object names this file, "
                                     "and no resolver was given to open it", name)
        try:
            f = self.resolver(name)
        except FileNotFoundError as exc:
            raise MissingExtentError("the resolver found no such file", name) from exc
        except OSError as exc:
            raise ImageIOError(exc.strerror or str(exc), name, errno=exc.errno) from exc
        return FileObjectAccess(f, name, owned=True)

    def exists(self, name: str) -> bool:
        try:
            self.open(name).close()
        except (MissingExtentError, FileNotFoundError):
            return False
        return True
