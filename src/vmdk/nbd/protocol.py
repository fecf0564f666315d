"""A sans-I/O NBD server connection (fixed newstyle, structured replies).

The connection never touches a socket: feed it what the client sent with
:meth:`ServerConnection.receive_data` (``b""`` means end of file), pull
events with :meth:`ServerConnection.next_event` until it returns
:data:`NEED_DATA`, and send the ``bytes`` its reply methods return::

    conn = ServerConnection({"": ExportInfo(size=1 << 30)})
    sock.sendall(conn.greeting())
    while conn.state is not State.CLOSED:
        event = conn.next_event()
        if event is NEED_DATA:
            conn.receive_data(sock.recv(65536))
        elif isinstance(event, OptionEvent):
            sock.sendall(conn.reply_option(event))
        ...

Option negotiation is answered by the connection itself from the exports it
was given; transmission requests are checked against the chosen export
(bounds, read-only, flags, payload size) before they become events, so an
application only ever sees requests it can carry out, or a
:class:`BadRequest` it must answer with :meth:`ServerConnection.reply_error`.

Any exception other than :class:`NbdProtocolError` escaping from this module
is a bug.  The wire format follows ``doc/proto.md`` of the NBD project.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final

from . import _wire as w
from ._wire import BlockState, ClientFlag, Cmd, CmdFlag, Errno, Opt, Rep

MAX_PAYLOAD: Final = 32 << 20  # largest READ/WRITE we accept, and advertise
MAX_OPTION_LENGTH: Final = 64 << 10  # largest option payload we buffer
MAX_STRING: Final = 4096  # the spec's limit on names and descriptions
MAX_BLOCK_DESCRIPTORS: Final = 1 << 17  # 1 MiB of block status per reply

#: Meta contexts we serve, with the ids we give them.
META_CONTEXTS: Final = {w.BASE_ALLOCATION: 1}


# -- errors -----------------------------------------------------------------


class NbdProtocolError(Exception):
    """Base of the protocol errors; anything else from this module is a bug."""


class LocalProtocolError(NbdProtocolError):
    """The application misused the connection (wrong state, unknown cookie...)."""


class RemoteProtocolError(NbdProtocolError):
    """The client broke the protocol in a way that forbids going on: drop it."""


# -- states and events ------------------------------------------------------


class State(enum.Enum):
    START = "start"  # nothing sent yet
    HANDSHAKE = "handshake"  # greeting sent, waiting for the client flags
    OPTIONS = "options"  # option haggling
    TRANSMISSION = "transmission"  # serving commands on the chosen export
    CLOSED = "closed"


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`ServerConnection.next_event` when more bytes are needed.
NEED_DATA: Final = _NeedData()


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """Base of everything :meth:`ServerConnection.next_event` returns."""


@dataclasses.dataclass(frozen=True, slots=True)
class ClientFlagsReceived(Event):
    flags: ClientFlag


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The client hung up (or sent NBD_CMD_DISC earlier)."""


@dataclasses.dataclass(frozen=True, slots=True)
class OptionEvent(Event):
    """An option request; answer it with :meth:`ServerConnection.reply_option`."""

    @property
    def option(self) -> int:
        """The option code (``NBD_OPT_*``) the request came as."""
        return _OPTION_CODES[type(self)]


@dataclasses.dataclass(frozen=True, slots=True)
class ExportNameOption(OptionEvent):
    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class AbortOption(OptionEvent):
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class ListOption(OptionEvent):
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class InfoOption(OptionEvent):
    """NBD_OPT_INFO, or NBD_OPT_GO when ``go`` is true."""

    name: str
    requests: tuple[int, ...]
    go: bool

    @property
    def option(self) -> int:
        return Opt.GO if self.go else Opt.INFO


@dataclasses.dataclass(frozen=True, slots=True)
class StructuredReplyOption(OptionEvent):
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class MetaContextOption(OptionEvent):
    """NBD_OPT_LIST_META_CONTEXT, or NBD_OPT_SET_META_CONTEXT when ``set`` is true."""

    name: str
    queries: tuple[str, ...]
    set: bool

    @property
    def option(self) -> int:
        return Opt.SET_META_CONTEXT if self.set else Opt.LIST_META_CONTEXT


