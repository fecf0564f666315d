"""Consistency checks of an image, reported as counts as ``qemu-img check`` does.

Exit codes (``CheckResult.exit_code``): 0 clean, 1 the check could not run,
2 corruptions found, 3 only leaked space found.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
else:
    from ._numpy import np

from ._structs import SparseFlags
from .errors import UnsupportedFormatError, VmdkError
from .extents.base import SECTOR_SIZE, pread_exact, pwrite_all
from .extents.flat import FlatExtent
from .extents.sparse import MAX_FILE_SECTORS, SparseExtent, u32_view
from .extents.sparse import log as sparse_log
from .image import Image


@dataclasses.dataclass(frozen=True)
class Problem:
    kind: str  # "corruption", "leak" or "warning"
    message: str
    filename: str | None = None


@dataclasses.dataclass
class CheckResult:
    filename: str
    corruptions: int = 0
    leaks: int = 0  # leaked clusters (grain-sized pieces of unused file space)
    check_errors: int = 0
    problems: list[Problem] = dataclasses.field(default_factory=list)
    allocated_clusters: int = 0
    total_clusters: int = 0
    image_end_offset: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    unclean_cleared: bool = False  # a repair cleared the unclean-shutdown flag

    def add(self, kind: str, message: str, filename: str | None, count: int = 1) -> None:
        self.problems.append(Problem(kind, message, filename))
        if kind == "corruption":
            self.corruptions += count
        elif kind == "leak":
            self.leaks += count

    @property
    def exit_code(self) -> int:
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json(self) -> dict[str, Any]:
        """The keys of ``qemu-img check --output=json``, plus the list of problems."""
        out: dict[str, Any] = {
            "filename": self.filename,
            "format": "vmdk",
            "check-errors": self.check_errors,
            "image-end-offset": self.image_end_offset,
            "allocated-clusters": self.allocated_clusters,
            "total-clusters": self.total_clusters,
            "problems": [dataclasses.asdict(p) for p in self.problems],
        }
        if self.corruptions:
            out["corruptions"] = self.corruptions
        if self.leaks:
            out["leaks"] = self.leaks
        if self.corruptions_fixed:
            out["corruptions-fixed"] = self.corruptions_fixed
        if self.leaks_fixed:
            out["leaks-fixed"] = self.leaks_fixed
        if self.unclean_cleared:
            out["unclean-flag-cleared"] = True
        return out


def check(path: str | os.PathLike[str], *, repair: str | None = None,
          allow_external: bool = False, force_share: bool = False,
          progress: Callable[[int], None] | None = None) -> CheckResult:
    """Check an image and report every inconsistency found.

    ``repair`` is None (only look), "leaks" (give leaked space back) or "all"
    (also restore bad entries from the redundant copies, drop entries that point
    outside the file, give entries that share a grain or point into metadata a
    copy of their own, rebuild the redundant metadata from the primary copy, and
    clear the unclean-shutdown flag).  After a repair the image is checked
    again and the result tells what was fixed.
    """
    with _quiet_extent_warnings():
        return _check(os.fspath(path), repair, allow_external, force_share, progress)


def _check(path: str, repair: str | None, allow_external: bool, force_share: bool,
           progress: Callable[[int], None] | None) -> CheckResult:
    if repair is not None:
        if repair not in ("leaks", "all"):
            raise ValueError("repair must be None, 'leaks' or 'all'")
        before = _inspect(path, allow_external, force_share=False)
        if before.check_errors or not (before.corruptions or before.leaks or before.problems):
            return before
        if repair == "leaks" and before.corruptions:
            # Moving grains around a corrupt table could make things worse: as qemu-img,
            # "-r leaks" leaves corruptions alone, and here the leaks with them.
            before.problems.append(Problem(
                "warning", "not repaired: the image has corruptions; 'check -r all' repairs "
                "what can be repaired", path))
            return before
        _repair(path, repair, allow_external)
        after = _inspect(path, allow_external, force_share=False, progress=progress)
        after.corruptions_fixed = max(0, before.corruptions - after.corruptions)
        after.leaks_fixed = max(0, before.leaks - after.leaks)
        after.unclean_cleared = _unclean(before) and not _unclean(after)
        return after
    return _inspect(path, allow_external, force_share, progress)


def _unclean(result: CheckResult) -> bool:
    return any(p.message.startswith(_UNCLEAN) for p in result.problems)


_UNCLEAN = "the image was not closed cleanly"


class _NoExtentWarnings(logging.Filter):
    """Check reports every fault itself (the unclean flag, tables that differ from their
    copies...): no log line from each of its opens too.  Only the checking thread's
    warnings are dropped: other threads' images still warn while a check runs."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING or record.thread != self.thread


