"""The VMDK text descriptor: parse, query, edit and write it back byte for byte.

A descriptor is a small text file (or a text area inside a sparse extent)::

    # Disk DescriptorFile
    version=1
    CID=1a2b3c4d
    parentCID=ffffffff
    createType="monolithicSparse"

    # Extent description
    RW 4192256 SPARSE "test-s001.vmdk"

    # The Disk Data Base
    #DDB
    ddb.adapterType = "lsilogic"

:class:`Descriptor` keeps every line as the bytes it was read from (comments,
blank lines, trailing blanks, CRLF or LF), so writing back an unchanged
descriptor gives the input again, and an edit rewrites only the line it
concerns.  Parsing is lenient about blanks around ``=`` and quoting, as
VirtualBox and libvmdk are; new lines use VMware's own spelling, which QEMU
(the strictest reader) needs.

Every fault in the text is raised as :class:`~vmdk.errors.DescriptorError`
with the 1-based line number when there is one.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import enum
import re
import string
from collections.abc import Callable, Iterator

from .errors import DescriptorError, DescriptorSpaceError

__all__ = [
    "ACCESS_MODES",
    "EXTENT_TYPES",
    "Descriptor",
    "ExtentLine",
    "canonical_create_type",
]

#: Bigger descriptors are refused before any work: VirtualBox stops at 1100
#: lines and the embedded area is at most 10 MiB, real ones are under 4 KiB.
MAX_BYTES = 1 << 20
MAX_LINES = 10_000

ACCESS_MODES = frozenset({"RW", "RDONLY", "NOACCESS"})
# Matched case-sensitively, as QEMU and VirtualBox do.
EXTENT_TYPES = frozenset(
    {"FLAT", "SPARSE", "ZERO", "VMFS", "VMFSSPARSE", "VMFSRDM", "VMFSRAW", "SESPARSE"}
)

DEFAULT_ENCODING = "UTF-8"
NO_PARENT_CID = 0xFFFFFFFF

# Only ASCII blanks count: the other readers use C isspace(), and Unicode
# blanks (U+00A0, U+3000) are legitimate characters in file names.
_WS = " \t\f\v"
_WS_RUN = re.compile(f"[{_WS}]+")
_KEY_VALUE = re.compile(f'([{_WS}]*)([^{_WS}="]+)([{_WS}]*=[{_WS}]*)(.*?)([{_WS}]*)')
_DECIMAL = re.compile("[0-9]{1,20}")
_HEX32 = re.compile("[0-9a-fA-F]{1,8}")
_CODEC_NAME = re.compile("[A-Za-z0-9_-]{1,40}")
_WRITABLE_KEY = re.compile('[^\\s="#]+')
_ENCODING_LINE = re.compile(f"[{_WS}]*encoding[{_WS}]*=".encode())
_FORBIDDEN_IN_VALUE = ('"', "\n", "\r", "\0")

# VMware quotes string keys and leaves numbers bare; unknown keys are quoted,
# which every reader accepts.
_UNQUOTED_HEADER_KEYS = frozenset({"version", "CID", "parentCID"})
_CTK_KEY = "changeTrackPath"
_DDB_PREFIX = "ddb."

_CREATE_TYPES = (
    "custom", "monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat", "fullDevice", "partitionedDevice", "vmfsPreallocated",
    "vmfsEagerZeroedThick", "vmfsThin", "vmfsSparse", "vmfsRDM", "vmfsRDMP", "vmfsRaw",
    "streamOptimized", "vmfs", "seSparse",
)  # fmt: skip
_CREATE_TYPE_ALIASES = {
    "2gbmaxextentsparse": "twoGbMaxExtentSparse",
    "2gbmaxextentflat": "twoGbMaxExtentFlat",
    "vmfsrawdevicemap": "vmfsRDM",
    "vmfspassthroughrawdevicemap": "vmfsRDMP",
    "vmfssesparse": "seSparse",
} | {name.lower(): name for name in _CREATE_TYPES}


def canonical_create_type(value: str) -> str | None:
    """VMware's spelling of a createType value, matched without regard to case.

    The spec calls descriptor content case-insensitive, but tools compare
    createType exactly; this maps ``MonolithicSparse`` or ``2GbMaxExtentFlat``
    to the one spelling the rest of the package uses.  ``None`` if unknown.
    """
    return _CREATE_TYPE_ALIASES.get(value.strip(_WS).lower())


class _Fault(Exception):
    """A problem on one line; the parser adds the file name and line number."""


# --------------------------------------------------------------------------- extent lines


@dataclasses.dataclass(frozen=True, slots=True)
class ExtentLine:
    """One extent line: ``ACCESS SECTORS TYPE ["filename" [OFFSET [extra...]]]``.

    ``extra`` holds the fields after the offset (partition UUID, device id)
    as written, so lines from ESXi raw-device descriptors survive an edit.
    """

    access: str
    sectors: int
    type: str
    filename: str | None = None
    offset: int | None = None
    extra: tuple[str, ...] = ()

    def format(self) -> str:
        """The canonical VMware spelling, e.g. ``RW 20480 FLAT "disk-flat.vmdk" 0``."""
        try:
            self._check()
        except _Fault as exc:
            raise DescriptorError(str(exc)) from None
        parts = [self.access, str(self.sectors), self.type]
        if self.filename is not None:
            parts.append(f'"{self.filename}"')
        if self.offset is not None:
            parts.append(str(self.offset))
        parts.extend(self.extra)
        return " ".join(parts)

    def _check(self) -> None:
        if self.access not in ACCESS_MODES:
            raise _Fault(f"unknown extent access {self.access!r}")
        if self.type not in EXTENT_TYPES:
            raise _Fault(f"unknown extent type {self.type!r}")
        _check_count(self.sectors, "extent size")
        if self.filename is not None:
            # The format has no escape for these: the line would not read back.
            if any(c in self.filename for c in _FORBIDDEN_IN_VALUE):
                raise _Fault(f"extent file name {self.filename!r} contains a quote, newline or NUL")
        elif self.type != "ZERO":
            raise _Fault(f"a {self.type} extent needs a file name")
        if self.offset is not None:
            _check_count(self.offset, "extent offset")
            if self.filename is None:
                raise _Fault("an extent offset needs a file name before it")
        if self.extra and self.offset is None:
            raise _Fault("extra extent fields need an offset before them")
        for field in self.extra:
            if not field or _WS_RUN.search(field) or any(c in field for c in _FORBIDDEN_IN_VALUE):
                raise _Fault(f"extra extent field {field!r} is empty or has blanks or quotes")


def _check_count(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
        raise _Fault(f"{what} {value!r} is not a whole number of sectors")


def _parse_number(token: str, what: str) -> int:
    if not _DECIMAL.fullmatch(token):  # also bounds int() to 20 digits
        raise _Fault(f"{what} {token!r} is not a non-negative decimal number")
    value = int(token)
    _check_count(value, what)
    return value


def _tokens(text: str) -> list[str]:
    text = text.strip(_WS)
    return _WS_RUN.split(text) if text else []


def _parse_extent(text: str) -> ExtentLine:
    body = text.strip(_WS)
    head, quote, _ = body.partition('"')
    fields = _tokens(head)
    if len(fields) != 3:
        if not quote and len(fields) > 3:
            raise _Fault("extent file name must be in double quotes")
        raise _Fault("extent line needs ACCESS SECTORS TYPE")
    access, size, kind = fields
    if kind not in EXTENT_TYPES:
        raise _Fault(f"unknown extent type {kind!r}")
    sectors = _parse_number(size, "extent size")
    if not quote:
        if kind != "ZERO":
            raise _Fault(f"a {kind} extent needs a file name")
        return ExtentLine(access, sectors, kind)
    return _parse_extent_tail(access, sectors, kind, body)


def _parse_extent_tail(access: str, sectors: int, kind: str, body: str) -> ExtentLine:
    # A name may hold spaces and (sadly) quotes: take all up to the last quote.
    first, last = body.index('"'), body.rindex('"')
    if first == last:
        raise _Fault("extent file name has no closing quote")
    tail = _tokens(body[last + 1 :])
    offset = _parse_number(tail[0], "extent offset") if tail else None
    return ExtentLine(access, sectors, kind, body[first + 1 : last], offset, tuple(tail[1:]))


# --------------------------------------------------------------------------- lines


class _Kind(enum.Enum):
    BLANK = "blank"
    COMMENT = "comment"
    HEADER = "header"
    EXTENT = "extent"
    CTK = "change tracking"
    DDB = "disk database"


@dataclasses.dataclass(frozen=True, slots=True)
class _Field:
    """A ``key = value`` line split so a new value keeps the old spacing and quoting."""

    key: str
    value: str
    head: str  # leading blanks, key and "=" with its blanks
    quoted: bool
    tail: str  # trailing blanks

    def render(self, value: str) -> str:
        # An unquoted value cannot carry blanks at its ends: quote it then.
        quote = '"' if self.quoted or value != value.strip(_WS) or not value else ""
        return f"{self.head}{quote}{value}{quote}{self.tail}"


@dataclasses.dataclass(frozen=True, slots=True)
class _Line:
    raw: bytes  # the line as stored, without its ending
    eol: bytes  # b"\n", b"\r\n", or b"" for a last line without one
    kind: _Kind
    field: _Field | None = None
    extent: ExtentLine | None = None


def _parse_field(text: str) -> _Field | None:
    match = _KEY_VALUE.fullmatch(text)
    if match is None:
        return None
    lead, key, equals, value, tail = match.groups()
    quoted = value.startswith('"')
    if quoted:
        if len(value) < 2 or not value.endswith('"'):
            raise _Fault(f"value of {key} has no closing quote")
        value = value[1:-1]
    return _Field(key, value, lead + key + equals, quoted, tail)


def _classify(text: str) -> tuple[_Kind, _Field | None, ExtentLine | None]:
    stripped = text.strip(_WS)
    if not stripped:
        return _Kind.BLANK, None, None
    if stripped.startswith("#"):
        return _Kind.COMMENT, None, None
    if _tokens(stripped)[0] in ACCESS_MODES:
        return _Kind.EXTENT, None, _parse_extent(stripped)
    field = _parse_field(text)
    if field is None:
        raise _Fault("line is not a comment, key=value pair or extent line")
    if field.key.startswith(_DDB_PREFIX):
        return _Kind.DDB, field, None
    return (_Kind.CTK if field.key == _CTK_KEY else _Kind.HEADER), field, None


def _decode_line(raw: bytes, eol: bytes, codec: str) -> _Line:
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as exc:
        raise _Fault(f"bytes {raw[exc.start : exc.end]!r} are not valid {codec}") from None
    kind, field, extent = _classify(text)
    return _Line(raw, eol, kind, field, extent)


def _split_lines(data: bytes, filename: str | None) -> list[tuple[bytes, bytes]]:
    """Cut into (content, ending) pairs; LF and CRLF end lines, a lone CR is refused."""
    pieces = data.split(b"\n")
    lines = []
    for number, piece in enumerate(pieces, 1):
        last = number == len(pieces)
        if last and not piece:
            break
        eol = b"" if last else b"\n"
        if piece.endswith(b"\r") and not last:
            piece, eol = piece[:-1], b"\r\n"
        if b"\r" in piece:
            # VirtualBox refuses it too; old Mac endings would hide line breaks.
            raise DescriptorError("carriage return without line feed", filename, line=number)
        lines.append((piece, eol))
    return lines


def _cut(data: bytes, filename: str | None) -> bytes:
    # Embedded descriptors are NUL-padded: the text ends at the first NUL.
    # Search a bounded prefix only, so a huge buffer costs no more than the limit.
    end = data.find(b"\0", 0, MAX_BYTES + 1)
    if end >= 0:
        data = data[:end]
    if len(data) > MAX_BYTES:
        raise DescriptorError(f"descriptor is larger than {MAX_BYTES} bytes", filename)
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    if lines > MAX_LINES:
        raise DescriptorError(f"descriptor has more than {MAX_LINES} lines", filename)
    return bytes(data)


# --------------------------------------------------------------------------- encodings


def _check_codec(name: str) -> str:
    """Return ``name`` if Python can use it for descriptor text, else raise _Fault.

    Lines are split on bytes before decoding, so only codecs that spell ASCII
    as ASCII work (UTF-8, windows-1252, GBK, Big5, Shift_JIS do; UTF-16 does not).
    """
    if not _CODEC_NAME.fullmatch(name):
        raise _Fault(f"unknown descriptor encoding {name!r}")
    probe = string.printable
    try:
        codecs.lookup(name)
        ok = (
            probe.encode(name) == probe.encode("ascii")
            and probe.encode("ascii").decode(name) == probe
        )
    except (LookupError, UnicodeError):
        raise _Fault(f"unknown descriptor encoding {name!r}") from None
    if not ok:
        raise _Fault(f"descriptor encoding {name!r} is not ASCII-compatible")
    return name


def _is_utf8(lines: list[tuple[bytes, bytes]]) -> bool:
    try:
        for raw, _eol in lines:
            raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _declared_encoding(lines: list[tuple[bytes, bytes]], filename: str | None) -> str | None:
    # The encoding is named inside the text it governs; its own line is ASCII,
    # so read it as latin-1 (which never fails) before decoding the rest.
    for number, (raw, _eol) in enumerate(lines, 1):
        if not _ENCODING_LINE.match(raw):
            continue
        with _naming(filename, number):
            field = _parse_field(raw.decode("latin-1"))
            if field is not None:
                return _check_codec(field.value.strip(_WS))
    return None


def _same_codec(a: str, b: str) -> bool:
    return codecs.lookup(a).name == codecs.lookup(b).name


# --------------------------------------------------------------------------- ordering


# Sections must come header -> extents -> change tracking -> ddb (VirtualBox
# refuses other orders, and a reader streaming the text relies on it).
_RANK = {_Kind.HEADER: 0, _Kind.EXTENT: 1, _Kind.CTK: 2, _Kind.DDB: 3}


def _check_order(lines: list[_Line], filename: str | None) -> None:
    rank = 0
    for number, line in enumerate(lines, 1):
        if line.kind not in _RANK:
            continue
        own = _RANK[line.kind]
        if line.kind is _Kind.CTK and rank == 0:
            own = 0  # changeTrackPath among the header keys is still a header key
        if own < rank:
            what = line.field.key if line.field else "extent line"
            raise DescriptorError(f"{what} is out of order", filename, line=number)
        rank = own


def _check_required(lines: list[_Line], filename: str | None) -> None:
    if not any(line.kind is _Kind.EXTENT for line in lines):
        raise DescriptorError("descriptor has no extent line", filename)
    keys = {line.field.key for line in lines if line.kind is _Kind.HEADER and line.field}
    if "createType" not in keys:
        raise DescriptorError("descriptor has no createType", filename)


# --------------------------------------------------------------------------- descriptor


class Descriptor:
    """A parsed descriptor that writes back exactly what it read, plus edits."""

    def __init__(self, lines: list[_Line], codec: str, filename: str | None = None) -> None:
        # Internal: build descriptors with parse() or new().
        self._lines = lines
        self._codec = codec
        self.filename = filename

    # ---------------------------------------------------------------- reading and writing

    @classmethod
    def parse(cls, data: bytes, filename: str | None = None) -> Descriptor:
        """Parse descriptor bytes (text ends at the first NUL); raise DescriptorError."""
        pairs = _split_lines(_cut(data, filename), filename)
        codec = _declared_encoding(pairs, filename)
        if codec is None:
            # No encoding named: UTF-8, as VMware writes today; older Windows tools wrote the
            # local code page, so bytes that are not UTF-8 are read as Latin-1 (which round-
            # trips every byte) rather than refused, as qemu and VMware accept them.
            codec = DEFAULT_ENCODING if _is_utf8(pairs) else "latin-1"
        lines = []
        for number, (raw, eol) in enumerate(pairs, 1):
            with _naming(filename, number):
                lines.append(_decode_line(raw, eol, codec))
        _check_order(lines, filename)
        _check_required(lines, filename)
        return cls(lines, codec, filename)

    def to_bytes(self) -> bytes:
        return b"".join(line.raw + line.eol for line in self._lines)

    def to_bytes_padded(self, size: int) -> bytes:
        """The text NUL-padded to ``size`` bytes for an embedded descriptor area.

        Never truncates: a cut descriptor would lose extent or ddb lines.
        """
        data = self.to_bytes()
        if len(data) > size:
            raise DescriptorSpaceError(
                f"descriptor needs {len(data)} bytes but only {size} are available", self.filename
            )
        return data + bytes(size - len(data))

    def copy(self) -> Descriptor:
        # Lines are immutable, so a shallow copy of the list is independent.
        return Descriptor(list(self._lines), self._codec, self.filename)

    def __str__(self) -> str:
        return self.to_bytes().decode(self._codec)

    def __repr__(self) -> str:
        return f"<Descriptor {self.filename or ''} {len(self._lines)} lines>"

    @classmethod
    def new(
        cls,
        create_type: str,
        extents: list[ExtentLine],
        *,
        cid: int,
        parent_cid: int = NO_PARENT_CID,
        parent_file_name_hint: str | None = None,
        ddb: dict[str, str] | None = None,
        encoding: str | None = None,
    ) -> Descriptor:
        """A descriptor in VMware's canonical layout, with LF endings."""
        with _naming(None):
            codec = _check_codec(encoding) if encoding else DEFAULT_ENCODING
        header = ["# Disk DescriptorFile", "version=1"]
        if encoding:
            header.append(f'encoding="{_checked_value("encoding", encoding)}"')
        header += [f"CID={_hex32(cid, 'CID')}", f"parentCID={_hex32(parent_cid, 'parentCID')}"]
        header.append(f'createType="{_checked_value("createType", create_type)}"')
        if parent_file_name_hint is not None:
            hint = _checked_value("parentFileNameHint", parent_file_name_hint)
            header.append(f'parentFileNameHint="{hint}"')
        body = ["", "# Extent description", *(e.format() for e in extents)]
        body += ["", "# The Disk Data Base", "#DDB", ""]
        body += [
            _ddb_text(_checked_key(_ddb_key(k)), _checked_value(k, v))
            for k, v in (ddb or {}).items()
        ]
        text = "".join(line + "\n" for line in header + body)
        return cls.parse(_encode(text, codec, None))

    # ---------------------------------------------------------------- header keys

    def get(self, key: str) -> str | None:
        """A header (or changeTrackPath) value, unquoted; the first if repeated."""
        index = self._find(key, (_Kind.HEADER, _Kind.CTK))
        return None if index is None else self._field(index).value

    def set(self, key: str, value: str) -> None:
        """Set a header key; a new one goes after the last header line."""
        if key.startswith(_DDB_PREFIX):
            raise DescriptorError(f"{key} is a disk database key: use ddb_set", self.filename)
        if key == "encoding":
            self._recode(value)
        self._set(key, value, (_Kind.HEADER, _Kind.CTK), self._header_text)

    def remove(self, key: str) -> bool:
        """Remove every line of a header key; True if there was one."""
        if key == "encoding" and self.get("encoding") is not None:
            self._recode(DEFAULT_ENCODING)
        return self._remove(key, (_Kind.HEADER, _Kind.CTK))

    # ---------------------------------------------------------------- disk database

    def ddb_get(self, key: str) -> str | None:
        """A ddb value; ``key`` may be given with or without the ``ddb.`` prefix."""
        index = self._find(_ddb_key(key), (_Kind.DDB,))
        return None if index is None else self._field(index).value

    def ddb_set(self, key: str, value: str) -> None:
        self._set(_ddb_key(key), value, (_Kind.DDB,), _ddb_text)

    def ddb_remove(self, key: str) -> bool:
        return self._remove(_ddb_key(key), (_Kind.DDB,))

    def ddb_items(self) -> dict[str, str]:
        """All ddb keys (``ddb.`` prefix included) in file order; the first wins if repeated."""
        items: dict[str, str] = {}
        for line in self._lines:
            if line.kind is _Kind.DDB and line.field:
                items.setdefault(line.field.key, line.field.value)
        return items

    # ---------------------------------------------------------------- extents

    @property
    def extents(self) -> list[ExtentLine]:
        """The extent lines in order (a fresh list: edit through set_extents/add_extent)."""
        return [line.extent for line in self._lines if line.extent is not None]

    def set_extents(self, extents: list[ExtentLine]) -> None:
        """Replace the extent lines in place; lines that do not change keep their bytes."""
        if not extents:
            raise DescriptorError("a descriptor needs at least one extent", self.filename)
        texts = [e.format() for e in extents]  # validate all before changing anything
        slots = [i for i, line in enumerate(self._lines) if line.kind is _Kind.EXTENT]
        for slot, extent, text in zip(slots, extents, texts):
            if self._lines[slot].extent != extent:
                self._replace(slot, text)
        for slot in reversed(slots[len(extents) :]):
            del self._lines[slot]
        for text in texts[len(slots) :]:
            self._insert(self._after_last((_Kind.EXTENT,)), text)

    def add_extent(self, extent: ExtentLine) -> None:
        self._insert(self._after_last((_Kind.EXTENT,)), extent.format())

    # ---------------------------------------------------------------- typed properties

    @property
    def cid(self) -> int:
        return self._hex_key("CID", None)

    @cid.setter
    def cid(self, value: int) -> None:
        self.set("CID", _hex32(value, "CID"))

    @property
    def parent_cid(self) -> int:
        """The parent's CID; ffffffff (no parent) when the key is absent."""
        return self._hex_key("parentCID", NO_PARENT_CID)

    @parent_cid.setter
    def parent_cid(self, value: int) -> None:
        self.set("parentCID", _hex32(value, "parentCID"))

    @property
    def create_type(self) -> str:
        value = self.get("createType")
        if value is None:
            raise DescriptorError("descriptor has no createType", self.filename)
        return value

    @create_type.setter
    def create_type(self, value: str) -> None:
        self.set("createType", value)

    @property
    def parent_file_name_hint(self) -> str | None:
        return self.get("parentFileNameHint")

    @parent_file_name_hint.setter
    def parent_file_name_hint(self, value: str | None) -> None:
        if value is None:
            self.remove("parentFileNameHint")
        else:
            self.set("parentFileNameHint", value)

    @property
    def version(self) -> int:
        """The descriptor version; 1 when absent (some generators leave it out)."""
        value = self.get("version")
        if value is None:
            return 1
        if not _DECIMAL.fullmatch(value.strip(_WS)):
            raise DescriptorError(f"version {value!r} is not a number", self.filename)
        return int(value)

    @version.setter
    def version(self, value: int) -> None:
        with _naming(self.filename):
            _check_count(value, "version")
        self.set("version", str(value))

    @property
    def encoding(self) -> str:
        """The text encoding as the descriptor names it (UTF-8 when not named)."""
        return self._codec

    @encoding.setter
    def encoding(self, value: str) -> None:
        self.set("encoding", value)

    # ---------------------------------------------------------------- internals

    def _field(self, index: int) -> _Field:
        field = self._lines[index].field
        assert field is not None  # only key lines are ever looked up
        return field

    def _find(self, key: str, kinds: tuple[_Kind, ...]) -> int | None:
        for index, line in enumerate(self._lines):
            if line.kind in kinds and line.field is not None and line.field.key == key:
                return index
        return None

    def _set(
        self, key: str, value: str, kinds: tuple[_Kind, ...], fresh: Callable[[str, str], str]
    ) -> None:
        with _naming(self.filename):
            key, value = _checked_key(key), _checked_value(key, value)
        index = self._find(key, kinds)
        if index is not None:
            self._replace(index, self._field(index).render(value))
        else:
            self._insert(self._new_key_position(key), fresh(key, value))

    def _remove(self, key: str, kinds: tuple[_Kind, ...]) -> bool:
        doomed = [i for i, line in enumerate(self._lines)
                  if line.kind in kinds and line.field is not None and line.field.key == key]  # fmt: skip
        for index in reversed(doomed):
            del self._lines[index]
        return bool(doomed)

    def _hex_key(self, key: str, default: int | None) -> int:
        value = self.get(key)
        if value is None:
            if default is None:
                raise DescriptorError(f"descriptor has no {key}", self.filename)
            return default
        if not _HEX32.fullmatch(value.strip(_WS)):
            raise DescriptorError(f"{key} {value!r} is not a 32-bit hex number", self.filename)
        return int(value, 16)

    def _header_text(self, key: str, value: str) -> str:
        if key in _UNQUOTED_HEADER_KEYS and value == value.strip(_WS) and value:
            return f"{key}={value}"
        return f'{key}="{value}"'

    def _new_key_position(self, key: str) -> int:
        if key.startswith(_DDB_PREFIX):
            return self._ddb_position()
        if key == _CTK_KEY:
            return self._after_last((_Kind.CTK, _Kind.EXTENT))
        index = self._after_last((_Kind.HEADER,))
        if index:
            return index
        # No header key left: go after the opening comment lines.
        while index < len(self._lines) and self._lines[index].kind is _Kind.COMMENT:
            index += 1
        return index

    def _ddb_position(self) -> int:
        index = self._after_last((_Kind.DDB,))
        if index:
            return index
        if not any(_is_ddb_marker(line.raw) for line in self._lines):
            for text in ("", "# The Disk Data Base", "#DDB", ""):
                self._insert(len(self._lines), text)
        return len(self._lines)

    def _after_last(self, kinds: tuple[_Kind, ...]) -> int:
        """Index just after the last line of one of ``kinds``; 0 if none."""
        found = [i for i, line in enumerate(self._lines) if line.kind in kinds]
        return found[-1] + 1 if found else 0

    def _make_line(self, text: str, eol: bytes) -> _Line:
        raw = _encode(text, self._codec, self.filename)
        with _naming(self.filename):
            return _decode_line(raw, eol, self._codec)

    def _replace(self, index: int, text: str) -> None:
        self._lines[index] = self._make_line(text, self._lines[index].eol)

    def _insert(self, index: int, text: str) -> None:
        eol = self._dominant_eol()
        if index == len(self._lines) and self._lines and not self._lines[-1].eol:
            # The file had no final newline: the new last line keeps it that way.
            self._lines[-1] = dataclasses.replace(self._lines[-1], eol=eol)
            eol = b""
        self._lines.insert(index, self._make_line(text, eol))

    def _dominant_eol(self) -> bytes:
        crlf = sum(line.eol == b"\r\n" for line in self._lines)
        lf = sum(line.eol == b"\n" for line in self._lines)
        return b"\r\n" if crlf > lf else b"\n"

    def _recode(self, codec: str) -> None:
        """Switch every line to another encoding, all or nothing."""
        with _naming(self.filename):
            codec = _check_codec(codec.strip(_WS))
        if _same_codec(codec, self._codec):
            self._codec = codec
            return
        lines = []
        for line in self._lines:
            text = line.raw.decode(self._codec)
            lines.append(dataclasses.replace(line, raw=_encode(text, codec, self.filename)))
        self._lines, self._codec = lines, codec


