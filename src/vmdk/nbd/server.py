"""An NBD server: one thread moves bytes between sockets and :mod:`.protocol`.

A selector loop serves every client from one thread, one request at a time, so
the device (block devices are not thread-safe) sees one call at a time and
readers always see whole writes.  What a few clients can make the server hold
is bounded (:class:`Limits`):

* ``max_connections`` clients at once (16 by default); more wait in the listen
  backlog, the system's full one, and are accepted as slots free up, as
  qemu-nbd does with ``--shared``;
* ``max_in_flight`` payload bytes across all clients (64 MiB by default):
  WRITE payloads being collected and READ replies not yet sent, of requests
  over 256 KiB (smaller ones come out of each connection's own allowance).  A
  request that does not fit waits, first come first served, for others to
  finish; none may exceed the advertised maximum (``NBD_INFO_BLOCK_SIZE``,
  32 MiB);
* a client must finish the handshake within ``handshake_timeout`` seconds (10)
  and, once it has started sending a request or been sent a reply, finish it
  within ``request_timeout`` (60); otherwise it is disconnected.  A client idle
  between requests is kept as long as it likes.

Signals are the caller's business: run :func:`serve` with a ``stop_event`` and
set it from a handler, or use :class:`NbdServer` directly.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import functools
import logging
import os
import selectors
import socket
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, Self

from ..errors import VmdkError
from . import protocol as p
from ._wire import BlockState, CmdFlag, Errno

log = logging.getLogger(__name__)

RECV_SIZE = 256 << 10
#: Requests up to this size need no share of the budget: each connection holds at most
#: one such reply and one read's worth of input, bounded by max_connections; so clients
#: that hoard the budget with large requests cannot hold up small ones.
SMALL_REQUEST = RECV_SIZE
ZERO_CHUNK = 1 << 20  # buffer for WRITE_ZEROES with NO_HOLE

DEFAULT_MAX_CONNECTIONS = 16
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_REQUEST_TIMEOUT = 60.0
DEFAULT_MAX_IN_FLIGHT = 2 * p.MAX_PAYLOAD  # a largest write and a largest read at once
#: More than any system allows: listen() caps it at the system's own maximum (somaxconn).
LISTEN_BACKLOG = 1 << 16
ACCEPT_RETRY = 1.0  # seconds to wait after accept() failed for want of resources


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


#: How much of the disk a block-status reply maps at first (see _Session._status_runs).
STATUS_WINDOW = 64 << 20


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


class StatusWindow:
    """The allocation map of the window the last block-status reply used, shared by every
    client: a client walks the disk extent by extent, each time asking up to its end, and
    the next question usually falls inside the window mapped for the last.  A write by
    anyone forgets it (see _Session.handle)."""

    def __init__(self) -> None:
        self.start = self.end = 0
        self.runs: Sequence[MapRun] = ()

    def runs_from(self, offset: int, length: int) -> tuple[Sequence[MapRun], int] | None:
        """The runs and how far from ``offset`` they answer, when the window holds it."""
        if not self.start <= offset < self.end:
            return None
        return self.runs, min(length, self.end - offset)

    def keep(self, start: int, end: int, runs: Sequence[MapRun]) -> None:
        self.start, self.end, self.runs = start, end, runs

    def forget(self) -> None:
        self.keep(0, 0, ())


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
                 writer: WriterSlot | None = None, status: StatusWindow | None = None) -> None:
        self.device = device
        self.lock = lock
        self.conn = conn
        self.writer = writer if writer is not None else WriterSlot()
        self.status = status if status is not None else StatusWindow()

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
                if isinstance(event, _WRITES):
                    if not self.writer.claim(self):
                        return self.conn.reply_error(
                            event, Errno.EPERM, "another client is writing to this export")
                    self.status.forget()  # the map it holds may no longer be true
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
        runs, span = self._status_runs(request.offset, request.length)
        return self.conn.reply_block_status(request, block_states(runs, request.offset, span))

    def _status_runs(self, offset: int, length: int) -> tuple[Sequence[MapRun], int]:
        """The allocation of a window from ``offset`` (the protocol lets a reply cover less
        than was asked).  Clients ask up to the end of the disk at every extent they
        reach: mapping all of it each time cost time squared in the disk's size.  A
        window that holds one kind only says little, so it grows while that is so."""
        known = self.status.runs_from(offset, length)
        if known is not None:
            return known
        span = min(length, STATUS_WINDOW)
        runs = self.device.map(offset, span)
        while len(runs) <= 1 and span < length:
            span = min(length, span * 8)
            runs = self.device.map(offset, span)
        self.status.keep(offset, offset + span, runs)
        return runs, span

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


# -- limits -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a few clients may make the server hold (see the module's docstring)."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {self.max_connections}")
        for name in ("handshake_timeout", "request_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if self.max_in_flight < p.MAX_PAYLOAD:
            # a request of the advertised maximum size could never get its bytes
            raise ValueError(f"max_in_flight must be at least {p.MAX_PAYLOAD} (the largest "
                             f"request), not {self.max_in_flight}")


class _Budget:
    """Payload bytes in flight across all clients: write payloads being collected and read
    replies not yet sent.  Granted first come, first served, so a large request is not
    starved by a stream of smaller ones."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.queue: collections.deque[_Client] = collections.deque()

    def take(self, client: _Client, n: int) -> bool:
        """Grant ``n`` bytes to ``client`` now, or queue it and return False."""
        first = not self.queue or self.queue[0] is client
        if first and self.used + n <= self.limit:
            if self.queue:
                self.queue.popleft()
            self.used += n
            return True
        if client not in self.queue:
            self.queue.append(client)
        return False

    def give_back(self, n: int) -> None:
        self.used -= n

    def forget(self, client: _Client) -> None:
        with contextlib.suppress(ValueError):
            self.queue.remove(client)

    def next_grantable(self) -> _Client | None:
        """The first waiting client, if what it waits for is free now."""
        if self.queue and self.used + self.queue[0].wanted <= self.limit:
            return self.queue[0]
        return None


