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

from ._access import file_size, pread
from ._structs import SparseFlags
from .compact import defragment, next_grain_sector, unused_sectors
from .errors import (
    ChainError,
    MissingExtentError,
    UnsafePathError,
    UnsupportedFormatError,
    VmdkError,
)
from .extents.base import SECTOR_SIZE, pread_exact, pwrite_all
from .extents.flat import FlatExtent
from .extents.sparse import MAX_FILE_SECTORS, SparseExtent, u32_bytes, u32_view
from .extents.sparse import log as sparse_log
from .image import Image


@dataclasses.dataclass(frozen=True)
class Problem:
    kind: str  # "corruption", "leak", "chain", "warning" or "error" (it could not be opened)
    message: str
    filename: str | None = None
    #: The keyword that would let a refused open through, and what it does (see VmdkError).
    opt_in: tuple[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "filename": self.filename}


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
    #: Breaks in the snapshot chain: a missing parent, a parent that changed (CID
    #: mismatch), a loop.  The image's content is not what it should be, as with a
    #: corruption, and no repair of the image's own structures mends it.
    chain_errors: int = 0
    #: False for a streamOptimized image: written once, front to back, it is never
    #: changed in place; ``convert --recover`` makes a new one from what is readable.
    repairable: bool = True

    def add(self, kind: str, message: str, filename: str | None, count: int = 1) -> None:
        self.problems.append(Problem(kind, message, filename))
        if kind == "corruption":
            self.corruptions += count
        elif kind == "leak":
            self.leaks += count
        elif kind == "chain":
            self.chain_errors += count

    @property
    def exit_code(self) -> int:
        if self.check_errors:
            return 1
        if self.corruptions or self.chain_errors:
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
            "problems": [p.to_json() for p in self.problems],
        }
        if self.corruptions:
            out["corruptions"] = self.corruptions
        if self.chain_errors:
            out["chain-errors"] = self.chain_errors
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

    ``repair`` is None (only look), "leaks" (give leaked space back, down to gaps
    smaller than a grain; refused while there are corruptions or the two copies of
    the tables disagree) or "all": first decide, entry by entry, every directory
    and grain table entry whose primary and redundant copies disagree, on evidence
    (the copy pointing at a valid grain nothing else references wins; each choice
    is listed in the result's problems), then drop entries that point outside the
    file, give entries that share a grain or point into metadata a copy of their
    own, rebuild the redundant metadata from the primary copy, give leaked space
    back, and clear the unclean-shutdown flag.  After a repair the image is
    checked again and the result tells what was fixed.
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
        if not before.repairable:
            before.problems.append(Problem(
                "warning", "not repaired: a streamOptimized image is written once and never "
                "changed in place; 'vmdk convert --recover IMAGE NEW.vmdk' makes a new image "
                "of every grain that reads", path))
            return before
        if repair == "leaks" and before.corruptions:
            # Moving grains around a corrupt table could make things worse: as qemu-img,
            # "-r leaks" leaves corruptions alone, and here the leaks with them.
            before.problems.append(Problem(
                "warning", "not repaired: the image has corruptions; 'check -r all' repairs "
                "what can be repaired", path))
            return before
        if repair == "leaks" and _copies_disagree(before):
            # After a crash the copies may disagree (a warning, not a corruption): a grain
            # only one copy references could be the data, so nothing is moved until
            # "-r all" has decided between them.
            before.problems.append(Problem(
                "warning", "not repaired: the grain tables and their redundant copies "
                "disagree; 'check -r all' decides between them first", path))
            return before
        decided = _repair(path, repair, allow_external)
        after = _inspect(path, allow_external, force_share=False, progress=progress)
        after.problems[:0] = decided  # what the repair chose, where the copies disagreed
        after.corruptions_fixed = max(0, before.corruptions - after.corruptions)
        after.leaks_fixed = max(0, before.leaks - after.leaks)
        after.unclean_cleared = _unclean(before) and not _unclean(after)
        return after
    return _inspect(path, allow_external, force_share, progress)


def _unclean(result: CheckResult) -> bool:
    return any(p.message.startswith(_UNCLEAN) for p in result.problems)


def _copies_disagree(result: CheckResult) -> bool:
    return any(_TABLES_DIFFER in p.message or _TABLE_DIFFERS in p.message
               or _DIRECTORIES_DIFFER in p.message
               for p in result.problems)


_UNCLEAN = "the image was not closed cleanly"
_TABLES_DIFFER = "differ from their redundant copies"  # after "N grain tables"
_TABLE_DIFFERS = "differs from its redundant copy"  # after "1 grain table"
_DIRECTORIES_DIFFER = "grain directory and its redundant copy disagree"


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
        result.problems.append(Problem("error", str(exc), path, exc.opt_in))
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
        has_parent = bool(image.descriptor.parent_file_name_hint)
    finally:
        image.close()
    if has_parent:
        _check_chain(path, allow_external, result)
    return result


def _check_chain(path: str, allow_external: bool, result: CheckResult) -> None:
    """A snapshot's parents must be there, unchanged since it was taken, and not loop
    (read without locks: only their descriptors and headers are looked at)."""
    try:
        Image.open(path, "r", allow_external=allow_external, force_share=True).close()
    except (ChainError, MissingExtentError, UnsafePathError) as exc:
        hint = ("'vmdk rebase -u -b PARENT' names the right parent" if
                isinstance(exc, (ChainError, MissingExtentError)) else
                "--allow-external trusts it")
        result.add("chain", f"the snapshot chain is broken: {exc.reason}; {hint}",
                   exc.filename or path)
    except VmdkError as exc:  # a parent that cannot be read is a break in the chain too
        result.add("chain", f"a parent cannot be opened: {exc.reason}", exc.filename or path)


def _check_flat(extent: FlatExtent, result: CheckResult) -> None:
    assert extent.filename is not None
    have = file_size(extent.src)
    need = extent.base + extent.size
    if have < need and (not isinstance(extent.src, int) or os.path.isfile(extent.filename)):
        result.add("corruption", f"flat extent file holds {have} bytes but the descriptor "
                   f"needs {need}", extent.filename)


def _check_sparse(extent: SparseExtent, result: CheckResult,
                  progress: Callable[[int], None] | None = None) -> None:
    name = extent.filename
    h = extent.header
    if h.unclean_shutdown:
        result.add("warning", f"{_UNCLEAN} (unclean-shutdown flag set)", name)
    file_sectors = -(-extent.file_size // SECTOR_SIZE)
    _compare_directories(extent, result)
    grains, disputed, backup_only = _scan_tables(extent, result, progress)
    result.total_clusters += -(-h.capacity // h.grain_size)
    result.allocated_clusters += int(grains.size)
    if extent.compressed:
        result.repairable = False
        beyond = grains[grains >= file_sectors]
        if beyond.size:
            result.add("corruption", f"{_count(beyond.size, 'grain entry points', 'grain entries point')}"
                       " past the end of the file", name, int(beyond.size))
        damaged, first = extent.verify_compressed()
        if damaged:
            result.add("corruption", f"{_count(damaged, 'compressed grain', 'compressed grains')} "
                       f"cannot be read ({first})", name, damaged)
        result.image_end_offset = max(result.image_end_offset, extent.file_size)
        return
    grain_end = grains + h.grain_size
    past_end = (grain_end > file_sectors) & ~disputed  # a disputed entry is counted once
    beyond = grains[past_end]
    if beyond.size:
        result.add("corruption", f"{_count(beyond.size, 'grain entry points', 'grain entries point')}"
                   f" past the end of the file (first at sector {int(beyond[0])})", name,
                   int(beyond.size))
    # Every used area of the file, as sector intervals: metadata first, then grains.  Each
    # entry is counted once, under its first fault: one table of bad pointers is not also
    # a table of shared grains.
    meta_arr = _metadata(extent)
    in_meta = _in_areas(grains, grain_end, _merged(meta_arr)) & ~past_end & ~disputed
    if in_meta.any():
        n = int(np.count_nonzero(in_meta))
        result.add("corruption", f"{_count(n, 'grain entry points', 'grain entries point')} into "
                   "metadata", name, n)
    inside = ~(past_end | in_meta) & (grain_end <= file_sectors)
    order = np.argsort(grains[inside], kind="stable")
    s, e = grains[inside][order], grain_end[inside][order]
    shared = int(np.count_nonzero(s[1:] < e[:-1])) if s.size > 1 else 0
    if shared:
        result.add("corruption", f"{_count(shared, 'grain is', 'grains are')} referenced by more "
                   "than one entry or overlap", name, shared)
    # Where the image's used space ends, as far as the file holds it (a corrupt pointer
    # past the end names no space in use).
    used_end = max(int(e.max()) if e.size else 0, int(meta_arr[:, 1].max()))
    result.image_end_offset = max(result.image_end_offset,
                                  min(used_end, file_sectors) * SECTOR_SIZE)
    _count_leaks(extent, result, meta_arr, np.concatenate((s, backup_only)),
                 np.concatenate((e, backup_only + h.grain_size)), file_sectors)


def _count_leaks(extent: SparseExtent, result: CheckResult, meta: np.ndarray,
                 grain_starts: np.ndarray, grain_ends: np.ndarray, file_sectors: int) -> None:
    """Space past the overhead that neither the metadata nor any grain either copy of the
    tables references uses, counted in grains.  The padding inside the header's overhead
    is not space any repair could give back, so it is not counted."""
    starts = np.concatenate((meta[:, 0], grain_starts))
    ends = np.concatenate((meta[:, 1], grain_ends))
    leaked = unused_sectors(extent.header.overhead, starts, ends, file_sectors) // (
        extent.header.grain_size)
    if leaked:
        result.add("leak", f"{_count(leaked, 'grain', 'grains')} of file space "
                   f"{'is' if leaked == 1 else 'are'} not referenced by any table",
                   extent.filename, leaked)


def _count(n: int, one: str, many: str) -> str:
    """"1 grain", "2 grains": a number and its noun as English has them."""
    return f"{n} {one if n == 1 else many}"


def _copies_kind(extent: SparseExtent) -> str:
    """After a crash (unclean flag set) a copy one step behind its primary is the expected
    trace of an interrupted update: the primary is right, and -r all rewrites the copy."""
    return "warning" if extent.was_unclean else "corruption"


def _compare_directories(extent: SparseExtent, result: CheckResult) -> None:
    """Report the faults opening found in the directories, and where the redundant
    directory disagrees with the primary one."""
    name = extent.filename
    for fault in extent.directory_faults:
        result.add("corruption", fault, name)
    if extent.rgd is None or not extent.header.has(SparseFlags.REDUNDANT_GT):
        return
    shared = mismatch = 0
    for at in range(0, len(extent.gd), 1 << 20):  # bounded temporaries, however long
        gd = u32_view(extent.gd[at:at + (1 << 20)])
        rgd = u32_view(extent.rgd[at:at + (1 << 20)])
        shared += int(np.count_nonzero((gd != 0) & (gd == rgd)))
        mismatch += int(np.count_nonzero((gd == 0) != (rgd == 0)))
    if shared and not extent.directory_faults:
        result.add("corruption", f"{_count(shared, 'grain table has', 'grain tables have')} no "
                   "separate redundant copy (both directories point at the same table)", name,
                   shared)
    if mismatch:
        result.add(_copies_kind(extent), f"{_DIRECTORIES_DIFFER} in "
                   f"{_count(mismatch, 'entry', 'entries')}", name, mismatch)


def _scan_tables(extent: SparseExtent, result: CheckResult,
                 progress: Callable[[int], None] | None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read every grain table and its redundant copy in one pass, batch by batch (progress
    hears each batch), and report the tables that differ from their copies.  Returns the
    sectors of the stored grains, in grain order; which of them the redundant copy gives
    otherwise (reported already); and the sectors of the grains only the redundant tables
    reference (space in use: ``check -r all`` may choose them)."""
    n = extent.header.num_gtes_per_gt
    first_data = 2 if extent.zeroed_gte else 1
    none = np.zeros(0, dtype=np.int64)
    numbers, grains, only = [none], [none], [none]
    disputed = [np.zeros(0, dtype=bool)]
    tables = entries = 0
    for batch in extent.scan_tables():
        if batch.primary.any():
            rows, slots = np.nonzero(batch.primary >= first_data)
            numbers.append(batch.indexes[rows] * n + slots)
            grains.append(batch.primary[rows, slots].astype(np.int64))
            disputed.append(batch.primary[rows, slots] != batch.backup[rows, slots]
                            if batch.backup is not None else np.zeros(rows.size, dtype=bool))
        if batch.backup is not None and batch.differ.size:
            ours, theirs = batch.primary[batch.differ], batch.backup[batch.differ]
            differ = ours != theirs
            tables += int(batch.differ.size)
            entries += int(np.count_nonzero(differ))
            only.append(theirs[differ & (theirs >= first_data)].astype(np.int64))
        if progress:
            progress(batch.covered)
    if tables:
        # Counted per entry: check -r all decides each one, and counts each as fixed.
        result.add(_copies_kind(extent),
                   f"{_count(tables, 'grain table', 'grain tables')} "
                   f"{_TABLE_DIFFERS if tables == 1 else _TABLES_DIFFER} "
                   f"({_count(entries, 'entry', 'entries')})", extent.filename, entries)
    order = np.argsort(np.concatenate(numbers), kind="stable")
    return (np.concatenate(grains)[order], np.concatenate(disputed)[order],
            np.concatenate(only))


def _read_table(extent: SparseExtent, sector: int) -> np.ndarray:
    """The grain table stored at ``sector``, as read from the file (zeros past its end)."""
    n = extent.header.num_gtes_per_gt
    raw = pread(extent.src, n * 4, sector * SECTOR_SIZE)
    return np.frombuffer(raw.ljust(n * 4, b"\0"), dtype="<u4").astype(np.uint32)


def _repair(path: str, mode: str, allow_external: bool) -> list[Problem]:
    """Repair every sparse extent; returns what was chosen where the copies disagreed."""
    decided: list[Problem] = []
    with Image.open(path, "r+", allow_external=allow_external, open_parent=False,
                    repair=True) as image:
        for extent in image.extents:
            if not isinstance(extent, SparseExtent) or extent.compressed:
                continue
            if mode == "all":
                # Every disagreement is decided before anything moves: until then a grain
                # either copy references may hold the only good copy of some data.
                kind = "warning" if extent.was_unclean else "corruption"
                decided += [Problem(kind, note, extent.filename)
                            for note in _decide_copies(extent)]
                _untangle_tables(extent)
                _drop_bad_entries(extent)
                _untangle(extent)
                _rebuild_redundant(extent)
            defragment(extent)  # -r leaks runs only where both copies agree
        # Closing the image writes its header with the unclean-shutdown flag cleared.
    return decided


# ------------------------------------------------------ choosing between the two copies
#
# Each grain table, and the directory, is stored twice.  Where the copies disagree the
# repair keeps, entry by entry, the one the evidence supports: a grain inside the file,
# past the metadata, on a grain boundary (where the image's grains are), that no other
# entry of either copy references.  All of it is decided before any grain moves.

# Why an entry is, or is not, a grain of its own; and how each reason ranks.
_OWN, _EMPTY, _MARKER, _PAST_END, _INTO_META, _OFF_BOUNDARY, _SHARED = range(7)
_GOOD, _PLAIN, _BAD = 3, 2, 1
_RANKS = (_GOOD, _PLAIN, _PLAIN, _BAD, _BAD, _BAD, _BAD)
#: Decisions listed one by one per table (a whole damaged table gets a summary line).
_NOTES_PER_TABLE = 8


@dataclasses.dataclass
class _Copies:
    """Both copies of the grain tables, as read before the repair changes anything."""

    first_data: int  # the smallest entry that is a sector (1 is the zeroed-grain marker)
    disputed: dict[int, tuple[np.ndarray, np.ndarray]]  # index -> (primary, redundant)
    agreed: list[np.ndarray]  # sectors of the grains of tables whose copies agree

    def add_agreed(self, table: np.ndarray) -> None:
        self.agreed.append(table[table >= self.first_data].astype(np.int64))

    def undisputed(self) -> np.ndarray:
        """Sorted sectors of the grains referenced where the copies agree."""
        parts = list(self.agreed)
        for p, b in self.disputed.values():
            parts.append(p[(p == b) & (p >= self.first_data)].astype(np.int64))
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    def references(self, file_sectors: int, grain: int) -> np.ndarray:
        """Sorted sectors of every grain inside the file either copy references (an entry
        whose copies differ counts twice)."""
        parts = list(self.agreed)
        for p, b in self.disputed.values():
            parts += [p[p >= self.first_data].astype(np.int64),
                      b[(b >= self.first_data) & (b != p)].astype(np.int64)]
        if not parts:
            return np.zeros(0, dtype=np.int64)
        sectors = np.concatenate(parts)
        return np.sort(sectors[sectors + grain <= file_sectors])


def _decide_copies(extent: SparseExtent) -> list[str]:
    """Decide every directory and grain table entry whose two copies disagree, in the
    primary copy (the redundant one is rewritten from it later); returns the choices."""
    if extent.rgd is None:
        return []
    notes = _directory_choices_at_open(extent)
    copies = _read_copies(extent)
    notes += _decide_directories(extent, copies)
    notes += _decide_entries(extent, copies)
    return notes


def _directory_on_disk(extent: SparseExtent, sector: int) -> np.ndarray:
    size = len(extent.gd) * 4
    raw = pread(extent.src, size, sector * SECTOR_SIZE).ljust(size, b"\0")
    return np.frombuffer(raw, dtype="<u4").astype(np.uint32)


def _directory_choices_at_open(extent: SparseExtent) -> list[str]:
    """What opening the image already chose where a directory entry was 0, past the end
    of the file or in metadata, or both directories named one table."""
    assert extent.rgd is not None
    h = extent.header
    gd, rgd = u32_view(extent.gd), u32_view(extent.rgd)
    disk_gd, disk_rgd = _directory_on_disk(extent, h.gd_offset), _directory_on_disk(
        extent, h.rgd_offset)
    changed = (gd != disk_gd) | (rgd != disk_rgd) | ((disk_gd == disk_rgd) & (disk_gd != 0))
    notes = []
    for i in np.flatnonzero(changed).tolist():
        g, r = int(disk_gd[i]), int(disk_rgd[i])
        head = f"grain directory entry {i}: "
        if g == r:
            notes.append(head + f"both copies point at the table at sector {g}; kept it "
                         "as the primary, and a new redundant copy is written")
        elif int(gd[i]) != g:
            notes.append(head + f"kept the redundant copy's table at sector {r} (the primary "
                         f"entry {_table_why(g)}); a new redundant copy is written")
        else:
            notes.append(head + f"kept the primary copy's table at sector {g} (the redundant "
                         f"entry {_table_why(r)}); a new redundant copy is written")
    return _capped(notes, "grain directory")


def _table_why(sector: int) -> str:
    if sector == 0:
        return "was 0"
    return f"pointed at sector {sector}, past the end of the file or into metadata"


def _capped(notes: list[str], what: str) -> list[str]:
    if len(notes) <= _NOTES_PER_TABLE:
        return notes
    more = len(notes) - _NOTES_PER_TABLE
    return notes[:_NOTES_PER_TABLE] + [f"{what}: {more} more entries decided the same way"]


def _read_copies(extent: SparseExtent) -> _Copies:
    """Both copies of every table that has two; a table whose redundant copy is new since
    the open (the open gives one to a table only one directory knew) has one.  The grains
    of agreeing tables are only gathered when some table's copies disagree."""
    assert extent.rgd is not None
    h = extent.header
    on_disk = _directory_on_disk(extent, h.rgd_offset)
    gd, rgd = u32_view(extent.gd), u32_view(extent.rgd)
    copies = _Copies(2 if extent.zeroed_gte else 1, {}, [])
    agreed = []
    for i in np.flatnonzero(gd).tolist():
        r = int(rgd[i])
        if r and r != int(gd[i]) and r == int(on_disk[i]):
            primary, backup = _primary_table(extent, i), _read_table(extent, r)
            if not np.array_equal(primary, backup):
                copies.disputed[i] = (primary, backup)
                continue
        agreed.append(i)
    if copies.disputed:
        for i in agreed:
            copies.add_agreed(_primary_table(extent, i))
    return copies


def _primary_table(extent: SparseExtent, index: int) -> np.ndarray:
    """The primary grain table as the extent has it now (its cache holds the newest)."""
    cached = extent._cached_table(index)
    if cached is not None:
        return u32_view(cached).copy()
    return _read_table(extent, int(extent.gd[index]))


def _decide_directories(extent: SparseExtent, copies: _Copies) -> list[str]:
    """A disputed table whose place in one directory overlaps another table or a grain in
    use is not a table: the other directory's copy is kept, whole."""
    assert extent.rgd is not None
    h = extent.header
    span = -(-h.num_gtes_per_gt * 4 // SECTOR_SIZE)
    gd, rgd = u32_view(extent.gd), u32_view(extent.rgd)  # changed in place, through the views
    tables = np.sort(np.concatenate((gd[gd != 0], rgd[rgd != 0])).astype(np.int64))
    in_use = copies.undisputed()
    notes = []
    for i, (p, b) in sorted(copies.disputed.items()):
        g, r = int(gd[i]), int(rgd[i])
        g_fault = _table_fault(extent, g, r, tables, in_use, p, b, "redundant")
        r_fault = _table_fault(extent, r, g, tables, in_use, b, p, "primary")
        if abs(g - r) < span and not g_fault and not r_fault:
            # Two overlapping tables cannot both be written: the one whose entries look
            # like a grain table (grains past the overhead, on boundaries) is the table.
            if _grain_like(extent, i, b) > _grain_like(extent, i, p):
                g_fault = f"overlapping the redundant table at sector {r}"
            else:
                r_fault = f"overlapping the primary table at sector {g}"
        head = f"grain directory entry {i}: "
        if g_fault and not r_fault:
            gd[i], rgd[i] = r, 0  # the redundant table becomes the primary; a copy follows
            extent._forget_table(i)
            extent._gd_dirty.add(i)
            del copies.disputed[i]
            copies.add_agreed(b)
            notes.append(head + f"kept the redundant copy's table at sector {r} (the primary "
                         f"entry pointed at sector {g}, {g_fault}); a new redundant copy is "
                         "written")
        elif r_fault and not g_fault:
            rgd[i] = 0  # a new redundant copy is written from the primary
            extent._gd_dirty.add(i)
            del copies.disputed[i]
            copies.add_agreed(p)
            notes.append(head + f"kept the primary copy's table at sector {g} (the redundant "
                         f"entry pointed at sector {r}, {r_fault}); a new redundant copy is "
                         "written")
    extent._meta = None
    return notes


def _table_fault(extent: SparseExtent, sector: int, counterpart: int, tables: np.ndarray,
                 in_use: np.ndarray, own: np.ndarray, theirs: np.ndarray,
                 their_name: str) -> str | None:
    """Why the table at ``sector`` cannot be this directory entry's table, if it cannot."""
    h = extent.header
    gs, span = h.grain_size, -(-h.num_gtes_per_gt * 4 // SECTOR_SIZE)
    near = np.count_nonzero((tables > sector - span) & (tables < sector + span))
    if near - 1 - (abs(counterpart - sector) < span) > 0:  # (itself, and its other copy)
        return "the table of another directory entry"
    hit = in_use[(in_use > sector - gs) & (in_use < sector + span)]
    if hit.size:
        return f"a grain in use at sector {int(hit[0])}"
    # The other copy's table has a grain here that looks like one, this copy's own entry
    # for it does not, and the two tables differ elsewhere too: this "table" is that
    # grain's data.  (Differing only there, it is the other copy's entry that is damaged.)
    t = theirs.astype(np.int64)
    over = _grain_like_entries(extent, t) & (t > sector - gs) & (t < sector + span)
    mine = own.astype(np.int64)
    if (np.any(over & ~_grain_like_entries(extent, mine))
            and np.any((own != theirs) & ~over)):
        return f"the grain at sector {int(t[over][0])} the {their_name} table holds"
    return None


def _grain_like_entries(extent: SparseExtent, entries: np.ndarray) -> np.ndarray:
    """Entries that point at a grain inside the file past the overhead, on a grain
    boundary where the overhead is on one."""
    h = extent.header
    gs = h.grain_size
    file_sectors = -(-extent.file_size // SECTOR_SIZE)
    like: np.ndarray = ((entries >= max(h.overhead, 2)) & (entries + gs <= file_sectors)
                        & ((entries % gs == 0) | (h.overhead % gs != 0)))
    return like


def _grain_like(extent: SparseExtent, index: int, table: np.ndarray) -> int:
    """How many entries of table ``index`` look like grains; entries for grains past the
    disk's end (in its last table) do not count, as they must be empty."""
    h = extent.header
    grains = -(-h.capacity // h.grain_size) - index * h.num_gtes_per_gt
    entries = table[:max(0, grains)].astype(np.int64)
    return int(np.count_nonzero(_grain_like_entries(extent, entries)))


def _plausible(extent: SparseExtent, entries: np.ndarray, file_sectors: int) -> np.ndarray:
    """Entries that can be right: unallocated, the zero marker, or a grain inside the
    file past the overhead (what the repair kept before it weighed evidence)."""
    ok = entries == 0
    if extent.zeroed_gte:
        ok |= entries == 1
    h = extent.header
    plausible: np.ndarray = ok | ((entries >= h.overhead) & (entries + h.grain_size <= file_sectors))
    return plausible


def _decide_entries(extent: SparseExtent, copies: _Copies) -> list[str]:
    """Fix each disputed entry of the primary tables on evidence (see _entry_faults)."""
    if not copies.disputed:
        return []
    h = extent.header
    file_sectors = -(-extent.file_size // SECTOR_SIZE)
    refs = copies.references(file_sectors, h.grain_size)
    meta = _merged(extent.metadata_areas())
    undisputed = copies.undisputed()
    aligned = h.overhead % h.grain_size == 0 and not np.any(undisputed % h.grain_size)
    ranks = np.array(_RANKS)
    notes: list[str] = []
    for i, (p, b) in sorted(copies.disputed.items()):
        slots = np.flatnonzero(p != b)
        pv, bv = p[slots].astype(np.int64), b[slots].astype(np.int64)
        p_why = _entry_faults(extent, pv, bv, refs, meta, aligned, file_sectors)
        b_why = _entry_faults(extent, bv, pv, refs, meta, aligned, file_sectors)
        p_rank, b_rank = ranks[p_why], ranks[b_why]
        # Neither a grain of its own: as before evidence was weighed, a plausible redundant
        # entry replaces an impossible primary one.
        fallback = ((p_rank == _BAD) & (b_rank == _BAD) & _plausible(extent, bv, file_sectors)
                    & ~_plausible(extent, pv, file_sectors))
        take = (b_rank > p_rank) | fallback
        table = u32_view(extent._gt(i))  # fixed in place, through the view
        table[slots[take]] = b[slots[take]]
        extent._gt_dirty.add(i)  # both copies are written from the decided primary
        notes += _entry_notes(i, slots, pv, bv, take, p_why, b_why)
    return notes


def _merged(areas: list[tuple[int, int]] | np.ndarray) -> np.ndarray:
    """Sector ranges sorted and joined where they touch, as an (n, 2) array."""
    a = np.asarray(areas, dtype=np.int64).reshape(-1, 2)
    if not a.size:
        return a
    a = a[np.lexsort((a[:, 1], a[:, 0]))]
    reach = np.maximum.accumulate(a[:, 1])  # the end of everything up to each range
    first = np.ones(len(a), dtype=bool)
    first[1:] = a[1:, 0] > reach[:-1]  # a range no earlier one reaches starts a new area
    starts = np.flatnonzero(first)
    ends = reach[np.append(starts[1:] - 1, len(a) - 1)]
    return np.stack((a[starts, 0], ends), axis=1)


def _metadata(extent: SparseExtent) -> np.ndarray:
    """``extent.metadata_areas()`` as an (n, 2) array; the tables' areas (655,360 of them
    in a 10 TiB extent) are made in bulk."""
    fixed = np.array(extent.metadata_areas(tables=False), dtype=np.int64).reshape(-1, 2)
    span = -(-extent.header.num_gtes_per_gt * 4 // SECTOR_SIZE)
    directories = [u32_view(d) for d in (extent.gd, extent.rgd) if d is not None]
    tables = np.concatenate([d[d != 0] for d in directories]).astype(np.int64)
    return np.concatenate((fixed, np.stack((tables, tables + span), axis=1)))


def _entry_faults(extent: SparseExtent, values: np.ndarray, others: np.ndarray,
                  refs: np.ndarray, meta: np.ndarray, aligned: bool,
                  file_sectors: int) -> np.ndarray:
    """For each disputed entry (``others`` is the other copy's value of the same entry), why
    it is or is not a grain of its own: _OWN, or the first fault found."""
    h = extent.header
    gs = h.grain_size
    first_data = 2 if extent.zeroed_gte else 1
    why = np.full(values.shape, _OWN, dtype=np.int64)
    why[values == 0] = _EMPTY
    if extent.zeroed_gte:
        why[values == 1] = _MARKER
    rest = values >= first_data
    for fault, hit in (
            (_PAST_END, lambda v: v + gs > file_sectors),
            (_INTO_META, lambda v: (v < h.overhead) | _in_areas(v, v + gs, meta)),
            (_OFF_BOUNDARY, lambda v: np.full(v.shape, aligned) & (v % gs != 0)),
            (_SHARED, lambda v: _held_by_others(v, others, refs, gs, first_data,
                                                file_sectors))):
        found = rest & hit(values)
        why[found] = fault
        rest &= ~found
    return why


def _in_areas(starts: np.ndarray, ends: np.ndarray, areas: np.ndarray) -> np.ndarray:
    """Which [start, end) ranges overlap one of the sorted, disjoint ``areas``."""
    if not areas.size:
        return np.zeros(starts.shape, dtype=bool)
    i = np.searchsorted(areas[:, 0], ends, "left") - 1
    hit: np.ndarray = (i >= 0) & (areas[np.maximum(i, 0), 1] > starts)
    return hit


def _held_by_others(values: np.ndarray, others: np.ndarray, sectors: np.ndarray,
                    gs: int, first_data: int, file_sectors: int) -> np.ndarray:
    """Grains that overlap one another entry of either copy references (``sectors``)."""
    near = (np.searchsorted(sectors, values + gs, "left")
            - np.searchsorted(sectors, values - gs, "right"))
    # Among them: the grain itself, and the other copy's grain of the same entry if the two
    # overlap (e.g. a grain and the same sector plus one).
    own = 1 + ((others >= first_data) & (others + gs <= file_sectors)
               & (np.abs(others - values) < gs))
    held: np.ndarray = near > own
    return held


def _entry_notes(index: int, slots: np.ndarray, pv: np.ndarray, bv: np.ndarray,
                 take: np.ndarray, p_why: np.ndarray, b_why: np.ndarray) -> list[str]:
    notes = [_entry_note(index, int(slots[k]), int(pv[k]), int(bv[k]), bool(take[k]),
                         int(p_why[k]), int(b_why[k]))
             for k in range(min(len(slots), _NOTES_PER_TABLE))]
    more = len(slots) - _NOTES_PER_TABLE
    if more > 0:
        from_backup = int(np.count_nonzero(take[_NOTES_PER_TABLE:]))
        notes.append(f"grain table {index}: {more} more entries decided: {from_backup} from "
                     f"the redundant copy, {more - from_backup} from the primary")
    return notes


def _entry_note(index: int, slot: int, p: int, b: int, took_backup: bool, p_why: int,
                b_why: int) -> str:
    head = f"grain table {index} entry {slot}: "
    if p_why == _OWN and b_why == _OWN:
        return head + (f"kept the primary copy's grain at sector {p} (the redundant copy's "
                       f"grain at sector {b} is valid too, as after an interrupted move; the "
                       "primary is written first)")
    kept, other = ("redundant", "primary") if took_backup else ("primary", "redundant")
    value, why = (b, b_why) if took_backup else (p, p_why)
    other_value, other_why = (p, p_why) if took_backup else (b, b_why)
    if _RANKS[why] == _BAD:
        return head + (f"neither copy points at a grain of its own (the primary entry "
                       f"{_why(p_why, p)}, the redundant one {_why(b_why, b)}); kept the "
                       f"{kept} copy's entry")
    return head + (f"kept the {kept} copy's {_what(why, value)} (the {other} entry "
                   f"{_why(other_why, other_value)})")


def _what(why: int, value: int) -> str:
    return {_OWN: f"grain at sector {value}", _EMPTY: "empty entry",
            _MARKER: "zeroed-grain marker"}.get(why, f"entry {value}")


def _why(why: int, value: int) -> str:
    return {
        _OWN: f"pointed at the grain at sector {value}",
        _EMPTY: "was 0",
        _MARKER: "was the zeroed-grain marker",
        _PAST_END: f"pointed at sector {value}, past the end of the file",
        _INTO_META: f"pointed at sector {value}, into metadata",
        _OFF_BOUNDARY: f"pointed at sector {value}, off a grain boundary",
        _SHARED: f"pointed at sector {value}, a grain another entry holds",
    }[why]


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
    clash |= _in_areas(starts, ends, _merged(extent.metadata_areas()))  # "into metadata"
    movers = order[clash]
    if not movers.size:
        return 0
    first = next_grain_sector(extent)  # copies on grain boundaries, as every other grain
    if first + movers.size * gs > MAX_FILE_SECTORS:
        raise UnsupportedFormatError("extent file would grow past 2 TiB (u32 sector numbers)",
                                     extent.filename)
    extent.flush()
    extent._end = first
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
    for index in np.flatnonzero(_copies_to_place(extent, gd, rgd, gt_sectors)):
        rgd[index] = extent._end
        extent._end += gt_sectors
    os.ftruncate(extent.fd, max(extent.file_size, extent._end * SECTOR_SIZE))
    extent.file_size = max(extent.file_size, extent._end * SECTOR_SIZE)
    extent._gt_dirty.update(int(i) for i in np.flatnonzero(gd))
    extent._gd_dirty.update(range(len(gd)))
    extent._meta = None  # the tables moved: recompute what writes must not touch
    extent.flush()


def _copies_to_place(extent: SparseExtent, gd: np.ndarray, rgd: np.ndarray,
                     span: int) -> np.ndarray:
    """Which tables need a new place for their redundant copy: those without one, or with
    one where writing it would overwrite a primary table, another copy or a grain."""
    r = rgd.astype(np.int64)
    has = (gd != 0) & (rgd != 0)
    redo: np.ndarray = (gd != 0) & (rgd == 0)
    primaries = np.sort(gd[gd != 0].astype(np.int64))
    redo |= has & _any_near(primaries, r - span, r + span)  # (one shared with its primary too)
    _numbers, grains = extent.stored_grains()
    redo |= has & _any_near(np.sort(grains), r - extent.header.grain_size, r + span)
    keep = np.flatnonzero(has & ~redo)
    order = keep[np.argsort(r[keep], kind="stable")]
    starts = r[order]
    clash = np.zeros(starts.shape, dtype=bool)
    clash[1:] = starts[1:] < np.maximum.accumulate(starts + span)[:-1]  # the first keeps it
    redo[order[clash]] = True
    return redo


def _any_near(sorted_starts: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Whether any of ``sorted_starts`` lies strictly between ``lo`` and ``hi``, each."""
    near: np.ndarray = (np.searchsorted(sorted_starts, hi, "left")
                        - np.searchsorted(sorted_starts, lo, "right")) > 0
    return near


def _untangle_tables(extent: SparseExtent) -> None:
    """Give each primary grain table that overlaps another one (as when both copies of a
    directory entry were damaged) a copy of its own: each goes on reading what it reads
    now, and writing one can no longer change the other."""
    span = -(-extent.header.num_gtes_per_gt * 4 // SECTOR_SIZE)
    gd = u32_view(extent.gd)  # changed in place, through the view
    used = np.flatnonzero(gd)
    order = used[np.argsort(gd[used], kind="stable")]
    starts = gd[order].astype(np.int64)
    clash = np.zeros(starts.shape, dtype=bool)
    clash[1:] = starts[1:] < np.maximum.accumulate(starts + span)[:-1]  # the first keeps it
    movers = order[clash].tolist()
    if not movers:
        return
    # Each table as read now (the cached, decided one, or the file's bytes): written first.
    tables = {i: u32_bytes(extent._gt(i)) for i in movers}
    first = extent._end
    for k, i in enumerate(movers):
        pwrite_all(extent.fd, tables[i], (first + k * span) * SECTOR_SIZE)
    extent._end = first + len(movers) * span
    os.ftruncate(extent.fd, max(extent.file_size, extent._end * SECTOR_SIZE))
    extent.file_size = max(extent.file_size, extent._end * SECTOR_SIZE)
    os.fdatasync(extent.fd)
    for k, i in enumerate(movers):
        gd[i] = first + k * span
        extent._gd_dirty.add(i)
    extent._meta = None
