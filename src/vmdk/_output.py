"""New outputs appear under their name only when complete.

A :class:`StagedOutput` is written in a hidden folder beside its final name,
``.NAME.vmdk-partial-PID-RANDOM/``, which holds the new files under their
final names (so the extent names a descriptor gives stay right).  Committing
renames the extents into place first and the descriptor (or the one file)
last, so the name only ever shows a finished image; discarding removes the
folder and leaves everything under the final names as it was.

The files of the image being replaced are locked for writing from the start,
so nobody opens it, here or in qemu, while its replacement is made; once the
new image is in place, the old image's extents the new one does not use are
removed.  A SIGKILL can leave the staging folder behind: its name says what
it is.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import stat
from collections.abc import Iterator, Sequence
from types import FrameType, TracebackType
from typing import Any, Self

from .errors import ImageExistsError, ImageIOError, VmdkError

log = logging.getLogger(__name__)

#: What a staging folder's name carries after the output's name: a person seeing one
#: left by a killed process knows what it is and whose it was.
PARTIAL_MARK = ".vmdk-partial-"
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

#: Stages of this process not yet committed or discarded (the CLI's last resort).
_LIVE: set[StagedOutput] = set()


class StagedOutput:
    """An output being made under a temporary name, put in place by :meth:`commit`.

    ``path`` is where to write the main file (the descriptor, or the one
    file); every other file goes beside it, announced first with
    :meth:`claim`.  ``image`` outputs replace a whole VMDK (its extents
    too); others (raw disks, OVA packages) replace one file.  With
    ``in_place_ok``, an existing target that is no regular file (a device, a
    pipe) is written where it is.  Files named in ``keep`` are never removed.
    Used as a context manager, an exception discards the stage.
    """

    def __init__(self, final: str, *, overwrite: bool, image: bool = True,
                 in_place_ok: bool = False, durable: bool = True, keep: Sequence[str] = ()) -> None:
        self.overwrite = overwrite
        self.image = image
        self.durable = durable
        self._keep = {os.path.realpath(k) for k in keep}
        self._locks: dict[tuple[int, int], int] = {}
        self._claimed: list[str] = []
        self._staging: str | None = None
        self._aside: str | None = None
        self._done = False
        self.in_place = False
        self.final = self._resolve(final, in_place_ok)
        self.folder = os.path.dirname(os.path.abspath(self.final))
        self.path = self.final
        try:
            if self.in_place:
                return
            self._lock_image_at(self.final)
            with _signals_deferred():  # a folder made is a folder registered for removal
                # The name part is cut so that long names still fit the 255-byte limit.
                self._staging = _make_folder(self.folder, f".{os.path.basename(self.final)[:200]}"
                                                          f"{PARTIAL_MARK}{os.getpid()}-")
                _LIVE.add(self)
            self.path = os.path.join(self._staging, os.path.basename(self.final))
            self._claimed.append(self.path)
        except BaseException:
            self.discard()
            raise

    # ------------------------------------------------------------------- setup

    def _resolve(self, final: str, in_place_ok: bool) -> str:
        """The name to replace: refuse what may not be replaced; a device or pipe is
        written in place; a raw output through a symlink replaces the file it names."""
        try:
            st = os.lstat(final)
        except FileNotFoundError:
            return final
        if not self.overwrite:
            raise ImageExistsError("file exists", final, opt_in=("overwrite", "replaces it"))
        if stat.S_ISLNK(st.st_mode) and not self.image:
            final = os.path.realpath(final)  # as qemu-img: the file the link names gets the disk
            try:
                st = os.lstat(final)
            except FileNotFoundError:
                return final
        if stat.S_ISREG(st.st_mode):
            return final
        if in_place_ok and not stat.S_ISLNK(st.st_mode) and not stat.S_ISDIR(st.st_mode):
            self.in_place = True
            return final
        raise VmdkError("refusing to overwrite something that is not a plain file", final)

    def _lock_image_at(self, final: str) -> None:
        """Lock the file at ``final`` and, for an image, the extents its descriptor names here."""
        if not os.path.lexists(final):
            return
        for i, name in enumerate(self._files_at(final)):
            self._lock(name, required=i == 0)

    def _files_at(self, final: str) -> list[str]:
        """The file at ``final`` and, for images, the extent files beside it that it names."""
        names = [os.path.abspath(final)]
        if self.image:
            names += [n for n in text_extents(final, self.folder) if n != names[0]]
        return names

    def _lock(self, name: str, *, required: bool) -> None:
        """Take the write lock on ``name`` (held until the end); ImageInUseError if in use.

        Only regular files are locked (opening a pipe would block); a ``required``
        file that is something else is refused, others are left alone.
        """
        from ._lock import lock_image_file

        try:
            fd = os.open(name, _OPEN_FLAGS)  # never through a link, never waiting on a pipe
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            fd = -1
        try:
            st = os.fstat(fd) if fd >= 0 else None
            if st is None or not stat.S_ISREG(st.st_mode):
                if required:
                    raise VmdkError("refusing to overwrite something that is not a plain file",
                                    name)
                return
            key = (st.st_dev, st.st_ino)
            if key in self._locks:
                return
            lock_image_file(fd, name, write=True)
            self._locks[key] = fd
            fd = -1
        finally:
            if fd >= 0:
                os.close(fd)

    def claim(self, paths: Sequence[str]) -> None:
        """Announce files to be written beside ``path`` (paths in the staging folder):
        what their final names hold now is tested and locked before anything is written."""
        for staged in paths:
            if staged in self._claimed:
                continue
            final = os.path.join(self.folder, os.path.basename(staged))
            if os.path.lexists(final):
                if not self.overwrite:
                    raise ImageExistsError("file exists", final,
                                           opt_in=("overwrite", "replaces it"))
                self._lock(final, required=True)
            self._claimed.append(staged)

    # ------------------------------------------------------------------ commit

    def commit(self) -> None:
        """Put the new files in place (the main file last), remove the replaced image's
        extents the new one does not use, sync the folder.  On failure nothing changed."""
        if self._done:
            return
        log.info("%s: complete, put in place", self.final)
        if self.in_place:
            self._finish()
            return
        try:
            if self.durable:
                self._sync_files()
            with _folder_locked(self.folder) as folder_fd:
                self._lock_image_at(self.final)  # what is there now (it may be new)
                used = {os.path.join(self.folder, os.path.basename(p)) for p in self._claimed}
                if self.image:
                    used.update(text_extents(self.path, self.folder, owned=False))
                stale = [n for n in self._files_at(self.final)
                         if n not in used and os.path.realpath(n) not in self._keep]
                with _signals_deferred():
                    self._move_into_place()
                    self._done = True
                    _remove_stale(stale)
                    if self.durable:
                        os.fsync(folder_fd)  # the renames themselves survive a crash
        except BaseException:
            if not self._done:
                self.discard()
            raise
        finally:
            if self._done:
                self._finish()

    def _sync_files(self) -> None:
        """Every new file on disk before its name is: a crash then finds the old image or
        the whole new one (syncing what its writer already synced costs next to nothing)."""
        for staged in self._claimed:
            try:
                fd = os.open(staged, _OPEN_FLAGS)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _move_into_place(self) -> None:
        """Rename the staged files over their final names, extents first.  A failure part
        way puts back what was there (kept meanwhile as hard links in the staging folder)."""
        moved: list[tuple[str, str | None]] = []
        order = [p for p in self._claimed if p != self.path] + [self.path]
        try:
            for staged in order:
                if not os.path.lexists(staged):
                    continue  # announced but not made (a partitionedDevice without a table)
                final = os.path.join(self.folder, os.path.basename(staged))
                backup = self._keep_aside(final)
                os.rename(staged, final)
                moved.append((final, backup))
        except BaseException:
            _put_back(moved)
            raise

    def _keep_aside(self, final: str) -> str | None:
        """A hard link to what ``final`` holds now, to put back if the commit fails."""
        if not os.path.lexists(final) or self._staging is None:
            return None
        if self._aside is None:  # a fresh name: it cannot be one of the staged files
            self._aside = _make_folder(self._staging, "replaced-")
        backup = os.path.join(self._aside, os.path.basename(final))
        try:
            os.link(final, backup, follow_symlinks=False)
        except OSError:  # no hard links here: this rename can no longer be undone
            return None
        return backup

    # ----------------------------------------------------------------- discard

    def discard(self) -> None:
        """Remove everything staged; the final names are left exactly as they were."""
        if self._done:
            return
        self._done = True
        self._finish()

    def _finish(self) -> None:
        """Remove the staging folder (with whatever it still holds) and release the locks.

        An interrupt waits until this is done: once the stage is no longer live, nothing
        else would remove a folder an interrupt left half removed.
        """
        self._done = True
        with _signals_deferred():
            try:
                if self._staging is not None:
                    _remove_tree(self._staging)
            finally:
                _LIVE.discard(self)
                for fd in self._locks.values():
                    with contextlib.suppress(OSError):
                        os.close(fd)
                self._locks.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            staging = self._staging
            self.discard()
            if staging is not None and isinstance(exc, OSError | VmdkError):
                named = _about_final(exc, staging, self.final)
                if named is not None:
                    raise named from exc

    def __repr__(self) -> str:
        return f"<StagedOutput {self.final!r} at {self.path!r}>"


def _about_final(exc: OSError | VmdkError, staging: str, final: str) -> BaseException | None:
    """The error again, naming the output a user asked for instead of a file in the hidden
    staging folder (which is gone by now): None when it names no such file."""
    name = getattr(exc, "filename", None)
    if not isinstance(name, str) or not os.path.abspath(name).startswith(staging + os.sep):
        return None
    inner = os.path.relpath(os.path.abspath(name), staging)
    if not isinstance(exc, VmdkError):
        exc = ImageIOError(exc.strerror or str(exc), name, errno=exc.errno)
    reason = exc.reason if inner == os.path.basename(final) else f"{exc.reason} (writing {inner})"
    return exc.renamed(final, reason)


def discard_all() -> None:
    """Discard every stage of this process still open (after an interrupted command)."""
    for stage in list(_LIVE):
        stage.discard()


@contextlib.contextmanager
def output_errors(name: str) -> Iterator[None]:
    """A full disk or file-size limit met while writing ``name`` becomes an ImageIOError."""
    try:
        yield
    except VmdkError:
        raise
    except OSError as exc:
        if exc.errno not in _FULL:
            raise
        raise ImageIOError(exc.strerror or str(exc), name, errno=exc.errno) from exc


def text_extents(path: str, folder: str, *, owned: bool = True) -> list[str]:
    """The files in ``folder`` that the text descriptor at ``path`` names (nothing for a
    file that is no text descriptor).  With ``owned``, only files that belong to the
    image: a raw-device image's extents are someone's disks, never its own."""
    from .descriptor import Descriptor, canonical_create_type
    from .image import RAW_DEVICE_TYPES, sniff

    try:
        if sniff(path) != "descriptor":
            return []
        with open(path, "rb") as f:
            descriptor = Descriptor.parse(f.read(1 << 20), filename=path)
        if owned and canonical_create_type(descriptor.create_type) in RAW_DEVICE_TYPES:
            return []
        lines = descriptor.extents
    except (OSError, VmdkError, ValueError):
        return []
    out = []
    for line in lines:
        name = line.filename
        if name and os.path.basename(name) == name and name not in (".", ".."):
            out.append(os.path.join(folder, name))
    return out


# ------------------------------------------------------------------- helpers

def _make_folder(parent: str, prefix: str) -> str:
    """A new private folder in ``parent`` named ``prefix`` and a random suffix."""
    for _ in range(100):
        path = os.path.join(parent, f"{prefix}{os.urandom(4).hex()}")
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        except OSError as exc:  # the folder's fault (missing, read-only): name the folder
            raise OSError(exc.errno, exc.strerror, parent) from exc
        return path
    raise FileExistsError(errno.EEXIST, "no free name for a staging folder", parent)


def _remove_tree(path: str) -> None:
    """Remove a staging folder and all it holds (never following links), ignoring what
    is already gone: it holds only what this module and the writers put there."""
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return
    for entry in entries:
        with contextlib.suppress(FileNotFoundError):
            if entry.is_dir(follow_symlinks=False):
                _remove_tree(entry.path)
            else:
                os.unlink(entry.path)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)


def _remove_stale(names: Sequence[str]) -> None:
    """Remove the replaced image's extents the new image does not use: regular files only."""
    for name in names:
        try:
            if stat.S_ISREG(os.lstat(name).st_mode):
                os.unlink(name)
        except FileNotFoundError:
            continue
        except OSError as exc:  # the new image is in place: a leftover is no failure
            log.warning("%s: could not remove this extent of the replaced image: %s",
                        name, exc.strerror or exc)