@dataclasses.dataclass(frozen=True, slots=True)
class RefusedOption(OptionEvent):
    """An option we do not support or could not parse; the reply is an error."""

    code: int
    error: Rep
    reason: str

    @property
    def option(self) -> int:
        return self.code


@dataclasses.dataclass(frozen=True, slots=True)
class Request(Event):
    """A transmission request; ``cookie`` is the spec's "handle"."""

    cookie: int
    flags: CmdFlag
    offset: int
    length: int


@dataclasses.dataclass(frozen=True, slots=True)
class Read(Request):
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class Write(Request):
    data: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True, slots=True)
class Flush(Request):
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class Trim(Request):
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class WriteZeroes(Request):
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class BlockStatus(Request):
    context_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Disconnect(Request):
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class BadRequest(Request):
    """A request refused before reaching the application: reply with ``error``."""

    command: int
    error: Errno
    reason: str


# -- exports ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the connection needs to know about one export."""

    size: int
    read_only: bool = False
    description: str = ""
    min_block_size: int = 1
    preferred_block_size: int = 4096
    max_block_size: int = MAX_PAYLOAD

    def __post_init__(self) -> None:
        if not 0 <= self.size < 1 << 63:
            raise ValueError(f"export size out of range: {self.size}")
        if len(self.description.encode()) > MAX_STRING:
            raise ValueError("export description longer than 4096 bytes")

    @property
    def transmission_flags(self) -> w.TransmissionFlag:
        f = w.TransmissionFlag
        flags = f.HAS_FLAGS | f.SEND_FLUSH
        if self.read_only:
            return flags | f.READ_ONLY | f.CAN_MULTI_CONN
        return flags | f.SEND_FUA | f.SEND_TRIM | f.SEND_WRITE_ZEROES


# -- the state machine, as data ---------------------------------------------


class _Trigger(enum.Enum):
    GREETING = "greeting"
    CLIENT_FLAGS = "client flags"
    EXPORT_CHOSEN = "export chosen"
    EXPORT_REFUSED = "export refused"  # EXPORT_NAME of an unknown export
    ABORT = "abort"
    DISCONNECT = "disconnect"
    EOF = "eof"
    ERROR = "error"


_S, _T = State, _Trigger
_TRANSITIONS: Final[dict[State, dict[_Trigger, State]]] = {
    _S.START: {_T.GREETING: _S.HANDSHAKE, _T.ERROR: _S.CLOSED},
    _S.HANDSHAKE: {_T.CLIENT_FLAGS: _S.OPTIONS, _T.EOF: _S.CLOSED, _T.ERROR: _S.CLOSED},
    _S.OPTIONS: {
        _T.EXPORT_CHOSEN: _S.TRANSMISSION,
        _T.EXPORT_REFUSED: _S.CLOSED,
        _T.ABORT: _S.CLOSED,
        _T.EOF: _S.CLOSED,
        _T.ERROR: _S.CLOSED,
    },
    _S.TRANSMISSION: {_T.DISCONNECT: _S.CLOSED, _T.EOF: _S.CLOSED, _T.ERROR: _S.CLOSED},
    _S.CLOSED: {_T.EOF: _S.CLOSED, _T.ERROR: _S.CLOSED, _T.DISCONNECT: _S.CLOSED},
}

#: The states in which each kind of outgoing message may be produced.
#: Command replies stay allowed once closed, for requests read before NBD_CMD_DISC.
_SEND_STATES: Final = {
    "greeting": {_S.START},
    "option": {_S.OPTIONS},
    "command": {_S.TRANSMISSION, _S.CLOSED},
}

_REQUEST_EVENTS: Final[dict[Cmd, type[Request]]] = {
    Cmd.READ: Read,
    Cmd.FLUSH: Flush,
    Cmd.TRIM: Trim,
    Cmd.WRITE_ZEROES: WriteZeroes,
    Cmd.DISC: Disconnect,
}


class _Malformed(Exception):
    """An option payload does not parse (internal; becomes NBD_REP_ERR_INVALID)."""


