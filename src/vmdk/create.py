"""Creating new images of every subformat VMware, VirtualBox and qemu-img make.

One small writer per ``createType``; each lays out its files, writes a
descriptor in VMware's canonical spelling, and hands back the image opened
for writing.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, overload

from .descriptor import Descriptor, ExtentLine
from .errors import UnsupportedFormatError, VmdkError
from .extents.base import SECTOR_SIZE
from .extents.flat import FlatExtent
from .extents.sparse import SparseExtent
from .image import Image, compute_geometry, io_errors, new_cid

if TYPE_CHECKING:
    from ._file import VmdkFile
    from ._output import StagedOutput
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


#: The subformats whose grain tables are preallocated (always, as VMware lays them out).
HOSTED_SPARSE = ("monolithicSparse", "twoGbMaxExtentSparse")
PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")


def _refuse_metadata_preallocation(path: str | os.PathLike[str], subformat: str,
                                   preallocate: bool | str) -> str:
    """``preallocate`` as qemu-img names it ("off", "metadata", "falloc", "full") or a
    bool (True: "falloc"); "metadata" asks for the grain tables, which hosted sparse
    images always have, and which no other kind has."""
    if not isinstance(preallocate, bool) and preallocate not in PREALLOCATION_MODES:
        raise ValueError(f"preallocation {preallocate!r} is not one of "
                         f"{', '.join(PREALLOCATION_MODES)}")
    if preallocate == "metadata" and subformat not in HOSTED_SPARSE:
        raise UnsupportedFormatError(
            f"preallocation=metadata preallocates grain tables, which {subformat} has none "
            f"of (hosted sparse images always have them); flat images take falloc or full",
            path)
    return subformat


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
    preallocate: bool | str = False,
    cluster_size: int = 65536,
    zeroed_grain: bool = False,
    toolsversion: str = DEFAULT_TOOLS_VERSION,
    compression_level: int = 1,
    raw_device: str | None = None,
    partitions: Sequence[RawRange] | Sequence[int] | None = None,
    overwrite: bool = False,
    allow_external: bool = False,
    force_share: bool = False,
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
    preallocate: bool | str = False,
    cluster_size: int = 65536,
    zeroed_grain: bool = False,
    toolsversion: str = DEFAULT_TOOLS_VERSION,
    compression_level: int = 1,
    raw_device: str | None = None,
    partitions: Sequence[RawRange] | Sequence[int] | None = None,
    overwrite: bool = False,
    allow_external: bool = False,
    force_share: bool = False,
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
    preallocate: bool | str = False,
    cluster_size: int = 65536,
    zeroed_grain: bool = False,
    toolsversion: str = DEFAULT_TOOLS_VERSION,
    compression_level: int = 1,
    raw_device: str | None = None,
    partitions: Sequence[RawRange] | Sequence[int] | None = None,
    overwrite: bool = False,
    allow_external: bool = False,
    force_share: bool = False,
) -> VmdkFile | StreamFile:
    """Create an image and return it opened for writing.

    The result is a :class:`vmdk.VmdkFile`, or for ``streamOptimized`` a write-only
    :class:`vmdk.stream.StreamFile` filled front to back.

    ``size`` is in bytes and rounded up to a whole sector; with ``parent`` it
    defaults to the parent's size and the new image is a snapshot (child) of it.

    The files are made under a hidden staging folder beside ``path`` and get
    their names only when complete (a stream: when it is closed); an image
    they replace stays as it was, and locked, until then.  ``allow_external``
    trusts a parent (and devices) outside the new image's folder;
    ``force_share`` reads a parent that another process has open for writing.
    """
    from ._file import VmdkFile
    from ._output import StagedOutput

    subformat = _refuse_metadata_preallocation(path, ALIASES.get(subformat, subformat),
                                               preallocate)
    opts = CreateOptions(adapter_type, hwversion, geometry, comment,
                         preallocate in (True, "falloc", "full"), cluster_size,
                         zeroed_grain, toolsversion, compression_level)
    plan = _plan(os.fspath(path), size, subformat, parent, opts, raw_device, partitions,
                 allow_external, force_share)
    try:
        with io_errors(plan.path):
            stage = StagedOutput(plan.path, overwrite=overwrite, keep=plan.keep())
        with stage:
            made = _write(plan, stage)
    finally:
        plan.close()
    if made is not None:
        stream: StreamFile = made
        return stream
    with io_errors(plan.path):
        stage.commit()
    # The image is whole and in place: if opening it fails now, it stays.
    return VmdkFile(Image.open(plan.path, "r+", allow_external=plan.open_external,
                               share_parents=force_share))


def create_in(stage: StagedOutput, size: int, subformat: str = "monolithicSparse", *,
              parent: str | os.PathLike[str] | None = None, raw_device: str | None = None,
              partitions: Sequence[RawRange] | Sequence[int] | None = None,
              allow_external: bool = False, **options: Any) -> VmdkFile | StreamFile:
    """The new image made in ``stage`` and opened there for writing, for a caller that
    fills it before committing the stage (convert).  ``options`` are create's."""
    plan = _plan(stage.final, size, subformat, parent, CreateOptions(**options), raw_device,
                 partitions, allow_external)
    try:
        stream: StreamFile | None = _write(plan, stage)
        return stream if stream is not None else _open_staged(plan, stage)
    finally:
        plan.close()


