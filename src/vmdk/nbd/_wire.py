"""NBD wire constants and layouts, declared once as data.

Source: the NBD protocol specification, ``doc/proto.md`` of
https://github.com/NetworkBlockDevice/nbd (fixed newstyle negotiation,
structured replies, ``base:allocation``).  Every integer on the wire is
big-endian.  Names follow the spec without the ``NBD_`` prefix.
"""

from __future__ import annotations

import enum
import struct

# -- magics -----------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # b"IHAVEOPT": newstyle greeting and every option
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF


# -- handshake --------------------------------------------------------------


class HandshakeFlag(enum.IntFlag):
    """Sent by the server in the greeting (16 bits)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """Sent by the client right after the greeting (32 bits)."""

    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4  # withdrawn
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERR = 1 << 31


class Rep(enum.IntEnum):
    """Option reply types; those with the top bit set are errors."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR | 1
    ERR_POLICY = _REP_ERR | 2
    ERR_INVALID = _REP_ERR | 3
    ERR_PLATFORM = _REP_ERR | 4
    ERR_TLS_REQD = _REP_ERR | 5
    ERR_UNKNOWN = _REP_ERR | 6
    ERR_SHUTDOWN = _REP_ERR | 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
    ERR_TOO_BIG = _REP_ERR | 9

    @property
    def is_error(self) -> bool:
        return bool(self & _REP_ERR)


class Info(enum.IntEnum):
    """Information types inside an ``Rep.INFO`` reply to INFO/GO."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


# -- transmission -----------------------------------------------------------


class TransmissionFlag(enum.IntFlag):
    """Per-export flags (16 bits), sent with the export size."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


#: Command flags each command accepts; anything else is answered with EINVAL.
ALLOWED_CMD_FLAGS: dict[Cmd, CmdFlag] = {
    Cmd.READ: CmdFlag.FUA,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.DISC: CmdFlag(0),
    Cmd.FLUSH: CmdFlag(0),
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE,
    Cmd.BLOCK_STATUS: CmdFlag.REQ_ONE,
}

#: Commands that change the export, refused with EPERM when it is read-only.
WRITING_CMDS = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES})


class ReplyFlag(enum.IntFlag):
    DONE = 1 << 0


_REPLY_ERR = 1 << 15


class ReplyType(enum.IntEnum):
    """Structured reply chunk types."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = _REPLY_ERR | 1
    ERROR_OFFSET = _REPLY_ERR | 2


class Errno(enum.IntEnum):
    """Error values on the wire (fixed by the spec, not the host's errno)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class BlockState(enum.IntFlag):
    """Status flags of the ``base:allocation`` meta context."""

    HOLE = 1 << 0
    ZERO = 1 << 1


BASE_ALLOCATION = "base:allocation"

# -- layouts ----------------------------------------------------------------

#: NBDMAGIC, IHAVEOPT, handshake flags.
GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
#: IHAVEOPT, option, data length.
OPTION_HEADER = struct.Struct(">QII")
#: magic, option, reply type, data length.
OPTION_REPLY_HEADER = struct.Struct(">QIII")
#: Reply to EXPORT_NAME: export size, transmission flags (then 124 zeros unless NO_ZEROES).
EXPORT_NAME_REPLY = struct.Struct(">QH")
EXPORT_NAME_PADDING = 124
#: Rep.INFO payloads: type + size + flags; type + min + preferred + max.
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")
INFO_TYPE = struct.Struct(">H")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
#: magic, command flags, type, cookie (handle), offset, length.
REQUEST = struct.Struct(">IHHQQI")
#: magic, error, cookie.
SIMPLE_REPLY = struct.Struct(">IIQ")
#: magic, reply flags, type, cookie, payload length.
STRUCTURED_REPLY = struct.Struct(">IHHQI")
OFFSET = struct.Struct(">Q")
#: Structured error: error, message length.
ERROR_HEADER = struct.Struct(">IH")
#: Block status descriptor: length, status flags.
BLOCK_DESCRIPTOR = struct.Struct(">II")
