"""Snapshot chain operations: take a snapshot, commit a child into its parent, rebase.

A child names its parent by ``parentFileNameHint`` and records the parent's
CID as ``parentCID``; any change to the parent's content changes its CID and
so must be followed by updating the children that still depend on it.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
else:
    from ._numpy import np

from .create import create
from .errors import ChainError, UnsupportedFormatError
from .extents.base import SECTOR_SIZE
from .image import NO_PARENT_CID, PENDING_PARENT_CID_KEY, Image, MapRun, new_cid

log = logging.getLogger(__name__)

CHUNK = 8 << 20
Progress = Callable[[int], None]


def snapshot(parent: str | os.PathLike[str], child: str | os.PathLike[str], *,
             subformat: str = "monolithicSparse", overwrite: bool = False,
             allow_external: bool = False, force_share: bool = False) -> None:
    """Create ``child`` as an empty snapshot on top of ``parent`` (``qemu-img create -b``).

    ``allow_external`` trusts a parent outside the child's folder; ``force_share``
    reads a parent that another process has open for writing (as ``open`` does).
    """
    with create(child, None, subformat, parent=parent, overwrite=overwrite,
                allow_external=allow_external, force_share=force_share):
        pass


def commit(child: str | os.PathLike[str], *, progress: Progress | None = None,
           allow_external: bool = False) -> None:
    """Write everything stored in ``child`` into its parent; the child stays valid on top.

    Killed at any moment, the child still reads as it did (everything copied
    stays stored in it too), and running commit again finishes the job: the
    parent's new CID is named in the child (``ddb.pendingParentCID``) before
    the parent changes, and becomes the child's parentCID once all is copied.
    ``allow_external`` trusts a parent (or extents) outside the child's folder.
    Both images are written, so both are locked: there is nothing to share.
    """
    child = os.fspath(child)
    # The child is read without taking locks: the parent's write lock below would
    # otherwise collide with the read lock the child's chain holds on it.  Announcing
    # the commit locks the child for writing, so a child in use is refused right there.
    with Image.open(child, "r", force_share=True, allow_external=allow_external) as top:
        if top.parent is None:
            raise ChainError("image has no parent to commit into", child)
        parent_path = top.parent.path
        target = _announce_commit(child, top, allow_external)
        log.info("committing %s into %s", child, parent_path)
        runs = [r for r in top.map() if r.depth == 0 and r.present]
        if top.size > top.parent.size:
            from .resize import resize_with_cid

            # as qemu-img commit does for formats that can grow: the parent takes the size
            # first, or the tail would be refused halfway through the copy
            resize_with_cid(parent_path, top.size, shrink=False, cid=target)
        with Image.open(parent_path, "r+", allow_external=allow_external) as base:
            base._first_write(target)  # even with nothing to copy: the child expects it
            _copy_runs(top, base, runs, progress)
            base.flush()
    _set_parent(child, target, None, allow_external)


def _announce_commit(child: str, top: Image, allow_external: bool) -> int:
    """Name the parent's coming CID in the child, durably; return it.

    A second run after an interruption finds the parent at the CID the first
    one named; that CID stays accepted until the parent has the new one.
    """
    assert top.parent is not None
    target = new_cid()
    cids = [target]
    if top.parent.cid != top.parent_cid:  # an interrupted commit (the open accepted it)
        cids.append(top.parent.cid)
    with Image.open(child, "r+", open_parent=False, allow_external=allow_external) as image:
        image.set_metadata(PENDING_PARENT_CID_KEY, " ".join(f"{c:08x}" for c in cids))
    return target


def _copy_runs(src: Image, dst: Image, runs: list[MapRun], progress: Progress | None) -> None:
    buf = bytearray(CHUNK)
    for run in runs:
        if not run.data or run.zero:
            dst.write_zeroes_at(run.start, run.length)
            if progress:
                progress(run.length)
            continue
        pos, end = run.start, run.start + run.length
        while pos < end:
            n = min(CHUNK, end - pos)
            view = memoryview(buf)[:n]
            src.readinto_at(pos, view)
            dst.write_at(pos, view)
            pos += n
            if progress:
                progress(n)


def rebase(child: str | os.PathLike[str], new_parent: str | os.PathLike[str] | None, *,
           safe: bool = True, progress: Progress | None = None) -> None:
    """Make ``new_parent`` (or no parent) the parent of ``child``.

    In safe mode the content seen through the child stays the same: every
    range the child does not store and where the old and new parent differ is
    copied into the child first.  ``safe=False`` only rewrites the descriptor
    (use it when the new parent has the same content, e.g. after a move).
    """
    child = os.fspath(child)
    new_path = os.fspath(new_parent) if new_parent else None
    if new_path is not None:
        _refuse_loop(child, new_path)
        hint = os.path.relpath(os.path.abspath(new_path), os.path.dirname(os.path.abspath(child)))
        _check_hint_fits(child, hint)  # before any copying, not after it
    if safe:
        with Image.open(child, "r+") as top:
            # What the child shows stays the same, so its CID does too: its own snapshots
            # stay valid, also when the rebase is killed halfway.
            top._first_write(top.cid)
            new = Image.open(new_path, "r") if new_path else None
            try:
                _copy_differences(top, new, progress)
                top.flush()
            finally:
                if new is not None:
                    new.close()
    if new_path is None:
        _set_parent(child, NO_PARENT_CID, "")
        return
    with Image.open(new_path, "r") as new:
        cid = new.cid
    hint = os.path.relpath(os.path.abspath(new_path), os.path.dirname(os.path.abspath(child)))
    _set_parent(child, cid, hint)


def _refuse_loop(child: str, new_parent: str) -> None:
    """A parent may not be the child itself or one of the child's own snapshots."""
    me = os.path.realpath(child)
    with Image.open(new_parent, "r", force_share=True, ignore_cid=True) as image:
        chain = [os.path.realpath(img.path) for img in image.chain()]
    if me in chain:
        raise ChainError(f"{new_parent!r} is this image or one of its snapshots: the chain "
                         "would loop", child)