# -- one connection -----------------------------------------------------------------------


_NOTHING = memoryview(b"")


class _Client:
    """One connection: its protocol state, the reply being sent, its share of the budget.

    Never blocks: :meth:`advance` goes as far as the socket and the budget allow, and
    :attr:`interest` tells the loop what to wait for next.
    """

    def __init__(self, sock: socket.socket, peer: str, owner: NbdServer, budget: _Budget,
                 now: float) -> None:
        self.sock = sock
        self.peer = peer
        self.conn = p.ServerConnection({owner.export_name: owner.export})
        self.session = _Session(owner.device, owner.lock, self.conn, owner.writer,
                                owner.status)
        self.budget = budget
        self.limits = owner.limits
        self.out = memoryview(self.conn.greeting())  # the reply being sent
        self.held = 0  # budget held for the request being served
        self.wanted = 0  # budget asked for and not granted yet: the client waits for it
        self.stashed: p.Read | None = None  # a READ waiting for budget for its reply
        self.handshake_deadline = now + self.limits.handshake_timeout
        self.busy_since: float | None = None  # when the unfinished message or reply began
        self.registered = 0  # selector events the loop watches for it

    @property
    def done(self) -> bool:
        return self.conn.state is p.State.CLOSED and not self.out

    @property
    def interest(self) -> int:
        """What to wait for: room to send, bytes to read, or (0) the budget."""
        if self.out:
            return selectors.EVENT_WRITE
        return 0 if self.wanted else selectors.EVENT_READ

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        self.conn.receive_data(data)
        self.advance()

    def advance(self) -> None:
        """Send what is due, then serve buffered requests, until the client or the budget
        has to be waited for."""
        while self._send_pending() and self.conn.state is not p.State.CLOSED:
            if not self._serve_next():
                return

    def _send_pending(self) -> bool:
        """Send what the socket takes of the pending reply; True once none is left.

        A reply sent in full ends its request: the budget the request held is given back
        (not before: a WRITE holds it from its header on, while its payload comes in).
        """
        if not self.out:
            return True
        while self.out:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                return False
            self.out = self.out[sent:]
        self.out = _NOTHING  # an empty slice would still hold the whole reply
        if self.held:
            self.budget.give_back(self.held)
            self.held = 0
        return True

    def _serve_next(self) -> bool:
        """Serve one buffered event; False when more bytes or budget are needed first."""
        event = self.stashed or self.conn.next_event()
        if event is p.NEED_DATA:
            self._reserve(self.conn.incoming_payload)  # granted or queued, wait either way
            return False
        assert isinstance(event, p.Event)
        if isinstance(event, p.Read) and not self._reserve(event.length):
            self.stashed = event
            return False
        self.stashed = None
        self.busy_since = None  # a message is complete: the next one gets its own time
        self.out = memoryview(self.session.handle(event))
        return True

    def _reserve(self, n: int) -> bool:
        if n <= max(self.held, SMALL_REQUEST):
            return True
        if self.budget.take(self, n - self.held):
            self.held, self.wanted = n, 0
            return True
        self.wanted = n
        return False

    def note_time(self, now: float) -> None:
        """Start the clock of an unfinished message or reply (not while we make it wait)."""
        busy = bool(self.out) or (self.conn.mid_message and not self.wanted)
        if not busy:
            self.busy_since = None
        elif self.busy_since is None:
            self.busy_since = now

    @property
    def negotiating(self) -> bool:
        return self.conn.state in (p.State.HANDSHAKE, p.State.OPTIONS)

    def deadline(self) -> float | None:
        """When the client must have finished what it is doing, if it is doing anything."""
        if self.negotiating:
            return self.handshake_deadline
        if self.busy_since is None:
            return None  # idle between requests, or waiting for the budget: fine
        return self.busy_since + self.limits.request_timeout

    def close(self) -> None:
        self.budget.give_back(self.held)
        self.held = 0
        self.budget.forget(self)
        self.stashed = None
        self.out = _NOTHING
        self.session.close()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # at once, even with a reply half sent
        self.sock.close()