@dataclasses.dataclass
class _Plan:
    """A checked request for a new image: everything its writer needs."""

    path: str  # the final name
    subformat: str
    sectors: int
    opts: CreateOptions
    parent: Image | None
    raw_device: str | None
    partitions: Sequence[RawRange] | Sequence[int] | None
    allow_external: bool

    @property
    def open_external(self) -> bool:
        return self.allow_external or self.subformat in ("fullDevice", "partitionedDevice")

    def keep(self) -> list[str]:
        """Files the new image reads: never removed as the replaced image's."""
        return image_files(self.parent) if self.parent is not None else []

    def close(self) -> None:
        if self.parent is not None:
            self.parent.close()
            self.parent = None


def _plan(path: str, size: int | None, subformat: str, parent: str | os.PathLike[str] | None,
          opts: CreateOptions, raw_device: str | None,
          partitions: Sequence[RawRange] | Sequence[int] | None, allow_external: bool,
          force_share: bool = False) -> _Plan:
    """Check a request before anything is written; opens the parent, if any."""
    if raw_device is not None:  # like open(): relative to the current folder, not the image's
        raw_device = os.path.abspath(raw_device)
    subformat = ALIASES.get(subformat, subformat)
    if subformat not in SUBFORMATS:
        raise UnsupportedFormatError(
            f"unknown subformat {subformat!r} (one of {', '.join(SUBFORMATS)})", path)
    parent_image = None
    if parent is not None:
        if subformat not in ("monolithicSparse", "twoGbMaxExtentSparse", "vmfsSparse"):
            raise UnsupportedFormatError(f"a snapshot cannot be {subformat}; use a sparse subformat",
                                         path)
        parent_image = Image.open(parent, "r", allow_external=allow_external,
                                  force_share=force_share)
    try:
        if parent_image is not None:
            refuse_replacing(image_files(parent_image), path, subformat)
            _check_parent_name(path, parent_image, allow_external)
            if size is None:
                size = parent_image.size
        if size is None:
            if subformat in ("fullDevice", "partitionedDevice") and raw_device is not None:
                size = device_size(raw_device)
            else:
                raise ValueError("size is required")
        size = operator.index(size)  # a float size is a mistake, not a number of bytes
        _check_options(size, opts)
        if opts.zeroed_grain and subformat not in HOSTED_SPARSE:
            raise UnsupportedFormatError(
                f"zeroed_grain marks zeroed grains in the tables of a hosted sparse image "
                f"({', '.join(HOSTED_SPARSE)}); {subformat} has no such tables", path)
        if parent_image is not None and size < parent_image.size:
            raise UnsupportedFormatError(
                f"a snapshot of {size} bytes would be smaller than its parent "
                f"({parent_image.size} bytes) and hide the parent's end; give no size (the "
                "parent's) or a larger one", path)
        if opts.preallocate and subformat not in ("monolithicFlat", "twoGbMaxExtentFlat", "vmfs"):
            raise UnsupportedFormatError(
                f"preallocation applies to flat subformats (monolithicFlat, twoGbMaxExtentFlat, "
                f"vmfs); {subformat} grows as it is written", path)
    except BaseException:
        if parent_image is not None:
            parent_image.close()
        raise
    logging.getLogger(__name__).info(
        "creating %s: %s, %d bytes%s", path, subformat, size,
        f", a snapshot of {parent_image.path}" if parent_image is not None else "")
    return _Plan(path, subformat, _ceil_div(size, SECTOR_SIZE), opts, parent_image, raw_device,
                 partitions, allow_external)


def _check_parent_name(path: str, parent: Image, allow_external: bool) -> None:
    """Refuse now a parent the child could not be opened with (one outside its folder)."""
    from .image import resolve_extent_path

    resolve_extent_path(path, _parent_fields(path, parent)["parent_file_name_hint"],
                        allow_external=allow_external)


