"""COWD (vmfsSparse) extents: create, write, reopen, read back, corrupt headers, qemu-img."""

from __future__ import annotations

import itertools
import os
import shutil
import struct
import subprocess
import tempfile
import tracemalloc
from contextlib import closing
from pathlib import Path

import pytest

from conftest import covered, qemu_data_ranges
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmdk._structs import CowdHeader
from vmdk.errors import (
    CorruptImageError,
    InvalidHeaderError,
    OutOfRangeError,
    ReadOnlyError,
    UnsupportedFormatError,
    VmdkError,
)
from vmdk.extents.base import Alloc, Run
from vmdk.extents.cowd import CowdExtent

QEMU_IMG = shutil.which("qemu-img")
needs_qemu = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img is not installed")

GT_SPAN_SECTORS = 4096  # sectors one grain table covers at grain size 1


def pattern(n: int, seed: int = 0) -> bytes:
    """Deterministic bytes whose period (251) differs from every sector and grain size."""
    cycle = bytes((seed * 13 + i * 7) % 251 for i in range(251))
    return (cycle * (n // 251 + 1))[:n]


def read_all(extent: CowdExtent, fill: bytes | None = None) -> bytes:
    """The extent's bytes with holes filled from ``fill`` (or zeros)."""
    buf = bytearray(extent.size)
    for start, length in extent.read_into(0, memoryview(buf)):
        buf[start : start + length] = fill[start : start + length] if fill else bytes(length)
    return bytes(buf)


def unallocated(offset: int, length: int) -> Run:
    return Run(offset, length, Alloc.UNALLOCATED)


def header_u32(path: Path, offset: int) -> int:
    return struct.unpack_from("<I", path.read_bytes(), offset)[0]


def test_create_gives_an_empty_extent(tmp_path: Path) -> None:
    path = tmp_path / "a-delta.vmdk"
    with closing(CowdExtent.create(str(path), 10000, grain_size=2)) as ext:
        assert ext.size == 10000 * 512
        assert ext.status(0, ext.size) == [unallocated(0, ext.size)]
        buf = bytearray(4096)
        assert ext.read_into(512, memoryview(buf)) == [(0, 4096)]
        assert ext.info() == {
            "filename": str(path),
            "virtual-size": 10000 * 512,
            "format": "COWD",
            "cluster-size": 1024,
        }
    header = CowdHeader.unpack(path.read_bytes())
    assert (header.version, header.flags, header.num_sectors, header.grain_size) == (1, 3, 10000, 2)
    assert header.num_gd_entries == 2 and header.gd_offset == 4
    assert header.free_sector == 5 == path.stat().st_size // 512
    assert header.unclean_shutdown == 0


def test_parent_file_name_is_stored(tmp_path: Path) -> None:
    path = tmp_path / "child-delta.vmdk"
    CowdExtent.create(str(path), 100, parent_file_name="base.vmdk").close()
    assert CowdHeader.unpack(path.read_bytes()).parent_file_name == b"base.vmdk"


@pytest.mark.parametrize("grain_size", [1, 8, 3])
def test_full_and_partial_grains_survive_reopen(tmp_path: Path, grain_size: int) -> None:
    path = str(tmp_path / "x.vmdk")
    capacity = 3 * GT_SPAN_SECTORS * grain_size + 7
    model = bytearray(capacity * 512)
    writes = [
        (0, pattern(grain_size * 512 * 4, 1)),  # whole grains
        (grain_size * 512 * 10 + 100, pattern(700, 2)),  # inside/over partial grains
        (GT_SPAN_SECTORS * grain_size * 512 - 1000, pattern(3000, 3)),  # across a GT boundary
        (capacity * 512 - 300, pattern(300, 4)),  # the disk's last bytes
        (50, pattern(10, 5)),  # over an allocated grain
    ]
    with closing(CowdExtent.create(path, capacity, grain_size=grain_size)) as ext:
        for offset, data in writes:
            ext.write(offset, memoryview(data))
            model[offset : offset + len(data)] = data
        assert read_all(ext) == model
    with closing(CowdExtent.open(path)) as ext:
        assert read_all(ext) == model
        gd_present = [r for r in ext.status(0, ext.size) if r.alloc is Alloc.DATA]
        assert gd_present and all(r.host_offset is not None for r in gd_present)


def test_overwrite_in_place_does_not_grow(tmp_path: Path) -> None:
    path = tmp_path / "x.vmdk"
    with closing(CowdExtent.create(str(path), 8192)) as ext:
        ext.write(0, memoryview(pattern(65536)))
        size = path.stat().st_size
        ext.write(1000, memoryview(b"\xff" * 20000))
        assert path.stat().st_size == size


def test_partial_grain_uses_the_backing_reader(tmp_path: Path) -> None:
    parent = pattern(64 * 512, 9)
    calls: list[tuple[int, int]] = []

    def backing(offset: int, buf: memoryview) -> None:
        calls.append((offset, len(buf)))
        buf[:] = parent[offset : offset + len(buf)]

    with closing(CowdExtent.create(str(tmp_path / "x.vmdk"), 64, grain_size=8)) as ext:
        ext.write(4096 + 100, memoryview(b"N" * 5000), backing)  # grain 1 partly, grain 2 partly
        expected = bytearray(parent)
        expected[4096 + 100 : 4096 + 5100] = b"N" * 5000
        got = read_all(ext, fill=parent)
        assert got == expected
        # Only the uncovered parts of the two partial grains were asked for.
        assert calls == [(4096, 100), (4096 + 5100, 3 * 4096 - (4096 + 5100))]
        runs = ext.status(0, ext.size)
        assert [(r.offset, r.length, r.alloc) for r in runs] == [
            (0, 4096, Alloc.UNALLOCATED),
            (4096, 8192, Alloc.DATA),
            (12288, 64 * 512 - 12288, Alloc.UNALLOCATED),
        ]


def test_metadata_layout_and_order(tmp_path: Path) -> None:
    """GT allocated at freeSector, grain after it, GD entry and freeSector updated."""
    path = tmp_path / "x.vmdk"
    with closing(CowdExtent.create(str(path), 3 * GT_SPAN_SECTORS)) as ext:
        ext.write(GT_SPAN_SECTORS * 512, memoryview(b"A" * 512))  # first grain of table 1
        raw = path.read_bytes()
    gd = struct.unpack_from("<3I", raw, 4 * 512)
    assert gd == (0, 5, 0)  # header 4 sectors, GD 1 sector, GT at 5
    grain = struct.unpack_from("<I", raw, 5 * 512)[0]
    assert grain == 5 + 32
    assert raw[grain * 512 : grain * 512 + 512] == b"A" * 512
    assert CowdHeader.unpack(raw).free_sector == grain + 1 == len(raw) // 512


def test_unclean_flag_is_set_while_open_for_writing(tmp_path: Path) -> None:
    path = tmp_path / "x.vmdk"
    ext = CowdExtent.create(str(path), 100)
    assert header_u32(path, 1648) == 1
    ext.close()
    assert header_u32(path, 1648) == 0
    ext.close()  # closing twice is harmless
    with closing(CowdExtent.open(str(path))) as ro:
        assert header_u32(path, 1648) == 0 and not ro.was_unclean


def test_allocation_after_a_crash_never_reuses_written_space(tmp_path: Path) -> None:
    path = tmp_path / "x.vmdk"
    ext = CowdExtent.create(str(path), 8192)
    free0 = ext.header.free_sector
    ext.write(0, memoryview(b"1" * 512))
    ext.close()
    # A crash after the GT/GD writes but before the freeSector update:
    with open(path, "r+b") as fh:
        fh.seek(28)
        fh.write(struct.pack("<I", free0))
        fh.seek(1648)
        fh.write(struct.pack("<I", 1))
    with closing(CowdExtent.open(str(path), read_only=False)) as ext:
        assert ext.was_unclean
        ext.write(512 * 5000, memoryview(b"2" * 512))
        buf = bytearray(512)
        ext.read_into(0, memoryview(buf))
        assert buf == b"1" * 512


def test_failing_backing_reader_allocates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "x.vmdk"

    def broken(offset: int, buf: memoryview) -> None:
        raise OSError("parent unreadable")

    with closing(CowdExtent.create(str(path), 8192, grain_size=8)) as ext:
        size = path.stat().st_size
        with pytest.raises(OSError, match="parent unreadable"):
            ext.write(100, memoryview(b"x" * 10), broken)
        assert path.stat().st_size == size
        assert ext.status(0, ext.size) == [unallocated(0, ext.size)]


def test_read_only_and_range_checks(tmp_path: Path) -> None:
    path = str(tmp_path / "x.vmdk")
    CowdExtent.create(path, 100).close()
    with closing(CowdExtent.open(path)) as ext:
        with pytest.raises(ReadOnlyError):
            ext.write(0, memoryview(b"x"))
        with pytest.raises(OutOfRangeError):
            ext.read_into(100 * 512 - 1, memoryview(bytearray(2)))
    with closing(CowdExtent.open(path, read_only=False, nominal_sectors=200)) as ext:
        assert ext.size == 200 * 512
        assert ext.status(0, ext.size) == [unallocated(0, 200 * 512)]
        with pytest.raises(OutOfRangeError):  # past the header's capacity
            ext.write(150 * 512, memoryview(b"x"))
    with pytest.raises(ValueError):
        CowdExtent.create(path, 100, grain_size=4096)
    ext = CowdExtent.open(path)
    ext.close()
    with pytest.raises(ValueError):
        ext.read_into(0, memoryview(bytearray(1)))


def test_requests_map_to_few_runs(tmp_path: Path) -> None:
    """A large sequential write becomes one contiguous DATA run per table span."""
    with closing(CowdExtent.create(str(tmp_path / "x.vmdk"), 4 * GT_SPAN_SECTORS)) as ext:
        ext.write(0, memoryview(pattern(2 * GT_SPAN_SECTORS * 512)))
        runs = ext.status(0, ext.size)
        # two tables' grains, each contiguous after its own 32-sector GT
        assert [r.alloc for r in runs] == [Alloc.DATA, Alloc.DATA, Alloc.UNALLOCATED]
        assert runs[0].length == GT_SPAN_SECTORS * 512
        assert runs[1].host_offset == runs[0].host_offset + runs[0].length + 32 * 512


# -- property test against a bytearray model ------------------------------------

_op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 10**9), st.integers(1, 20000), st.integers(0, 255)),
    st.tuples(st.just("read"), st.integers(0, 10**9), st.integers(0, 20000), st.just(0)),
    st.tuples(st.just("reopen"), st.just(0), st.just(0), st.just(0)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grain_size=st.sampled_from([1, 3, 8]), ops=st.lists(_op, max_size=25))