# --------------------------------------------------------------------------- helpers


def _is_ddb_marker(raw: bytes) -> bool:
    return raw.strip(_WS.encode()).upper() == b"#DDB"


def _ddb_key(key: str) -> str:
    return key if key.startswith(_DDB_PREFIX) else _DDB_PREFIX + key


def _ddb_text(key: str, value: str) -> str:
    return f'{key} = "{value}"'


def _checked_key(key: str) -> str:
    if not isinstance(key, str) or not _WRITABLE_KEY.fullmatch(key) or key in ACCESS_MODES:
        raise DescriptorError(f"{key!r} cannot be used as a descriptor key")
    return key


def _checked_value(key: str, value: str) -> str:
    if not isinstance(value, str):
        raise DescriptorError(f"value of {key} must be a string, not {type(value).__name__}")
    # There is no escape for these in a descriptor: the line would not read back.
    if any(c in value for c in _FORBIDDEN_IN_VALUE):
        raise DescriptorError(f"value of {key} {value!r} contains a quote, newline or NUL")
    return value


def _hex32(value: int, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
        raise DescriptorError(f"{what} {value!r} is not a 32-bit unsigned number")
    return f"{value:08x}"


def _encode(text: str, codec: str, filename: str | None) -> bytes:
    # A file name that is not valid UTF-8 comes from the system with its undecodable bytes
    # as surrogates (os.fsdecode): written back as those bytes, it names the same file.
    errors = "surrogateescape" if codecs.lookup(codec).name == "utf-8" else "strict"
    try:
        return text.encode(codec, errors)
    except UnicodeEncodeError as exc:
        raise DescriptorError(f"{exc.object[exc.start:exc.end]!r} cannot be written in "
                              f"{codec}", filename) from None


@contextlib.contextmanager
def _naming(filename: str | None, line: int | None = None) -> Iterator[None]:
    """Turn a _Fault (or a DescriptorError without a file) into one naming file and line."""
    try:
        yield
    except _Fault as exc:
        raise DescriptorError(str(exc), filename, line=line) from None
    except DescriptorError as exc:
        if exc.filename is None and filename is not None:
            raise DescriptorError(exc.reason, filename, line=exc.line) from None
        raise