def _write(plan: _Plan, stage: StagedOutput) -> Any:
    """Lay out the image's files in ``stage``; a stream comes back as its writer."""
    with io_errors(plan.path):
        return _WRITERS[plan.subformat](stage, plan.sectors, plan.opts, plan.parent,
                                        plan.raw_device, plan.partitions)


def _open_staged(plan: _Plan, stage: StagedOutput) -> VmdkFile:
    """Open the image still in its staging folder for writing.

    Names in it are relative to the final folder: a parent is opened from
    there and attached, and a device beside the image is reached through a
    link in the staging folder (removed with it).
    """
    from ._file import VmdkFile

    _link_outside_names(stage)
    image = Image.open(stage.path, "r+", allow_external=plan.open_external,
                       open_parent=plan.parent is None)
    if plan.parent is not None:
        image.parent, plan.parent = plan.parent, None
    return VmdkFile(image)


def _link_outside_names(stage: StagedOutput) -> None:
    """Links in the staging folder to the files beside the target that the image names."""
    from ._output import text_extents

    staging = os.path.dirname(stage.path)
    staged = set(os.listdir(staging))
    for name in text_extents(stage.path, staging, owned=False):
        base = os.path.basename(name)
        if base not in staged and os.path.lexists(os.path.join(stage.folder, base)):
            os.symlink(os.path.join(os.pardir, base), name)


def _parent_fields(path: str, parent: Image | None) -> dict[str, Any]:
    if parent is None:
        return {}
    hint = os.path.relpath(os.path.abspath(parent.path), os.path.dirname(os.path.abspath(path)))
    return {"parent_cid": parent.cid, "parent_file_name_hint": hint}


#: createType -> the extent type of its lines (flat ones carry an offset, VMFS ones none).
_EXTENT_TYPES = {"monolithicSparse": "SPARSE", "streamOptimized": "SPARSE",
                 "twoGbMaxExtentSparse": "SPARSE", "monolithicFlat": "FLAT",
                 "twoGbMaxExtentFlat": "FLAT", "vmfs": "VMFS", "vmfsSparse": "VMFSSPARSE"}


def extent_layout(subformat: str, path: str, sectors: int) -> list[tuple[str, ExtentLine]]:
    """The extent files of a new ``subformat`` image at ``path`` and the line naming each:
    the image file itself for monolithic sparse and stream images, else the files beside it."""
    kind = _EXTENT_TYPES[subformat]
    offset = 0 if kind == "FLAT" else None
    if subformat in ("monolithicSparse", "streamOptimized"):
        names = [(path, os.path.basename(path))]
        sizes = [sectors]
    elif subformat in ("twoGbMaxExtentSparse", "twoGbMaxExtentFlat"):
        sizes = _split_sizes(sectors)
        letter = "s" if kind == "SPARSE" else "f"
        names = [_sibling(path, f"-{letter}{i + 1:03d}") for i in range(len(sizes))]
    else:
        names = [_sibling(path, "-delta" if kind == "VMFSSPARSE" else "-flat")]
        sizes = [sectors]
    return [(full, ExtentLine("RW", n, kind, base, offset))
            for (full, base), n in zip(names, sizes)]


def new_descriptor(subformat: str, lines: list[ExtentLine], sectors: int, opts: CreateOptions,
                   parent: Image | None = None, final: str = "") -> Descriptor:
    """The descriptor a new image gets (a snapshot's names its ``parent`` as seen from
    ``final``, the image's final name)."""
    return Descriptor.new(subformat, lines, cid=new_cid(),
                          ddb=_ddb(sectors * SECTOR_SIZE, opts, parent),
                          **_parent_fields(final, parent))


def _create_monolithic_sparse(stage: StagedOutput, sectors: int, opts: CreateOptions,
                              parent: Image | None, *_: Any) -> None:
    path = stage.path
    stage.claim([path])
    lines = [line for _, line in extent_layout("monolithicSparse", path, sectors)]
    descriptor = new_descriptor("monolithicSparse", lines, sectors, opts, parent, stage.final)
    extent = SparseExtent.create(path, sectors, grain_size=opts.cluster_size // SECTOR_SIZE,
                                 descriptor=descriptor.to_bytes(),
                                 zeroed_grain=opts.zeroed_grain)
    extent.close()


def _create_split_sparse(stage: StagedOutput, sectors: int, opts: CreateOptions,
                         parent: Image | None, *_: Any) -> None:
    path = stage.path
    layout = extent_layout("twoGbMaxExtentSparse", path, sectors)
    stage.claim([path] + [full for full, _ in layout])
    for full, line in layout:
        SparseExtent.create(full, line.sectors, grain_size=opts.cluster_size // SECTOR_SIZE,
                            zeroed_grain=opts.zeroed_grain).close()
    _write_text_descriptor(path, new_descriptor("twoGbMaxExtentSparse",
                                                [line for _, line in layout], sectors, opts,
                                                parent, stage.final))


