"""compare, check, cat and convert cost what the disks hold, not their virtual size.

Nothing here is timed.  The ``reads`` fixture counts the bytes asked of the system
(``os.pread``/``os.preadv``) and of images (``Image.readinto_at``, holes included) and
fails as soon as either count passes a budget: the bytes the files store, plus a little.
Code that walks the disk end to end overruns it at once.  Behaviour is checked against
qemu-img on small disks.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import vmdk
from conftest import qemu_data_ranges, run
from vmdk._structs import SparseHeader
from vmdk.check import check
from vmdk.convert import convert
from vmdk.image import Image

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
BIG = 64 * GiB
#: Reads allowed beyond what the files store: headers and descriptors read more than once.
SLACK = 256 * KiB


@dataclasses.dataclass
class Reads:
    """Bytes read so far: asked of the system, and asked of images."""

    limit: int
    system: int = 0
    image: int = 0
    calls: int = 0

    def count(self, kind: str, n: int) -> None:
        setattr(self, kind, getattr(self, kind) + n)
        if kind == "system":
            self.calls += 1
        if getattr(self, kind) > self.limit:
            raise AssertionError(f"{getattr(self, kind)} bytes read ({kind}), more than the "
                                 f"{self.limit} the files hold")


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Reads]:
    """``reads(*paths)`` starts counting, with a budget of what ``paths`` store plus SLACK."""

    def start(*paths: Path) -> Reads:
        counter = Reads(stored(*paths) + SLACK)
        real_pread, real_preadv, real_readinto = os.pread, os.preadv, Image.readinto_at

        def pread(fd: int, n: int, offset: int) -> bytes:
            counter.count("system", n)
            return real_pread(fd, n, offset)

        def preadv(fd: int, buffers: list[Any], offset: int, *flags: int) -> int:
            counter.count("system", sum(memoryview(b).nbytes for b in buffers))
            return real_preadv(fd, buffers, offset, *flags)

        def readinto_at(self: Image, offset: int, buf: Any) -> None:
            counter.count("image", memoryview(buf).nbytes)
            real_readinto(self, offset, buf)

        monkeypatch.setattr(os, "pread", pread)
        monkeypatch.setattr(os, "preadv", preadv)
        monkeypatch.setattr(Image, "readinto_at", readinto_at)
        return counter

    return start


def stored(*paths: Path) -> int:
    """The bytes the files occupy on the host: what they hold, holes left out."""
    return sum(os.stat(p).st_blocks * 512 for p in paths)


def image(path: Path, size: int, pieces: dict[int, bytes] | None = None) -> Path:
    with vmdk.create(path, size) as disk:
        for offset, data in (pieces or {}).items():
            disk.write_at(offset, data)
    return path


def raw(path: Path, size: int, pieces: dict[int, bytes] | None = None) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in (pieces or {}).items():
            f.seek(offset)
            f.write(data)
    return path


# -- convert ----------------------------------------------------------------------------------


def test_convert_of_an_empty_image_reads_nothing(tmp_path: Path,
                                                 reads: Callable[..., Reads]) -> None:
    disk = image(tmp_path / "a.vmdk", BIG)
    counter = reads(disk)
    convert(disk, tmp_path / "out.raw", out_format="raw", durable=False)
    assert counter.image == 0
    assert os.path.getsize(tmp_path / "out.raw") == BIG and stored(tmp_path / "out.raw") < MiB


# -- check --------------------------------------------------------------------------------------


def table_areas(path: Path) -> list[tuple[int, int]]:
    """Byte ranges of every grain table and redundant copy the directories name."""
    with open(path, "rb") as f:
        h = SparseHeader.unpack(f.read(512))
        count = -(-h.capacity // (h.grain_size * h.num_gtes_per_gt))
        size = h.num_gtes_per_gt * 4
        areas = []
        for directory in (h.gd_offset, h.rgd_offset):
            f.seek(directory * 512)
            sectors = struct.unpack(f"<{count}I", f.read(4 * count))
            areas += [(s * 512, s * 512 + size) for s in sectors if s]
    return areas


def in_hole(path: Path, start: int, end: int) -> bool:
    """Whether the file has no data from ``start`` to ``end``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, start, os.SEEK_DATA) >= end
    except OSError:  # ENXIO: only holes up to the end of the file
        return True
    finally:
        os.close(fd)


