"""Moving an image to a new name: ``vmdk rename SRC DST`` (``vmware-vdiskmanager -n``).

An image is several files that name each other: the descriptor names its
extents (``disk-flat.vmdk``, ``disk-s001.vmdk``...) and each snapshot names its
parent.  A rename moves them all and rewrites the names, in an order where a
kill at any moment leaves the old image whole, or the new one, or both:

1. every file of the image gets its new name as a hard link (nothing moves yet);
2. the new descriptor is written under a temporary name and linked as DST,
   which never replaces a file (a monolithic file, its own descriptor, is linked
   as DST and its embedded extent line rewritten);
3. the snapshots found beside SRC get their parentFileNameHint pointed at DST
   (their parentCID stays: no content changed);
4. the old names go: extents first, the descriptor last.

Between 2 and 4 both names open and share their files.  Running the same
rename again then finishes the job.  Before anything changes, the image and
each of its snapshots is locked for writing, so none is in use elsewhere while
its names change, and everything that could refuse the rename has been checked.
Snapshots are only looked for in SRC's folder: one kept elsewhere is not found.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
from collections.abc import Iterator

from ._output import PARTIAL_MARK, _signals_deferred
from ._structs import SPARSE_MAGIC, SparseHeader
from .descriptor import Descriptor, canonical_create_type
from .errors import (
    ChainError,
    DescriptorSpaceError,
    ImageExistsError,
    ImageInUseError,
    UnsafePathError,
    UnsupportedFormatError,
    VmdkError,
)
from .extents.base import SECTOR_SIZE, pwrite_all
from .extents.sparse import MAX_DESCRIPTOR_SECTORS
from .image import (
    CHANGE_TRACK_KEY,
    MAX_DESCRIPTOR_BYTES,
    NO_PARENT_CID,
    RAW_DEVICE_TYPES,
    Image,
    _lock_files,
    _replace_file,
    _still_named,
    find_parent,
    resolve_extent_path,
    sniff,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Move:
    """One file of the image that gets a new name (full paths)."""

    old: str
    new: str


@dataclasses.dataclass
class _Stored:
    """A descriptor as read from its file, and where it lives there."""

    path: str
    descriptor: Descriptor
    area: tuple[int, int] | None  # (offset, bytes) when embedded in a sparse file

    def write(self, descriptor: Descriptor) -> None:
        """Rewrite it in place, durably (a text file, or the embedded area)."""
        if self.area is None:
            _replace_file(self.path, descriptor.to_bytes())
            return
        offset, size = self.area
        data = descriptor.to_bytes_padded(size)
        fd = os.open(self.path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            pwrite_all(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclasses.dataclass
class _Plan:
    """Everything the rename does, worked out before anything changes."""

    src: str
    dst: str
    stored: _Stored  # SRC's descriptor
    descriptor: Descriptor  # what DST's says
    moves: list[_Move]

    @property
    def embedded(self) -> bool:
        return self.stored.area is not None


@dataclasses.dataclass
class _Child:
    """A snapshot of SRC, locked, with the hint it gets."""

    image: Image
    stored: _Stored
    hint: str
    locks: list[int]


def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
           allow_external: bool = False) -> list[str]:
    """Give the image ``src`` the name ``dst`` (a folder: the same file name in it),
    with all its files, and point its snapshots in ``src``'s folder at the new name.

    Returns the snapshots whose parentFileNameHint was changed.  Refused, with
    nothing changed: a ``dst`` that exists (``ImageExistsError``) unless it is
    this rename interrupted, which is then finished; another file system (a
    rename cannot move data: ``vmdk convert`` copies it); an image in use
    (``ImageInUseError``) or whose chain is broken (``ChainError``); a snapshot
    that cannot follow, in use or else (``ChainError`` naming each); a name a
    descriptor could no longer reach (``UnsafePathError``).
    """
    src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
    if os.path.isdir(dst):
        dst = os.path.join(dst, os.path.basename(src))
    if src == dst:
        raise VmdkError("the new name is the image's own name", dst)
    plan = _plan(src, dst, allow_external)
    resuming = os.path.lexists(dst)
    if resuming and not _interrupted_rename(plan):
        raise ImageExistsError("file exists: a rename never replaces a file", dst)
    _refuse_other_file_system(plan)
    if not resuming:  # when resuming, _interrupted_rename found every new name to be ours
        _refuse_taken_names(plan)
    with _locked(dst if resuming else src, allow_external), \
            _children(plan, allow_external) as children, _signals_deferred():
        _refuse_changed(plan.stored)  # read before the lock: a writer may have come between
        if resuming:
            log.info("%s: finishing an interrupted rename to %s", src, dst)
        _publish(plan, resuming)
        _point_children_at(plan, children)
        _remove_old_names(plan)
        return [child.stored.path for child in children]


# ------------------------------------------------------------------ planning

def _plan(src: str, dst: str, allow_external: bool) -> _Plan:
    """SRC's descriptor and the one DST gets: new extent names, hint and tracking file."""
    stored = _read_descriptor(src)
    descriptor = stored.descriptor.copy()
    namer = _Namer(src, dst, stored, allow_external)
    lines = stored.descriptor.extents
    descriptor.set_extents([dataclasses.replace(line, filename=namer.extent(line.filename))
                            if line.filename else line for line in lines])
    tracking = descriptor.get(CHANGE_TRACK_KEY)
    if tracking:
        descriptor.set(CHANGE_TRACK_KEY, namer.extent(tracking, tracking=True))
    hint = descriptor.parent_file_name_hint
    if hint and descriptor.parent_cid != NO_PARENT_CID:
        descriptor.parent_file_name_hint = _own_parent_hint(src, dst, hint, allow_external)
    if stored.area is not None:
        descriptor = _fitting(stored, descriptor)
    return _Plan(src, dst, stored, descriptor, namer.moves)


