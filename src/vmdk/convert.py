"""Copying a disk from one image or raw file to another, skipping what reads as zeros.

The source's allocation map drives the copy: unallocated and zero ranges are
never read; stored ranges are read in large blocks, and blocks of zeros
inside them are dropped so the target stays sparse (holes in raw files,
unallocated grains in sparse images).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import io
import logging
import mmap
import os
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple, Protocol, cast

log = logging.getLogger(__name__)

if TYPE_CHECKING:

    import numpy as np
else:
    from ._numpy import np

from ._access import Readable, file_size, is_url, release
from ._output import StagedOutput, output_errors
from .errors import UnsupportedFormatError, VmdkError
from .extents.base import pread_exact, pwrite_all, stored_ranges
from .image import Image, foreign_format, io_errors, not_vmdk, sniff

#: Bytes moved per read/write system call.
CHUNK = 8 << 20
#: Default granularity of zero detection (qemu-img's -S default is 4 KiB).
DEFAULT_SPARSE_SIZE = 4096

Progress = Callable[[int], None]


@dataclasses.dataclass(frozen=True)
class Span:
    start: int
    length: int
    data: bool  # False: known to read as zeros, need not be read
    host_fd: int | None = None  # where the bytes lie as they are, when they do
    host_offset: int | None = None


class Source(Protocol):
    size: int

    def spans(self) -> Iterator[Span]:
        """Ranges in order, covering 0 .. size, each stored (read it) or reading as zeros."""
        ...

    def readinto_at(self, offset: int, buf: memoryview) -> None: ...
    def files(self) -> list[str]: ...
    def close(self) -> None: ...


class RawSource:
    """A raw disk file; holes found with SEEK_DATA/SEEK_HOLE are not read (a file behind
    a URL tells no holes: all of it is read)."""

    def __init__(self, path: str, storage_options: dict[str, Any] | None = None) -> None:
        self.path = path
        self.fd: Readable
        self.read_ahead = 1
        if is_url(path):
            from .remote import open_url

            self.fd = open_url(path, storage_options)[1]
            self.read_ahead = self.fd.parallel_reads
        else:
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self.size = file_size(self.fd)

    def spans(self) -> Iterator[Span]:
        pos = 0
        for data, hole in stored_ranges(self.fd, 0, self.size):
            if data > pos:
                yield Span(pos, data - pos, False)
            yield Span(data, hole - data, True)
            pos = hole
        if pos < self.size:
            yield Span(pos, self.size - pos, False)

    def readinto_at(self, offset: int, buf: memoryview) -> None:
        pread_exact(self.fd, buf, offset, self.path)

    def files(self) -> list[str]:
        return [self.path]

    def close(self) -> None:
        release(self.fd)


class ImageSource:
    """A VMDK image (with its whole chain): ranges stored in no layer are skipped."""

    def __init__(self, image: Image) -> None:
        self.image = image
        self.size = image.size
        #: Chunks a copy reads ahead of the one it writes (see _copy_chunks).
        self.read_ahead = max([layer.folder.parallel_reads for layer in image.chain()
                               if layer.folder is not None], default=1)

    def spans(self) -> Iterator[Span]:
        fds: dict[str, int] = {}
        for image in self.image.chain():
            for extent in image.extents:
                fd = getattr(extent, "fd", None)
                if extent.filename and isinstance(fd, int) and fd >= 0:
                    fds.setdefault(extent.filename, fd)
        for run in self.image.map():
            fd = fds.get(run.filename) if run.filename and run.offset is not None else None
            stored = run.data and not run.zero  # holes in flat files need no reading
            yield Span(run.start, run.length, stored, fd, run.offset if fd is not None else None)

    def readinto_at(self, offset: int, buf: memoryview) -> None:
        self.image.readinto_at(offset, buf)

    def files(self) -> list[str]:
        from .create import image_files

        return image_files(self.image)

    def close(self) -> None:
        self.image.close()


def open_source(path: str, fmt: str | None = None, **open_args: Any) -> Source:
    """Open ``path`` as "raw" or "vmdk"; the kind is detected when ``fmt`` is None.  A URL
    is a VMDK unless ``fmt`` says "raw"."""
    if is_url(path):
        if fmt == "raw":
            return RawSource(path, open_args.get("storage_options"))
        if fmt not in (None, "vmdk"):
            raise VmdkError(f"{fmt} sources are not read from URLs (raw or vmdk)", path)
        return ImageSource(Image.open(path, "r", **open_args))
    with io_errors(path):
        if fmt is None:
            from .ova import is_ova

            if is_ova(path):  # its first disk, indexed in one pass and read in place
                from .ova.disk import OvaDisk

                return OvaDisk(path)
            fmt = "raw" if sniff(path) == "raw" else "vmdk"
            if fmt == "raw" and (foreign_format(path) or path.lower().endswith(".vmdk")):
                # Only a file of no known kind is a raw disk: one named .vmdk that is no
                # VMDK (an empty or cut download) or another format would copy as garbage.
                raise UnsupportedFormatError(
                    f"{not_vmdk(path)} (-f raw takes its bytes as they are)", path)
        if fmt == "raw":
            return RawSource(path)
    if fmt == "vmdk":
        return ImageSource(Image.open(path, "r", **open_args))
    raise VmdkError(f"unknown source format {fmt!r} (raw or vmdk)", path)


def nonzero_runs(view: memoryview, block: int) -> list[tuple[int, int]]:
    """(start, length) runs of ``view`` whose ``block``-sized pieces are not all zeros."""
    n = len(view)
    whole = n - n % block
    runs = (_nonzero_blocks(view[:whole], block) if block >= FEW_BLOCKS_FROM
            else _nonzero_words(view[:whole], block)) if whole else []
    if whole < n and any(view[whole:]):
        if runs and runs[-1][0] + runs[-1][1] == whole:
            runs[-1] = (runs[-1][0], runs[-1][1] + n - whole)
        else:
            runs.append((whole, n - whole))
    return runs


#: Blocks this large are few enough to test one by one, without numpy (which a stream or
#: sparse output then never loads: 45 ms of every such command's start).
FEW_BLOCKS_FROM = 32 << 10


def _nonzero_blocks(view: memoryview, block: int) -> list[tuple[int, int]]:
    zeros = bytes(block)
    runs: list[tuple[int, int]] = []
    start = -1
    for pos in range(0, len(view), block):
        if zeros.startswith(view[pos:pos + block]):  # memcmp, stopping at the first byte off
            if start >= 0:
                runs.append((start, pos - start))
                start = -1
        elif start < 0:
            start = pos
    if start >= 0:
        runs.append((start, len(view) - start))
    return runs


def _nonzero_words(view: memoryview, block: int) -> list[tuple[int, int]]:
    words = np.frombuffer(view, dtype=np.uint8).reshape(-1, block)
    # max() along rows is several times faster than any() in numpy
    nz = (words if block % 8 else words.view(np.uint64)).max(axis=1) != 0
    edges = np.flatnonzero(np.diff(np.concatenate(([False], nz, [False])).astype(np.int8)))
    return [(int(a) * block, int(b - a) * block) for a, b in zip(edges[::2], edges[1::2])]


def _allocate_all(fd: int, size: int) -> None:
    """Give every hole of a raw output its blocks (they read as zeros, as before)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        zeros = bytes(CHUNK)  # no fallocate here: write the zeros of each hole instead
        pos = 0
        for data, end in [*stored_ranges(fd, 0, size), (size, size)]:
            while pos < data:
                pos += os.pwrite(fd, zeros[:min(CHUNK, data - pos)], pos)
            pos = end


