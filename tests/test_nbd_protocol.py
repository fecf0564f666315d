"""The sans-I/O NBD server connection, driven by a byte-level client in this file.

No sockets: :class:`Pair` feeds client bytes to a ``ServerConnection``,
answers its events from an in-memory disk (the application's part) and
collects what the server would send, which the client helpers then parse.
"""

from __future__ import annotations

import random
import struct

import pytest

from vmdk.nbd import _wire as w
from vmdk.nbd.protocol import (
    NEED_DATA,
    BadRequest,
    BlockStatus,
    ConnectionClosed,
    Event,
    ExportInfo,
    Flush,
    LocalProtocolError,
    NbdProtocolError,
    OptionEvent,
    Read,
    RemoteProtocolError,
    Request,
    ServerConnection,
    State,
    Trim,
    Write,
    WriteZeroes,
)

SIZE = 1 << 20
BLOCK = 64 << 10
ONE_CONTEXT_ID = 1

Opt, Rep, Cmd, Errno, CmdFlag = w.Opt, w.Rep, w.Cmd, w.Errno, w.CmdFlag


def pattern(size: int) -> bytearray:
    return bytearray(bytes([i % 251 for i in range(256)]) * (size // 256))


class Pair:
    """A ServerConnection with a tiny application and a client's view of the wire."""

    def __init__(self, exports: dict[str, ExportInfo] | None = None) -> None:
        self.disk = pattern(SIZE)
        self.conn = ServerConnection(exports if exports is not None else {"": ExportInfo(SIZE)})
        self.inbox = bytearray(self.conn.greeting())
        self.events: list[Event] = []
        self.flushes = 0

    # -- the server's application -------------------------------------------------

    def feed(self, data: bytes) -> None:
        self.conn.receive_data(data)
        while (event := self.conn.next_event()) is not NEED_DATA:
            assert isinstance(event, Event)
            self.events.append(event)
            self.inbox += self.respond(event)
            if isinstance(event, ConnectionClosed):
                break

    def respond(self, event: Event) -> bytes:
        conn = self.conn
        if isinstance(event, OptionEvent):
            return conn.reply_option(event)
        if isinstance(event, BadRequest):
            return conn.reply_error(event, event.error, event.reason)
        if isinstance(event, Request) and event.flags & CmdFlag.FUA:
            self.flushes += 1
        if isinstance(event, Read):
            return conn.reply_read(event, self.disk[event.offset : event.offset + event.length])
        if isinstance(event, Write):
            self.disk[event.offset : event.offset + event.length] = event.data
            return conn.reply_ok(event)
        if isinstance(event, WriteZeroes):
            self.disk[event.offset : event.offset + event.length] = bytes(event.length)
            return conn.reply_ok(event)
        if isinstance(event, Flush):
            self.flushes += 1
            return conn.reply_ok(event)
        if isinstance(event, Trim):
            return conn.reply_ok(event)
        if isinstance(event, BlockStatus):
            # first block data, the rest a zero hole
            first = max(0, min(BLOCK - event.offset, event.length))
            runs = [(first, w.BlockState(0)), (event.length - first, w.BlockState(3))]
            return conn.reply_block_status(event, runs)
        return b""

    # -- the client ---------------------------------------------------------------------

    def take(self, n: int) -> bytes:
        assert len(self.inbox) >= n, f"server sent {len(self.inbox)} bytes, wanted {n}"
        data = bytes(self.inbox[:n])
        del self.inbox[:n]
        return data

    def handshake(self, flags: int = 3) -> None:
        magic, opt, hflags = w.GREETING.unpack(self.take(w.GREETING.size))
        assert (magic, opt, hflags) == (w.NBDMAGIC, w.IHAVEOPT, 3)
        self.feed(w.CLIENT_FLAGS.pack(flags))

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.feed(w.OPTION_HEADER.pack(w.IHAVEOPT, option, len(data)) + data)

    def option_replies(self, option: int) -> list[tuple[int, bytes]]:
        """Read option replies up to the final ACK or error."""
        out = []
        while True:
            magic, opt, rep, length = w.OPTION_REPLY_HEADER.unpack(
                self.take(w.OPTION_REPLY_HEADER.size)
            )
            assert (magic, opt) == (w.OPTION_REPLY_MAGIC, option)
            out.append((rep, self.take(length)))
            if rep == Rep.ACK or rep & (1 << 31):
                return out

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.send_option(option, data)
        return self.option_replies(option)

    def go(
        self, name: str = "", *, structured: bool = True, meta: bool = True, hello: bool = True
    ) -> int:
        """Negotiate the usual way; return the transmission flags."""
        if hello:
            self.handshake()
        if structured:
            assert self.option(Opt.STRUCTURED_REPLY) == [(Rep.ACK, b"")]
        if meta:
            replies = self.option(Opt.SET_META_CONTEXT, meta_payload(name, ["base:allocation"]))
            assert replies[0] == (
                Rep.META_CONTEXT,
                struct.pack(">I", ONE_CONTEXT_ID) + b"base:allocation",
            )
        replies = self.option(Opt.GO, info_payload(name))
        assert replies[-1] == (Rep.ACK, b"")
        assert self.conn.state is State.TRANSMISSION
        export = next(d for rep, d in replies if rep == Rep.INFO and d[:2] == b"\0\0")
        _, size, flags = w.INFO_EXPORT.unpack(export)
        assert size == SIZE
        return int(flags)

    def request(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        data: bytes = b"",
        cookie: int = 7,
    ) -> None:
        self.feed(w.REQUEST.pack(w.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + data)

    def simple_reply(self, length: int = 0) -> tuple[int, int, bytes]:
        magic, error, cookie = w.SIMPLE_REPLY.unpack(self.take(w.SIMPLE_REPLY.size))
        assert magic == w.SIMPLE_REPLY_MAGIC
        return error, cookie, self.take(length if not error else 0)

    def chunks(self) -> list[tuple[int, int, int, bytes]]:
        """Structured chunks up to the one flagged DONE: (flags, type, cookie, payload)."""
        out = []
        while True:
            magic, flags, kind, cookie, length = w.STRUCTURED_REPLY.unpack(
                self.take(w.STRUCTURED_REPLY.size)
            )
            assert magic == w.STRUCTURED_REPLY_MAGIC
            out.append((flags, kind, cookie, self.take(length)))
            if flags & w.ReplyFlag.DONE:
                return out

    def structured_error(self) -> int:
        ((_, kind, _, payload),) = self.chunks()
        assert kind == w.ReplyType.ERROR
        error, msg_len = w.ERROR_HEADER.unpack(payload[:6])
        assert len(payload) == 6 + msg_len
        return int(error)


def nbd_string(text: str) -> bytes:
    return struct.pack(">I", len(text.encode())) + text.encode()


def info_payload(name: str, requests: tuple[int, ...] = ()) -> bytes:
    return nbd_string(name) + struct.pack(f">H{len(requests)}H", len(requests), *requests)


def meta_payload(name: str, queries: list[str]) -> bytes:
    return nbd_string(name) + struct.pack(">I", len(queries)) + b"".join(map(nbd_string, queries))


@pytest.fixture
def pair() -> Pair:
    return Pair()


# -- handshake ---------------------------------------------------------------------------------


def test_greeting_then_client_flags(pair: Pair) -> None:
    assert pair.conn.state is State.HANDSHAKE
    pair.handshake()
    assert pair.conn.state is State.OPTIONS
    assert pair.conn.client_flags == 3


@pytest.mark.parametrize("flags", [0, 1 << 5, 3 | 1 << 31], ids=["not-fixed", "unknown", "high"])
def test_bad_client_flags_are_fatal(pair: Pair, flags: int) -> None:
    with pytest.raises(RemoteProtocolError):
        pair.handshake(flags)
    assert pair.conn.state is State.CLOSED


def test_bad_option_magic_is_fatal(pair: Pair) -> None:
    pair.handshake()
    with pytest.raises(RemoteProtocolError, match="magic"):
        pair.feed(struct.pack(">QII", 0x1234, Opt.LIST, 0))
    assert pair.conn.state is State.CLOSED


def test_eof_between_messages_closes_cleanly(pair: Pair) -> None:
    pair.handshake()
    pair.feed(b"")
    assert isinstance(pair.events[-1], ConnectionClosed)
    assert pair.conn.state is State.CLOSED


def test_eof_inside_a_message_is_an_error(pair: Pair) -> None:
    pair.handshake()
    pair.feed(w.OPTION_HEADER.pack(w.IHAVEOPT, Opt.GO, 100) + b"abc")
    with pytest.raises(RemoteProtocolError, match="middle"):
        pair.feed(b"")


# -- options -------------------------------------------------------------------------------------


def test_list_names_every_export() -> None:
    pair = Pair({"": ExportInfo(SIZE), "disk2": ExportInfo(SIZE)})
    pair.handshake()
    replies = pair.option(Opt.LIST)
    assert replies == [
        (Rep.SERVER, nbd_string("")),
        (Rep.SERVER, nbd_string("disk2")),
        (Rep.ACK, b""),
    ]


def test_list_with_data_is_invalid(pair: Pair) -> None:
    pair.handshake()
    assert pair.option(Opt.LIST, b"x")[0][0] == Rep.ERR_INVALID
    assert pair.conn.state is State.OPTIONS


def test_info_reports_export_name_and_block_sizes(pair: Pair) -> None:
    pair.handshake()
    replies = pair.option(Opt.INFO, info_payload("", (w.Info.NAME, w.Info.BLOCK_SIZE)))
    infos = {struct.unpack(">H", d[:2])[0]: d for rep, d in replies if rep == Rep.INFO}
    _, size, flags = w.INFO_EXPORT.unpack(infos[w.Info.EXPORT])
    assert size == SIZE and flags & w.TransmissionFlag.HAS_FLAGS
    assert not flags & w.TransmissionFlag.READ_ONLY
    assert w.INFO_BLOCK_SIZE.unpack(infos[w.Info.BLOCK_SIZE]) == (3, 1, 4096, 32 << 20)
    assert infos[w.Info.NAME] == b"\0\x01"
    assert replies[-1] == (Rep.ACK, b"")
    assert pair.conn.state is State.OPTIONS  # INFO does not end haggling


def test_info_and_go_on_unknown_export(pair: Pair) -> None:
    pair.handshake()
    assert pair.option(Opt.INFO, info_payload("nope"))[0][0] == Rep.ERR_UNKNOWN
    assert pair.option(Opt.GO, info_payload("nope"))[0][0] == Rep.ERR_UNKNOWN
    assert pair.conn.state is State.OPTIONS


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\0\0\0\x05ab",
        info_payload("") + b"extra",
        info_payload("")[:-1],
        b"\0\0\0\x01\xff\0\0",
    ],
    ids=["empty", "short-name", "trailing", "short-count", "not-utf8"],
)
def test_malformed_go_is_invalid_not_fatal(pair: Pair, data: bytes) -> None:
    pair.handshake()
    assert pair.option(Opt.GO, data)[0][0] == Rep.ERR_INVALID
    pair.go(structured=False, meta=False, hello=False)  # still usable


def test_go_read_only_export_flags() -> None:
    pair = Pair({"ro": ExportInfo(SIZE, read_only=True)})
    pair.handshake()
    replies = pair.option(Opt.GO, info_payload("ro"))
    _, _, flags = w.INFO_EXPORT.unpack(replies[0][1])
    f = w.TransmissionFlag
    assert flags & f.READ_ONLY and flags & f.CAN_MULTI_CONN
    assert not flags & (f.SEND_TRIM | f.SEND_WRITE_ZEROES | f.SEND_FUA)


def test_go_read_write_export_flags(pair: Pair) -> None:
    flags = pair.go()
    f = w.TransmissionFlag
    want = f.HAS_FLAGS | f.SEND_FLUSH | f.SEND_FUA | f.SEND_TRIM | f.SEND_WRITE_ZEROES
    assert flags == want  # no READ_ONLY, no CAN_MULTI_CONN


@pytest.mark.parametrize(("client_flags", "padding"), [(3, 0), (1, 124)])
def test_export_name(pair: Pair, client_flags: int, padding: int) -> None:
    pair.handshake(client_flags)
    pair.send_option(Opt.EXPORT_NAME, b"")
    size, flags = w.EXPORT_NAME_REPLY.unpack(pair.take(w.EXPORT_NAME_REPLY.size))
    assert size == SIZE and flags & w.TransmissionFlag.HAS_FLAGS
    assert pair.take(padding) == bytes(padding) and not pair.inbox
    assert pair.conn.state is State.TRANSMISSION


def test_export_name_unknown_closes(pair: Pair) -> None:
    pair.handshake()
    pair.send_option(Opt.EXPORT_NAME, b"nope")
    assert not pair.inbox
    assert pair.conn.state is State.CLOSED


def test_export_name_too_long_is_fatal(pair: Pair) -> None:
    pair.handshake()
    with pytest.raises(RemoteProtocolError):
        pair.feed(w.OPTION_HEADER.pack(w.IHAVEOPT, Opt.EXPORT_NAME, 5000))


def test_abort(pair: Pair) -> None:
    pair.handshake()
    assert pair.option(Opt.ABORT) == [(Rep.ACK, b"")]
    assert pair.conn.state is State.CLOSED
    pair.feed(b"")  # the client hangs up afterwards
    assert isinstance(pair.events[-1], ConnectionClosed)


@pytest.mark.parametrize(
    "option", [Opt.STARTTLS, Opt.EXTENDED_HEADERS, Opt.PEEK_EXPORT, 99, 0xFFFFFFFF]
)
def test_unknown_options_are_unsupported(pair: Pair, option: int) -> None:
    pair.handshake()
    assert pair.option(option, b"payload")[0][0] == Rep.ERR_UNSUP
    assert pair.conn.state is State.OPTIONS


def test_oversize_option_is_refused_before_its_payload_arrives(pair: Pair) -> None:
    pair.handshake()
    pair.feed(w.OPTION_HEADER.pack(w.IHAVEOPT, Opt.GO, 0xFFFFFFFF))
    assert pair.option_replies(Opt.GO)[0][0] == Rep.ERR_TOO_BIG
    chunk = bytes(1 << 16)
    for _ in range(64):  # 4 MiB of the 4 GiB payload: dropped as it comes
        pair.feed(chunk)
        assert not pair.inbox
    assert pair.conn._available() == 0
    assert pair.conn._skip == 0xFFFFFFFF - (64 << 16)


def test_option_just_over_the_limit_then_more_options(pair: Pair) -> None:
    pair.handshake()
    assert pair.option(Opt.LIST, bytes((64 << 10) + 1))[0][0] == Rep.ERR_TOO_BIG
    assert pair.option(Opt.LIST)[-1][0] == Rep.ACK


def test_structured_reply_option(pair: Pair) -> None:
    pair.handshake()
    assert pair.option(Opt.STRUCTURED_REPLY, b"x")[0][0] == Rep.ERR_INVALID
    assert not pair.conn.structured_replies
    assert pair.option(Opt.STRUCTURED_REPLY) == [(Rep.ACK, b"")]
    assert pair.conn.structured_replies


def test_set_meta_context_needs_structured_replies(pair: Pair) -> None:
    pair.handshake()
    replies = pair.option(Opt.SET_META_CONTEXT, meta_payload("", ["base:allocation"]))
    assert replies[0][0] == Rep.ERR_INVALID


@pytest.mark.parametrize(
    ("queries", "found"),
    [
        ([], True),
        (["base:"], True),
        (["base:allocation"], True),
        (["qemu:dirty-bitmap:x"], False),
        (["base:other"], False),
    ],
)
def test_list_meta_context(pair: Pair, queries: list[str], found: bool) -> None:
    pair.handshake()
    replies = pair.option(Opt.LIST_META_CONTEXT, meta_payload("", queries))
    contexts = [d[4:] for rep, d in replies if rep == Rep.META_CONTEXT]
    assert contexts == ([b"base:allocation"] if found else [])
    assert replies[-1] == (Rep.ACK, b"")


def test_meta_context_errors(pair: Pair) -> None:
    pair.handshake()
    pair.option(Opt.STRUCTURED_REPLY)
    assert pair.option(Opt.SET_META_CONTEXT, meta_payload("nope", []))[0][0] == Rep.ERR_UNKNOWN
    bad = nbd_string("") + struct.pack(">I", 1_000_000)
    assert pair.option(Opt.LIST_META_CONTEXT, bad)[0][0] == Rep.ERR_INVALID
    bad = nbd_string("") + struct.pack(">I", 1) + struct.pack(">I", 5000) + bytes(5000)
    assert pair.option(Opt.LIST_META_CONTEXT, bad)[0][0] == Rep.ERR_INVALID


def test_meta_context_for_another_export_is_dropped_on_go() -> None:
    pair = Pair({"": ExportInfo(SIZE), "b": ExportInfo(SIZE)})
    pair.handshake()
    pair.option(Opt.STRUCTURED_REPLY)
    pair.option(Opt.SET_META_CONTEXT, meta_payload("b", ["base:allocation"]))
    pair.option(Opt.GO, info_payload(""))
    assert pair.conn.meta_contexts == ()


# -- transmission -----------------------------------------------------------------------------------


def test_read_simple(pair: Pair) -> None:
    pair.go(structured=False, meta=False)
    pair.request(Cmd.READ, 1000, 5000, cookie=0xDEADBEEF)
    assert pair.simple_reply(5000) == (0, 0xDEADBEEF, bytes(pair.disk[1000:6000]))


def test_read_structured(pair: Pair) -> None:
    pair.go()
    pair.request(Cmd.READ, 4096, 8192, cookie=3)
    ((flags, kind, cookie, payload),) = pair.chunks()
    assert (flags, kind, cookie) == (w.ReplyFlag.DONE, w.ReplyType.OFFSET_DATA, 3)
    assert payload == struct.pack(">Q", 4096) + pair.disk[4096 : 4096 + 8192]


def test_read_of_nothing(pair: Pair) -> None:
    pair.go()
    pair.request(Cmd.READ, 0, 0)
    assert [c[1] for c in pair.chunks()] == [w.ReplyType.NONE]


def test_write_then_read_back(pair: Pair) -> None:
    pair.go(structured=False, meta=False)
    pair.request(Cmd.WRITE, 512, 3, data=b"abc", flags=CmdFlag.FUA)
    assert pair.simple_reply() == (0, 7, b"")
    assert pair.disk[512:515] == b"abc" and pair.flushes == 1
    pair.request(Cmd.READ, 511, 5)
    assert pair.simple_reply(5)[2] == bytes(pair.disk[511:512]) + b"abc" + bytes(pair.disk[515:516])


def test_write_fed_one_byte_at_a_time(pair: Pair) -> None:
    pair.go(structured=False, meta=False)
    message = w.REQUEST.pack(w.REQUEST_MAGIC, 0, Cmd.WRITE, 9, 0, 4) + b"wxyz"
    for byte in message:
        pair.feed(bytes([byte]))
    assert pair.simple_reply() == (0, 9, b"") and pair.disk[:4] == b"wxyz"


def test_flush_trim_write_zeroes(pair: Pair) -> None:
    pair.go()
    pair.request(Cmd.FLUSH, cookie=1)
    pair.request(Cmd.TRIM, 0, BLOCK, cookie=2)
    pair.request(Cmd.WRITE_ZEROES, 100, 50, flags=CmdFlag.NO_HOLE | CmdFlag.FUA, cookie=3)
    assert [pair.simple_reply()[:2] for _ in range(3)] == [(0, 1), (0, 2), (0, 3)]
    assert pair.disk[100:150] == bytes(50) and pair.flushes == 2
    assert [type(e).__name__ for e in pair.events[-3:]] == ["Flush", "Trim", "WriteZeroes"]


def test_block_status(pair: Pair) -> None:
    pair.go()
    pair.request(Cmd.BLOCK_STATUS, 0, SIZE)
    ((flags, kind, cookie, payload),) = pair.chunks()
    assert (flags, kind, cookie) == (1, w.ReplyType.BLOCK_STATUS, 7)
    assert struct.unpack(">IIIII", payload) == (ONE_CONTEXT_ID, BLOCK, 0, SIZE - BLOCK, 3)


def test_block_status_req_one_and_clipping(pair: Pair) -> None:
    pair.go()
    pair.request(Cmd.BLOCK_STATUS, 1000, 2 * BLOCK, flags=CmdFlag.REQ_ONE)
    ((_, _, _, payload),) = pair.chunks()
    assert struct.unpack(">III", payload) == (ONE_CONTEXT_ID, BLOCK - 1000, 0)


def test_block_status_without_meta_context(pair: Pair) -> None:
    pair.go(meta=False)
    pair.request(Cmd.BLOCK_STATUS, 0, 4096)
    assert pair.structured_error() == Errno.EINVAL


@pytest.mark.parametrize(
    ("cmd", "offset", "length", "flags", "error"),
    [
        (Cmd.READ, SIZE - 10, 11, 0, Errno.EINVAL),
        (Cmd.READ, 1 << 62, 1, 0, Errno.EINVAL),
        (Cmd.READ, 0, (32 << 20) + 1, 0, Errno.EOVERFLOW),
        (Cmd.TRIM, SIZE, 1, 0, Errno.ENOSPC),
        (Cmd.WRITE_ZEROES, 0, SIZE + 1, 0, Errno.ENOSPC),
        (Cmd.BLOCK_STATUS, 0, 0, 0, Errno.EINVAL),
        (Cmd.BLOCK_STATUS, SIZE, 1, 0, Errno.EINVAL),
        (Cmd.CACHE, 0, 1, 0, Errno.EINVAL),
        (Cmd.RESIZE, 0, 0, 0, Errno.EINVAL),
        (42, 0, 0, 0, Errno.EINVAL),
        (Cmd.READ, 0, 1, CmdFlag.REQ_ONE, Errno.EINVAL),
        (Cmd.FLUSH, 0, 0, CmdFlag.DF, Errno.EINVAL),
        (Cmd.READ, 0, 1, 1 << 15, Errno.EINVAL),
    ],
)
@pytest.mark.parametrize("structured", [False, True])
def test_bad_requests_get_error_replies(
    pair: Pair, cmd: int, offset: int, length: int, flags: int, error: int, structured: bool
) -> None:
    pair.go(structured=structured, meta=structured)
    pair.request(cmd, offset, length, flags=flags)
    got = pair.structured_error() if structured else pair.simple_reply()[0]
    assert got == error
    assert isinstance(pair.events[-1], BadRequest)
    pair.request(Cmd.READ, 0, 1)  # still serving
    assert pair.conn.state is State.TRANSMISSION


def test_write_past_end_skips_its_payload(pair: Pair) -> None:
    pair.go(structured=False, meta=False)
    pair.request(Cmd.WRITE, SIZE - 2, 4, data=b"abcd")
    pair.request(Cmd.READ, SIZE - 2, 2, cookie=8)
    assert pair.simple_reply() == (Errno.ENOSPC, 7, b"")
    assert pair.simple_reply(2) == (0, 8, bytes(pair.disk[-2:]))


def test_write_on_read_only_export() -> None:
    pair = Pair({"": ExportInfo(SIZE, read_only=True)})
    pair.handshake()
    pair.option(Opt.GO, info_payload(""))
    before = bytes(pair.disk)
    for cmd, data in [(Cmd.WRITE, b"x" * 10), (Cmd.TRIM, b""), (Cmd.WRITE_ZEROES, b"")]:
        pair.request(cmd, 0, 10, data=data)
        assert pair.simple_reply() == (Errno.EPERM, 7, b"")
    assert pair.disk == before
    pair.request(Cmd.FLUSH)
    assert pair.simple_reply() == (0, 7, b"")


def test_incoming_payload_is_known_from_the_write_header_on(pair: Pair) -> None:
    pair.go(structured=False, meta=False)
    conn = pair.conn
    assert (conn.incoming_payload, conn.mid_message) == (0, False)
    header = w.REQUEST.pack(w.REQUEST_MAGIC, 0, Cmd.WRITE, 7, 0, 3 * BLOCK)
    pair.feed(header[:10])
    assert (conn.incoming_payload, conn.mid_message) == (0, True)  # not even a header yet
    pair.feed(header[10:] + bytes(BLOCK))
    assert (conn.incoming_payload, conn.mid_message) == (3 * BLOCK, True)
    pair.feed(b"\xab" * (2 * BLOCK))
    assert isinstance(pair.events[-1], Write) and pair.events[-1].data == (
        bytes(BLOCK) + b"\xab" * (2 * BLOCK))
    assert (conn.incoming_payload, conn.mid_message) == (0, False)
    assert pair.simple_reply() == (0, 7, b"")


def test_refused_write_payload_needs_no_room_but_is_mid_message(pair: Pair) -> None:
    pair.go(structured=False, meta=False)
    pair.request(Cmd.WRITE, 0, 64 << 20, data=bytes(100))
    assert pair.conn.incoming_payload == 0  # dropped as it comes, never buffered
    assert pair.conn.mid_message  # but the client still owes the rest of it


def test_oversize_write_payload_is_dropped_not_buffered(pair: Pair) -> None:
    pair.go(structured=False, meta=False)
    length = 64 << 20
    pair.request(Cmd.WRITE, 0, length)
    assert pair.simple_reply() == (Errno.EOVERFLOW, 7, b"")
    chunk = bytes(1 << 20)
    for _ in range(64):
        pair.feed(chunk)
        assert pair.conn._available() == 0
    pair.request(Cmd.READ, 0, 4, cookie=8)
    assert pair.simple_reply(4)[:2] == (0, 8)


def test_bad_request_magic_is_fatal(pair: Pair) -> None:
    pair.go()
    with pytest.raises(RemoteProtocolError, match="magic"):
        pair.feed(struct.pack(">IHHQQI", 0x12345678, 0, 0, 1, 0, 1))
    assert pair.conn.state is State.CLOSED


def test_disconnect(pair: Pair) -> None:
    pair.go()
    pair.request(Cmd.DISC)
    assert pair.conn.state is State.CLOSED and not pair.inbox
    assert pair.conn.next_event() == ConnectionClosed()


def test_pipelined_requests_keep_their_cookies(pair: Pair) -> None:
    pair.go(structured=False, meta=False)
    batch = b"".join(
        w.REQUEST.pack(w.REQUEST_MAGIC, 0, Cmd.READ, cookie, cookie * 10, 10)
        for cookie in range(1, 6)
    )
    pair.feed(batch)
    for cookie in range(1, 6):
        assert pair.simple_reply(10) == (
            0,
            cookie,
            bytes(pair.disk[cookie * 10 : cookie * 10 + 10]),
        )


# -- misuse by the application ------------------------------------------------------------------


def test_local_misuse(pair: Pair) -> None:
    with pytest.raises(LocalProtocolError):
        pair.conn.greeting()
    fresh = ServerConnection({"": ExportInfo(SIZE)})
    with pytest.raises(LocalProtocolError):
        fresh.next_event()
    pair.go(structured=False, meta=False)
    with pytest.raises(LocalProtocolError):
        pair.conn.reply_option(pair.events[0])  # type: ignore[arg-type]
    read = Read(cookie=99, flags=CmdFlag(0), offset=0, length=4)
    with pytest.raises(LocalProtocolError, match="cookie"):
        pair.conn.reply_read(read, b"abcd")
    with pytest.raises(LocalProtocolError):
        pair.conn.reply_read(read, b"abc")
    with pytest.raises(LocalProtocolError):
        pair.conn.reply_ok(read)
    pair.feed(b"")
    with pytest.raises(LocalProtocolError):
        pair.conn.receive_data(b"more")


def test_an_answered_request_cannot_be_answered_twice(pair: Pair) -> None:
    pair.go(structured=False, meta=False)
    pair.conn.receive_data(w.REQUEST.pack(w.REQUEST_MAGIC, 0, Cmd.FLUSH, 5, 0, 0))
    event = pair.conn.next_event()
    assert isinstance(event, Flush)
    pair.conn.reply_ok(event)
    with pytest.raises(LocalProtocolError):
        pair.conn.reply_ok(event)


def test_export_info_is_checked() -> None:
    with pytest.raises(ValueError):
        ExportInfo(-1)
    with pytest.raises(ValueError):
        ExportInfo(1, description="x" * 5000)


# -- hostile input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["options", "transmission"])
def test_random_garbage_only_raises_protocol_errors(phase: str) -> None:
    rng = random.Random(1234)
    for _ in range(300):
        pair = Pair()
        if phase == "options":
            pair.handshake()
            prefix = w.OPTION_HEADER.pack(
                w.IHAVEOPT, rng.choice(list(Opt) + [77]), rng.randrange(64)
            )
        else:
            pair.go(structured=rng.random() < 0.5, meta=False)
            prefix = struct.pack(">IHH", w.REQUEST_MAGIC, rng.randrange(1 << 16), rng.randrange(10))
        garbage = prefix + rng.randbytes(rng.randrange(200))
        try:
            for start in range(0, len(garbage), 13):
                pair.feed(garbage[start : start + 13])
            pair.feed(b"")
        except NbdProtocolError:
            pass