def _copy_differences(top: Image, new: Image | None, progress: Progress | None) -> None:
    old = top.parent
    grain = top.cluster_size or 65536
    buf_old, buf_new = bytearray(CHUNK), bytearray(CHUNK)
    for run in top.map():
        if run.depth == 0 and run.present:
            continue  # the child stores this range itself
        pos, end = run.start, run.start + run.length
        while pos < end:
            n = min(CHUNK, end - pos)
            v_old, v_new = memoryview(buf_old)[:n], memoryview(buf_new)[:n]
            if old is not None:
                top.readinto_at(pos, v_old)  # what the child shows now, through the old chain
            else:
                v_old[:] = bytes(n)
            _read_or_zero(new, pos, v_new)
            for start, length in _differing(v_old, v_new, grain, pos):
                top.write_at(pos + start, v_old[start:start + length])
            pos += n
            if progress:
                progress(n)


def _read_or_zero(image: Image | None, pos: int, view: memoryview) -> None:
    n = 0 if image is None else max(0, min(len(view), image.size - pos))
    if n:
        assert image is not None
        image.readinto_at(pos, view[:n])
    if n < len(view):
        view[n:] = bytes(len(view) - n)


def _differing(a: memoryview, b: memoryview, grain: int, base: int) -> list[tuple[int, int]]:
    """Grain-aligned (start, length) pieces where ``a`` and ``b`` differ."""
    if a == b:
        return []
    x = np.frombuffer(a, dtype=np.uint8)
    y = np.frombuffer(b, dtype=np.uint8)
    head = (-base) % grain
    out: list[tuple[int, int]] = []
    edges = [0] + list(range(head or grain, len(a), grain)) + [len(a)]
    for lo, hi in itertools.pairwise(edges):
        if hi > lo and not np.array_equal(x[lo:hi], y[lo:hi]):
            if out and out[-1][0] + out[-1][1] == lo:
                out[-1] = (out[-1][0], out[-1][1] + hi - lo)
            else:
                out.append((lo, hi - lo))
    return out


def _check_hint_fits(child: str, hint: str) -> None:
    with Image.open(child, "r", open_parent=False, force_share=True) as image:
        if image.embedded is None:
            return
        trial = image.descriptor.copy()
        trial.parent_file_name_hint = hint
        trial.to_bytes_padded(image.embedded.header.descriptor_size * SECTOR_SIZE)


def _set_parent(child: str, parent_cid: int, hint: str | None,
                allow_external: bool = False) -> None:
    """Rewrite the child's parent fields (no content changes, so its own CID stays).

    The mark of an unfinished commit goes in the same write: the parent is settled.
    """
    with Image.open(child, "r+", open_parent=False, allow_external=allow_external) as image:
        if image.embedded is not None and image.embedded.compressed:
            raise UnsupportedFormatError("a streamOptimized image cannot have a parent", child)
        image.descriptor.parent_cid = parent_cid
        image.descriptor.ddb_remove(PENDING_PARENT_CID_KEY)
        if hint is not None:
            image.descriptor.parent_file_name_hint = hint or None