def _read_descriptor(path: str) -> _Stored:
    """The descriptor of an image file: a text file, or the area embedded in a sparse one."""
    kind = sniff(path)
    if kind == "descriptor":
        with open(path, "rb") as f:
            return _Stored(path, Descriptor.parse(f.read(MAX_DESCRIPTOR_BYTES), path), None)
    if kind == "sparse":
        with open(path, "rb") as f:
            header = SparseHeader.unpack(f.read(SparseHeader.SIZE))
            if 0 < header.descriptor_size <= MAX_DESCRIPTOR_SECTORS and header.descriptor_offset:
                offset = header.descriptor_offset * SECTOR_SIZE
                size = header.descriptor_size * SECTOR_SIZE
                f.seek(offset)
                raw = f.read(size)
                if raw.strip(b"\0").strip():
                    return _Stored(path, Descriptor.parse(raw, path), (offset, size))
    if kind in ("sparse", "cowd", "sesparse"):
        raise UnsupportedFormatError("this file has no descriptor of its own (an extent of "
                                     "another image?): rename the image's descriptor", path)
    raise UnsupportedFormatError("not a VMDK image (no descriptor or known header)", path)


class _Namer:
    """New names for the files a descriptor names.

    A file named after the image (``disk-flat.vmdk`` for ``disk.vmdk``) is renamed
    after DST; other files of the image in its folder keep their names and move
    with it.  Files elsewhere (devices, other folders, the disks a raw-device image
    maps) stay where they are and are named as seen from DST's folder.
    """

    def __init__(self, src: str, dst: str, stored: _Stored, allow_external: bool) -> None:
        self.src, self.dst = src, dst
        self.src_folder, self.dst_folder = os.path.dirname(src), os.path.dirname(dst)
        self.src_stem, self.dst_stem = _stem(src), _stem(dst)
        self.embedded = stored.area is not None
        create_type = canonical_create_type(stored.descriptor.create_type)
        self.raw_device = create_type in RAW_DEVICE_TYPES
        self.allow_external = allow_external
        self.moves: list[_Move] = []

    def extent(self, name: str, tracking: bool = False) -> str:
        if self.embedded and not tracking:
            return os.path.basename(self.dst)  # a monolithic file names itself
        bare = os.path.basename(name) == name and name not in (".", "..")
        after_image = bare and name.startswith(self.src_stem)
        if after_image or (bare and not self.raw_device and not tracking):
            new = self.dst_stem + name[len(self.src_stem):] if after_image else name
            move = _Move(os.path.join(self.src_folder, name), os.path.join(self.dst_folder, new))
            if tracking and not (os.path.lexists(move.old) or os.path.lexists(move.new)):
                return name  # VMware makes the tracking file when it first needs it
            if move.old != move.new and move not in self.moves:
                self.moves.append(move)
            return new
        if os.path.isabs(name) or self.src_folder == self.dst_folder:
            return name
        seen_from_dst = os.path.relpath(os.path.join(self.src_folder, name), self.dst_folder)
        _reachable(self.src, self.dst, seen_from_dst, "extent", self.allow_external)
        return seen_from_dst