def _put_back(moved: list[tuple[str, str | None]]) -> None:
    """Undo the renames done so far: the old files return, new ones leave."""
    for final, backup in reversed(moved):
        with contextlib.suppress(OSError):
            if backup is not None:
                os.rename(backup, final)
            else:
                os.unlink(final)


@contextlib.contextmanager
def _folder_locked(folder: str) -> Iterator[int]:
    """The folder, opened and flock()ed: commits of this package into one folder take turns,
    so two commits of split images never interleave their renames."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


_DEFERRED = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done (a commit or a removal is never
    left half way by them); a signal that came meanwhile is acted on at the end.

    Only the main thread can set handlers, and only it ever sees KeyboardInterrupt.
    """
    caught: list[int] = []

    def record(signum: int, frame: FrameType | None) -> None:
        caught.append(signum)

    saved: dict[int, Any] = {}
    try:
        for deferred in _DEFERRED:
            if signal.getsignal(deferred) is not None:  # None: set outside Python: left alone
                saved[deferred] = signal.signal(deferred, record)
    except ValueError:  # not the main thread
        saved.clear()
    try:
        yield
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)
        if caught:
            _redeliver(caught[0], saved[caught[0]])


def _redeliver(sig: int, handler: Any) -> None:
    if callable(handler):
        handler(sig, None)  # the default SIGINT handler raises KeyboardInterrupt
    elif handler == signal.SIG_DFL:
        signal.raise_signal(sig)
