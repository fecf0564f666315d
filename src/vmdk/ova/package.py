"""An OVA opened for reading: its members, its descriptor, manifest and disks.

Members are found by walking the tar headers lazily, so reading the first
disk never looks past it (whatever follows may be cut off).  Disks are named
by their member name, their OVF disk id, or their 1-based place in the
descriptor's disk list; a disk stored gzip-compressed (ovftool ``--compress``,
``ovf:compression="gzip"``) is read through gzip.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Self

from ..errors import CorruptImageError, UnsupportedFormatError, VmdkError
from .tar import BLOCK, Member, Walker, header_checks_out, open_member

if TYPE_CHECKING:  # is_ova is asked of every source: the rest loads when used
    from ..stream_read import StreamReader
    from . import ovf


def is_ova(path: str) -> bool:
    """A tar named .ova or .tar, or a .ova holding anything else (opening it says what is
    wrong: a gzipped or text ``.ova`` must be refused as a package, not read as a raw disk).

    One block is read.  A ``.ova`` starting with a zero block (nothing at all, or only
    the end of an empty archive) is left to the other kinds' detection.
    """
    lower = path.lower()
    if not lower.endswith((".ova", ".tar")):
        return False
    try:
        if not os.path.isfile(path):  # never open a pipe or device: that may block or consume
            return False
        with open(path, "rb") as f:
            block = f.read(BLOCK)
    except OSError:
        return False
    return header_checks_out(block) or (lower.endswith(".ova") and any(block))


def _not_a_tar(block: bytes) -> str:
    """Why a file is no plain tar, and what to do about it."""
    if block[:2] == b"\x1f\x8b":
        return "gzip-compressed, not a plain tar: an OVA is an uncompressed tar (gunzip it first)"
    if block[:3] == b"BZh" or block[:6] == b"\xfd7zXZ\x00" or block[:4] == b"\x28\xb5\x2f\xfd":
        return "compressed, not a plain tar: an OVA is an uncompressed tar (decompress it first)"
    if block[:4] == b"PK\x03\x04":
        return "a zip archive, not a tar: an OVA is an uncompressed tar"
    if not block:
        return "empty: an OVA is a tar archive"
    return "not a tar archive (no valid tar header at its start): an OVA is an uncompressed tar"


@dataclass(frozen=True)
class DiskRef:
    """One disk of a package: where it is stored and what the descriptor says of it."""

    index: int  # 1-based
    member: str
    disk_id: str | None = None
    compression: str | None = None

    def label(self) -> str:
        return f"{self.index}: {self.member}" + (f" (disk id {self.disk_id})" if self.disk_id
                                                  else "")


class Package:
    """An OVA open for reading; use as a context manager."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            block = os.pread(self.fd, BLOCK, 0)
            if not header_checks_out(block):
                raise UnsupportedFormatError(_not_a_tar(block), self.path)
        except BaseException:
            os.close(self.fd)
            raise
        self._walker = Walker(self.fd, self.path)
        self._envelope: ovf.Envelope | None | bool = False  # False: not looked for yet

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- members ---------------------------------------------------------------------------

    def members(self) -> Iterator[Member]:
        """The members in archive order, found lazily."""
        return iter(self._walker)

    def all_members(self) -> list[Member]:
        """Every member; a package cut inside one raises, naming it."""
        return list(self.members())

    @property
    def end_marker(self) -> bool:
        """After a full walk: whether the archive ended with its zero blocks."""
        return self._walker.end_marker

    def member(self, name: str) -> Member | None:
        return next((m for m in self.members() if m.name == name and m.is_file), None)

    def open(self, member: Member) -> IO[bytes]:
        if member.typeflag == b"S":
            raise UnsupportedFormatError(f"{member.name} is stored as a sparse tar member",
                                         self.path)
        return open_member(self.fd, member)

    def read(self, member: Member, limit: int) -> bytes:
        """A small member's bytes, whole (a cut one raises)."""
        if member.size > limit:
            raise CorruptImageError(f"{member.name} is {member.size} bytes long, more than "
                                    f"the {limit} such a member can be", self.path)
        data = os.pread(self.fd, member.size, member.data_offset)
        if len(data) < member.size:
            raise CorruptImageError(f"the package is cut short inside {member.name}", self.path)
        return data

    # -- the descriptor --------------------------------------------------------------------

    def descriptor_member(self) -> Member | None:
        return next((m for m in self.members() if m.is_file
                     and m.name.lower().endswith(".ovf")), None)

    def envelope(self) -> ovf.Envelope | None:
        """The descriptor's model, or None when there is none or it cannot be read
        (reading disks does not need it; ``verify`` says what is wrong with it)."""
        from . import ovf

        if self._envelope is False:
            self._envelope = None
            member = self.descriptor_member()
            if member is not None:
                try:
                    self._envelope = ovf.parse(self.read(member, ovf.MAX_OVF_SIZE),
                                               f"{self.path}:{member.name}")
                except VmdkError:
                    self._envelope = None
        return self._envelope if isinstance(self._envelope, ovf.Envelope) else None

    # -- disks -----------------------------------------------------------------------------

    def disks(self) -> list[DiskRef]:
        """The disks in the descriptor's order; without a readable descriptor, the .vmdk
        members in archive order."""
        return list(self._disks())

    def _disks(self) -> Iterator[DiskRef]:
        """The disks, found lazily where the descriptor does not list them: a package cut
        after its first disk still gives that one."""
        env = self.envelope()
        refs: list[DiskRef] = []
        for d in env.disks if env is not None else ():
            f = env.disk_file(d) if env is not None else None
            if f is not None and f.href:
                refs.append(DiskRef(len(refs) + 1, f.href, d.disk_id, f.compression))
        if refs:
            yield from refs
            return
        vmdks = (m for m in self.members() if m.is_file and m.name.lower().endswith(".vmdk"))
        for n, m in enumerate(vmdks, 1):
            yield DiskRef(n, m.name)

    def find_disk(self, selector: str | None = None) -> tuple[DiskRef, Member]:
        """The disk named by member name, OVF disk id or 1-based index (the first by
        default), and its member; a wrong name lists the disks there are."""
        ref = next((d for d in self._disks() if _matches(d, selector)), None)
        if ref is None:
            listed = "; ".join(d.label() for d in self.disks()) or "none"
            what = f"no disk {selector!r} in the package" if selector else "package holds no disk"
            raise VmdkError(f"{what} (its disks: {listed})", self.path)
        member = self.member(ref.member)
        if member is None:
            raise CorruptImageError(f"the descriptor names the disk file {ref.member}, which "
                                    "the package does not hold", self.path)
        return ref, member

    def open_disk(self, ref: DiskRef, member: Member, raw: IO[bytes] | None = None
                  ) -> IO[bytes]:
        """The disk's VMDK bytes, decompressed when the descriptor says gzip (from ``raw``
        when given: the member's bytes as some other reader passes them on)."""
        raw = raw if raw is not None else self.open(member)
        if ref.compression in (None, "", "identity"):
            return raw
        if ref.compression != "gzip":
            raise UnsupportedFormatError(f"{member.name} is compressed with "
                                         f"{ref.compression!r}, not gzip", self.path)
        return io.BufferedReader(_Gunzip(raw, f"{self.path}:{member.name}"), 1 << 20)


