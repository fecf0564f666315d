"""Images read where they live: HTTP(S), S3, GCS, Azure and any other fsspec filesystem.

``vmdk.open("s3://bucket/vm/disk.vmdk")`` and the read-only verbs take a URL; the
optional extra ``pip install 'vmdk[remote]'`` brings fsspec (and its HTTP and S3
backends).  Only the bytes a job needs are fetched, in few requests:

* a small read (a header, a grain table) fetches a little more than asked,
  ``BLOCK`` bytes from where it starts, since the next metadata read is usually
  next to it; what came is kept (``CACHE_BYTES``) for the reads that follow;
* the reads of one request to the image (the runs of grains of a chunk, the
  tables a map needs) are given together: neighbouring ranges are fetched as one
  range, reading through gaps up to ``GAP`` bytes, and ranges are fetched on up
  to ``connections`` connections at once, ``PART`` bytes at most each;
* holes are never fetched: the image's own maps say what is stored.

Faults: a 404 is a MissingExtentError, a refusal (401/403) or a server that
ignores range requests a RemoteError naming the URL and the status; network
faults and 5xx answers are tried again ``RETRIES`` times, and every network
operation has a timeout (``TIMEOUT`` seconds unless the storage options set one).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import io
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, BinaryIO

from ._access import Folder, RandomAccess, relative_target
from .errors import (
    ImageExistsError,
    MissingExtentError,
    RemoteError,
    UnsupportedFormatError,
    VmdkError,
)

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

log = logging.getLogger(__name__)

#: A small read fetches this much from where it starts: the metadata read next is usually
#: within it (an image's header, descriptor and grain directory take one request).
BLOCK = 256 << 10
#: Neighbouring ranges asked for together are fetched as one when at most this far apart.
GAP = 64 << 10
#: The most one request fetches: larger ranges are split and fetched side by side.
PART = 4 << 20
#: Fetched bytes kept for reads that come back to them (small reads and the ends of large ones).
CACHE_BYTES = 32 << 20
#: Of a large fetch only its end is kept: where the next sequential read may begin.
KEEP_TAIL = 1 << 20
#: How many times a transient fault (network, timeout, 5xx) is tried again.
RETRIES = 3
#: Seconds to wait for a connection or for the next bytes of an answer.
TIMEOUT = 30.0
DEFAULT_CONNECTIONS = 8


@dataclasses.dataclass
class Settings:
    """What the command line sets once for every URL a job opens."""

    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    connections: int = DEFAULT_CONNECTIONS


settings = Settings()


def configure(storage_options: dict[str, Any] | None = None,
              connections: int | None = None) -> None:
    """Set the fsspec options and the connections used for URLs opened from now on."""
    if storage_options is not None:
        settings.storage_options = dict(storage_options)
    if connections is not None:
        if connections < 1:
            raise ValueError("connections must be at least 1")
        settings.connections = connections


def _fsspec() -> Any:
    try:
        import fsspec
    except ImportError:
        raise UnsupportedFormatError(
            "reading images from URLs needs fsspec: pip install 'vmdk[remote]'") from None
    return fsspec


def filesystem(url: str, storage_options: dict[str, Any] | None = None
               ) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem serving ``url`` and the path in it.

    fsspec keeps one filesystem per protocol and options, so every file of an image
    (and every image of a job) shares its connections.
    """
    options = dict(settings.storage_options if storage_options is None else storage_options)
    protocol = url.split("://", 1)[0].lower()
    _add_timeouts(protocol, options)
    try:
        fs, path = _fsspec().core.url_to_fs(url, **options)
    except (ImportError, ValueError) as exc:
        raise UnsupportedFormatError(f"cannot read {protocol}:// URLs: {exc}", url) from exc
    return fs, path


def _add_timeouts(protocol: str, options: dict[str, Any]) -> None:
    """Bound every network wait, unless the caller's options already do: never a hang."""
    if protocol in ("http", "https"):
        import aiohttp

        client = dict(options.get("client_kwargs") or {})
        client.setdefault("timeout", aiohttp.ClientTimeout(total=None, connect=TIMEOUT,
                                                           sock_read=TIMEOUT))
        options["client_kwargs"] = client
    elif protocol in ("gs", "gcs"):
        import aiohttp

        options.setdefault("requests_timeout", aiohttp.ClientTimeout(
            total=None, connect=TIMEOUT, sock_read=TIMEOUT))
    elif protocol in ("az", "abfs", "abfss"):
        options.setdefault("connection_timeout", TIMEOUT)
        options.setdefault("read_timeout", TIMEOUT)
    elif protocol in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("connect_timeout", TIMEOUT)
        config.setdefault("read_timeout", TIMEOUT)
        config.setdefault("retries", {"max_attempts": 1})  # retried here, a bounded number
        options["config_kwargs"] = config