class RawTarget:
    """A raw output file: created at full size as one hole, then data is written into it.

    An existing device or pipe (``in_place``) is written where it is instead:
    what the copy skips is written as zeros there (a block device, a pipe),
    so it reads as the disk afterwards; a pipe takes the disk in order.
    ``name`` is the output as the user named it, for errors.
    """

    def __init__(self, path: str, size: int, durable: bool = True, *, in_place: bool = False,
                 name: str | None = None) -> None:
        self.path = path
        self.name = name or path
        self.size = size
        self.durable = durable
        self.in_place = in_place
        self._end = 0  # in place: every byte below is written
        if in_place:
            self.fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
            mode = os.fstat(self.fd).st_mode
            self._sequential = stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
            self._fill = self._sequential or stat.S_ISBLK(mode)
            self._sync = stat.S_ISBLK(mode)
            self.copy_fd: int | None = None  # copy_file_range needs regular files
        else:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                              | getattr(os, "O_CLOEXEC", 0), 0o644)
            self._sequential = self._fill = False
            self._sync = True
            self.copy_fd = self.fd
            with output_errors(self.name):
                os.ftruncate(self.fd, size)

    def write_at(self, offset: int, data: memoryview) -> None:
        with output_errors(self.name):
            if self._fill and offset > self._end:
                self._write_zeros(self._end, offset)
            self._write(offset, data)

    def _write(self, offset: int, data: memoryview) -> None:
        done = 0
        if self._sequential:
            if offset != self._end:
                raise VmdkError(f"a pipe takes the disk in order: a write at {offset} came "
                                f"after byte {self._end}", self.name)
            while done < len(data):
                done += os.write(self.fd, data[done:])
        else:
            while done < len(data):
                done += os.pwrite(self.fd, data[done:], offset + done)
        self._end = max(self._end, offset + len(data))

    def _write_zeros(self, start: int, end: int) -> None:
        zeros = memoryview(bytes(min(CHUNK, end - start)))
        while start < end:
            n = min(len(zeros), end - start)
            self._write(start, zeros[:n])
            start += n

    def finish(self, sparse_size: int) -> None:
        """Complete the output: the tail of an in-place one, the blocks of ``-S 0``."""
        with output_errors(self.name):
            if self._fill and self._end < self.size:
                self._write_zeros(self._end, self.size)
            if sparse_size == 0 and not self.in_place:  # -S 0: the output fully allocated
                _allocate_all(self.fd, self.size)

    def close(self) -> None:
        try:
            if self.durable and self._sync:
                with output_errors(self.name):
                    os.fsync(self.fd)
        finally:
            os.close(self.fd)

    def abandon(self) -> None:
        """Let go of the file without syncing it (it is being removed)."""
        with contextlib.suppress(OSError):
            os.close(self.fd)