def _create_flat(stage: StagedOutput, sectors: int, opts: CreateOptions,
                 parent: Image | None, *_: Any, create_type: str = "monolithicFlat") -> None:
    """monolithicFlat, twoGbMaxExtentFlat and vmfs (whose lines carry no offset)."""
    path = stage.path
    layout = extent_layout(create_type, path, sectors)
    stage.claim([path] + [full for full, _ in layout])
    for full, line in layout:
        FlatExtent.create(full, line.sectors, preallocate=opts.preallocate).close()
    _write_text_descriptor(path, new_descriptor(create_type, [line for _, line in layout],
                                                sectors, opts))


def _create_vmfs(stage: StagedOutput, sectors: int, opts: CreateOptions,
                 parent: Image | None, *rest: Any) -> None:
    _create_flat(stage, sectors, opts, parent, create_type="vmfs")


def _create_split_flat(stage: StagedOutput, sectors: int, opts: CreateOptions,
                       parent: Image | None, *_: Any) -> None:
    _create_flat(stage, sectors, opts, parent, create_type="twoGbMaxExtentFlat")


def _create_stream(stage: StagedOutput, sectors: int, opts: CreateOptions,
                   parent: Image | None, *_: Any) -> Any:
    """streamOptimized is written once, front to back: hand back the writer itself."""
    return _stream_file(stage, os.path.basename(stage.path), sectors, opts)


def _stream_file(target: Any, name: str, sectors: int, opts: CreateOptions) -> Any:
    """A stream writer to ``target``: an open file, or a stage the image is put in place
    from when the writer is closed."""
    from ._output import StagedOutput

    descriptor = new_descriptor("streamOptimized", [ExtentLine("RW", sectors, "SPARSE", name, None)],
                                sectors, opts)
    writer: type[StreamFile]
    if isinstance(target, StagedOutput):
        from ._staged_stream import StagedStreamFile

        writer = StagedStreamFile
    else:
        from .stream import StreamFile

        writer = StreamFile
    return writer(target, sectors, descriptor.to_bytes(),
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


def _create_vmfs_sparse(stage: StagedOutput, sectors: int, opts: CreateOptions,
                        parent: Image | None, *_: Any) -> None:
    """An ESX snapshot: a descriptor plus a COWD ``name-delta.vmdk`` extent."""
    from .extents.cowd import CowdExtent

    path = stage.path
    [(full, line)] = extent_layout("vmfsSparse", path, sectors)
    stage.claim([path, full])
    parent_name = os.path.basename(parent.path) if parent is not None else None
    CowdExtent.create(full, sectors, grain_size=1, parent_file_name=parent_name).close()
    _write_text_descriptor(path, new_descriptor("vmfsSparse", [line], sectors, opts, parent,
                                                stage.final))


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


def _create_full_device(stage: StagedOutput, sectors: int, opts: CreateOptions,
                        parent: Image | None, raw_device: str | None, *_: Any) -> None:
    path = stage.path
    if not raw_device:
        raise VmdkError("fullDevice needs raw_device (the disk or file to expose)", stage.final)
    if os.path.exists(raw_device):
        have = device_size(raw_device)
        if sectors * SECTOR_SIZE > have:
            raise VmdkError(f"the device holds {have} bytes, less than the "
                            f"{sectors * SECTOR_SIZE} asked for", raw_device)
    stage.claim([path])
    descriptor = Descriptor.new("fullDevice", [ExtentLine("RW", sectors, "FLAT",
                                                          _extent_name(stage.final, raw_device), 0)],
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


def _create_partitioned_device(stage: StagedOutput, sectors: int, opts: CreateOptions,
                               parent: Image | None, raw_device: str | None,
                               partitions: Sequence[RawRange] | Sequence[int] | None) -> None:
    path = stage.path
    if not partitions:
        raise VmdkError("partitionedDevice needs the partitions to expose (partition numbers "
                        "of the device, or ranges of it)", stage.final,
                        opt_in=("partitions=[1, 5]", "names them"))
    ranges = [p for p in partitions if isinstance(p, RawRange)]
    numbers = [p for p in partitions if isinstance(p, int)]
    if numbers:
        from .partitions import partitioned_ranges

        if ranges or not raw_device:
            raise ValueError("partitions are either partition numbers of raw_device or RawRanges")
        ranges = partitioned_ranges(raw_device, numbers)
    lines, table = _partition_lines(stage.final, sectors, ranges)
    pt_full, _ = _sibling(path, "-pt")
    stage.claim([path] + ([pt_full] if table else []))
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