def _stem(path: str) -> str:
    name = os.path.basename(path)
    return name[:-5] if name.lower().endswith(".vmdk") else name


def _own_parent_hint(src: str, dst: str, hint: str, allow_external: bool) -> str:
    """SRC's own parent as seen from DST's folder (the same hint within one folder)."""
    if os.path.dirname(src) == os.path.dirname(dst):
        return hint
    parent = find_parent(src, hint, allow_external=allow_external)
    if parent is None:
        raise ChainError(f"parent image {hint!r} was not found", src)
    new = parent if os.path.isabs(hint) else os.path.relpath(parent, os.path.dirname(dst))
    _reachable(src, dst, new, "parent", allow_external)
    return new


def _reachable(src: str, dst: str, name: str, what: str, allow_external: bool) -> None:
    """Refuse a name the image at DST could not open without allow_external."""
    try:
        resolve_extent_path(dst, name, allow_external=allow_external)
    except UnsafePathError:
        raise UnsafePathError(f"at {dst} the image would name its {what} {name!r}, outside its "
                              "folder; pass allow_external=True (--allow-external) to trust "
                              "that", src) from None


def _fitting(stored: _Stored, descriptor: Descriptor) -> Descriptor:
    """The new embedded descriptor, if it fits its area; else the old extent line stays
    (no reader goes by a monolithic file's own extent name), unless a changed parent
    hint must be written."""
    assert stored.area is not None
    try:
        descriptor.to_bytes_padded(stored.area[1])
        return descriptor
    except DescriptorSpaceError:
        if descriptor.parent_file_name_hint != stored.descriptor.parent_file_name_hint:
            raise
    log.warning("%s: the embedded descriptor has no room for the new name; its extent line "
                "keeps the old one, which readers ignore", stored.path)
    return stored.descriptor


# ------------------------------------------------------------------ refusals

def _interrupted_rename(plan: _Plan) -> bool:
    """Whether DST is this very rename, stopped after DST was made (see the module doc)."""
    with contextlib.suppress(OSError):
        if plan.embedded:
            return os.path.samefile(plan.src, plan.dst)
        with open(plan.dst, "rb") as f:
            if f.read(MAX_DESCRIPTOR_BYTES + 1) != plan.descriptor.to_bytes():
                return False
        return all(os.path.exists(move.new) and (not os.path.lexists(move.old)
                                                 or os.path.samefile(move.old, move.new))
                   for move in plan.moves)
    return False


def _refuse_taken_names(plan: _Plan) -> None:
    """A new name may only be taken by a link to the same file (an interrupted rename)."""
    for move in plan.moves:
        if os.path.lexists(move.new) and not (os.path.exists(move.old)
                                              and os.path.samefile(move.old, move.new)):
            raise ImageExistsError("file exists: a rename never replaces a file", move.new)


