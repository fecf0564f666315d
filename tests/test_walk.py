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
import io
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import vmdk
from conftest import pattern, qemu_data_ranges, run
from vmdk._structs import SparseHeader
from vmdk.check import check
from vmdk.cli import main
from vmdk.compare import first_difference
from vmdk.convert import convert, open_source
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

    real_pread, real_preadv, real_readinto = os.pread, os.preadv, Image.readinto_at

    def start(*paths: Path) -> Reads:
        counter = Reads(stored(*paths) + SLACK)

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


def out_of(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().out.splitlines()


DATA = pattern(MiB, seed=7, zero_every=0)


# -- compare ------------------------------------------------------------------------------------


def test_compare_two_empty_images_reads_nothing(tmp_path: Path, reads: Callable[..., Reads],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    a, b = image(tmp_path / "a.vmdk", BIG), image(tmp_path / "b.vmdk", BIG)
    counter = reads(a, b)
    assert main(["compare", os.fspath(a), os.fspath(b)]) == 0
    assert out_of(capsys) == ["Images are identical."]
    assert counter.image == 0


def test_compare_reads_the_data_present_once(tmp_path: Path, reads: Callable[..., Reads],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    at = 5 * GiB + 3 * 65536
    a = image(tmp_path / "a.vmdk", BIG, {at: DATA})
    b = raw(tmp_path / "b.raw", BIG, {at: DATA})
    counter = reads(a, b)
    assert main(["compare", os.fspath(a), os.fspath(b)]) == 0
    assert out_of(capsys) == ["Images are identical."]
    assert counter.image <= len(DATA) + SLACK


def test_compare_finds_data_stored_in_one_side_only(tmp_path: Path, reads: Callable[..., Reads],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    at = 7 * GiB + 777
    a = image(tmp_path / "a.vmdk", BIG)
    b = raw(tmp_path / "b.raw", BIG, {at: b"\1"})
    reads(a, b)
    assert main(["compare", os.fspath(a), os.fspath(b)]) == 1
    assert out_of(capsys) == [f"Content mismatch at offset {at}!"]
    assert main(["compare", os.fspath(b), os.fspath(a)]) == 1
    assert out_of(capsys) == [f"Content mismatch at offset {at}!"]


def test_compare_stored_zeros_equal_unallocated(tmp_path: Path, reads: Callable[..., Reads],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    a = image(tmp_path / "a.vmdk", BIG)
    b = raw(tmp_path / "b.raw", BIG, {3 * GiB: bytes(MiB)})  # written zeros: stored
    assert stored(b) >= MiB
    counter = reads(a, b)
    assert main(["compare", os.fspath(b), os.fspath(a)]) == 0
    assert out_of(capsys) == ["Images are identical."]
    assert counter.system <= stored(a, b) + SLACK


def test_compare_size_mismatch_walks_the_longer_tail(tmp_path: Path,
                                                     reads: Callable[..., Reads],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    big = image(tmp_path / "big.vmdk", BIG, {100 * MiB: DATA})
    small = raw(tmp_path / "small.raw", 512 * MiB, {100 * MiB: DATA})
    counter = reads(big, small)
    assert main(["compare", os.fspath(small), os.fspath(big)]) == 0
    assert out_of(capsys) == ["Warning: Image size mismatch!", "Images are identical."]
    assert counter.image <= len(DATA) + SLACK
    with vmdk.open(big, "r+") as disk:
        disk.write_at(40 * GiB + 5, b"\1")
    counter = reads(big, small)
    assert main(["compare", os.fspath(big), os.fspath(small)]) == 1
    # As qemu-img: the tail of the longer image is compared as content, after the warning.
    assert out_of(capsys) == ["Warning: Image size mismatch!",
                              f"Content mismatch at offset {40 * GiB + 5}!"]
    assert counter.image <= len(DATA) + 65536 + SLACK


def test_compare_progress_covers_the_longer_disk(tmp_path: Path) -> None:
    a = open_source(os.fspath(image(tmp_path / "a.vmdk", 64 * MiB, {MiB: DATA, 40 * MiB: DATA})))
    b = open_source(os.fspath(raw(tmp_path / "b.raw", 48 * MiB, {MiB: DATA, 40 * MiB: DATA})))
    steps: list[int] = []
    try:
        assert first_difference(a, b, steps.append) is None
    finally:
        a.close()
        b.close()
    assert sum(steps) == 64 * MiB and all(n > 0 for n in steps) and len(steps) >= 5


@dataclasses.dataclass(frozen=True)
class Pair:
    """Two small disks and the options to compare them with."""

    name: str
    first: dict[int, bytes]
    second: dict[int, bytes]
    first_size: int = 4 * MiB
    second_size: int = 4 * MiB
    options: tuple[str, ...] = ()
    second_raw: bool = True


X = pattern(3 * 65536, seed=3, zero_every=0)
PAIRS = [
    Pair("same data", {65536: X}, {65536: X}),
    Pair("a byte differs", {65536: X}, {65536: X[:70000] + b"\0" + X[70001:]}),
    Pair("a byte differs, two images", {65536: X}, {65536: X[:1000] + b"?" + X[1001:]},
         second_raw=False),
    Pair("data in the first only", {2 * MiB + 4096: X}, {}),
    Pair("data in the second only", {}, {3 * MiB + 513: b"\7"}),
    Pair("data in the second only, two images", {}, {3 * MiB + 513: b"\7"}, second_raw=False),
    Pair("stored zeros against unallocated", {}, {MiB: bytes(MiB)}),
    Pair("data against other data elsewhere", {0: X}, {MiB: X}, second_raw=False),
    Pair("longer second, zeros in its tail", {65536: X}, {65536: X, 5 * MiB: bytes(4096)},
         second_size=6 * MiB),
    Pair("longer second, data in its tail", {65536: X}, {65536: X, 5 * MiB + 100: b"\1"},
         second_size=6 * MiB),
    Pair("longer first image, data in its tail", {65536: X, 5 * MiB + 9: b"\1"}, {65536: X},
         first_size=6 * MiB, second_raw=False),
    Pair("sizes and content differ", {65536: X}, {65536: X[::-1]}, second_size=6 * MiB),
    Pair("strict, sizes differ", {65536: X}, {65536: X}, second_size=6 * MiB,
         options=("-s",)),
    Pair("strict, same sizes", {65536: X}, {65536: X}, options=("-s",), second_raw=False),
]


def _normalized(lines: list[str]) -> list[str]:
    """qemu-img names the sector a mismatch is in, we name the byte; and we add the sizes
    to the strict mode's size mismatch."""
    out = []
    for line in lines:
        if line.startswith("Content mismatch at offset "):
            offset = int(line.rsplit(" ", 1)[1].rstrip("!"))
            line = f"Content mismatch at offset {offset // 512 * 512}!"
        out.append(line.split(" (")[0])
    return out


@pytest.mark.parametrize("swap", [False, True], ids=["forward", "swapped"])
@pytest.mark.parametrize("pair", PAIRS, ids=[p.name for p in PAIRS])
def test_compare_agrees_with_qemu(qemu_img: str, tmp_path: Path, pair: Pair, swap: bool,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    first = image(tmp_path / "first.vmdk", pair.first_size, pair.first)
    make = raw if pair.second_raw else image
    second = make(tmp_path / ("second.raw" if pair.second_raw else "second.vmdk"),
                  pair.second_size, pair.second)
    formats = ["-f", "vmdk", "-F", "raw" if pair.second_raw else "vmdk"]
    paths = [first, second]
    if swap:
        formats = [formats[0], formats[3], formats[2], formats[1]]
        paths.reverse()
    theirs = run(qemu_img, "compare", *pair.options, *formats, *paths, check=False)
    ours = main(["compare", *pair.options, *formats, *map(os.fspath, paths)])
    assert ours == theirs.returncode
    assert _normalized(out_of(capsys)) == _normalized(theirs.stdout.splitlines())


def test_compare_of_a_snapshot_reads_its_parent_where_it_has_no_data(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = image(tmp_path / "base.vmdk", 8 * MiB, {0: X, 4 * MiB: X})
    child = tmp_path / "child.vmdk"
    with vmdk.create(child, parent=base) as disk:
        disk.write_at(4 * MiB + 65536, bytes(65536))  # zeros over the parent's data
    expected = bytearray(8 * MiB)
    expected[:len(X)] = X
    expected[4 * MiB:4 * MiB + len(X)] = X
    expected[4 * MiB + 65536:4 * MiB + 2 * 65536] = bytes(65536)
    same = raw(tmp_path / "same.raw", 8 * MiB, {0: bytes(expected)})
    assert main(["compare", os.fspath(child), os.fspath(same)]) == 0
    expected[4 * MiB + 65536] = 1
    other = raw(tmp_path / "other.raw", 8 * MiB, {0: bytes(expected)})
    assert main(["compare", "-q", os.fspath(child), os.fspath(other)]) == 1
    assert main(["compare", os.fspath(other), os.fspath(child)]) == 1
    assert out_of(capsys)[-1] == f"Content mismatch at offset {4 * MiB + 65536}!"


# -- cat and convert ----------------------------------------------------------------------------


def test_cat_writes_holes_without_reading_them(tmp_path: Path, reads: Callable[..., Reads],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    disk = image(tmp_path / "a.vmdk", GiB, {300 * MiB + 4096: DATA})
    sparse = raw(tmp_path / "a.raw", GiB, {300 * MiB + 4096: DATA})
    with open(os.devnull, "wb") as sink:
        stdout = io.TextIOWrapper(sink, write_through=True)
        monkeypatch.setattr(sys, "stdout", stdout)  # (in the test: pytest sets its own before)
        counter = reads(disk)
        assert main(["cat", os.fspath(disk)]) == 0
        assert counter.image <= len(DATA) + SLACK
        counter = reads(sparse)
        assert main(["cat", os.fspath(sparse)]) == 0
        assert counter.system <= len(DATA) + SLACK
        stdout.detach()  # the sink closes first


@pytest.mark.parametrize("kind", ["vmdk", "raw", "snapshot"])
def test_cat_gives_every_byte(tmp_path: Path, kind: str,
                              capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    content = bytearray(6 * MiB + 512)
    content[65536 + 5:65536 + 5 + len(X)] = X
    content[5 * MiB:5 * MiB + 3] = b"end"
    if kind == "raw":
        path = raw(tmp_path / "a.raw", len(content), {0: bytes(content)})
    else:
        path = image(tmp_path / "a.vmdk", len(content), {0: bytes(content)})
        if kind == "snapshot":
            child = tmp_path / "child.vmdk"
            with vmdk.create(child, parent=path) as disk:
                disk.write_at(5 * MiB + 1, b"N")
            content[5 * MiB + 1] = ord("N")
            path = child
    capfdbinary.readouterr()
    assert main(["cat", os.fspath(path)]) == 0
    assert capfdbinary.readouterr().out == bytes(content)


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