def test_check_reads_no_table_lying_in_a_hole(tmp_path: Path, reads: Callable[..., Reads],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    disk = image(tmp_path / "a.vmdk", TiB)
    tables = sorted(table_areas(disk))
    tables = [area for area in tables if in_hole(disk, *area)]
    assert len(tables) > 60000  # all but the few sharing a block with a directory
    starts = [a for a, _ in tables]
    counter = reads(disk)
    counting_pread = os.pread
    touched: list[int] = []

    def pread(fd: int, n: int, offset: int) -> bytes:
        i = bisect.bisect_left(starts, offset + n) - 1  # the last table starting before the end
        if i >= 0 and tables[i][1] > offset:
            touched.append(offset)
        return counting_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)
    result = check(disk)
    assert (result.exit_code, result.allocated_clusters) == (0, 0)
    assert result.total_clusters == TiB // 65536
    assert touched == []
    assert counter.system <= stored(disk) + SLACK


def test_check_reports_progress_from_the_start(tmp_path: Path, reads: Callable[..., Reads]
                                               ) -> None:
    # A grain in every 16th table: those tables and their copies are stored, the rest holes.
    pieces = {t * 32 * MiB + 4096: b"x" * 4096 for t in range(0, BIG // (32 * MiB), 16)}
    disk = image(tmp_path / "a.vmdk", BIG, pieces)
    counter = reads(disk)
    calls_at_tick: list[int] = []
    ticks: list[int] = []

    def progress(n: int) -> None:
        calls_at_tick.append(counter.calls)
        ticks.append(n)

    result = check(disk, progress=progress)
    assert result.exit_code == 0 and result.allocated_clusters == len(pieces)
    assert sum(ticks) == BIG
    assert len(ticks) >= 2
    # The first report comes once the image is open and the first tables are read, not
    # after every table has been read (as it did when the copies were compared first).
    assert calls_at_tick[0] <= 32, (calls_at_tick[0], counter.calls)
    assert counter.system <= stored(disk) + SLACK


def test_check_counts_as_qemu_does(qemu_img: str, tmp_path: Path) -> None:
    pieces = {t * 32 * MiB + g * 65536: b"y" * 512 for t in range(0, 64, 5) for g in (0, 7)}
    disk = image(tmp_path / "a.vmdk", 2 * GiB + 65536 * 3, pieces)
    theirs = run(qemu_img, "check", disk, check=False)
    result = check(disk)
    assert result.exit_code == theirs.returncode == 0
    grains = sum(length for _start, length in qemu_data_ranges(disk)) // 65536
    assert result.allocated_clusters == grains == len(pieces)
    assert result.total_clusters == -(-(2 * GiB + 65536 * 3) // 65536)


def _punch(path: Path, offset: int, length: int) -> None:
    """Make a range of the file a hole (reads as zeros), as a sparse copy of a table would be."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fd = os.open(path, os.O_RDWR)
    try:
        if libc.fallocate(fd, _PUNCH_HOLE | _KEEP_SIZE, offset, length) != 0:
            pytest.skip(f"cannot punch holes here: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


_KEEP_SIZE, _PUNCH_HOLE = 0x01, 0x02  # linux/falloc.h


@pytest.mark.parametrize("copy", [0, 1], ids=["primary", "redundant"])
def test_check_compares_a_table_with_a_copy_lying_in_a_hole(tmp_path: Path, copy: int) -> None:
    disk = image(tmp_path / "a.vmdk", GiB, {5 * 32 * MiB: b"z" * 512})
    with open(disk, "rb") as f:
        h = SparseHeader.unpack(f.read(512))
        f.seek((h.gd_offset, h.rgd_offset)[copy] * 512 + 5 * 4)
        (sector,) = struct.unpack("<I", f.read(4))
    block = sector * 512 // 4096 * 4096  # the file system block holding the whole table
    _punch(disk, block, 4096)  # (its neighbour in the block is an empty table: zeros too)
    result = check(disk)
    assert result.exit_code == 2
    assert any("grain tables differ from their redundant copies" in p.message
               for p in result.problems), result.problems
