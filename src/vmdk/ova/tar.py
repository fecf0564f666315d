"""The tar layer of an OVA: its headers as they are stored, members read in place, and writing.

Importers read an OVA front to back as a plain ustar archive, so this layer
sees what :mod:`tarfile` hides: pax and GNU extension records, the header
magic, a size field in base-256.  Members are read straight from the file
(nothing is extracted), and a member cut off by a short download just ends
early, so the reader above it can say where.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from ..errors import CorruptImageError

BLOCK = 512
#: The largest size eleven octal digits hold (8 GiB - 1): ustar's own limit.
USTAR_MAX_SIZE = 8 ** 11 - 1
#: Metadata members (pax records, GNU long names) are read whole: a sane cap.
MAX_EXTENSION_SIZE = 1 << 20

POSIX_MAGIC = b"ustar\x0000"
GNU_MAGIC = b"ustar  \x00"

#: Type flags of records that change the member after them, and what they are called.
EXTENSIONS = {b"x": "pax header", b"g": "pax global header", b"L": "GNU long name",
              b"K": "GNU long link name"}
REGULAR = (b"0", b"\x00", b"7")


@dataclass(frozen=True)
class Member:
    """One member as the archive stores it, with the extension records in front of it."""

    name: str
    size: int
    header_offset: int
    data_offset: int
    typeflag: bytes
    magic: bytes
    extensions: tuple[str, ...] = ()
    base256_size: bool = False

    @property
    def is_file(self) -> bool:
        return self.typeflag in REGULAR

    @property
    def end(self) -> int:
        """Where the next header starts."""
        return self.data_offset + _padded(self.size)

    @property
    def format(self) -> str:
        """"ustar", "gnu" (GNU magic) or "v7" (no magic)."""
        return {POSIX_MAGIC: "ustar", GNU_MAGIC: "gnu"}.get(self.magic, "v7")


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _number(field_: bytes) -> tuple[int, bool]:
    """A numeric header field: octal text, or base-256 (GNU) when its top bit is set."""
    if field_[:1] and field_[0] & 0x80:
        value = int.from_bytes(field_[1:], "big") | ((field_[0] & 0x3F) << (8 * (len(field_) - 1)))
        return value, True
    text = field_.split(b"\0", 1)[0].strip(b" ")
    return int(text or b"0", 8), False


def _checksum(block: bytes) -> int:
    return sum(block[:148]) + 8 * 32 + sum(block[156:])


def header_checks_out(block: bytes) -> bool:
    """Whether ``block`` is a tar header: its checksum adds up."""
    if len(block) < BLOCK or not any(block):
        return False
    try:
        stored, _ = _number(block[148:156])
    except ValueError:
        return False
    return stored == _checksum(block)


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


@dataclass
class _Pending:
    """Extension records read since the last member, to apply to the next one."""

    names: list[str] = field(default_factory=list)
    name: str | None = None
    size: int | None = None

    def clear(self) -> None:
        self.names.clear()
        self.name = self.size = None


def _pax_records(data: bytes) -> dict[str, str]:
    """``LENGTH key=value\\n`` records; malformed ones end the parse (tar itself refuses)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            break
        record = data[space + 1:pos + length - 1]
        key, _, value = record.partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
        if length <= 0:
            break
    return out


class Walker:
    """Every member in archive order, read lazily (members after a cut are never asked for).

    A header that does not add up, or that the file ends inside, is a
    :class:`CorruptImageError` naming ``path``.  A member's data cut short is
    not noticed here: the member's reader ends early.  After the walk,
    ``end_marker`` says whether the archive ended with its zero blocks (tar
    accepts a file that just ends after a member; a cut download does the same).
    """

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self.end_marker = False

    def __iter__(self) -> Iterator[Member]:
        pos = 0
        pending = _Pending()
        file_size = os.fstat(self.fd).st_size
        while True:
            block = os.pread(self.fd, BLOCK, pos)
            if len(block) < BLOCK:
                if pos >= file_size and pos > 0 and not pending.names:
                    return
                raise CorruptImageError(f"the package is cut short: it ends inside the tar "
                                        f"header at byte {pos}", self.path)
            if not any(block):
                self.end_marker = True
                return
            if not header_checks_out(block):
                raise CorruptImageError(f"the tar header at byte {pos} is damaged (its checksum "
                                        "does not add up): not a plain tar, or a damaged one",
                                        self.path)
            if block[156:157] in EXTENSIONS:
                record = _member(block, pos, _Pending())
                _read_extension(self.fd, self.path, record, pending)
                pos = record.end
                continue
            member = _member(block, pos, pending)
            pending.clear()
            yield member
            if member.data_offset + member.size > file_size:
                raise CorruptImageError(f"the package is cut short: it ends at byte {file_size}, "
                                        f"inside {member.name} (bytes {member.data_offset}-"
                                        f"{member.data_offset + member.size})", self.path)
            pos = member.end


def _member(block: bytes, pos: int, pending: _Pending) -> Member:
    name = _text(block[0:100])
    magic = block[257:265]
    if magic == POSIX_MAGIC and block[345]:
        name = _text(block[345:500]) + "/" + name
    size, base256 = _number(block[124:136])
    return Member(name=pending.name or name, size=pending.size if pending.size is not None
                  else size, header_offset=pos, data_offset=pos + BLOCK,
                  typeflag=block[156:157], magic=magic, extensions=tuple(pending.names),
                  base256_size=base256)