def _refuse_changed(stored: _Stored) -> None:
    """Refuse when a descriptor changed since it was read (another writer came first)."""
    if _read_descriptor(stored.path).descriptor.to_bytes() != stored.descriptor.to_bytes():
        raise ImageInUseError("image is in use: it changed while the rename was being "
                              "prepared; try again", stored.path)


def _refuse_other_file_system(plan: _Plan) -> None:
    folder = os.stat(os.path.dirname(plan.dst))
    for path in [plan.src] + [move.old for move in plan.moves if os.path.exists(move.old)]:
        if os.stat(path).st_dev != folder.st_dev:
            raise _other_file_system(plan)


def _other_file_system(plan: _Plan) -> VmdkError:
    return VmdkError("is on another file system than the image: a rename moves no data; "
                     f"copy the image with 'vmdk convert {plan.src} {plan.dst}' and remove "
                     "the old one", plan.dst)


# ------------------------------------------------------------------ locking

@contextlib.contextmanager
def _locked(path: str, allow_external: bool) -> Iterator[None]:
    """The image opened with its whole chain (refused when broken) and its files locked
    for writing: nobody, here or in qemu, has it open while its names change."""
    with Image.open(path, "r", force_share=True, allow_external=allow_external) as image:
        locks = _lock_for_writing(image, os.stat(path))
        try:
            yield
        finally:
            for fd in locks:
                os.close(fd)


def _lock_for_writing(image: Image, opened: os.stat_result) -> list[int]:
    locks = _lock_files(image.path, image.extents, write=True)
    if not _still_named(image.path, opened, image.extents):
        for fd in locks:
            os.close(fd)
        raise ImageInUseError("image is in use: it was replaced while being opened", image.path)
    return locks


@contextlib.contextmanager
def _children(plan: _Plan, allow_external: bool) -> Iterator[list[_Child]]:
    """SRC's snapshots in its folder, each locked and checked that it can take its new hint.

    One that is in use or cannot be updated refuses the whole rename, naming it:
    renaming without it would break its chain.
    """
    found: list[_Child] = []
    refused: list[str] = []
    try:
        for path in _snapshot_candidates(plan):
            try:
                child = _child(plan, path, allow_external)
            except (VmdkError, OSError) as exc:
                refused.append(f"{os.path.basename(path)} ({_reason(exc)})")
                continue
            if child is not None:
                found.append(child)
        if refused:
            raise ChainError("snapshots of this image cannot be pointed at the new name, so "
                             f"it keeps its name: {'; '.join(refused)}", plan.src)
        yield found
    finally:
        for child in found:
            child.image.close()
            for fd in child.locks:
                os.close(fd)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, VmdkError):
        return exc.reason
    return os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc)


def _snapshot_candidates(plan: _Plan) -> list[str]:
    """Files in SRC's folder that may be images, other than the renamed image's own."""
    own = {plan.src, plan.dst} | {m.old for m in plan.moves} | {m.new for m in plan.moves}
    folder = os.path.dirname(plan.src)
    out = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if (entry.path in own or PARTIAL_MARK in entry.name
                or not entry.is_file(follow_symlinks=False)):
            continue
        head = b""
        with contextlib.suppress(OSError), open(entry.path, "rb") as f:
            head = f.read(4)
        if head == SPARSE_MAGIC or sniff(entry.path) == "descriptor":
            out.append(entry.path)
    return out