def test_random_writes_match_a_model(grain_size: int, ops: list[tuple[str, int, int, int]]) -> None:
    capacity = (GT_SPAN_SECTORS + 300) * grain_size + 3  # two tables, the last one partial
    size = capacity * 512
    parent = pattern(size, 42)
    model = bytearray(parent)

    def backing(offset: int, buf: memoryview) -> None:
        assert 0 <= offset and offset + len(buf) <= size
        buf[:] = parent[offset : offset + len(buf)]

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "p.vmdk")
        ext = CowdExtent.create(path, capacity, grain_size=grain_size)
        try:
            for kind, offset, length, byte in ops:
                offset %= size
                length = min(length, size - offset)
                if kind == "write":
                    data = bytes([byte]) * length
                    ext.write(offset, memoryview(data), backing)
                    model[offset : offset + length] = data
                elif kind == "read":
                    buf = bytearray(length)
                    for s, n in ext.read_into(offset, memoryview(buf)):
                        buf[s : s + n] = parent[offset + s : offset + s + n]
                    assert buf == model[offset : offset + length]
                else:
                    ext.close()
                    ext = CowdExtent.open(path, read_only=False)
            assert read_all(ext, fill=parent) == model
            runs = ext.status(0, size)
            assert sum(r.length for r in runs) == size
            assert all(a.offset + a.length == b.offset for a, b in itertools.pairwise(runs))
        finally:
            ext.close()