class _Payload:
    """A cursor over one option payload."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int) -> bytes:
        if n > len(self._data) - self._pos:
            raise _Malformed("option data shorter than its fields say")
        self._pos += n
        return self._data[self._pos - n : self._pos]

    def u16(self) -> int:
        return int(w.U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(w.U32.unpack(self.take(4))[0])

    def string(self) -> str:
        raw = self.take(self.u32())
        if len(raw) > MAX_STRING:
            raise _Malformed("string longer than 4096 bytes")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Malformed("string is not UTF-8") from exc

    def end(self) -> None:
        if self._pos != len(self._data):
            raise _Malformed("trailing bytes after option data")


def _parse_info(option: int, p: _Payload) -> OptionEvent:
    name = p.string()
    requests = tuple(p.u16() for _ in range(p.u16()))
    p.end()
    return InfoOption(name, requests, go=option == Opt.GO)


def _parse_meta_context(option: int, p: _Payload) -> OptionEvent:
    name = p.string()
    count = p.u32()
    if count > MAX_OPTION_LENGTH // 4:
        raise _Malformed("too many meta context queries")
    queries = tuple(p.string() for _ in range(count))
    p.end()
    return MetaContextOption(name, queries, set=option == Opt.SET_META_CONTEXT)


def _parse_empty(event: OptionEvent) -> Callable[[int, _Payload], OptionEvent]:
    def parse(option: int, p: _Payload) -> OptionEvent:
        p.end()
        return event

    return parse


_OPTION_PARSERS: Final[dict[int, Callable[[int, _Payload], OptionEvent]]] = {
    Opt.ABORT: lambda option, p: AbortOption(),  # payload, if any, is ignored
    Opt.LIST: _parse_empty(ListOption()),
    Opt.INFO: _parse_info,
    Opt.GO: _parse_info,
    Opt.STRUCTURED_REPLY: _parse_empty(StructuredReplyOption()),
    Opt.LIST_META_CONTEXT: _parse_meta_context,
    Opt.SET_META_CONTEXT: _parse_meta_context,
}


# -- the connection ---------------------------------------------------------


class ServerConnection:
    """The server side of one NBD connection.

    ``exports`` maps export names to what clients may see of them; the empty
    name is the default export.  Nothing here is thread-safe: use one
    connection per client.
    """

    def __init__(
        self,
        exports: Mapping[str, ExportInfo],
        *,
        max_option_length: int = MAX_OPTION_LENGTH,
    ) -> None:
        self._exports = dict(exports)
        self._max_option_length = max_option_length
        self.state = State.START
        self.client_flags = ClientFlag(0)
        self.export_name: str | None = None
        self.export: ExportInfo | None = None
        self.structured_replies = False
        self._meta_export: str | None = None  # the export SET_META_CONTEXT named
        self._contexts: tuple[int, ...] = ()
        self._buf = bytearray()
        self._pos = 0
        self._skip = 0  # payload bytes of a refused message still to drop
        self._incoming = 0  # length of the WRITE payload being collected
        self._eof = False
        self._pending: collections.Counter[int] = collections.Counter()

    # -- state ------------------------------------------------------------

    def _fire(self, trigger: _Trigger) -> None:
        try:
            self.state = _TRANSITIONS[self.state][trigger]
        except KeyError:
            raise LocalProtocolError(f"cannot {trigger.value} in state {self.state.name}") from None

    def _check_send(self, kind: str) -> None:
        if self.state not in _SEND_STATES[kind]:
            raise LocalProtocolError(f"cannot send {kind} replies in state {self.state.name}")

    @property
    def meta_contexts(self) -> tuple[int, ...]:
        """Ids of the meta contexts negotiated for the transmission phase."""
        return self._contexts

    @property
    def incoming_payload(self) -> int:
        """Length of the WRITE payload the connection is collecting, 0 if none.

        Known once :meth:`next_event` has seen the request header and returned
        :data:`NEED_DATA`: an application bounding its memory can set this much
        aside before it feeds the connection more (the payload is buffered until
        the whole request is there).
        """
        return self._incoming

    @property
    def mid_message(self) -> bool:
        """Part of a client message is buffered (or a refused payload is being dropped).

        Meaningful after :meth:`next_event` returned :data:`NEED_DATA`: the client
        has started a message and not finished it, which is what a server times out.
        """
        return self._available() > 0 or self._skip > 0

    # -- input ------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the client; ``b""`` signals end of file."""
        if self._eof:
            raise LocalProtocolError("data received after end of file")
        if data:
            self._buf += data
        else:
            self._eof = True

    def _available(self) -> int:
        return len(self._buf) - self._pos

    def _peek(self, n: int) -> bytes | None:
        if self._available() < n:
            return None
        with memoryview(self._buf) as view:  # one copy, not two
            return bytes(view[self._pos : self._pos + n])

    def _consume(self, n: int) -> None:
        self._pos += n
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos >= 1 << 20:
            del self._buf[: self._pos]
            self._pos = 0

    def _take(self, n: int) -> bytes | None:
        data = self._peek(n)
        if data is not None:
            self._consume(n)
        return data

    def next_event(self) -> Event | _NeedData:
        """Parse the next event, or return :data:`NEED_DATA`.

        Raises :class:`RemoteProtocolError` (and closes) when the client
        breaks the protocol beyond repair.
        """
        if self.state is State.START:
            raise LocalProtocolError("send the greeting before reading")
        try:
            if self.state is State.CLOSED:
                return ConnectionClosed()
            if self._skip:
                n = min(self._skip, self._available())
                self._consume(n)
                self._skip -= n
            event = NEED_DATA if self._skip else _READERS[self.state](self)
        except RemoteProtocolError:
            self._fire(_Trigger.ERROR)
            raise
        if event is NEED_DATA and self._eof:
            return self._end_of_file()
        return event

    def _end_of_file(self) -> ConnectionClosed:
        clean = self._available() == 0 and not self._skip
        self._fire(_Trigger.EOF)
        if not clean:
            raise RemoteProtocolError("connection closed in the middle of a message")
        return ConnectionClosed()

    def _read_client_flags(self) -> Event | _NeedData:
        raw = self._take(w.CLIENT_FLAGS.size)
        if raw is None:
            return NEED_DATA
        (flags,) = w.CLIENT_FLAGS.unpack(raw)
        if flags & ~int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES):
            raise RemoteProtocolError(f"unknown client flags {flags:#x}")
        if not flags & ClientFlag.C_FIXED_NEWSTYLE:
            raise RemoteProtocolError("client does not speak fixed newstyle")
        self.client_flags = ClientFlag(flags)
        self._fire(_Trigger.CLIENT_FLAGS)
        return ClientFlagsReceived(self.client_flags)

    def _read_option(self) -> Event | _NeedData:
        header = self._peek(w.OPTION_HEADER.size)
        if header is None:
            return NEED_DATA
        magic, option, length = w.OPTION_HEADER.unpack(header)
        if magic != w.IHAVEOPT:
            raise RemoteProtocolError(f"bad option magic {magic:#x}")
        limit = MAX_STRING if option == Opt.EXPORT_NAME else self._max_option_length
        if length > limit:
            if option == Opt.EXPORT_NAME:  # no error reply exists for it
                raise RemoteProtocolError("export name longer than 4096 bytes")
            self._consume(w.OPTION_HEADER.size)
            self._skip = length
            return RefusedOption(option, Rep.ERR_TOO_BIG, f"option data too long ({length})")
        message = self._take(w.OPTION_HEADER.size + length)
        if message is None:
            return NEED_DATA
        return self._parse_option(option, message[w.OPTION_HEADER.size :])

    def _parse_option(self, option: int, data: bytes) -> OptionEvent:
        if option == Opt.EXPORT_NAME:
            try:
                return ExportNameOption(data.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise RemoteProtocolError("export name is not UTF-8") from exc
        parser = _OPTION_PARSERS.get(option)
        if parser is None:
            return RefusedOption(option, Rep.ERR_UNSUP, f"option {option} not supported")
        try:
            return parser(option, _Payload(data))
        except _Malformed as exc:
            return RefusedOption(option, Rep.ERR_INVALID, str(exc))

    def _read_request(self) -> Event | _NeedData:
        header = self._peek(w.REQUEST.size)
        if header is None:
            return NEED_DATA
        magic, flags, kind, cookie, offset, length = w.REQUEST.unpack(header)
        if magic != w.REQUEST_MAGIC:
            raise RemoteProtocolError(f"bad request magic {magic:#x}")
        fields = (cookie, CmdFlag(flags), offset, length)
        refusal = self._check_request(kind, *fields[1:])
        if kind == Cmd.WRITE and refusal is None:
            if self._available() < w.REQUEST.size + length:
                self._incoming = length
                return NEED_DATA
            self._incoming = 0
            self._consume(w.REQUEST.size)
            data = self._take(length)  # one copy of the payload, not two
            assert data is not None
            event: Request = Write(*fields, data=data)
        else:
            self._consume(w.REQUEST.size)
            if kind == Cmd.WRITE:
                self._skip = length  # drop the payload without buffering it
            if refusal is not None:
                event = BadRequest(*fields, command=kind, error=refusal[0], reason=refusal[1])
            elif kind == Cmd.BLOCK_STATUS:
                event = BlockStatus(*fields, context_ids=self._contexts)
            else:
                event = _REQUEST_EVENTS[Cmd(kind)](*fields)
        if isinstance(event, Disconnect):  # gets no reply
            self._fire(_Trigger.DISCONNECT)
        else:
            self._pending[cookie] += 1
        return event

    def _check_request(
        self, kind: int, flags: int, offset: int, length: int
    ) -> tuple[Errno, str] | None:
        """Why a request must be refused, or None if the application may run it."""
        assert self.export is not None
        if kind == Cmd.DISC:
            return None
        try:
            cmd = Cmd(kind)
        except ValueError:
            return Errno.EINVAL, f"unknown command {kind}"
        allowed = w.ALLOWED_CMD_FLAGS.get(cmd)
        if allowed is None:
            return Errno.EINVAL, f"command {cmd.name} not supported"
        if flags & ~int(allowed):  # int: ~ on a flag keeps only known bits
            return Errno.EINVAL, f"flags {flags:#x} not valid for {cmd.name}"
        if cmd in w.WRITING_CMDS and self.export.read_only:
            return Errno.EPERM, "export is read-only"
        if cmd in (Cmd.READ, Cmd.WRITE) and length > self.export.max_block_size:
            return (
                Errno.EOVERFLOW,
                f"request of {length} bytes exceeds {self.export.max_block_size}",
            )
        if cmd == Cmd.BLOCK_STATUS and (not self._contexts or length == 0):
            return Errno.EINVAL, "no meta context negotiated" if length else "zero length"
        if offset + length > self.export.size and cmd not in (Cmd.DISC, Cmd.FLUSH):
            error = Errno.ENOSPC if cmd in w.WRITING_CMDS else Errno.EINVAL
            return error, "request reaches past the end of the export"
        return None

    # -- output: handshake and options -------------------------------------

    def greeting(self) -> bytes:
        """The server's first message: magics and handshake flags."""
        self._check_send("greeting")
        self._fire(_Trigger.GREETING)
        flags = w.HandshakeFlag.FIXED_NEWSTYLE | w.HandshakeFlag.NO_ZEROES
        return w.GREETING.pack(w.NBDMAGIC, w.IHAVEOPT, flags)

    def reply_option(self, event: OptionEvent) -> bytes:
        """Answer an option event from the exports this connection serves.

        May end option haggling: a successful GO or EXPORT_NAME enters
        TRANSMISSION, ABORT and an unknown EXPORT_NAME close (the latter
        returns ``b""``: the spec wants the connection dropped).
        """
        self._check_send("option")
        return _OPTION_REPLIES[type(event)](self, event)

    def refuse_option(self, event: OptionEvent, error: Rep, message: str = "") -> bytes:
        """Answer an option with an error of the application's choosing (e.g. policy)."""
        self._check_send("option")
        if not error.is_error:
            raise LocalProtocolError(f"{error.name} is not an error reply")
        if isinstance(event, ExportNameOption):
            self._fire(_Trigger.EXPORT_REFUSED)
            return b""
        return _option_reply(event.option, error, message.encode())

    def _reply_export_name(self, event: ExportNameOption) -> bytes:
        export = self._exports.get(event.name)
        if export is None:
            self._fire(_Trigger.EXPORT_REFUSED)
            return b""
        self._choose(event.name, export)
        zeroes = 0 if self.client_flags & ClientFlag.C_NO_ZEROES else w.EXPORT_NAME_PADDING
        return w.EXPORT_NAME_REPLY.pack(export.size, export.transmission_flags) + bytes(zeroes)

    def _reply_abort(self, event: AbortOption) -> bytes:
        self._fire(_Trigger.ABORT)
        return _option_reply(Opt.ABORT, Rep.ACK)

    def _reply_list(self, event: ListOption) -> bytes:
        replies = [_option_reply(Opt.LIST, Rep.SERVER, _string(name)) for name in self._exports]
        return b"".join(replies) + _option_reply(Opt.LIST, Rep.ACK)

    def _reply_info(self, event: InfoOption) -> bytes:
        code = event.option
        export = self._exports.get(event.name)
        if export is None:
            return _option_reply(code, Rep.ERR_UNKNOWN, b"unknown export")
        infos = [
            w.INFO_EXPORT.pack(w.Info.EXPORT, export.size, export.transmission_flags),
            w.INFO_BLOCK_SIZE.pack(
                w.Info.BLOCK_SIZE,
                export.min_block_size,
                export.preferred_block_size,
                export.max_block_size,
            ),
        ]
        if w.Info.NAME in event.requests:
            infos.append(w.INFO_TYPE.pack(w.Info.NAME) + event.name.encode())
        if w.Info.DESCRIPTION in event.requests and export.description:
            infos.append(w.INFO_TYPE.pack(w.Info.DESCRIPTION) + export.description.encode())
        out = b"".join(_option_reply(code, Rep.INFO, info) for info in infos)
        if event.go:
            self._choose(event.name, export)
        return out + _option_reply(code, Rep.ACK)

    def _reply_structured(self, event: StructuredReplyOption) -> bytes:
        self.structured_replies = True
        return _option_reply(Opt.STRUCTURED_REPLY, Rep.ACK)

    def _reply_meta_context(self, event: MetaContextOption) -> bytes:
        code = event.option
        if event.set and not self.structured_replies:
            return _option_reply(code, Rep.ERR_INVALID, b"structured replies not negotiated")
        if event.name not in self._exports:
            return _option_reply(code, Rep.ERR_UNKNOWN, b"unknown export")
        names = _match_contexts(event.queries, list_all=not event.set)
        if event.set:
            self._meta_export = event.name
            self._contexts = tuple(META_CONTEXTS[n] for n in names)
        replies = [
            _option_reply(code, Rep.META_CONTEXT, w.U32.pack(META_CONTEXTS[n]) + n.encode())
            for n in names
        ]
        return b"".join(replies) + _option_reply(code, Rep.ACK)

    def _reply_refused(self, event: RefusedOption) -> bytes:
        return _option_reply(event.option, event.error, event.reason.encode())

    def _choose(self, name: str, export: ExportInfo) -> None:
        if name != self._meta_export:
            self._contexts = ()  # contexts were negotiated for another export
        self.export_name = name
        self.export = export
        self._fire(_Trigger.EXPORT_CHOSEN)

    # -- output: transmission ------------------------------------------------

    def _finish(self, request: Request) -> None:
        self._check_send("command")
        if not self._pending[request.cookie]:
            raise LocalProtocolError(f"no request with cookie {request.cookie:#x} awaits a reply")
        self._pending[request.cookie] -= 1
        if not self._pending[request.cookie]:
            del self._pending[request.cookie]

    def reply_ok(self, request: Request) -> bytes:
        """Success for a request that returns no data (WRITE, FLUSH, TRIM...)."""
        if isinstance(request, (Read, BlockStatus)):
            raise LocalProtocolError("READ and BLOCK_STATUS replies carry data")
        self._finish(request)
        return w.SIMPLE_REPLY.pack(w.SIMPLE_REPLY_MAGIC, 0, request.cookie)

    def reply_read(self, request: Read, data: bytes | memoryview) -> bytes:
        """Successful READ: a simple reply, or one OFFSET_DATA chunk when structured."""
        if len(data) != request.length:
            raise LocalProtocolError(f"READ of {request.length} bytes answered with {len(data)}")
        self._finish(request)
        if not self.structured_replies:
            return w.SIMPLE_REPLY.pack(w.SIMPLE_REPLY_MAGIC, 0, request.cookie) + data
        if not data:
            return _chunk(request.cookie, w.ReplyType.NONE, b"")
        return _chunk(request.cookie, w.ReplyType.OFFSET_DATA, w.OFFSET.pack(request.offset), data)

    def reply_error(self, request: Request, error: Errno, message: str = "") -> bytes:
        """A failed request: a simple reply, or an ERROR chunk when structured."""
        if not error:
            raise LocalProtocolError("an error reply needs a non-zero error")
        self._finish(request)
        if not self.structured_replies:
            return w.SIMPLE_REPLY.pack(w.SIMPLE_REPLY_MAGIC, error, request.cookie)
        text = message.encode()[:MAX_STRING]
        payload = w.ERROR_HEADER.pack(error, len(text)) + text
        return _chunk(request.cookie, w.ReplyType.ERROR, payload)

    def reply_block_status(
        self, request: BlockStatus, extents: Iterable[tuple[int, BlockState]]
    ) -> bytes:
        """BLOCK_STATUS for every negotiated context, from (length, state) runs.

        The runs must start at ``request.offset``; they are merged, clipped to
        the request (to one run with REQ_ONE) and capped in number.
        """
        descriptors = _descriptors(extents, request.length, bool(request.flags & CmdFlag.REQ_ONE))
        if not descriptors:
            raise LocalProtocolError("block status needs at least one non-empty run")
        self._finish(request)
        payload = b"".join(w.BLOCK_DESCRIPTOR.pack(n, s) for n, s in descriptors)
        last = len(request.context_ids) - 1
        return b"".join(
            _chunk(
                request.cookie, w.ReplyType.BLOCK_STATUS, w.U32.pack(cid), payload, done=i == last
            )
            for i, cid in enumerate(request.context_ids)
        )


_OPTION_REPLIES: Final[
    dict[type[OptionEvent], Callable[[ServerConnection, OptionEvent], bytes]]
] = {
    ExportNameOption: ServerConnection._reply_export_name,  # type: ignore[dict-item]
    AbortOption: ServerConnection._reply_abort,  # type: ignore[dict-item]
    ListOption: ServerConnection._reply_list,  # type: ignore[dict-item]
    InfoOption: ServerConnection._reply_info,  # type: ignore[dict-item]
    StructuredReplyOption: ServerConnection._reply_structured,  # type: ignore[dict-item]
    MetaContextOption: ServerConnection._reply_meta_context,  # type: ignore[dict-item]
    RefusedOption: ServerConnection._reply_refused,  # type: ignore[dict-item]
}

_READERS: Final[dict[State, Callable[[ServerConnection], Event | _NeedData]]] = {
    State.HANDSHAKE: ServerConnection._read_client_flags,
    State.OPTIONS: ServerConnection._read_option,
    State.TRANSMISSION: ServerConnection._read_request,
}

_OPTION_CODES: Final[dict[type[OptionEvent], Opt]] = {
    ExportNameOption: Opt.EXPORT_NAME,
    AbortOption: Opt.ABORT,
    ListOption: Opt.LIST,
    StructuredReplyOption: Opt.STRUCTURED_REPLY,
}


def _option_reply(option: int, reply: Rep, data: bytes = b"") -> bytes:
    return w.OPTION_REPLY_HEADER.pack(w.OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def _string(text: str) -> bytes:
    raw = text.encode()
    return w.U32.pack(len(raw)) + raw


def _chunk(
    cookie: int,
    kind: w.ReplyType,
    head: bytes,
    data: bytes | memoryview = b"",
    *,
    done: bool = True,
) -> bytes:
    flags = w.ReplyFlag.DONE if done else 0
    header = w.STRUCTURED_REPLY.pack(
        w.STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(head) + len(data)
    )
    return b"".join((header, head, data))


def _match_contexts(queries: Sequence[str], *, list_all: bool) -> list[str]:
    """The contexts a LIST/SET names: exact names, or ``ns:`` for a whole namespace."""
    if not queries:
        return list(META_CONTEXTS) if list_all else []
    found = [
        name
        for name in META_CONTEXTS
        if any(q == name or (q.endswith(":") and name.startswith(q)) for q in queries)
    ]
    return found


def _descriptors(
    extents: Iterable[tuple[int, BlockState]], limit: int, one: bool
) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for length, state in extents:
        length = min(length, limit)
        if length <= 0:
            continue
        if out and out[-1][1] == state:
            out[-1] = (out[-1][0] + length, state)
        elif len(out) == MAX_BLOCK_DESCRIPTORS:
            break
        else:
            out.append((length, int(state)))
        limit -= length
        if not limit:
            break
    return out[:1] if one else out