def copy(source: Source, write_at: Callable[[int, memoryview], None], *,
         sparse_size: int = DEFAULT_SPARSE_SIZE, progress: Progress | None = None,
         target_fd: int | None = None) -> int:
    """Copy every stored, non-zero byte of ``source`` through ``write_at``; returns bytes written.

    With ``target_fd`` (a raw target), ranges stored as they are in a host file
    are copied by the kernel (``copy_file_range``) without passing through
    Python: stored grains are copied whole, zeros inside them included.
    """
    written = 0
    chunks: list[tuple[int, int, int]] = []  # what goes through Python, in order: see _gathered
    for span in source.spans():
        if not span.data:
            if progress:
                progress(span.length)
            continue
        if target_fd is not None and span.host_fd is not None and span.host_offset is not None:
            try:
                done = _kernel_copy(span.host_fd, span.host_offset, target_fd, span.start,
                                    span.length)
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY:
                    raise
                target_fd = None  # this filesystem cannot: copy through Python from here on
            else:
                written += done
                if progress:
                    progress(done)
                if done == span.length:
                    continue
                # The file ends early: the image decides what that means (zeros past a
                # short flat file, an error for a grain past a sparse file's end).
                span = Span(span.start + done, span.length - done, True)
        chunks.extend((pos, n, n) for pos in range(span.start, span.start + span.length, CHUNK)
                      for n in [min(CHUNK, span.start + span.length - pos)])
    if getattr(source, "read_ahead", 1) > 1:
        chunks = _gathered(chunks)
    return written + _copy_chunks(source, chunks, write_at, sparse_size, progress)


