"""Creating new images of every subformat VMware, VirtualBox and qemu-img make.

One small writer per ``createType``; each lays out its files, writes a
descriptor in VMware's canonical spelling, and hands back the image opened
for writing.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, overload

from .descriptor import Descriptor, ExtentLine
from .errors import ImageExistsError, UnsupportedFormatError, VmdkError
from .extents.base import SECTOR_SIZE
from .extents.flat import FlatExtent
from .extents.sparse import SparseExtent
from .image import Image, compute_geometry, io_errors, new_cid

if TYPE_CHECKING:
    from ._file import VmdkFile
    from .stream import StreamFile

#: VMware and VirtualBox cut split images into extents of 2047 MiB.
SPLIT_SECTORS = 2047 * 2048
ADAPTER_TYPES = ("ide", "buslogic", "lsilogic", "legacyESX", "pvscsi", "lsisas1068")
SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized", "vmfs", "vmfsSparse", "fullDevice",
              "partitionedDevice")
#: Accepted spellings of subformats, as VMware's own documents use both.
ALIASES = {"2GbMaxExtentSparse": "twoGbMaxExtentSparse", "2GbMaxExtentFlat": "twoGbMaxExtentFlat"}
DEFAULT_TOOLS_VERSION = "2147483647"  # "use the host's tools", what vSphere looks for
NIL_UUID = "00000000-0000-0000-0000-000000000000"


@dataclasses.dataclass(frozen=True)
class RawRange:
    """A range of a ``partitionedDevice`` disk.

    ``data`` (a copy of a partition table or boot sector) is stored in the
    ``name-pt.vmdk`` file; ``device`` maps the range onto a device or file from
    ``device_offset``; with neither the range reads as zeros.
    """

    start: int
    size: int
    device: str | None = None
    device_offset: int = 0
    data: bytes | None = None


@dataclasses.dataclass
class CreateOptions:
    adapter_type: str = "ide"
    hwversion: str = "4"
    geometry: tuple[int, int, int] | None = None
    comment: str | None = None
    preallocate: bool = False
    cluster_size: int = 65536
    zeroed_grain: bool = False
    toolsversion: str = DEFAULT_TOOLS_VERSION
    compression_level: int = 1


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _sibling(path: str, suffix: str) -> tuple[str, str]:
    """(full path, name for the descriptor) of ``base<suffix>.vmdk`` next to ``path``."""
    folder, name = os.path.split(path)
    stem = name[:-5] if name.lower().endswith(".vmdk") else name
    base = f"{stem}{suffix}.vmdk"
    return os.path.join(folder, base), base


def _new_uuid() -> str:
    import uuid  # on first use: it costs 4 ms at start-up (it imports platform)

    return str(uuid.uuid4())


def _ddb(size: int, opts: CreateOptions, parent: Image | None = None) -> dict[str, str]:
    c, h, s = opts.geometry or compute_geometry(size, opts.adapter_type)
    ddb = {
        "ddb.adapterType": opts.adapter_type,
        "ddb.geometry.cylinders": str(c),
        "ddb.geometry.heads": str(h),
        "ddb.geometry.sectors": str(s),
        "ddb.longContentID": os.urandom(16).hex(),
        "ddb.uuid.image": _new_uuid(),
        "ddb.uuid.modification": NIL_UUID,
        "ddb.uuid.parent": str(parent.uuid) if parent is not None and parent.uuid else NIL_UUID,
        "ddb.uuid.parentmodification": NIL_UUID,
        "ddb.virtualHWVersion": opts.hwversion,
        "ddb.toolsVersion": opts.toolsversion,
    }
    if opts.comment is not None:
        from .image import encode_comment

        ddb["ddb.comment"] = encode_comment(opts.comment)
    return ddb


#: The largest disk any file or descriptor here can describe (Linux's file size limit).
MAX_DISK_BYTES = (1 << 63) - 1


def _check_options(size: int, opts: CreateOptions) -> None:
    if size < 0:
        raise ValueError("size must not be negative")
    if size > MAX_DISK_BYTES:
        raise ValueError(f"{size} bytes is more than any file system holds")
    if opts.adapter_type not in ADAPTER_TYPES:
        raise ValueError(f"unknown adapter type {opts.adapter_type!r} "
                         f"(one of {', '.join(ADAPTER_TYPES)})")
    g = opts.cluster_size
    if g < 4096 or g & (g - 1) or g > (1 << 24):
        raise ValueError("cluster size must be a power of two from 4 KiB to 16 MiB")
    if not 0 <= opts.compression_level <= 9:
        raise ValueError("compression level must be from 0 to 9")
    if opts.geometry is not None:
        c, h, s = opts.geometry
        if not (0 <= c and 1 <= h <= 255 and 1 <= s <= 63):
            raise ValueError(f"geometry {c}/{h}/{s}: heads must be 1-255 and sectors 1-63")


def _remove_if(paths: Sequence[str], overwrite: bool) -> None:
    from ._lock import refuse_if_in_use

    existing = [p for p in paths if os.path.lexists(p)]
    for p in existing:
        if not overwrite:
            raise ImageExistsError("file exists (pass overwrite=True to replace it)", p)
        if not os.path.isfile(p) or os.path.islink(p):
            raise VmdkError("refusing to overwrite something that is not a plain file", p)
        refuse_if_in_use(p)
    for p in existing:
        os.unlink(p)


def image_files(image: Image) -> list[str]:
    """Every file an image reads: descriptors and extents of its whole chain."""
    out = []
    for layer in image.chain():
        out.append(layer.path)
        out += [e.filename for e in layer.extents if e.filename]
    return out


def refuse_replacing(sources: Sequence[str], path: str, subformat: str) -> None:
    """Refuse to create ``path`` when it, or an extent file that ``subformat`` writes
    next to it (``name-flat.vmdk``, ``name-s001.vmdk``...), is one of ``sources``."""
    folder, name = os.path.split(os.path.abspath(path))
    stem = name[:-5] if name.lower().endswith(".vmdk") else name
    pattern = re.compile(re.escape(stem) + _SIBLINGS.get(ALIASES.get(subformat, subformat), "(?!)")
                         + r"\.vmdk", re.IGNORECASE)
    for source in sources:
        same = (os.path.exists(path) and os.path.exists(source)
                and os.path.samefile(source, path))
        sibling = (os.path.dirname(os.path.abspath(source)) == folder
                   and pattern.fullmatch(os.path.basename(source)) is not None)
        if same or sibling:
            raise VmdkError(f"creating it would replace {source}, which the source or parent "
                            "reads from", path)


#: The extent files each subformat writes beside its descriptor, as name suffixes.
_SIBLINGS = {"monolithicFlat": "-flat", "vmfs": "-flat", "vmfsSparse": "-delta",
             "twoGbMaxExtentSparse": r"-s\d{3,}", "twoGbMaxExtentFlat": r"-f\d{3,}",
             "partitionedDevice": "-pt"}


def _write_text_descriptor(path: str, descriptor: Descriptor) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        data = descriptor.to_bytes()
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


#: A split image's descriptor names every extent; readers refuse descriptors of more lines.
MAX_SPLIT_EXTENTS = 8192


def _split_sizes(sectors: int) -> list[int]:
    if sectors == 0:
        return [0]
    full, rest = divmod(sectors, SPLIT_SECTORS)
    if full + bool(rest) > MAX_SPLIT_EXTENTS:
        raise UnsupportedFormatError(
            f"a split image of {sectors * SECTOR_SIZE >> 40} TiB would need more than "
            f"{MAX_SPLIT_EXTENTS} extents")
    return [SPLIT_SECTORS] * full + ([rest] if rest else [])


@overload
def create(  # type: ignore[overload-overlap]  # a stream is written front to back only
    path: str | os.PathLike[str],
    size: int | None,
    subformat: Literal["streamOptimized"],
    *,
    parent: str | os.PathLike[str] | None = None,
    adapter_type: str = "ide",
    hwversion: str = "4",
    geometry: tuple[int, int, int] | None = None,
    comment: str | None = None,
    preallocate: bool = False,
    cluster_size: int = 65536,
    zeroed_grain: bool = False,
    toolsversion: str = DEFAULT_TOOLS_VERSION,
    compression_level: int = 1,
    raw_device: str | None = None,
    partitions: Sequence[RawRange] | Sequence[int] | None = None,
    overwrite: bool = False,
    allow_external: bool = False,
) -> StreamFile: ...


@overload
def create(
    path: str | os.PathLike[str],
    size: int | None = None,
    subformat: str = "monolithicSparse",
    *,
    parent: str | os.PathLike[str] | None = None,
    adapter_type: str = "ide",
    hwversion: str = "4",
    geometry: tuple[int, int, int] | None = None,
    comment: str | None = None,
    preallocate: bool = False,
    cluster_size: int = 65536,
    zeroed_grain: bool = False,
    toolsversion: str = DEFAULT_TOOLS_VERSION,
    compression_level: int = 1,
    raw_device: str | None = None,
    partitions: Sequence[RawRange] | Sequence[int] | None = None,
    overwrite: bool = False,
    allow_external: bool = False,
) -> VmdkFile: ...


def create(
    path: str | os.PathLike[str],
    size: int | None = None,
    subformat: str = "monolithicSparse",
    *,
    parent: str | os.PathLike[str] | None = None,
    adapter_type: str = "ide",
    hwversion: str = "4",
    geometry: tuple[int, int, int] | None = None,
    comment: str | None = None,
    preallocate: bool = False,
    cluster_size: int = 65536,
    zeroed_grain: bool = False,
    toolsversion: str = DEFAULT_TOOLS_VERSION,
    compression_level: int = 1,
    raw_device: str | None = None,
    partitions: Sequence[RawRange] | Sequence[int] | None = None,
    overwrite: bool = False,
    allow_external: bool = False,
) -> VmdkFile | StreamFile:
    """Create an image and return it opened for writing.

    The result is a :class:`vmdk.VmdkFile`, or for ``streamOptimized`` a write-only
    :class:`vmdk.stream.StreamFile` filled front to back.

    ``size`` is in bytes and rounded up to a whole sector; with ``parent`` it
    defaults to the parent's size and the new image is a snapshot (child) of it.
    """
    from ._file import VmdkFile

    path = os.fspath(path)
    if raw_device is not None:  # like open(): relative to the current folder, not the image's
        raw_device = os.path.abspath(raw_device)
    subformat = ALIASES.get(subformat, subformat)
    if subformat not in SUBFORMATS:
        raise UnsupportedFormatError(
            f"unknown subformat {subformat!r} (one of {', '.join(SUBFORMATS)})", path)
    opts = CreateOptions(adapter_type, hwversion, geometry, comment, preallocate, cluster_size,
                         zeroed_grain, toolsversion, compression_level)
    parent_image = None
    if parent is not None:
        if subformat not in ("monolithicSparse", "twoGbMaxExtentSparse", "vmfsSparse"):
            raise UnsupportedFormatError(f"a snapshot cannot be {subformat}; use a sparse subformat",
                                         path)
        parent_image = Image.open(parent, "r", allow_external=allow_external)
        try:
            refuse_replacing(image_files(parent_image), path, subformat)
        except BaseException:
            parent_image.close()
            raise
        if size is None:
            size = parent_image.size
    if size is None:
        if subformat in ("fullDevice", "partitionedDevice") and raw_device is not None:
            size = device_size(raw_device)
        else:
            raise ValueError("size is required")
    size = operator.index(size)  # a float size is a mistake, not a number of bytes
    _check_options(size, opts)
    if preallocate and subformat not in ("monolithicFlat", "twoGbMaxExtentFlat", "vmfs"):
        raise UnsupportedFormatError(
            f"preallocation applies to flat subformats (monolithicFlat, twoGbMaxExtentFlat, "
            f"vmfs); {subformat} grows as it is written", path)
    sectors = _ceil_div(size, SECTOR_SIZE)
    size = sectors * SECTOR_SIZE
    folder = os.path.dirname(path) or "."
    with io_errors(folder):
        before = set(os.listdir(folder))
    try:
        writer = _WRITERS[subformat]
        with io_errors(path):
            made = writer(path, sectors, opts, parent_image, overwrite, raw_device, partitions)
    except BaseException:
        _remove_new_files(folder, before, os.path.basename(path))
        raise
    finally:
        if parent_image is not None:
            parent_image.close()
    if made is not None:
        stream: StreamFile = made
        return stream
    try:
        return VmdkFile(Image.open(path, "r+", allow_external=allow_external or subformat in (
            "fullDevice", "partitionedDevice")))
    except BaseException:
        _remove_created(path)
        raise


def remove_image(path: str, before: set[str]) -> None:
    """Remove an image made after ``before`` (the folder's listing then): it and its extents."""
    _remove_new_files(os.path.dirname(path) or ".", before, os.path.basename(path))
    if os.path.isfile(path):
        os.unlink(path)


def _remove_new_files(folder: str, before: set[str], name: str) -> None:
    """Remove the files a failed create made: new in ``folder`` and named after the image."""
    stem = name[:-5] if name.lower().endswith(".vmdk") else name
    for entry in set(os.listdir(folder)) - before:
        full = os.path.join(folder, entry)
        if entry.startswith(stem) and os.path.isfile(full) and not os.path.islink(full):
            os.unlink(full)


def _remove_created(path: str) -> None:
    """Undo a create whose image then failed to open: remove the files it made."""
    try:
        with open(path, "rb") as f:
            extents = Descriptor.parse(f.read(1 << 20)).extents
    except (OSError, VmdkError):
        extents = []
    folder = os.path.dirname(path)
    for line in extents:
        name = os.path.join(folder, line.filename) if line.filename else None
        if name and os.path.isfile(name) and os.path.dirname(os.path.abspath(name)) == \
                os.path.abspath(folder) and os.path.basename(name) != os.path.basename(path):
            os.unlink(name)
    if os.path.isfile(path):
        os.unlink(path)


def _parent_fields(path: str, parent: Image | None) -> dict[str, Any]:
    if parent is None:
        return {}
    hint = os.path.relpath(os.path.abspath(parent.path), os.path.dirname(os.path.abspath(path)))
    return {"parent_cid": parent.cid, "parent_file_name_hint": hint}


def _create_monolithic_sparse(path: str, sectors: int, opts: CreateOptions, parent: Image | None,
                              overwrite: bool, *_: Any) -> None:
    _remove_if([path], overwrite)
    name = os.path.basename(path)
    descriptor = Descriptor.new("monolithicSparse", [ExtentLine("RW", sectors, "SPARSE", name, None)],
                                cid=new_cid(), ddb=_ddb(sectors * SECTOR_SIZE, opts, parent),
                                **_parent_fields(path, parent))
    extent = SparseExtent.create(path, sectors, grain_size=opts.cluster_size // SECTOR_SIZE,
                                 descriptor=descriptor.to_bytes(),
                                 zeroed_grain=opts.zeroed_grain)
    extent.close()


def _create_split_sparse(path: str, sectors: int, opts: CreateOptions, parent: Image | None,
                         overwrite: bool, *_: Any) -> None:
    sizes = _split_sizes(sectors)
    names = [_sibling(path, f"-s{i + 1:03d}") for i in range(len(sizes))]
    _remove_if([path] + [full for full, _ in names], overwrite)
    lines = []
    for (full, base), n in zip(names, sizes):
        SparseExtent.create(full, n, grain_size=opts.cluster_size // SECTOR_SIZE,
                            zeroed_grain=opts.zeroed_grain).close()
        lines.append(ExtentLine("RW", n, "SPARSE", base, None))
    descriptor = Descriptor.new("twoGbMaxExtentSparse", lines, cid=new_cid(),
                                ddb=_ddb(sectors * SECTOR_SIZE, opts, parent),
                                **_parent_fields(path, parent))
    _write_text_descriptor(path, descriptor)


def _create_flat(path: str, sectors: int, opts: CreateOptions, parent: Image | None,
                 overwrite: bool, *_: Any, create_type: str = "monolithicFlat",
                 extent_type: str = "FLAT") -> None:
    full, base = _sibling(path, "-flat")
    _remove_if([path, full], overwrite)
    FlatExtent.create(full, sectors, preallocate=opts.preallocate).close()
    # ESX (VMFS) extent lines carry no offset; hosted FLAT lines always do.
    offset = None if extent_type == "VMFS" else 0
    descriptor = Descriptor.new(create_type, [ExtentLine("RW", sectors, extent_type, base, offset)],
                                cid=new_cid(), ddb=_ddb(sectors * SECTOR_SIZE, opts))
    _write_text_descriptor(path, descriptor)


def _create_vmfs(path: str, sectors: int, opts: CreateOptions, parent: Image | None,
                 overwrite: bool, *rest: Any) -> None:
    _create_flat(path, sectors, opts, parent, overwrite, create_type="vmfs", extent_type="VMFS")


def _create_split_flat(path: str, sectors: int, opts: CreateOptions, parent: Image | None,
                       overwrite: bool, *_: Any) -> None:
    sizes = _split_sizes(sectors)
    names = [_sibling(path, f"-f{i + 1:03d}") for i in range(len(sizes))]
    _remove_if([path] + [full for full, _ in names], overwrite)
    lines = []
    for (full, base), n in zip(names, sizes):
        FlatExtent.create(full, n, preallocate=opts.preallocate).close()
        lines.append(ExtentLine("RW", n, "FLAT", base, 0))
    descriptor = Descriptor.new("twoGbMaxExtentFlat", lines, cid=new_cid(),
                                ddb=_ddb(sectors * SECTOR_SIZE, opts))
    _write_text_descriptor(path, descriptor)


def _create_stream(path: str, sectors: int, opts: CreateOptions, parent: Image | None,
                   overwrite: bool, *_: Any) -> Any:
    """streamOptimized is written once, front to back: hand back the writer itself."""
    _remove_if([path], overwrite)
    return _stream_file(path, os.path.basename(path), sectors, opts)


def _stream_file(target: Any, name: str, sectors: int, opts: CreateOptions) -> Any:
    from .stream import StreamFile

    descriptor = Descriptor.new("streamOptimized", [ExtentLine("RW", sectors, "SPARSE", name, None)],
                                cid=new_cid(), ddb=_ddb(sectors * SECTOR_SIZE, opts))
    return StreamFile(target, sectors, descriptor.to_bytes(),
                      grain_size=opts.cluster_size // SECTOR_SIZE,
                      compression_level=opts.compression_level)


def create_stream(fileobj: BinaryIO, size: int, *, name: str = "disk.vmdk",
                  adapter_type: str = "ide", hwversion: str = "4", comment: str | None = None,
                  cluster_size: int = 65536, toolsversion: str = DEFAULT_TOOLS_VERSION,
                  compression_level: int = 1, **ignored: Any) -> Any:
    """A streamOptimized image written to an open binary file (a pipe or socket will do).

    Returns a write-only :class:`vmdk.stream.StreamFile`; ``name`` is the extent
    name its descriptor carries.  Nothing is ever sought, so the image can be
    streamed as it is made.
    """
    opts = CreateOptions(adapter_type, hwversion, None, comment, False, cluster_size, False,
                         toolsversion, compression_level)
    _check_options(size, opts)
    return _stream_file(fileobj, name, _ceil_div(size, SECTOR_SIZE), opts)


def _create_vmfs_sparse(path: str, sectors: int, opts: CreateOptions, parent: Image | None,
                        overwrite: bool, *_: Any) -> None:
    """An ESX snapshot: a descriptor plus a COWD ``name-delta.vmdk`` extent."""
    from .extents.cowd import CowdExtent

    full, base = _sibling(path, "-delta")
    _remove_if([path, full], overwrite)
    parent_name = os.path.basename(parent.path) if parent is not None else None
    CowdExtent.create(full, sectors, grain_size=1, parent_file_name=parent_name).close()
    descriptor = Descriptor.new("vmfsSparse", [ExtentLine("RW", sectors, "VMFSSPARSE", base, None)],
                                cid=new_cid(), ddb=_ddb(sectors * SECTOR_SIZE, opts, parent),
                                **_parent_fields(path, parent))
    _write_text_descriptor(path, descriptor)


def _extent_name(image: str, target: str) -> str:
    """How a descriptor names ``target``: relative when it sits in the image's folder (or
    below), absolute otherwise; either way the file meant, wherever the caller stood."""
    target = os.path.abspath(target)
    rel = os.path.relpath(target, os.path.dirname(os.path.abspath(image)))
    return target if rel.startswith("..") else rel


def device_size(device: str) -> int:
    """Bytes in a disk or disk file (a block device's size is where seeking to its end goes)."""
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _create_full_device(path: str, sectors: int, opts: CreateOptions, parent: Image | None,
                        overwrite: bool, raw_device: str | None, *_: Any) -> None:
    if not raw_device:
        raise VmdkError("fullDevice needs raw_device (the disk or file to expose)", path)
    if os.path.exists(raw_device):
        have = device_size(raw_device)
        if sectors * SECTOR_SIZE > have:
            raise VmdkError(f"the device holds {have} bytes, less than the "
                            f"{sectors * SECTOR_SIZE} asked for", raw_device)
    _remove_if([path], overwrite)
    descriptor = Descriptor.new("fullDevice", [ExtentLine("RW", sectors, "FLAT",
                                                          _extent_name(path, raw_device), 0)],
                                cid=new_cid(), ddb=_ddb(sectors * SECTOR_SIZE, opts))
    _write_text_descriptor(path, descriptor)


def _partition_lines(path: str, sectors: int, ranges: Sequence[RawRange]
                     ) -> tuple[list[ExtentLine], bytes]:
    """Extent lines covering the disk, and the bytes of the partition-table copy file."""
    _pt_full, pt_base = _sibling(path, "-pt")
    lines: list[ExtentLine] = []
    table = bytearray()
    pos = 0
    for r in sorted(ranges, key=lambda r: r.start):
        if r.start % SECTOR_SIZE or r.size % SECTOR_SIZE:
            raise ValueError(f"raw range at {r.start} (+{r.size}) is not sector-aligned")
        if r.start < pos:
            raise ValueError(f"raw range at {r.start} overlaps the one before it")
        if r.start > pos:
            lines.append(ExtentLine("RW", (r.start - pos) // SECTOR_SIZE, "ZERO", None, None))
        n = r.size // SECTOR_SIZE
        if r.data is not None:
            lines.append(ExtentLine("RW", n, "FLAT", pt_base, len(table) // SECTOR_SIZE))
            table += bytes(r.data[:r.size]).ljust(r.size, b"\0")
        elif r.device is not None:
            lines.append(ExtentLine("RW", n, "FLAT", _extent_name(path, r.device),
                                    r.device_offset // SECTOR_SIZE))
        else:
            lines.append(ExtentLine("RW", n, "ZERO", None, None))
        pos = r.start + r.size
    if pos > sectors * SECTOR_SIZE:
        raise ValueError("raw ranges reach past the end of the disk")
    if pos < sectors * SECTOR_SIZE:
        lines.append(ExtentLine("RW", sectors - pos // SECTOR_SIZE, "ZERO", None, None))
    return lines, bytes(table)


def _create_partitioned_device(path: str, sectors: int, opts: CreateOptions,
                               parent: Image | None, overwrite: bool, raw_device: str | None,
                               partitions: Sequence[RawRange] | Sequence[int] | None) -> None:
    if not partitions:
        raise ValueError("partitionedDevice needs partitions (partition numbers of raw_device, "
                         "or a list of RawRange)")
    ranges = [p for p in partitions if isinstance(p, RawRange)]
    numbers = [p for p in partitions if isinstance(p, int)]
    if numbers:
        from .partitions import partitioned_ranges

        if ranges or not raw_device:
            raise ValueError("partitions are either partition numbers of raw_device or RawRanges")
        ranges = partitioned_ranges(raw_device, numbers)
    lines, table = _partition_lines(path, sectors, ranges)
    pt_full, _ = _sibling(path, "-pt")
    _remove_if([path] + ([pt_full] if table else []), overwrite)
    if table:
        fd = os.open(pt_full, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, table)
            os.fsync(fd)
        finally:
            os.close(fd)
    descriptor = Descriptor.new("partitionedDevice", lines, cid=new_cid(),
                                ddb=_ddb(sectors * SECTOR_SIZE, opts))
    _write_text_descriptor(path, descriptor)


_WRITERS = {
    "monolithicSparse": _create_monolithic_sparse,
    "twoGbMaxExtentSparse": _create_split_sparse,
    "monolithicFlat": _create_flat,
    "twoGbMaxExtentFlat": _create_split_flat,
    "vmfs": _create_vmfs,
    "vmfsSparse": _create_vmfs_sparse,
    "streamOptimized": _create_stream,
    "fullDevice": _create_full_device,
    "partitionedDevice": _create_partitioned_device,
}