def open_url(url: str, storage_options: dict[str, Any] | None = None
             ) -> tuple[RemoteFolder, RemoteFile]:
    """The file at ``url`` and the folder its image's other files are found in."""
    folder = RemoteFolder(storage_options)
    return folder, folder.open(url)


def _split_url(url: str) -> tuple[str, str]:
    """("scheme://host/", "path/in/it") for a web URL, ("s3://", "bucket/key") otherwise:
    names resolve within the second part, never into the first."""
    scheme, _, rest = url.partition("://")
    rest = rest.split("?", 1)[0].split("#", 1)[0]  # a query signs one file, not its neighbours
    if scheme.lower() in ("http", "https"):
        host, _, path = rest.partition("/")
        return f"{scheme}://{host}/", path
    return f"{scheme}://", rest


class RemoteFolder(Folder):
    """The files an image behind a URL names, in the same filesystem beside it."""

    def __init__(self, storage_options: dict[str, Any] | None) -> None:
        self.storage_options = storage_options
        self.parallel_reads = max(1, settings.connections // 2)

    def locate(self, image: str, name: str, *, allow_external: bool) -> str:
        root, path = _split_url(image)
        folder = path.rsplit("/", 1)[0] if "/" in path else ""
        return root + relative_target(folder, image, name, allow_external=allow_external)

    def open(self, name: str) -> RemoteFile:
        fs, path = filesystem(name, self.storage_options)
        return RemoteFile(fs, path, name, settings.connections)

    def exists(self, name: str) -> bool:
        fs, path = filesystem(name, self.storage_options)
        return bool(_call(name, "look for", lambda: fs.exists(path, **_deadline(fs))))


#: Bytes an upload sends per part (and holds in memory): S3 takes at most 10,000 parts,
#: so one upload carries up to 320 GiB.
UPLOAD_PART = 32 << 20


@contextlib.contextmanager
def upload(url: str, *, overwrite: bool, storage_options: dict[str, Any] | None = None
           ) -> Iterator[BinaryIO]:
    """A file at ``url`` written front to back, without a local copy: a multipart upload
    where the filesystem has one (S3, GCS, Azure), holding one part in memory.

    The object appears only when the block ends without error; a failure aborts the
    upload, leaving what ``url`` held before.  An existing object is refused
    (ImageExistsError) unless ``overwrite``.
    """
    fs, path = filesystem(url, storage_options)
    if not overwrite and _call(url, "look for", lambda: fs.exists(path, **_deadline(fs))):
        raise ImageExistsError("already exists (overwrite=True replaces it)", url)
    out = _call(url, "write to", lambda: fs.open(path, "wb", block_size=UPLOAD_PART),
                retry=False)
    try:
        yield out
    except BaseException:
        with contextlib.suppress(Exception):
            out.discard()  # aborts a multipart upload: nothing is left half made
        out.closed = True  # else its __del__ would try to finish the discarded upload
        raise
    _call(url, "finish writing", out.close, retry=False)


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(connections: int) -> ThreadPoolExecutor:
    """Workers fetching ranges side by side, one per connection, shared by all files."""
    with _pools_lock:
        pool = _pools.get(connections)
        if pool is None:
            pool = _pools[connections] = ThreadPoolExecutor(
                connections, thread_name_prefix="vmdk-fetch")
        return pool


class RemoteFile(RandomAccess):
    """One file behind a URL, read in ranges (see the module's notes)."""

    def __init__(self, fs: AbstractFileSystem, path: str, url: str, connections: int) -> None:
        self.fs, self.path, self.name = fs, path, url
        self.connections = connections
        self.parallel_reads = max(1, connections // 2)
        #: Requests made and bytes they brought: what a job cost.
        self.requests = 0
        self.fetched = 0
        self._http = fs.protocol in ("http", "https") or (
            isinstance(fs.protocol, tuple) and "http" in fs.protocol)
        self._cache = _Segments(CACHE_BYTES)
        self._stats = threading.Lock()
        self.size = self._size()

    def _size(self) -> int:
        info = _call(self.name, "open", lambda: self.fs.info(self.path, **_deadline(self.fs)))
        size = info.get("size")
        if info.get("type") == "directory":
            raise UnsupportedFormatError("is a folder, not an image", self.name)
        if not isinstance(size, int):
            raise RemoteError("the server does not tell the file's size (no Content-Length): "
                              "it cannot be read in parts", self.name)
        return size

    # ------------------------------------------------------------------ reads

    def readinto(self, buf: memoryview, offset: int) -> int:
        return self.read_pieces([(buf, offset)])[0]

    def read_pieces(self, pieces: list[tuple[memoryview, int]]) -> list[int]:
        wanted = [(off, off + max(0, min(len(buf), self.size - off))) for buf, off in pieces]
        wanted_ranges = [(a, b) for a, b in wanted if b > a]
        # What the cache holds now is what is used: another thread may evict it meanwhile.
        held = {s: data for a, b in wanted_ranges for s, data in self._cache.covering(a, b)}
        segments = [*held.items()]
        segments += self._fetch_all(_subtract(wanted_ranges, segments))
        got = []
        for (buf, _off), (a, b) in zip(pieces, wanted):
            if b > a:
                _fill(buf[:b - a], a, segments)
            got.append(max(0, b - a))
        return got

    def _fetch_all(self, ranges: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
        """Fetch ``ranges`` in as few requests as it takes, side by side; returns the
        fetched (start, bytes)."""
        todo = _union(ranges, GAP)
        if not todo:
            return []
        if len(todo) == 1 and todo[0][1] - todo[0][0] < BLOCK:
            # One small read (a header, a table) is usually followed by its neighbour's.
            a, b = todo[0]
            todo = [(a, max(b, min(self.size, a + BLOCK)))]
        parts = [(p, min(p + PART, b)) for a, b in todo for p in range(a, b, PART)]
        if len(parts) == 1 or self.connections == 1:
            out = [(a, self._fetch(a, b)) for a, b in parts]
        else:
            pool = _pool(self.connections)
            futures = [pool.submit(self._fetch, a, b) for a, b in parts]
            out = [(a, f.result()) for (a, _b), f in zip(parts, futures)]
        for a, data in out:
            if len(data) <= KEEP_TAIL:
                self._cache.put(a, data)
            else:
                self._cache.put(a + len(data) - KEEP_TAIL, data[-KEEP_TAIL:])
        return out

    def _fetch(self, start: int, end: int) -> bytes:
        """Bytes ``start .. end`` in one request (tried again on transient faults)."""
        data: bytes = _call(self.name, "read", lambda: self._get(start, end), retry=True)
        if len(data) != end - start:
            raise RemoteError(f"asked for bytes {start}-{end - 1}, the server sent "
                              f"{len(data)} bytes", self.name)
        with self._stats:
            self.requests += 1
            self.fetched += len(data)
        return data

    def _get(self, start: int, end: int) -> bytes:
        if self._http:
            from fsspec.asyn import sync

            data: bytes = sync(self.fs.loop, _http_range, self.fs, self.path, start, end,
                               end - start == self.size)
            return data
        return bytes(self.fs.cat_file(self.path, start=start, end=end,
                                      **_deadline(self.fs, end - start)))

    def close(self) -> None:
        if self.requests:
            log.info("%s: %d requests, %d bytes", self.name, self.requests, self.fetched)
            self.requests = 0


class _NoRanges(Exception):
    """The server answered a range request with the whole file."""


class _Status(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status} {reason}".rstrip())
        self.status = status


async def _http_range(fs: Any, url: str, start: int, end: int, whole: bool) -> bytes:
    """One ranged GET on fsspec's HTTP session, checking that a part came back before
    reading the body: a server that ignores ranges would otherwise send the whole disk."""
    session = await fs.set_session()
    kwargs = dict(fs.kwargs)
    headers = dict(kwargs.pop("headers", None) or {})
    headers["Range"] = f"bytes={start}-{end - 1}"
    async with session.get(fs.encode_url(url), headers=headers, **kwargs) as answer:
        if answer.status == 200 and not whole:
            raise _NoRanges
        if answer.status not in (200, 206):
            raise _Status(answer.status, answer.reason or "")
        data: bytes = await answer.read()
        return data


#: The slowest transfer a call is given time for, on top of its deadline (bytes a second).
SLOWEST_RATE = 64 << 10


def _deadline(fs: AbstractFileSystem, nbytes: int = 0) -> dict[str, float]:
    """A bound on one whole call, where fsspec takes one (its asynchronous filesystems:
    HTTP, S3, GCS, Azure): socket timeouts bound each wait, but not the retries and
    lookups some backends make on their own (gcsfs, the Azure SDK)."""
    from fsspec.asyn import AsyncFileSystem

    if not isinstance(fs, AsyncFileSystem):
        return {}
    return {"timeout": 4 * TIMEOUT + nbytes / SLOWEST_RATE}


def _call(name: str, what: str, func: Callable[[], Any], *, retry: bool = True) -> Any:
    """``func()``, with its faults as one clear error naming the URL; transient ones (the
    network, timeouts, 5xx, 429) tried again RETRIES times first, waiting longer each time."""
    for attempt in range(RETRIES + 1):
        try:
            return func()
        except VmdkError:
            raise
        except Exception as caught:  # every backend raises its own kinds
            exc = _underlying(caught)
            status = _status(exc)
            if not (retry and _transient(exc, status)) or attempt == RETRIES:
                raise _as_error(exc, status, name, what, attempt) from caught
            log.info("%s: %s; trying again", name, _describe(exc, status))
            time.sleep(min(2.0, 0.1 * 2 ** attempt))
    raise AssertionError("unreachable")


def _underlying(exc: Exception) -> Exception:
    """The fault itself: fsspec's HTTP filesystem reports every failure to learn a file's
    size (a refusal, a timeout) as FileNotFoundError, caused by the real one."""
    cause = exc.__cause__
    if isinstance(exc, FileNotFoundError) and isinstance(cause, Exception):
        return cause
    return exc


def _status(exc: BaseException) -> int | None:
    if isinstance(exc, _Status):
        return exc.status
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    if isinstance(status, int):
        return status
    response = getattr(exc, "response", None)  # botocore's ClientError
    if isinstance(response, dict):
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code if isinstance(code, int) else None
    return None


def _transient(exc: BaseException, status: int | None) -> bool:
    if status is not None:
        return status >= 500 or status in (408, 429)
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, _NoRanges)):
        return False
    return isinstance(exc, (OSError, TimeoutError)) or type(exc).__module__.startswith(
        ("aiohttp", "botocore", "urllib3", "fsspec"))


def _describe(exc: BaseException, status: int | None) -> str:
    if isinstance(exc, TimeoutError) or type(exc).__name__ == "FSTimeoutError":
        return f"no answer in time ({type(exc).__name__})"
    text = str(exc) or type(exc).__name__
    if status is not None and str(status) not in text:
        text = f"HTTP {status}: {text}"
    return text


def _as_error(exc: BaseException, status: int | None, name: str, what: str,
              attempt: int) -> VmdkError:
    if isinstance(exc, (NotImplementedError, io.UnsupportedOperation)):
        return UnsupportedFormatError(f"cannot {what} {name.split(':', 1)[0]}:// URLs", name)
    if isinstance(exc, _NoRanges):
        return RemoteError("the server does not support range requests (it answered with "
                           "the whole file): download the image, or serve it from a server "
                           "that does", name, status=200)
    if isinstance(exc, FileNotFoundError) or status in (404, 410):
        if status is None and name.lower().startswith(("http://", "https://")):
            status = 404  # fsspec's HTTP filesystem says FileNotFoundError for it
        return MissingExtentError(
            f"not found ({f'HTTP {status}' if status else 'no such file'})", name)
    if isinstance(exc, PermissionError) or status in (401, 403):
        return RemoteError(f"access denied ({_describe(exc, status)}): check the credentials "
                           "(--storage-option, or the usual environment)", name, status=status)
    tries = f" (after {attempt + 1} tries)" if attempt else ""
    return RemoteError(f"cannot {what}: {_describe(exc, status)}{tries}", name, status=status)


# -------------------------------------------------------------- byte ranges


def _union(ranges: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """Sorted ranges, joined where they overlap or lie at most ``gap`` bytes apart."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + gap:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


class _Segments:
    """Fetched bytes kept by where they start, the oldest dropped past ``budget``."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._starts: list[int] = []
        self._data: dict[int, bytes] = {}  # insertion order is age
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, start: int, data: bytes) -> None:
        with self._lock:
            old = self._data.pop(start, None)
            if old is None:
                bisect.insort(self._starts, start)
            else:
                self._bytes -= len(old)
            self._data[start] = data
            self._bytes += len(data)
            while self._bytes > self.budget and len(self._data) > 1:
                first = next(iter(self._data))
                self._bytes -= len(self._data.pop(first))
                self._starts.remove(first)

    def covering(self, a: int, b: int) -> list[tuple[int, bytes]]:
        """The kept (start, bytes) overlapping ``a .. b``."""
        with self._lock:
            return [(s, self._data[s]) for s in self._starts[:bisect.bisect_left(self._starts, b)]
                    if s + len(self._data[s]) > a]


def _subtract(ranges: list[tuple[int, int]], segments: list[tuple[int, bytes]]
              ) -> list[tuple[int, int]]:
    """The parts of ``ranges`` that no (start, bytes) segment covers."""
    for s, data in segments:
        e = s + len(data)
        ranges = [piece for lo, hi in ranges
                  for piece in ((lo, min(hi, s)), (max(lo, e), hi)) if piece[1] > piece[0]]
    return ranges


def _fill(view: memoryview, offset: int, segments: list[tuple[int, bytes]]) -> None:
    """Copy bytes ``offset ..`` into ``view`` from the segments that cover them."""
    end = offset + len(view)
    for s, data in segments:
        lo, hi = max(offset, s), min(end, s + len(data))
        if lo < hi:
            view[lo - offset:hi - offset] = data[lo - s:hi - s]
