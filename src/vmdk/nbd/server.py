"""A threaded NBD server: moves bytes between sockets and :mod:`.protocol`.

One thread per client, any number of clients; every device call goes
through one lock, since block devices are not thread-safe, so at most one
client reads or writes at a time.  Signals are the caller's business: run
:func:`serve` with a ``stop_event`` and set it from a handler, or use
:class:`NbdServer` directly.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import socketserver
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, Self

from ..errors import VmdkError
from . import protocol as p
from ._wire import BlockState, CmdFlag, Errno

log = logging.getLogger(__name__)

RECV_SIZE = 256 << 10
ZERO_CHUNK = 1 << 20  # buffer for WRITE_ZEROES with NO_HOLE


class MapRun(Protocol):
    """One run of :meth:`BlockDevice.map`, with ``qemu-img map`` meanings."""

    @property
    def start(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def data(self) -> bool: ...  # stored in the image
    @property
    def zero(self) -> bool: ...  # reads as zeros


class BlockDevice(Protocol):
    """What the server exports: an image opened by the package, or a test double."""

    @property
    def size(self) -> int: ...
    def writable(self) -> bool: ...
    def read_at(self, offset: int, length: int) -> bytes: ...
    def write_at(self, offset: int, data: bytes | memoryview) -> None: ...
    def write_zeroes_at(self, offset: int, length: int) -> None: ...
    def discard_at(self, offset: int, length: int) -> None: ...
    def flush(self) -> None: ...
    def map(self, offset: int, length: int) -> Sequence[MapRun]: ...


#: Device errors as NBD errors, looked up along the exception's MRO.
_ERRNO_BY_TYPE: dict[type[BaseException], Errno] = {
    PermissionError: Errno.EPERM,
    ValueError: Errno.EINVAL,
    NotImplementedError: Errno.ENOTSUP,
}
_ERRNO_BY_OS_ERRNO: dict[int, Errno] = {
    errno.ENOSPC: Errno.ENOSPC,
    errno.EDQUOT: Errno.ENOSPC,
    errno.EFBIG: Errno.ENOSPC,
    errno.EROFS: Errno.EPERM,
    errno.EACCES: Errno.EPERM,
    errno.EPERM: Errno.EPERM,
}


def nbd_errno(exc: BaseException) -> Errno:
    """The NBD error to report for a device exception (EIO when unsure)."""
    for cls in type(exc).__mro__:
        if cls in _ERRNO_BY_TYPE:
            return _ERRNO_BY_TYPE[cls]
    if isinstance(exc, OSError) and exc.errno in _ERRNO_BY_OS_ERRNO:
        return _ERRNO_BY_OS_ERRNO[exc.errno]
    return Errno.EIO


def block_states(
    runs: Iterable[MapRun], offset: int, length: int
) -> Iterator[tuple[int, BlockState]]:
    """``base:allocation`` (length, state) pairs covering offset..offset+length.

    Gaps between runs, and whatever the runs leave uncovered at the end, are
    reported as plain data: the safe answer.
    """
    pos, end = offset, offset + length
    for run in sorted(runs, key=lambda r: r.start):
        start, stop = max(run.start, pos), min(run.start + run.length, end)
        if stop <= start:
            continue
        if start > pos:
            yield start - pos, BlockState(0)
        state = BlockState(0) if run.data else BlockState.HOLE
        yield stop - start, state | (BlockState.ZERO if run.zero else 0)
        pos = stop
    if pos < end:
        yield end - pos, BlockState(0)


class WriterSlot:
    """Any number of clients may read; one at a time may write.

    The first client to send a write-type command holds the slot until it
    disconnects; another client's writes meanwhile get EPERM.
    """

    def __init__(self) -> None:
        self.holder: object | None = None

    def claim(self, session: object) -> bool:
        if self.holder is None:
            self.holder = session
        return self.holder is session

    def release(self, session: object) -> None:
        if self.holder is session:
            self.holder = None


_WRITES = (p.Write, p.Trim, p.WriteZeroes)


class _Session:
    """Carries out the requests of one client on the shared device."""

    def __init__(self, device: BlockDevice, lock: threading.Lock, conn: p.ServerConnection,
                 writer: WriterSlot | None = None) -> None:
        self.device = device
        self.lock = lock
        self.conn = conn
        self.writer = writer if writer is not None else WriterSlot()

    def close(self) -> None:
        with self.lock:
            self.writer.release(self)

    def handle(self, event: p.Event) -> bytes:
        if isinstance(event, p.OptionEvent):
            return self.conn.reply_option(event)
        if isinstance(event, p.BadRequest):
            log.debug("refused %s", event)
            return self.conn.reply_error(event, event.error, event.reason)
        action = _ACTIONS.get(type(event))
        if action is None:  # ClientFlagsReceived, ConnectionClosed
            return b""
        assert isinstance(event, p.Request)
        try:
            with self.lock:
                if isinstance(event, _WRITES) and not self.writer.claim(self):
                    return self.conn.reply_error(
                        event, Errno.EPERM, "another client is writing to this export")
                return action(self, event)
        except (VmdkError, OSError) as exc:
            log.warning("%s failed: %s", type(event).__name__, exc)
            return self.conn.reply_error(event, nbd_errno(exc), str(exc))

    def _fua(self, request: p.Request) -> None:
        if request.flags & CmdFlag.FUA:
            self.device.flush()

    def read(self, request: p.Read) -> bytes:
        data = self.device.read_at(request.offset, request.length) if request.length else b""
        return self.conn.reply_read(request, data)

    def write(self, request: p.Write) -> bytes:
        if request.length:
            self.device.write_at(request.offset, request.data)
        self._fua(request)
        return self.conn.reply_ok(request)

    def flush(self, request: p.Flush) -> bytes:
        self.device.flush()
        return self.conn.reply_ok(request)

    def trim(self, request: p.Trim) -> bytes:
        if request.length:
            self.device.discard_at(request.offset, request.length)
        self._fua(request)
        return self.conn.reply_ok(request)

    def write_zeroes(self, request: p.WriteZeroes) -> bytes:
        if request.flags & CmdFlag.NO_HOLE:
            self._write_zero_data(request.offset, request.length)
        elif request.length:
            self.device.write_zeroes_at(request.offset, request.length)
        self._fua(request)
        return self.conn.reply_ok(request)

    def _write_zero_data(self, offset: int, length: int) -> None:
        zeros = memoryview(bytes(min(length, ZERO_CHUNK)))
        while length:
            n = min(length, len(zeros))
            self.device.write_at(offset, zeros[:n])
            offset += n
            length -= n

    def block_status(self, request: p.BlockStatus) -> bytes:
        runs = self.device.map(request.offset, request.length)
        return self.conn.reply_block_status(
            request, block_states(runs, request.offset, request.length)
        )

    def disconnect(self, request: p.Disconnect) -> bytes:
        if self.device.writable():
            self.device.flush()
        return b""


_ACTIONS: dict[type[p.Event], Callable[[_Session, Any], bytes]] = {
    p.Read: _Session.read,
    p.Write: _Session.write,
    p.Flush: _Session.flush,
    p.Trim: _Session.trim,
    p.WriteZeroes: _Session.write_zeroes,
    p.BlockStatus: _Session.block_status,
    p.Disconnect: _Session.disconnect,
}


class _Handler(socketserver.BaseRequestHandler):
    @property
    def owner(self) -> NbdServer:
        assert isinstance(self.server, _ServerMixin)
        return self.server.owner

    def setup(self) -> None:
        self.owner.track(self.request, add=True)
        if self.request.family in (socket.AF_INET, socket.AF_INET6):
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def finish(self) -> None:
        self.owner.track(self.request, add=False)

    def handle(self) -> None:
        owner = self.owner
        conn = p.ServerConnection({owner.export_name: owner.export})
        session = _Session(owner.device, owner.lock, conn, owner.writer)
        sock: socket.socket = self.request
        try:
            sock.sendall(conn.greeting())
            while conn.state is not p.State.CLOSED:
                event = conn.next_event()
                if event is p.NEED_DATA:
                    conn.receive_data(sock.recv(RECV_SIZE))
                    continue
                assert isinstance(event, p.Event)
                out = session.handle(event)
                if out:
                    sock.sendall(out)
        except p.RemoteProtocolError as exc:
            log.warning("dropping client %s: %s", self.client_address or "(unix)", exc)
        except OSError as exc:
            log.info("client %s gone: %s", self.client_address or "(unix)", exc)
        finally:
            session.close()


class _ServerMixin(socketserver.ThreadingMixIn):
    daemon_threads = False
    block_on_close = True
    owner: NbdServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("bug while serving %s", client_address or "(unix)")


class _TCPServer(_ServerMixin, socketserver.TCPServer):
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily) -> None:
        self.address_family = family
        super().__init__(address, _Handler)


class _UnixServer(_ServerMixin, socketserver.UnixStreamServer):
    def __init__(self, path: str) -> None:
        super().__init__(path, _Handler)


class NbdServer:
    """Serve one device as one export; ``start()``, then ``stop()``.

    ``port=0`` picks a free port; :attr:`address` and :attr:`uri` tell
    which.  With ``unix_socket`` the server listens there instead of TCP.
    """

    def __init__(
        self,
        device: BlockDevice,
        *,
        host: str = "127.0.0.1",
        port: int = 10809,
        unix_socket: str | None = None,
        export_name: str = "",
        read_only: bool = False,
    ) -> None:
        self.device = device
        self.export_name = export_name
        self.export = p.ExportInfo(size=device.size, read_only=read_only or not device.writable())
        self.lock = threading.Lock()
        self.writer = WriterSlot()
        self.clients: set[socket.socket] = set()
        self.clients_lock = threading.Lock()
        self._host, self._port, self._unix_socket = host, port, unix_socket
        self._server: _TCPServer | _UnixServer | None = None
        self._thread: threading.Thread | None = None

    def track(self, sock: socket.socket, *, add: bool) -> None:
        """Remember (or forget) a client socket, so stop() can disconnect it."""
        with self.clients_lock:
            (self.clients.add if add else self.clients.discard)(sock)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Bind and start accepting clients in a background thread."""
        if self._server is not None:
            raise RuntimeError("server already started")
        if self._unix_socket is not None:
            server: _TCPServer | _UnixServer = _UnixServer(self._unix_socket)
        else:
            family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
            server = _TCPServer((self._host, self._port), family)
        server.owner = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="nbd-accept", daemon=True)
        self._thread.start()
        log.info("serving %s", self.uri)

    @property
    def address(self) -> tuple[str, int] | str:
        """The bound socket address: (host, port), or the Unix socket path."""
        if self._server is None:
            raise RuntimeError("server not started")
        if isinstance(self._server, _UnixServer):
            return str(self._server.server_address)
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def uri(self) -> str:
        """An NBD URI clients (qemu-img, nbdinfo) accept for the export."""
        name = urllib.parse.quote(self.export_name)
        address = self.address
        if isinstance(address, str):
            return f"nbd+unix:///{name}?socket={urllib.parse.quote(address)}"
        host, port = address
        return f"nbd://{f'[{host}]' if ':' in host else host}:{port}/{name}"

    def stop(self) -> None:
        """Stop accepting, disconnect clients, wait for them, flush the device."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        with self.clients_lock:
            for sock in self.clients:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already gone
        server.server_close()  # joins the client threads
        if self._thread is not None:
            self._thread.join()
        if isinstance(server, _UnixServer):
            _unlink(str(server.server_address))
        with self.lock:
            self.device.flush()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def serve(
    device: BlockDevice,
    *,
    host: str = "127.0.0.1",
    port: int = 10809,
    unix_socket: str | None = None,
    export_name: str = "",
    read_only: bool = False,
    ready: Callable[[str], None] | None = None,
    stop_event: threading.Event | None = None,
) -> None:
    """Serve ``device`` until ``stop_event`` is set, then flush it.

    ``ready`` is called with the server's URI once it accepts clients.
    """
    server = NbdServer(
        device,
        host=host,
        port=port,
        unix_socket=unix_socket,
        export_name=export_name,
        read_only=read_only,
    )
    stop_event = stop_event if stop_event is not None else threading.Event()
    server.start()
    try:
        if ready is not None:
            ready(server.uri)
        stop_event.wait()
    finally:
        server.stop()