@contextlib.contextmanager
def _quiet_extent_warnings() -> Iterator[None]:
    quiet = _NoExtentWarnings()
    sparse_log.addFilter(quiet)
    try:
        yield
    finally:
        sparse_log.removeFilter(quiet)


def _inspect(path: str, allow_external: bool, force_share: bool,
             progress: Callable[[int], None] | None = None) -> CheckResult:
    result = CheckResult(path)
    try:
        image = Image.open(path, "r", allow_external=allow_external, open_parent=False,
                           force_share=force_share)
    except VmdkError as exc:
        result.check_errors += 1
        result.problems.append(Problem("error", str(exc), path))
        return result
    try:
        for extent in image.extents:
            done = 0

            def tick(n: int) -> None:
                nonlocal done
                done += n
                if progress:
                    progress(n)

            if isinstance(extent, SparseExtent):
                _check_sparse(extent, result, tick)
            elif isinstance(extent, FlatExtent):
                _check_flat(extent, result)
            if progress:
                progress(extent.size - done)  # virtual bytes checked
    finally:
        image.close()
    return result


def _check_flat(extent: FlatExtent, result: CheckResult) -> None:
    assert extent.filename is not None
    have = os.fstat(extent.fd).st_size
    need = extent.base + extent.size
    if have < need and os.path.isfile(extent.filename):
        result.add("corruption", f"flat extent file holds {have} bytes but the descriptor "
                   f"needs {need}", extent.filename)