def _matches(disk: DiskRef, selector: str | None) -> bool:
    if selector is None:
        return True
    return selector in (disk.member, os.path.basename(disk.member), disk.disk_id,
                        str(disk.index))


class _Gunzip(io.RawIOBase):
    """A gzip member's decompressed bytes; a cut or damaged stream is a CorruptImageError
    (gzip's own EOFError and zlib.error say neither which file nor why)."""

    def __init__(self, raw: IO[bytes], name: str) -> None:
        self._gz = gzip.GzipFile(fileobj=raw, mode="rb")
        self._name = name

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            return self._gz.readinto(buffer)
        except EOFError as exc:
            raise CorruptImageError("the gzip-compressed disk ends early: the download was cut",
                                    self._name) from exc
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise CorruptImageError(f"the gzip-compressed disk is damaged ({exc})",
                                    self._name) from exc


# ------------------------------------------------------------------- the reading API


@contextlib.contextmanager
def open_ova_disk(path: str, disk: str | None = None, *, recover: bool = False
                  ) -> Iterator[StreamReader]:
    """A sequential reader of one disk of an OVA (the first, or the one ``disk`` names:
    member name, OVF disk id or 1-based index)."""
    from ..stream_read import StreamReader

    with Package(path) as package:
        ref, member = package.find_disk(disk)
        yield StreamReader(package.open_disk(ref, member), f"{path}:{member.name}",
                           recover=recover)


def ova_disks(path: str) -> list[str]:
    """Member names of the disks of an OVA, in the descriptor's order."""
    with Package(path) as package:
        return [d.member for d in package.disks()]


def copy_from_ova(path: str, write_at: Callable[[int, memoryview], None],
                  disk: str | None = None, progress: Callable[[int], None] | None = None) -> int:
    """Write every grain of an OVA's disk through ``write_at``; returns the virtual size.

    A disk member cut short, or damaged, raises ``CorruptImageError`` after the
    grains before the fault were written.
    """
    with open_ova_disk(path, disk) as reader:
        done = 0
        for offset, data in reader.grains():
            write_at(offset, memoryview(data))
            if progress:
                progress(offset + len(data) - done)
                done = offset + len(data)
        return reader.capacity


def ova_disk_size(path: str, disk: str | None = None) -> int:
    """The virtual size of an OVA's disk, from its header (the first, or ``disk``)."""
    with open_ova_disk(path, disk) as reader:
        return reader.capacity


__all__ = ["DiskRef", "Package", "copy_from_ova", "is_ova", "open_ova_disk", "ova_disk_size",
           "ova_disks"]