# -- the loop -------------------------------------------------------------------------------


class _Loop:
    """The server's one thread: accepts, reads, serves and sends with a selector."""

    def __init__(self, owner: NbdServer, listener: socket.socket) -> None:
        self.owner = owner
        self.limits = owner.limits
        self.listener = listener
        self.selector = selectors.DefaultSelector()
        self.budget = _Budget(self.limits.max_in_flight)
        self.clients: set[_Client] = set()
        self._stopping = False
        self._accepting = False
        self._accept_after = 0.0  # a failed accept() (no descriptors left) pauses accepting
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self.selector.register(self._wake_reader, selectors.EVENT_READ, self._on_wake)
        listener.setblocking(False)

    def stop(self) -> None:
        """Ask the loop to close every connection and return (from any thread)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")

    def run(self) -> None:
        try:
            self._watch_listener(time.monotonic())
            while not self._stopping:
                for key, _mask in self.selector.select(self._timeout(time.monotonic())):
                    key.data()
                now = time.monotonic()
                self._drop_late_clients(now)
                self._serve_budget_waiters(now)
                self._watch_listener(now)
        except Exception:
            log.exception("the NBD server stopped on a bug")
            raise
        finally:
            self._close_everything()

    # -- events

    def _on_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_reader.recv(64)

    def _on_listener(self) -> None:
        now = time.monotonic()
        while len(self.clients) < self.limits.max_connections:
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, ConnectionAbortedError):
                break
            except OSError as exc:  # EMFILE, ENOBUFS...: retry in a moment rather than spin
                log.warning("cannot accept clients: %s", exc)
                self._accept_after = now + ACCEPT_RETRY
                break
            self._add(sock, address, now)
        self._watch_listener(now)

    def _add(self, sock: socket.socket, address: Any, now: float) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = _Client(sock, _peer_name(address), self.owner, self.budget, now)
        self.clients.add(client)
        self._step(client, client.advance, now)  # sends the greeting

    def _on_client(self, client: _Client) -> None:
        if client in self.clients:  # not closed earlier in this round
            action = client.on_readable if client.interest & selectors.EVENT_READ else client.advance
            self._step(client, action, time.monotonic())

    def _step(self, client: _Client, action: Callable[[], None], now: float) -> None:
        """Run one action for a client; drop it if it broke the protocol, left, or hit a bug."""
        try:
            action()
        except p.RemoteProtocolError as exc:
            self._drop(client, logging.WARNING, f"dropped: {exc}")
            return
        except OSError as exc:
            self._drop(client, logging.INFO, f"gone: {exc}")
            return
        except Exception:
            log.exception("bug while serving client %s", client.peer)
            self._drop(client, logging.DEBUG, "dropped after the bug")
            return
        if client.done:
            self._drop(client, logging.DEBUG, "disconnected")
            return
        client.note_time(now)
        self._watch(client)

    # -- budget and deadlines

    def _serve_budget_waiters(self, now: float) -> None:
        """Let clients whose requests now fit in the budget go on, first come first served."""
        while (client := self.budget.next_grantable()) is not None:
            client.busy_since = None  # its clock stopped while we made it wait
            self._step(client, client.advance, now)
            if self.budget.next_grantable() is client:  # it did not take what it waited for
                break

    def _drop_late_clients(self, now: float) -> None:
        for client in list(self.clients):
            due = client.deadline()
            if due is None or now < due:
                continue
            if client.negotiating:
                why = f"no handshake within {self.limits.handshake_timeout:g} s"
            else:
                why = f"request or reply unfinished after {self.limits.request_timeout:g} s"
            self._drop(client, logging.WARNING, f"dropped: {why}")

    def _timeout(self, now: float) -> float | None:
        """How long select() may wait: until the next deadline, if any."""
        times = [due for c in self.clients if (due := c.deadline()) is not None]
        if not self._accepting and self._accept_after > now:
            times.append(self._accept_after)
        return max(0.0, min(times) - now) if times else None

    # -- selector bookkeeping

    def _watch(self, client: _Client) -> None:
        want = client.interest
        if want == client.registered:
            return
        if not want:
            self.selector.unregister(client.sock)
        elif not client.registered:
            self.selector.register(client.sock, want, functools.partial(self._on_client, client))
        else:
            self.selector.modify(client.sock, want, functools.partial(self._on_client, client))
        client.registered = want

    def _watch_listener(self, now: float) -> None:
        """Accept while there is a free slot: clients over the limit wait in the backlog."""
        want = (not self._stopping and len(self.clients) < self.limits.max_connections
                and now >= self._accept_after)
        if want and not self._accepting:
            self.selector.register(self.listener, selectors.EVENT_READ, self._on_listener)
        elif self._accepting and not want:
            self.selector.unregister(self.listener)
        self._accepting = want

    def _drop(self, client: _Client, level: int, what: str) -> None:
        log.log(level, "client %s %s", client.peer, what)
        if client.registered:
            self.selector.unregister(client.sock)
            client.registered = 0
        self.clients.discard(client)
        client.close()

    def _close_everything(self) -> None:
        for client in list(self.clients):
            self._drop(client, logging.DEBUG, "disconnected: the server stops")
        self.selector.close()
        self.listener.close()
        self._wake_reader.close()
        self._wake_writer.close()


def _peer_name(address: Any) -> str:
    if isinstance(address, tuple):
        host, port = address[:2]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "(unix)"


# -- listening sockets ----------------------------------------------------------------------


def _listen_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG)


def _listen_unix(path: str) -> socket.socket:
    _remove_dead_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_dead_socket(path: str) -> None:
    """Clear the way for a new server at ``path`` if a killed one left its socket file there.

    Nothing listening (connect is refused) means dead: remove it.  A socket that
    accepts belongs to a live server, and anything else is not ours to remove: refuse both.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket (left alone)", path)
    if _someone_listens(path):
        raise OSError(errno.EADDRINUSE, "another server is listening on this socket", path)
    log.info("removing %s, a socket no server listens on", path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _someone_listens(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)  # a live server with a full backlog answers EAGAIN: still live
        error = probe.connect_ex(path)
    finally:
        probe.close()
    if error in (0, errno.EAGAIN, errno.EINPROGRESS):
        return True
    if error == errno.ECONNREFUSED:
        return False
    raise OSError(error, os.strerror(error), path)


# -- the public server --------------------------------------------------------------------


class NbdServer:
    """Serve one device as one export; ``start()``, then ``stop()``.

    ``port=0`` picks a free port; :attr:`address` and :attr:`uri` tell
    which.  With ``unix_socket`` the server listens there instead of TCP (a
    socket file left by a server that was killed is replaced; a live server's
    socket or any other file is refused with an ``OSError``).  The limits are
    described in the module's docstring.
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
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        self.device = device
        self.export_name = export_name
        self.export = p.ExportInfo(size=device.size, read_only=read_only or not device.writable())
        self.limits = Limits(max_connections=max_connections,
                             handshake_timeout=handshake_timeout,
                             request_timeout=request_timeout, max_in_flight=max_in_flight)
        self.lock = threading.Lock()
        self.writer = WriterSlot()
        self.status = StatusWindow()
        self._host, self._port, self._unix_socket = host, port, unix_socket
        self._address: tuple[str, int] | str | None = None
        self._loop: _Loop | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Bind and start serving clients in a background thread."""
        if self._loop is not None:
            raise RuntimeError("server already started")
        if self._unix_socket is not None:
            listener = _listen_unix(self._unix_socket)
            self._address = self._unix_socket
        else:
            listener = _listen_tcp(self._host, self._port)
            host, port = listener.getsockname()[:2]
            self._address = str(host), int(port)
        self._loop = _Loop(self, listener)
        self._thread = threading.Thread(target=self._loop.run, name="nbd-serve", daemon=True)
        self._thread.start()
        log.info("serving %s", self.uri)

    @property
    def address(self) -> tuple[str, int] | str:
        """The bound socket address: (host, port), or the Unix socket path."""
        if self._address is None or self._loop is None:
            raise RuntimeError("server not started")
        return self._address

    @property
    def uri(self) -> str:
        """An NBD URI clients (qemu-img, nbdinfo) accept for the export."""
        name = urllib.parse.quote(self.export_name)
        address = self.address
        if isinstance(address, str):
            return f"nbd+unix:///{name}?socket={urllib.parse.quote(address)}"
        host, port = address
        return f"nbd://{f'[{host}]' if ':' in host else host}:{port}/{name}"

    @property
    def connections(self) -> int:
        """How many clients are connected (accepted and not yet gone)."""
        return len(self._loop.clients) if self._loop is not None else 0

    def stop(self) -> None:
        """Stop accepting, disconnect clients, flush the device."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        loop.stop()
        if self._thread is not None:
            self._thread.join()
        if self._unix_socket is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unix_socket)
        with self.lock:
            self.device.flush()


def serve(
    device: BlockDevice,
    *,
    host: str = "127.0.0.1",
    port: int = 10809,
    unix_socket: str | None = None,
    export_name: str = "",
    read_only: bool = False,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
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
        max_connections=max_connections,
        handshake_timeout=handshake_timeout,
        request_timeout=request_timeout,
        max_in_flight=max_in_flight,
    )
    stop_event = stop_event if stop_event is not None else threading.Event()
    server.start()
    try:
        if ready is not None:
            ready(server.uri)
        stop_event.wait()
    finally:
        server.stop()