# -- corrupt headers ----------------------------------------------------------------


def _image_with(tmp_path: Path, **fields: int) -> Path:
    path = tmp_path / "bad.vmdk"
    CowdExtent.create(str(path), 3 * GT_SPAN_SECTORS).close()
    raw = bytearray(path.read_bytes())
    offsets = {
        "version": 4,
        "num_sectors": 12,
        "grain_size": 16,
        "gd_offset": 20,
        "num_gd_entries": 24,
    }
    for name, value in fields.items():
        struct.pack_into("<I", raw, offsets[name], value)
    path.write_bytes(raw)
    return path


@pytest.mark.parametrize(
    ("fields", "error", "words"),
    [
        ({"version": 2}, UnsupportedFormatError, "version 2"),
        ({"grain_size": 0}, InvalidHeaderError, "grain size 0"),
        ({"grain_size": 4096}, InvalidHeaderError, "grain size 4096"),
        ({"num_gd_entries": 0xFFFFFFFF}, InvalidHeaderError, "numGDEntries"),
        (
            {"num_sectors": 0xFFFFFFFF, "num_gd_entries": 1 << 20},
            InvalidHeaderError,
            "past the end",
        ),
        ({"gd_offset": 1 << 31}, InvalidHeaderError, "past the end"),
        ({"gd_offset": 2}, InvalidHeaderError, "overlaps the header"),
    ],
)
def test_bad_header_numbers(
    tmp_path: Path, fields: dict[str, int], error: type, words: str
) -> None:
    path = _image_with(tmp_path, **fields)
    tracemalloc.start()
    try:
        with pytest.raises(error, match=words) as info:
            CowdExtent.open(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024
    assert str(path) in str(info.value)


def test_truncated_and_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "t.vmdk"
    path.write_bytes(b"COWD" + bytes(100))
    with pytest.raises(InvalidHeaderError, match="shorter"):
        CowdExtent.open(str(path))
    path.write_bytes(b"KDMV" + bytes(4000))
    with pytest.raises(InvalidHeaderError, match="magic"):
        CowdExtent.open(str(path))


def test_gd_entry_past_eof(tmp_path: Path) -> None:
    path = _image_with(tmp_path)
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, 4 * 512 + 4, 10**6)
    path.write_bytes(raw)
    with pytest.raises(CorruptImageError, match="grain directory entry 1"):
        CowdExtent.open(str(path))