def _gathered(chunks: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Neighbouring chunks read as one, up to CHUNK bytes from the first's start.

    For a source behind a URL: one read of the image then gives the stored runs of
    many small spans together, which its file fetches as few large ranges.  What
    lies between the spans reads as zeros without any fetch, and is not written.
    Each chunk is (start, length, stored bytes): the progress counted the rest already.
    """
    out: list[tuple[int, int, int]] = []
    for pos, n, stored in chunks:
        if out and pos + n - out[-1][0] <= CHUNK:
            out[-1] = (out[-1][0], pos + n - out[-1][0], out[-1][2] + stored)
        else:
            out.append((pos, n, stored))
    return out


def _copy_chunks(source: Source, chunks: list[tuple[int, int, int]],
                 write_at: Callable[[int, memoryview], None], sparse_size: int,
                 progress: Progress | None) -> int:
    """Read chunk N+1 in a worker thread while chunk N is written.

    The worker also finds the chunk's non-zero runs while the bytes it just
    read are still in its core's cache.  The source is only ever touched by the
    worker, the target only by the caller's thread.  Buffers are page-aligned,
    so reads from the page cache copy straight in.
    """
    if not chunks:
        return 0
    # Reads run ``ahead`` chunks in front of the write: chunk i's buffer is free again once
    # it was written, which is before the read of chunk i + ahead + 1 is started.
    ahead = max(1, int(getattr(source, "read_ahead", 1)))
    buffers = [memoryview(mmap.mmap(-1, CHUNK)) for _ in range(ahead + 1)]

    def read(i: int) -> tuple[memoryview, list[tuple[int, int]]]:
        pos, n, _stored = chunks[i]
        view = buffers[i % len(buffers)][:n]
        source.readinto_at(pos, view)
        return view, (nonzero_runs(view, sparse_size) if sparse_size else [(0, n)])

    from concurrent.futures import ThreadPoolExecutor

    written = 0
    with ThreadPoolExecutor(ahead, thread_name_prefix="vmdk-read-ahead") as pool:
        futures = collections.deque(pool.submit(read, i) for i in range(min(ahead, len(chunks))))
        for i, (pos, _n, stored) in enumerate(chunks):
            chunk, runs = futures.popleft().result()
            if i + ahead < len(chunks):
                futures.append(pool.submit(read, i + ahead))
            for start, length in runs:
                write_at(pos + start, chunk[start:start + length])
                written += length
            if progress:
                progress(stored)
    return written


_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}


def _kernel_copy(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> int:
    """Copy in the kernel; returns the bytes copied, short where the source file ends."""
    done = 0
    while done < length:
        n = os.copy_file_range(src_fd, dst_fd, length - done, src_offset + done, dst_offset + done)
        if n == 0:
            break
        done += n
    return done


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
            src_format: str | None = None, out_format: str = "vmdk",
            subformat: str = "monolithicSparse", sparse_size: int = DEFAULT_SPARSE_SIZE,
            progress: Progress | None = None, overwrite: bool = False,
            allow_external: bool = False, force_share: bool = False, ignore_cid: bool = False,
            disk: str | None = None, durable: bool = True, recover: bool = False,
            missing_as_zeros: bool = False, storage_options: dict[str, Any] | None = None,
            **create_options: Any) -> int:
    """Convert ``src`` into ``dst``; returns the bytes written.  An existing ``dst`` is
    refused (``ImageExistsError``) unless ``overwrite=True``, as :func:`vmdk.create` does.

    ``src`` is a raw file, any VMDK (a snapshot chain is flattened) or an OVA
    (its first disk, or ``disk``), detected unless ``src_format`` says
    "raw", "vmdk" or "ova".  ``out_format`` is "vmdk" (with ``subformat`` and
    the options of :func:`vmdk.create`) or "raw".  ``durable=False`` skips the
    final fsync, as ``qemu-img convert`` does by default.  The output is made
    under a hidden staging folder beside ``dst`` and gets its name only when
    complete; what ``dst`` held before stays as it was until then, and after
    any failure (a device or pipe output is written where it is).  ``recover=True``
    salvages a damaged or truncated streamOptimized source: its grain markers
    are walked front to back and every grain that reads is kept (a damaged grain
    reads as zeros), up to where the stream is cut or its structure breaks.
    ``missing_as_zeros=True`` reads the missing end of a cut flat extent file as
    zeros instead of failing.

    ``src`` may be a URL (read in place, see :mod:`vmdk.remote`), and so may ``dst``
    for what is written front to back (raw, or ``subformat="streamOptimized"``): it is
    uploaded as it is made (a multipart upload to object storage), without a local
    copy.  ``storage_options`` are fsspec's for both.
    """
    from .ova import is_ova

    src, dst = os.fspath(src), os.fspath(dst)
    log.info("converting %s (%s) to %s (%s)", src, src_format or "detected", dst,
             out_format if out_format == "raw" else f"vmdk {subformat}")
    if out_format == "raw" and (create_options or subformat != "monolithicSparse"):
        named = ", ".join(sorted(create_options) + (["subformat"] if subformat !=
                                                     "monolithicSparse" else []))
        raise VmdkError(f"a raw output has no VMDK options ({named}): they apply to -O vmdk",
                        dst)
    if src == "-":
        if sys.stdin.isatty():
            raise VmdkError("standard input is a terminal: pipe the disk into it "
                            "(... | vmdk convert - OUTPUT)", "<stdin>")
        if src_format == "raw":
            return _convert_raw_from_pipe(dst, out_format, subformat, sparse_size, overwrite,
                                          durable, create_options, progress)
        if src_format not in (None, "vmdk"):
            raise VmdkError(f"{src_format} input from a pipe is not supported: pipe raw bytes "
                            "(-f raw) or a streamOptimized VMDK, or name a file", "<stdin>")
        return _convert_from_pipe(dst, out_format, subformat, sparse_size, overwrite, durable,
                                  create_options, progress, recover)
    if dst != "-" and not is_url(src) and os.path.exists(dst) and os.path.samefile(src, dst):
        raise VmdkError("source and destination are the same file", dst)
    _refuse_own_files([src], dst, out_format, subformat)
    if recover and is_url(src):
        raise VmdkError("--recover reads a stream front to back from a local file or a pipe: "
                        "pipe the download into 'vmdk convert --recover -'", src)
    if recover:
        return _recover_stream(src, dst, out_format, subformat, sparse_size, overwrite, durable,
                               create_options, progress, disk)
    if src_format == "ova" or (src_format is None and is_ova(src)):
        from .ova import copy_from_ova, ova_disk_size

        with _target(dst, ova_disk_size(src, disk), out_format, subformat, sparse_size,
                     overwrite, durable, create_options, keep=[src],
                     storage_options=storage_options) as (write_at, _block):
            copy_from_ova(src, write_at, disk, progress)
        return os.path.getsize(dst) if dst != "-" and not is_url(dst) else 0
    extra: dict[str, Any] = ({"allow_external": allow_external, "force_share": force_share,
                              "ignore_cid": ignore_cid, "missing_as_zeros": missing_as_zeros}
                             if src_format != "raw" else {})
    if storage_options is not None and is_url(src):
        extra["storage_options"] = storage_options
    source = open_source(src, src_format, **extra)
    try:
        _refuse_own_files(source.files(), dst, out_format, subformat)
        with _target(dst, source.size, out_format, subformat, sparse_size, overwrite,
                     durable, create_options, keep=source.files(),
                     storage_options=storage_options) as (write_at, block):
            raw_fd = getattr(getattr(write_at, "__self__", None), "copy_fd", None)
            return copy(source, write_at, sparse_size=block, progress=progress,
                        target_fd=raw_fd if out_format == "raw" else None)
    finally:
        source.close()


class Streamed(NamedTuple):
    """What :func:`convert_to_stream` made: the disk's size and the bytes its grains hold."""

    capacity: int
    populated: int


def convert_to_stream(src: str | os.PathLike[str], out: BinaryIO, *, name: str,
                      src_format: str | None = None, disk: str | None = None,
                      progress: Progress | None = None, **options: Any) -> Streamed:
    """Convert ``src`` (raw, any VMDK or an OVA's disk) into a streamOptimized image
    written to ``out`` front to back: ``out`` is never sought, so it may be a tar member
    being written, an upload or a pipe.  ``name`` is the extent name its descriptor
    carries.  ``options`` are :func:`vmdk.create`'s (``compression_level``,
    ``adapter_type``...) and the source's (``allow_external``, ``force_share``).

    The same source and options always give the same bytes, whatever the thread count.
    """
    from .create import create_stream
    from .ova import is_ova

    src = os.fspath(src)
    open_args = {key: options.pop(key) for key in ("allow_external", "force_share")
                 if key in options}
    block = max(DEFAULT_SPARSE_SIZE, options.get("cluster_size", 65536))
    if src_format == "ova" or (src_format is None and is_ova(src)):
        from .ova import copy_from_ova, ova_disk_size

        stream = create_stream(out, ova_disk_size(src, disk), name=name, **options)
        with _finished(stream):
            copy_from_ova(src, stream.write_at, disk, progress)
    else:
        source = open_source(src, src_format, **(open_args if src_format != "raw" else {}))
        try:
            stream = create_stream(out, source.size, name=name, **options)
            with _finished(stream):
                copy(source, stream.write_at, sparse_size=block, progress=progress)
        finally:
            source.close()
    return Streamed(stream.size, stream.stored_bytes)


@contextlib.contextmanager
def _finished(stream: Any) -> Iterator[None]:
    """Close a stream being written when the block succeeds (the caller syncs what holds
    it), abandon it footerless when the block fails."""
    stream.durable = False
    try:
        yield
    except BaseException:
        stream.abandon()
        raise
    stream.close()


def _refuse_own_files(files: list[str], dst: str, out_format: str,
                      subformat: str = "monolithicSparse") -> None:
    """Never let the output replace a file the source is read from (its extents included)."""
    from .create import refuse_replacing

    if dst == "-" or is_url(dst):
        if dst in files:
            raise VmdkError("source and destination are the same object", dst)
        return
    if out_format == "vmdk":
        refuse_replacing(files, dst, subformat)
    elif os.path.exists(dst):
        for path in files:
            if os.path.exists(path) and os.path.samefile(path, dst):
                raise VmdkError(f"the output would replace {path}, which the source reads from",
                                dst)


def _recover_stream(src: str, dst: str, out_format: str, subformat: str, sparse_size: int,
                    overwrite: bool, durable: bool, create_options: dict[str, Any],
                    progress: Progress | None, disk: str | None = None) -> int:
    """Keep every grain of a streamOptimized file (or an OVA's disk) up to the first damage."""
    from .ova import is_ova, open_ova_disk
    from .stream_read import StreamReader

    with contextlib.ExitStack() as stack:
        if is_ova(src):
            reader = stack.enter_context(open_ova_disk(src, disk, recover=True))
        else:
            reader = StreamReader(stack.enter_context(open(src, "rb")), src, recover=True)
        with _target(dst, reader.capacity, out_format, subformat, sparse_size, overwrite,
                     durable, create_options) as (write_at, _block):
            return _write_grains(reader.grains(), write_at, progress, recover=True)


def _convert_from_pipe(dst: str, out_format: str, subformat: str, sparse_size: int,
                      overwrite: bool, durable: bool, create_options: dict[str, Any],
                      progress: Progress | None, recover: bool = False) -> int:
    """A streamOptimized image arriving on standard input, read front to back.

    The stream must arrive whole (see :mod:`vmdk.stream_read`): a cut pipe or
    download is an error, unless ``recover`` keeps the grains that came.
    """
    from .stream_read import StreamReader

    reader = StreamReader(sys.stdin.buffer, "<stdin>", recover=recover)
    with _target(dst, reader.capacity, out_format, subformat, sparse_size, overwrite,
                 durable, create_options) as (write_at, _block):
        return _write_grains(reader.grains(), write_at, progress, recover)


def _convert_raw_from_pipe(dst: str, out_format: str, subformat: str, sparse_size: int,
                           overwrite: bool, durable: bool, create_options: dict[str, Any],
                           progress: Progress | None) -> int:
    """A raw disk arriving on standard input.  Its size is known only at its end, and a
    VMDK's layout needs it first: the bytes wait in a sparse file beside the output
    (holding only what is not zeros), which is converted and removed."""
    folder = os.path.dirname(os.path.abspath(dst)) if dst != "-" else None
    spool = _make_spool(folder, os.path.basename(dst))
    try:
        with output_errors(dst if dst != "-" else spool.name):
            _spool_stdin(spool.fileno(), sparse_size)
        return convert(spool.name, dst, src_format="raw", out_format=out_format,
                       subformat=subformat, sparse_size=sparse_size, progress=progress,
                       overwrite=overwrite, durable=durable, **create_options)
    finally:
        spool.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(spool.name)


def _make_spool(folder: str | None, name: str) -> Any:
    import tempfile

    from ._output import PARTIAL_MARK

    return tempfile.NamedTemporaryFile(dir=folder, delete=False,
                                       prefix=f".{name[:100]}{PARTIAL_MARK}{os.getpid()}-stdin-")


def _spool_stdin(fd: int, block: int) -> int:
    """Copy standard input into ``fd``, leaving runs of zeros as holes; returns the size."""
    buf = memoryview(mmap.mmap(-1, CHUNK))
    source = cast("io.BufferedReader", sys.stdin.buffer)  # it is one, with readinto
    size = 0
    while True:
        n = source.readinto(buf)
        if not n:
            break
        for start, length in nonzero_runs(buf[:n], block or 512):
            pwrite_all(fd, buf[start:start + length], size + start)
        size += n
    os.ftruncate(fd, size)
    return size


def _write_grains(grains: Iterator[tuple[int, bytes]], write_at: Callable[[int, memoryview], None],
                  progress: Progress | None, recover: bool) -> int:
    """Write grains as they come; with ``recover``, stop quietly at the first damaged one."""
    from .errors import CorruptImageError

    written = 0
    try:
        for offset, data in grains:
            write_at(offset, memoryview(data))
            written += len(data)
            if progress:
                progress(len(data))
    except CorruptImageError as exc:
        if not recover:
            raise
        log.warning("%s; kept the %d bytes of grains before it", exc, written)
    return written


@contextlib.contextmanager
def _target(dst: str, size: int, out_format: str, subformat: str, sparse_size: int,
            overwrite: bool, durable: bool, create_options: dict[str, Any],
            keep: Sequence[str] = (), storage_options: dict[str, Any] | None = None
            ) -> Iterator[tuple[Callable[[int, memoryview], None], int]]:
    """The destination's ``write_at`` and the zero-detection block size suited to it.

    The output is made in a staging folder beside ``dst`` and put in place
    when the block ends without error; otherwise it is discarded, leaving
    ``dst`` as it was.  ``keep`` are files never removed as the replaced
    image's extents (the source's).
    """
    if dst == "-":
        if sys.stdout.isatty():
            raise VmdkError("refusing to write a disk image to a terminal: redirect it to a "
                            "file or a pipe", "-")
        _refuse_seeking("standard output", "-", out_format, subformat)
        with output_errors("<stdout>"), _sequential_target(
                sys.stdout.buffer, "disk.vmdk", size, out_format, sparse_size,
                create_options) as target:
            yield target
        return
    if is_url(dst):  # an object written once, front to back: a multipart upload
        from .remote import upload

        _refuse_seeking("a URL", dst, out_format, subformat)
        name = dst.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "disk.vmdk"
        with upload(dst, overwrite=overwrite, storage_options=storage_options
                    ) as out, output_errors(dst), _sequential_target(
                out, name, size, out_format, sparse_size, create_options) as target:
            yield target
        return
    if out_format not in ("raw", "vmdk"):
        raise VmdkError(f"unknown output format {out_format!r} (raw or vmdk)", dst)
    with io_errors(dst):
        stage = StagedOutput(dst, overwrite=overwrite, image=out_format == "vmdk",
                             in_place_ok=out_format == "raw", durable=durable, keep=keep)
    with stage, output_errors(dst):
        if out_format == "raw":
            raw = RawTarget(stage.path, size, durable, in_place=stage.in_place, name=dst)
            try:
                yield raw.write_at, sparse_size
                raw.finish(sparse_size)
                raw.close()
            except BaseException:
                stage.discard()  # first: the removal must not wait on close() working
                raw.abandon()
                raise
        else:
            yield from _vmdk_target(stage, size, subformat, sparse_size, durable, create_options)
        with io_errors(dst):
            stage.commit()


def _vmdk_target(stage: StagedOutput, size: int, subformat: str, sparse_size: int, durable: bool,
                 create_options: dict[str, Any]
                 ) -> Iterator[tuple[Callable[[int, memoryview], None], int]]:
    from .create import create_in

    if "Sparse" in subformat or subformat == "streamOptimized":
        # Zeros inside a grain cost nothing to write; whole zero grains are skipped anyway.
        sparse_size = max(sparse_size, create_options.get("cluster_size", 65536))
    out = create_in(stage, size, subformat, **create_options)
    out.durable = durable
    try:
        yield out.write_at, sparse_size
        out.close()
    except BaseException:
        stage.discard()  # first: the removal must not wait on close() working
        _abandon(out)
        raise


def _abandon(out: Any) -> None:
    """Release a new image being thrown away: no syncs, every file closed, errors ignored
    (a full disk fails each write again)."""
    if hasattr(out, "abandon"):
        with contextlib.suppress(OSError, VmdkError):
            out.abandon()
        return
    out.durable = False
    for extent in out.image.extents:  # one by one: a failing flush must not skip the others
        with contextlib.suppress(OSError, VmdkError):
            extent.close()
    with contextlib.suppress(OSError, VmdkError):
        out.close()


class SequentialOutput:
    """Writes arriving in ascending order, to a stream that cannot seek: the gaps between
    them (runs of zeros not written) become zeros on the way."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.pos = 0

    def write_at(self, offset: int, data: memoryview) -> None:
        if offset < self.pos:
            raise VmdkError(f"a write at byte {offset} came after byte {self.pos} had been "
                            "sent: standard output cannot go back", "-")
        self._zeros(offset - self.pos)
        self.out.write(data)
        self.pos = offset + len(data)

    def finish(self, size: int) -> None:
        self._zeros(size - self.pos)
        self.out.flush()

    def _zeros(self, n: int) -> None:
        zeros = memoryview(bytes(min(n, CHUNK)))
        while n > 0:
            self.out.write(zeros[:n])
            self.pos += min(n, len(zeros))
            n -= len(zeros)


def _refuse_seeking(where: str, name: str, out_format: str, subformat: str) -> None:
    """Only raw bytes and streams are written front to back, as a pipe or an upload takes
    them: other kinds go back to fill in their tables."""
    if out_format == "vmdk" and subformat != "streamOptimized":
        raise VmdkError(f"{where} takes raw bytes (-O raw) or a streamOptimized image "
                        "(-o subformat=streamOptimized): other kinds are not written front to "
                        "back", name)


@contextlib.contextmanager
def _sequential_target(out: BinaryIO, name: str, size: int, out_format: str, sparse_size: int,
                       create_options: dict[str, Any]
                       ) -> Iterator[tuple[Callable[[int, memoryview], None], int]]:
    """A raw disk or a streamOptimized image (named ``name`` in its descriptor) written to
    ``out`` as it is made: both are written front to back, so nothing is ever sought."""
    if out_format == "raw":
        raw = SequentialOutput(out)
        yield raw.write_at, sparse_size
        raw.finish(size)
        return
    from .create import create_stream

    stream = create_stream(out, size, name=name, **create_options)
    with _finished(stream):
        yield stream.write_at, max(sparse_size, create_options.get("cluster_size", 65536))
