"""The error tree of the package.

Every fault found in an image is raised as a subclass of :class:`VmdkError`
whose message starts with the file it concerns, so a user reading one line
knows where to look.  Plain ``OSError`` from the operating system (a missing
permission, a full disk) is left alone unless a layer can add which image
file it concerns.
"""

from __future__ import annotations

import os


class VmdkError(Exception):
    """Base of every error this package raises on purpose."""

    def __init__(self, message: str, filename: str | os.PathLike[str] | None = None) -> None:
        self.filename = os.fspath(filename) if filename is not None else None
        self.reason = message
        self.message = f"{self.filename}: {message}" if self.filename else message
        super().__init__(self.message)

    def __str__(self) -> str:
        # OSError-derived leaves would otherwise format themselves as "[Errno None] ...".
        return self.message


class CorruptImageError(VmdkError):
    """The image's structures contradict themselves or the file."""


class InvalidHeaderError(CorruptImageError):
    """A binary header (KDMV, COWD, seSparse, marker) is malformed."""


class DescriptorError(CorruptImageError):
    """The text descriptor cannot be parsed; ``line`` is 1-based when known."""

    def __init__(
        self,
        message: str,
        filename: str | os.PathLike[str] | None = None,
        line: int | None = None,
    ) -> None:
        self.line = line
        if line is not None:
            message = f"line {line}: {message}"
        super().__init__(message, filename)


class UnsupportedFormatError(VmdkError):
    """The file is valid but uses a kind or feature this package does not handle."""


class ReadOnlyError(VmdkError, PermissionError):
    """A write was attempted on an image (or extent) opened or declared read-only."""


class OutOfRangeError(VmdkError, ValueError):
    """An I/O request reaches past the end of the virtual disk."""


class MissingExtentError(VmdkError, FileNotFoundError):
    """A file the image needs does not exist: the image itself, an extent or a parent."""


class ImageExistsError(VmdkError, FileExistsError):
    """Creating would replace an existing file and overwriting was not asked for."""


class UnsafePathError(VmdkError, PermissionError):
    """A descriptor names a file outside the image's folder or a device."""


class ChainError(VmdkError):
    """A snapshot chain is broken: missing parent, CID mismatch, loop or too deep."""


class ImageInUseError(VmdkError, BlockingIOError):
    """Another process holds a conflicting lock on the image."""


class DescriptorSpaceError(VmdkError):
    """An edited descriptor no longer fits the area reserved for it in the extent."""


class ImageIOError(VmdkError, OSError):
    """The operating system failed an I/O on one of the image's files (EIO, ENOSPC...).

    ``errno`` is the system's error number, so callers can test for ENOSPC.
    """

    def __init__(self, message: str, filename: str | os.PathLike[str] | None = None,
                 errno: int | None = None) -> None:
        super().__init__(message, filename)
        self.errno = errno