def _read_extension(fd: int, path: str, record: Member, pending: _Pending) -> None:
    if record.size > MAX_EXTENSION_SIZE:
        raise CorruptImageError(f"{EXTENSIONS[record.typeflag]} at byte {record.header_offset} "
                                f"is {record.size} bytes long", path)
    data = os.pread(fd, record.size, record.data_offset)
    if len(data) < record.size:
        raise CorruptImageError(f"the package is cut short inside the "
                                f"{EXTENSIONS[record.typeflag]} at byte {record.header_offset}",
                                path)
    pending.names.append(EXTENSIONS[record.typeflag])
    if record.typeflag == b"x":
        records = _pax_records(data)
        pending.name = records.get("path", pending.name)
        if "size" in records and records["size"].isdigit():
            pending.size = int(records["size"])
    elif record.typeflag == b"L":
        pending.name = _text(data)


class MemberReader(io.RawIOBase):
    """A member's bytes, read straight from the archive file.

    Where the archive was cut inside the member, reads just end early, so the
    stream reader can say at which byte of the disk the cut happened.
    """

    def __init__(self, fd: int, member: Member) -> None:
        self._fd = fd
        self._pos = member.data_offset
        self._end = member.data_offset + member.size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._end - self._pos))
        got = os.preadv(self._fd, [view[:n]], self._pos) if n else 0
        self._pos += got
        return got


def open_member(fd: int, member: Member) -> IO[bytes]:
    return io.BufferedReader(MemberReader(fd, member), 1 << 20)


# ------------------------------------------------------------------------------ writing


def _octal(value: int, width: int) -> bytes:
    return f"{value:0{width - 1}o}".encode() + b"\0"


def _base256(value: int, width: int) -> bytes:
    return bytes([0x80]) + value.to_bytes(width - 1, "big")


def header(name: str, size: int, mtime: int | None = None) -> bytes:
    """A ustar header of a regular file, mode 644, owned by nobody of this machine.

    A member over 8 GiB cannot be told in ustar's octal size field: its size
    is written in base-256 under the GNU magic, which GNU tar, vSphere and
    VirtualBox read; pax records, which vSphere refuses, are never written.
    """
    raw = name.encode("utf-8")
    prefix = b""
    if len(raw) > 100:
        cut = raw.rfind(b"/", 0, 156)
        if cut <= 0 or len(raw) - cut - 1 > 100:
            raise ValueError(f"the name {name!r} is too long for a ustar header")
        prefix, raw = raw[:cut], raw[cut + 1:]
    big = size > USTAR_MAX_SIZE
    block = bytearray(BLOCK)
    block[0:len(raw)] = raw
    block[100:108] = _octal(0o644, 8)
    block[108:116] = _octal(0, 8)
    block[116:124] = _octal(0, 8)
    block[124:136] = _base256(size, 12) if big else _octal(size, 12)
    block[136:148] = _octal(int(time.time()) if mtime is None else mtime, 12)
    block[156:157] = b"0"
    block[257:265] = GNU_MAGIC if big else POSIX_MAGIC
    block[345:345 + len(prefix)] = prefix
    block[148:156] = b" " * 8
    block[148:156] = f"{_checksum(bytes(block)):06o}".encode() + b"\0 "
    return bytes(block)


class MemberSizeError(ValueError):
    """A member's data did not match the size its header announced."""


class TarWriter:
    """Writes members one after another into ``out``; :meth:`close` ends the archive.

    A member's size goes in its header, before its data.  When it is not known
    beforehand, :meth:`begin_unsized` leaves room for the header and :meth:`end`
    writes it there (``out`` must seek), and :meth:`reserve` holds room for data
    that :meth:`fill` writes later.
    """

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._open: tuple[str, int | None, int, int] | None = None  # name, size, done, at

    def add_bytes(self, name: str, data: bytes) -> None:
        self.begin(name, len(data))
        self.write(data)
        self.end()

    def begin(self, name: str, size: int) -> None:
        """Start a member whose ``size`` bytes are then given to :meth:`write`."""
        assert self._open is None, "a member is still open"
        self._out.write(header(name, size))
        self._open = (name, size, 0, -1)

    def begin_unsized(self, name: str) -> None:
        """Start a member whose size is what :meth:`write` gets before :meth:`end`."""
        assert self._open is None, "a member is still open"
        at = self._out.tell()
        self._out.write(bytes(BLOCK))  # an end-of-archive block until end() replaces it
        self._open = (name, None, 0, at)

    def write(self, data: bytes | memoryview) -> None:
        assert self._open is not None
        name, size, done, at = self._open
        if size is not None and done + len(data) > size:
            raise MemberSizeError(f"{name}: more than the {size} bytes its header announced")
        self._out.write(data)
        self._open = (name, size, done + len(data), at)

    def end(self) -> None:
        assert self._open is not None
        name, size, done, at = self._open
        if size is not None and done != size:
            raise MemberSizeError(f"{name}: {done} bytes written, its header announced {size}")
        self._out.write(bytes(-done % BLOCK))
        if size is None:
            self._write_at(at, header(name, done))
        self._open = None

    def reserve(self, name: str, size: int) -> int:
        """A member of ``size`` bytes whose data :meth:`fill` gives later; returns where
        the data goes."""
        self.begin(name, size)
        at = self._out.tell()
        self._out.write(bytes(size))
        self._open = (name, size, size, -1)
        self.end()
        return at

    def fill(self, at: int, data: bytes) -> None:
        """The data of a member made by :meth:`reserve`, of the size reserved."""
        self._write_at(at, data)

    def _write_at(self, at: int, data: bytes) -> None:
        end = self._out.tell()
        self._out.seek(at)
        self._out.write(data)
        self._out.seek(end)

    def close(self) -> None:
        """The end-of-archive marker: two zero blocks."""
        self._out.write(bytes(2 * BLOCK))


__all__ = [
    "BLOCK",
    "USTAR_MAX_SIZE",
    "Member",
    "MemberReader",
    "MemberSizeError",
    "TarWriter",
    "Walker",
    "header",
    "header_checks_out",
    "open_member",
]