def _child(plan: _Plan, path: str, allow_external: bool) -> _Child | None:
    """``path`` locked with its new hint, when it is a snapshot of SRC; else None."""
    try:
        stored = _read_descriptor(path)
    except (VmdkError, OSError):
        return None  # not an image with a descriptor: no snapshot of anything
    hint = stored.descriptor.parent_file_name_hint
    if stored.descriptor.parent_cid == NO_PARENT_CID or not hint:
        return None
    try:  # found as qemu and this package find a parent, whatever the hint's form
        parent = find_parent(path, hint, allow_external=True)
        if parent is None or not os.path.samefile(parent, plan.src):
            return None
    except (VmdkError, OSError):
        return None  # a hint that leads nowhere does not lead to SRC
    new_hint = plan.dst if os.path.isabs(hint) else os.path.relpath(plan.dst,
                                                                   os.path.dirname(path))
    if not os.path.isabs(new_hint):
        resolve_extent_path(path, new_hint, allow_external=allow_external)
    trial = stored.descriptor.copy()
    trial.parent_file_name_hint = new_hint
    if stored.area is not None:
        trial.to_bytes_padded(stored.area[1])  # DescriptorSpaceError: refused now
    image = Image.open(path, "r", force_share=True, open_parent=False,
                       allow_external=allow_external)
    locks: list[int] = []
    try:
        locks = _lock_for_writing(image, os.stat(path))
        _refuse_changed(stored)
    except BaseException:
        image.close()
        for fd in locks:
            os.close(fd)
        raise
    return _Child(image, stored, new_hint, locks)


# ------------------------------------------------------------------ the steps

def _publish(plan: _Plan, resuming: bool) -> None:
    """Steps 1 and 2: DST appears, whole, sharing SRC's files.  A failure before DST
    exists takes back the links made."""
    made: list[str] = []  # the names this run made: taken back if it fails here
    try:
        if not resuming:
            _link_new_names(plan, made)
            _place_descriptor(plan, made)
        if plan.embedded and plan.descriptor is not plan.stored.descriptor:
            # Both names are one file: its line names the new one now (no reader needs it).
            plan.stored.write(plan.descriptor)
    except BaseException:
        _unlink_quietly(made)
        raise
    _sync_folders(plan)


def _link_new_names(plan: _Plan, made: list[str]) -> None:
    for move in plan.moves:
        if os.path.lexists(move.new):
            continue  # a link an interrupted rename made (see _refuse_taken_names)
        _link(plan, move.old, move.new)
        made.append(move.new)


def _place_descriptor(plan: _Plan, made: list[str]) -> None:
    """DST's descriptor, under its name only when complete; never over another file."""
    if plan.embedded:
        _link(plan, plan.src, plan.dst)
        made.append(plan.dst)
        return
    folder, name = os.path.split(plan.dst)
    temporary = os.path.join(folder, f".{name[:200]}{PARTIAL_MARK}{os.getpid()}-"
                                     f"{os.urandom(4).hex()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                 0o644)
    try:
        try:
            pwrite_all(fd, plan.descriptor.to_bytes(), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        _link(plan, temporary, plan.dst)
        made.append(plan.dst)
    finally:
        _unlink_quietly([temporary])


def _link(plan: _Plan, old: str, new: str) -> None:
    try:
        os.link(old, new)
    except FileExistsError:
        raise ImageExistsError("file exists: a rename never replaces a file", new) from None
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise _other_file_system(plan) from None
        if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise VmdkError(f"cannot make a second name for the file here ({exc.strerror}), "
                            "which a safe rename needs: copy the image with 'vmdk convert' "
                            "instead", new) from exc
        raise


def _point_children_at(plan: _Plan, children: list[_Child]) -> None:
    """Step 3: each snapshot names DST (one in-place write of its descriptor)."""
    for child in children:
        descriptor = child.stored.descriptor.copy()
        descriptor.parent_file_name_hint = child.hint
        child.stored.write(descriptor)
        log.info("%s: its parent is now %s", child.stored.path, child.hint)


def _remove_old_names(plan: _Plan) -> None:
    """Step 4: extents first, SRC's descriptor last, so a rename stopped here is found
    again (by its descriptor) and finished."""
    for move in plan.moves:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(move.old)
    os.unlink(plan.src)
    _sync_folders(plan)


def _sync_folders(plan: _Plan) -> None:
    """The names made or removed survive a crash."""
    for folder in {os.path.dirname(plan.src), os.path.dirname(plan.dst)}:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _unlink_quietly(paths: list[str]) -> None:
    for path in reversed(paths):
        with contextlib.suppress(OSError):
            os.unlink(path)


__all__ = ["rename"]