def test_gt_entry_past_eof_is_reported_on_use(tmp_path: Path) -> None:
    path = tmp_path / "x.vmdk"
    with closing(CowdExtent.create(str(path), 3 * GT_SPAN_SECTORS)) as ext:
        ext.write(0, memoryview(b"x" * 512))
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, 5 * 512 + 4 * 7, 99999)  # table 0, entry 7
    path.write_bytes(raw)
    with closing(CowdExtent.open(str(path))) as ext:
        with pytest.raises(CorruptImageError, match="grain table 0 .* entry 7") as info:
            ext.read_into(0, memoryview(bytearray(512)))
        assert isinstance(info.value, VmdkError)


# -- qemu-img cross-checks --------------------------------------------------------


def _descriptor(tmp_path: Path, sectors: int, extent: str) -> Path:
    desc = tmp_path / "x.vmdk"
    desc.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        'createType="vmfsSparse"\n\n# Extent description\n'
        f'RW {sectors} VMFSSPARSE "{extent}"\n'
    )
    return desc


@needs_qemu
@pytest.mark.interop
@pytest.mark.parametrize("grain_size", [1, 8])
def test_qemu_img_reads_what_we_wrote(tmp_path: Path, grain_size: int) -> None:
    capacity = 3 * GT_SPAN_SECTORS * grain_size - 5
    model = bytearray(capacity * 512)
    with closing(
        CowdExtent.create(str(tmp_path / "x-delta.vmdk"), capacity, grain_size=grain_size)
    ) as ext:
        for i, offset in enumerate(
            [
                0,
                123456,
                GT_SPAN_SECTORS * grain_size * 512 - 777,
                2 * GT_SPAN_SECTORS * grain_size * 512 + 5,
                100,
            ]
        ):
            data = pattern(5000 + i * 999, i)
            offset = min(offset, capacity * 512 - len(data))
            ext.write(offset, memoryview(data))
            model[offset : offset + len(data)] = data
        our_data = [(r.offset, r.length) for r in ext.status(0, ext.size) if r.alloc is Alloc.DATA]
    desc = _descriptor(tmp_path, capacity, "x-delta.vmdk")
    out = tmp_path / "out.raw"
    subprocess.run(
        [QEMU_IMG, "convert", "-f", "vmdk", "-O", "raw", str(desc), str(out)],
        check=True,
        capture_output=True,
    )
    assert out.read_bytes() == model
    assert covered(qemu_data_ranges(desc)) == covered(our_data)
