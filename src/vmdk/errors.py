"""The error tree of the package.

Every fault found in an image is raised as a subclass of :class:`VmdkError`
whose message starts with the file it concerns, so a user reading one line
knows where to look.  Plain ``OSError`` from the operating system (a missing
permission, a full disk) is left alone unless a layer can add which image
file it concerns.
"""

from __future__ import annotations

import copy
import errno
import os


class VmdkError(Exception):
    """Base of every error this package raises on purpose.

    ``opt_in`` names the keyword argument that would let the refused thing through
    (``allow_external``, ``ignore_cid``..., or with its value: ``partitions=[1, 5]``)
    and what it does; the message ends with it in Python's spelling, and
    :meth:`with_flags` spells it as a command line does.
    """

    def __init__(self, message: str, filename: str | os.PathLike[str] | None = None, *,
                 opt_in: tuple[str, str] | None = None) -> None:
        self.filename = os.fspath(filename) if filename is not None else None
        self.opt_in = opt_in
        self.reason = message
        self.message = self._with(message, _python_spelling(opt_in[0]) if opt_in else None)
        super().__init__(self.message)

    def _with(self, reason: str, spelled: str | None) -> str:
        if spelled is not None and self.opt_in is not None:
            reason = f"{reason}; {spelled} {self.opt_in[1]}"
        return f"{self.filename}: {reason}" if self.filename else reason

    def with_flags(self, flags: dict[str, str]) -> str:
        """The message with its opt-in spelled as ``flags`` (keyword -> option) spell it,
        or without it where they have none: a hint names only what can be used."""
        return respell(self.message, self.opt_in, flags)

    def renamed(self, filename: str, reason: str) -> VmdkError:
        """The same error (class, errno, opt-in) about another file, for another reason."""
        other = copy.copy(self)
        if isinstance(self, OSError) and isinstance(other, OSError):
            other.errno = self.errno  # held by OSError itself: a copy does not carry it
        other.filename, other.reason = filename, reason
        other.message = other._with(reason,
                                    _python_spelling(self.opt_in[0]) if self.opt_in else None)
        other.args = (other.message,)
        return other

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
    """A file the image needs does not exist: the image itself, an extent or a parent.

    ``errno`` is ENOENT, as for any FileNotFoundError.
    """

    def __init__(self, message: str, filename: str | os.PathLike[str] | None = None, *,
                 opt_in: tuple[str, str] | None = None) -> None:
        super().__init__(message, filename, opt_in=opt_in)
        self.errno = errno.ENOENT


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


class RemoteError(ImageIOError):
    """A file behind a URL could not be read: a network fault that outlasted the retries,
    a refusal (HTTP 403...), or a server that cannot send part of a file.

    ``status`` is the HTTP status when the server answered with one, else None.
    """

    def __init__(self, message: str, filename: str | os.PathLike[str] | None = None,
                 status: int | None = None, errno: int | None = None) -> None:
        super().__init__(message, filename, errno=errno)
        self.status = status


def respell(message: str, opt_in: tuple[str, str] | None, flags: dict[str, str]) -> str:
    """``message``, ending with the hint of ``opt_in`` in Python's spelling, with that hint
    spelled as ``flags`` (keyword -> option) spell it, or dropped where they have none."""
    if opt_in is None:
        return message
    keyword, does = opt_in
    python = f"; {_python_spelling(keyword)} {does}"
    if not message.endswith(python):
        return message
    message = message[:-len(python)]
    name = keyword.partition("=")[0]
    return f"{message}; {flags[name]} {does}" if name in flags else message


def _python_spelling(keyword: str) -> str:
    """A flag keyword as ``name=True``; one with a value ("partitions=[1, 5]") as given."""
    return keyword if "=" in keyword else f"{keyword}=True"