def _check_sparse(extent: SparseExtent, result: CheckResult,
                  progress: Callable[[int], None] | None = None) -> None:
    name = extent.filename
    h = extent.header
    if h.unclean_shutdown:
        result.add("warning", f"{_UNCLEAN} (unclean-shutdown flag set)", name)
    gt_sectors = -(-h.num_gtes_per_gt * 4 // SECTOR_SIZE)
    file_sectors = -(-extent.file_size // SECTOR_SIZE)
    _compare_redundant(extent, result, gt_sectors)
    _numbers, grains = extent.stored_grains(progress)
    result.total_clusters += -(-h.capacity // h.grain_size)
    result.allocated_clusters += int(grains.size)
    if extent.compressed:
        beyond = grains[grains >= file_sectors]
        if beyond.size:
            result.add("corruption", f"{beyond.size} grain entries point past the end of the file",
                       name, int(beyond.size))
        damaged, first = extent.verify_compressed()
        if damaged:
            result.add("corruption", f"{damaged} compressed grains cannot be read ({first})",
                       name, damaged)
        result.image_end_offset = max(result.image_end_offset, extent.file_size)
        return
    grain_end = grains + h.grain_size
    beyond = grains[grain_end > file_sectors]
    if beyond.size:
        result.add("corruption", f"{beyond.size} grain entries point past the end of the file "
                   f"(first at sector {int(beyond[0])})", name, int(beyond.size))
    # Every used area of the file, as sector intervals: metadata first, then grains.
    meta_arr = np.array(extent.metadata_areas(), dtype=np.int64)
    into_meta = _overlaps(grains, grain_end, meta_arr)
    if into_meta:
        result.add("corruption", f"{into_meta} grain entries point into metadata", name, into_meta)
    order = np.argsort(grains, kind="stable")
    s, e = grains[order], grain_end[order]
    shared = int(np.count_nonzero(s[1:] < e[:-1])) if s.size > 1 else 0
    if shared:
        result.add("corruption", f"{shared} grains are referenced by more than one entry "
                   "or overlap", name, shared)
    used_end = max(int(e.max()) if e.size else 0, int(meta_arr[:, 1].max()))
    result.image_end_offset = max(result.image_end_offset, used_end * SECTOR_SIZE)
    _count_leaks(extent, result, meta_arr, s, e, file_sectors)


def _overlaps(starts: np.ndarray, ends: np.ndarray, areas: np.ndarray) -> int:
    hits = np.zeros(starts.shape, dtype=bool)
    for a, b in areas:
        hits |= (starts < b) & (ends > a)
    return int(np.count_nonzero(hits))


def _count_leaks(extent: SparseExtent, result: CheckResult, meta: np.ndarray,
                 grain_starts: np.ndarray, grain_ends: np.ndarray, file_sectors: int) -> None:
    """Space past the metadata that no table references, counted in grains."""
    h = extent.header
    inside = grain_starts < file_sectors  # entries past the end are corruptions, not space
    starts = np.minimum(np.concatenate((meta[:, 0], grain_starts[inside])), file_sectors)
    ends = np.minimum(np.concatenate((meta[:, 1], grain_ends[inside])), file_sectors)
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], np.maximum.accumulate(ends[order])
    gaps = np.maximum(starts[1:] - ends[:-1], 0)
    unused = int(gaps[starts[1:] >= h.overhead].sum()) if gaps.size else 0
    unused += max(0, file_sectors - max(int(ends.max()), h.overhead))
    leaked = unused // h.grain_size
    if leaked:
        result.add("leak", f"{leaked} grains of file space are not referenced by any table",
                   extent.filename, leaked)


def _compare_redundant(extent: SparseExtent, result: CheckResult, gt_sectors: int) -> None:
    name = extent.filename
    for fault in extent.directory_faults:
        result.add("corruption", fault, name)
    if extent.rgd is None or not extent.header.has(SparseFlags.REDUNDANT_GT):
        return
    gd, rgd = u32_view(extent.gd), u32_view(extent.rgd)
    shared = np.flatnonzero((gd != 0) & (gd == rgd))
    if shared.size and not extent.directory_faults:
        result.add("corruption", f"{shared.size} grain tables have no separate redundant copy "
                   "(both directories point at the same table)", name, int(shared.size))
    # After a crash (unclean flag set) a copy one step behind its primary is the expected
    # trace of an interrupted update: the primary is right, and -r all rewrites the copy.
    kind = "warning" if extent.was_unclean else "corruption"
    mismatch = np.flatnonzero((gd == 0) != (rgd == 0))
    if mismatch.size:
        result.add(kind, f"grain directory and its redundant copy disagree in "
                   f"{mismatch.size} entries", name, int(mismatch.size))
    n = extent.header.num_gtes_per_gt
    differing = 0
    for i in np.flatnonzero((gd != 0) & (rgd != 0)):
        raw = os.pread(extent.fd, n * 4, int(rgd[i]) * SECTOR_SIZE)
        backup = np.frombuffer(raw.ljust(n * 4, b"\0"), dtype="<u4")
        if not np.array_equal(backup, u32_view(extent._gt(int(i)))):
            differing += 1
    if differing:
        result.add(kind, f"{differing} grain tables differ from their redundant copies",
                   name, differing)


def _repair(path: str, mode: str, allow_external: bool) -> None:
    from .compact import defragment

    with Image.open(path, "r+", allow_external=allow_external, open_parent=False,
                    repair=True) as image:
        for extent in image.extents:
            if not isinstance(extent, SparseExtent) or extent.compressed:
                continue
            if mode == "all":
                _restore_from_redundant(extent)
                _drop_bad_entries(extent)
                _untangle(extent)
                _rebuild_redundant(extent)
            defragment(extent)
        # Closing the image writes its header with the unclean-shutdown flag cleared.


def _valid_entries(extent: SparseExtent, table: np.ndarray) -> np.ndarray:
    """Which entries can be right: unallocated, the zero marker, or a grain inside the
    file past the metadata area."""
    h = extent.header
    file_sectors = -(-extent.file_size // SECTOR_SIZE)
    entries = table.astype(np.int64)
    ok = entries == 0
    if extent.zeroed_gte:
        ok |= entries == 1
    valid: np.ndarray = ok | ((entries >= h.overhead) & (entries + h.grain_size <= file_sectors))
    return valid


def _restore_from_redundant(extent: SparseExtent) -> None:
    """Where a grain table entry is impossible and its redundant copy is not, take the copy."""
    if extent.rgd is None:
        return
    n = extent.header.num_gtes_per_gt
    gd, rgd = u32_view(extent.gd), u32_view(extent.rgd)
    for index in np.flatnonzero((gd != 0) & (rgd != 0) & (gd != rgd)):
        raw = os.pread(extent.fd, n * 4, int(rgd[index]) * SECTOR_SIZE)
        backup = np.frombuffer(raw.ljust(n * 4, b"\0"), dtype="<u4").astype(np.uint32)
        table = u32_view(extent._gt(int(index)))  # fixed in place, through the view
        fix = ~_valid_entries(extent, table) & _valid_entries(extent, backup)
        if fix.any():
            table[fix] = backup[fix]
            extent._gt_dirty.add(int(index))
    extent.flush()


def _drop_bad_entries(extent: SparseExtent) -> None:
    """Unmap entries whose grain lies past the end of the file: there is nothing to read."""
    h = extent.header
    file_sectors = -(-extent.file_size // SECTOR_SIZE)
    first_data = 2 if extent.zeroed_gte else 1
    for index in np.flatnonzero(u32_view(extent.gd)):
        table = u32_view(extent._gt(int(index)))
        bad = np.flatnonzero((table >= first_data)
                             & (table.astype(np.int64) + h.grain_size > file_sectors))
        for slot in bad:
            extent._set_entry(int(index) * h.num_gtes_per_gt + int(slot), 0)
    extent.flush()


def _untangle(extent: SparseExtent) -> int:
    """Give each entry that shares its grain, or points into metadata, a copy of its own.

    Every entry goes on reading exactly the bytes it reads now, but a write through
    one of them can no longer change what another reads or overwrite a table.  The
    copies are written and synced before any entry points at them.  Returns the moves.
    """
    gs = extent.header.grain_size
    numbers, sectors = extent.stored_grains()
    if not sectors.size:
        return 0
    order = np.argsort(sectors, kind="stable")
    starts = sectors[order]
    ends = starts + gs
    clash = np.zeros(starts.shape, dtype=bool)
    clash[1:] = starts[1:] < np.maximum.accumulate(ends)[:-1]  # the first holder keeps it
    for a, b in extent.metadata_areas():  # what check calls "into metadata"
        clash |= (starts < b) & (ends > a)
    movers = order[clash]
    if not movers.size:
        return 0
    if extent._end + movers.size * gs > MAX_FILE_SECTORS:
        raise UnsupportedFormatError("extent file would grow past 2 TiB (u32 sector numbers)",
                                     extent.filename)
    extent.flush()
    buf = memoryview(bytearray(extent.grain_bytes))
    targets = []
    for i in movers.tolist():
        pread_exact(extent.fd, buf, int(sectors[i]) * SECTOR_SIZE, extent.filename)
        pwrite_all(extent.fd, buf, extent._end * SECTOR_SIZE)
        targets.append((int(numbers[i]), extent._end))
        extent._end += gs
    extent.file_size = max(extent.file_size, extent._end * SECTOR_SIZE)
    os.fdatasync(extent.fd)
    for number, sector in targets:
        extent._set_entry(number, sector)
    extent.flush()
    return len(targets)


def _rebuild_redundant(extent: SparseExtent) -> None:
    """Make the redundant directory and tables an exact copy of the primary ones."""
    if extent.rgd is None:
        return
    gd, rgd = u32_view(extent.gd), u32_view(extent.rgd)  # changed in place, through the views
    # A table known only to the redundant directory is better than none.
    only_backup = np.flatnonzero((gd == 0) & (rgd != 0))
    gd[only_backup] = rgd[only_backup]
    gt_sectors = -(-extent.header.num_gtes_per_gt * 4 // SECTOR_SIZE)
    for index in np.flatnonzero((gd != 0) & ((rgd == 0) | (rgd == gd))):
        rgd[index] = extent._end
        extent._end += gt_sectors
    os.ftruncate(extent.fd, max(extent.file_size, extent._end * SECTOR_SIZE))
    extent.file_size = max(extent.file_size, extent._end * SECTOR_SIZE)
    extent._gt_dirty.update(int(i) for i in np.flatnonzero(gd))
    extent._gd_dirty.update(range(len(gd)))
    extent._meta = None  # the tables moved: recompute what writes must not touch
    extent.flush()
