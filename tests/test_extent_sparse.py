"""Tests for vmdk.extents.sparse.SparseExtent, used directly (no descriptor, no Image)."""

from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import pattern
from vmdk._structs import SECTOR_SIZE, ZEROED_GTE, SparseFlags, SparseHeader
from vmdk.errors import OutOfRangeError, ReadOnlyError, VmdkError
from vmdk.extents.sparse import SparseExtent

# A small geometry so several grain tables exist: 4 KiB grains, 8 entries per GT
# (32 KiB per GT), 256 KiB of capacity -> 8 GTs.
GRAIN = 8  # sectors
GTES = 8
CAPACITY = 512  # sectors
G = GRAIN * SECTOR_SIZE
GT_SPAN = GRAIN * GTES * SECTOR_SIZE
SIZE = CAPACITY * SECTOR_SIZE


def make(path: Path, **kw: object) -> SparseExtent:
    args: dict[str, object] = {"grain_size": GRAIN, "num_gtes_per_gt": GTES}
    args.update(kw)
    capacity = int(args.pop("capacity", CAPACITY))  # type: ignore[call-overload]
    return SparseExtent.create(os.fspath(path), capacity, **args)  # type: ignore[arg-type]


def read(ext: SparseExtent, offset: int, length: int) -> tuple[bytes, list[tuple[int, int]]]:
    buf = bytearray(b"\xee" * length)
    holes = ext.read_into(offset, memoryview(buf))
    for start, n in holes:  # what the image does without a parent
        buf[start:start + n] = bytes(n)
    return bytes(buf), holes


def header_of(path: Path) -> SparseHeader:
    return SparseHeader.unpack(path.read_bytes()[:512])


def gd_entries(path: Path, sector: int, count: int) -> list[int]:
    raw = path.read_bytes()[sector * SECTOR_SIZE:sector * SECTOR_SIZE + 4 * count]
    return list(struct.unpack(f"<{count}I", raw))


def gt_raw(path: Path, sector: int) -> bytes:
    return path.read_bytes()[sector * SECTOR_SIZE:sector * SECTOR_SIZE + 4 * GTES]


def gte(path: Path, grain: int, redundant: bool = False) -> int:
    h = header_of(path)
    index, slot = divmod(grain, h.num_gtes_per_gt)
    gd = gd_entries(path, h.rgd_offset if redundant else h.gd_offset, index + 1)
    raw = path.read_bytes()
    return struct.unpack_from("<I", raw, gd[index] * SECTOR_SIZE + 4 * slot)[0]


@pytest.fixture
def ext(tmp_path: Path):
    e = make(tmp_path / "e.vmdk")
    yield e
    e.close()


# -- header and layout -------------------------------------------------------------------------


def test_header_round_trip(tmp_path: Path) -> None:
    make(tmp_path / "e.vmdk", descriptor=b"# Disk DescriptorFile\nversion=1\n").close()
    raw = (tmp_path / "e.vmdk").read_bytes()[:512]
    h = SparseHeader.unpack(raw)
    assert h.pack() == raw
    assert (h.capacity, h.grain_size, h.num_gtes_per_gt) == (CAPACITY, GRAIN, GTES)
    assert h.newline_check == b"\n \r\n"
    assert h.has(SparseFlags.VALID_NEWLINE) and h.has(SparseFlags.REDUNDANT_GT)
    assert h.version == 1 and h.unclean_shutdown == 0
    reopened = SparseExtent.open(os.fspath(tmp_path / "e.vmdk"))
    try:
        assert reopened.header == h
        assert reopened.read_descriptor() == b"# Disk DescriptorFile\nversion=1\n"
    finally:
        reopened.close()


def test_layout_rgd_before_gd_and_overhead_grain_aligned(tmp_path: Path) -> None:
    make(tmp_path / "e.vmdk", descriptor=b"version=1\n").close()
    h = header_of(tmp_path / "e.vmdk")
    n_gts = CAPACITY // (GRAIN * GTES)
    assert h.descriptor_offset == 1 and h.descriptor_size == 20
    assert h.descriptor_offset + h.descriptor_size <= h.rgd_offset < h.gd_offset
    assert h.overhead % GRAIN == 0 and h.overhead * SECTOR_SIZE == os.path.getsize(
        tmp_path / "e.vmdk")
    rgd = gd_entries(tmp_path / "e.vmdk", h.rgd_offset, n_gts)
    gd = gd_entries(tmp_path / "e.vmdk", h.gd_offset, n_gts)
    # Every GT is preallocated; redundant ones come before the GD, primary ones after it.
    assert all(h.rgd_offset < s < h.gd_offset for s in rgd)
    assert all(h.gd_offset < s < h.overhead for s in gd)
    assert len(set(rgd) | set(gd)) == 2 * n_gts


def test_zeroed_grain_header(tmp_path: Path) -> None:
    make(tmp_path / "e.vmdk", zeroed_grain=True).close()
    h = header_of(tmp_path / "e.vmdk")
    assert h.version == 2 and h.has(SparseFlags.ZEROED_GTE)


# -- reads and writes --------------------------------------------------------------------------


def test_fresh_extent_is_all_holes(ext: SparseExtent) -> None:
    data, holes = read(ext, 0, SIZE)
    assert data == bytes(SIZE)
    assert holes == [(0, SIZE)]


def test_full_and_partial_grain_writes(ext: SparseExtent, tmp_path: Path) -> None:
    model = bytearray(SIZE)
    full = pattern(2 * G, seed=1, zero_every=0)
    ext.write(3 * G, memoryview(full))
    model[3 * G:5 * G] = full
    part = b"\xab" * 100
    ext.write(7 * G + 17, memoryview(part))
    model[7 * G + 17:7 * G + 117] = part
    data, holes = read(ext, 0, SIZE)
    assert data == bytes(model)
    assert (3 * G, 2 * G) not in holes
    # The partial grain is allocated whole; the rest of it reads zeros.
    assert read(ext, 7 * G, G)[1] == []
    ext.close()
    again = SparseExtent.open(os.fspath(tmp_path / "e.vmdk"))
    try:
        assert read(again, 0, SIZE)[0] == bytes(model)
    finally:
        again.close()


def test_write_across_gt_boundaries(ext: SparseExtent, tmp_path: Path) -> None:
    model = bytearray(SIZE)
    # From the middle of GT 1 to the middle of GT 4, unaligned at both ends.
    start, n = GT_SPAN + 3 * G + 5, 3 * GT_SPAN + 77
    blob = pattern(n, seed=2, zero_every=0, block=G)
    ext.write(start, memoryview(blob))
    model[start:start + n] = blob
    assert read(ext, 0, SIZE)[0] == bytes(model)
    # Overwrite across a boundary where some grains are allocated and some not.
    blob2 = b"\x11" * (2 * GT_SPAN)
    ext.write(GT_SPAN // 2, memoryview(blob2))
    model[GT_SPAN // 2:GT_SPAN // 2 + len(blob2)] = blob2
    assert read(ext, 0, SIZE)[0] == bytes(model)
    ext.close()
    again = SparseExtent.open(os.fspath(tmp_path / "e.vmdk"))
    try:
        assert read(again, 0, SIZE)[0] == bytes(model)
        assert read(again, SIZE - GT_SPAN, GT_SPAN)[1] == [(0, GT_SPAN)]
    finally:
        again.close()


def test_zero_grains_are_not_stored_without_backing(ext: SparseExtent, tmp_path: Path) -> None:
    before = os.path.getsize(tmp_path / "e.vmdk")
    ext.write(0, memoryview(bytes(4 * G)))
    ext.flush()
    assert os.path.getsize(tmp_path / "e.vmdk") == before
    assert read(ext, 0, 4 * G)[1] == [(0, 4 * G)]
    # Zero and data grains mixed in one write: only the data grain is stored.
    blob = bytes(G) + b"\x01" * G + bytes(G)
    ext.write(8 * G, memoryview(blob))
    ext.flush()
    assert os.path.getsize(tmp_path / "e.vmdk") == before + G
    data, holes = read(ext, 8 * G, 3 * G)
    assert data == blob
    assert holes == [(0, G), (2 * G, G)]


def test_zeroed_grain_with_backing_marks_zero_grains(tmp_path: Path) -> None:
    e = make(tmp_path / "e.vmdk", zeroed_grain=True)
    calls: list[tuple[int, int]] = []

    def backing(offset: int, view: memoryview) -> None:
        calls.append((offset, len(view)))
        view[:] = b"\x77" * len(view)

    try:
        e.write(2 * G, memoryview(bytes(2 * G)), backing)
        # A partial write fills the grain from the backing reader.
        e.write(5 * G + 10, memoryview(b"\x01\x02"), backing)
        e.flush()
        data, holes = read(e, 0, 8 * G)
        assert data[2 * G:4 * G] == bytes(2 * G)
        assert (2 * G, 2 * G) not in holes and all(s >= 4 * G or s + n <= 2 * G for s, n in holes)
        expect = bytearray(b"\x77" * G)
        expect[10:12] = b"\x01\x02"
        assert data[5 * G:6 * G] == expect
        assert calls
    finally:
        e.close()
    assert gte(tmp_path / "e.vmdk", 2) == ZEROED_GTE
    assert gte(tmp_path / "e.vmdk", 3) == ZEROED_GTE
    assert gte(tmp_path / "e.vmdk", 2, redundant=True) == ZEROED_GTE
    assert gte(tmp_path / "e.vmdk", 5) > ZEROED_GTE


def test_write_zeroes(tmp_path: Path) -> None:
    e = make(tmp_path / "e.vmdk")
    model = bytearray(pattern(SIZE // 2, seed=3, zero_every=0, block=G)) + bytes(SIZE // 2)
    try:
        e.write(0, memoryview(model[:SIZE // 2]))
        e.write_zeroes(G + 100, 5 * G)  # partial head, whole grains, partial tail
        model[G + 100:6 * G + 100] = bytes(5 * G)
        e.write_zeroes(SIZE // 2 - G, 3 * G)  # stored, then unallocated grains
        model[SIZE // 2 - G:SIZE // 2 + 2 * G] = bytes(3 * G)
        data, holes = read(e, 0, SIZE)
        assert data == bytes(model)
        # Unallocated grains stay unallocated (nothing is stored to make zeros)...
        assert holes == [(SIZE // 2, SIZE // 2)]
    finally:
        e.close()
    # ...and stored grains keep their space (zeroed in place, not leaked).
    assert gte(tmp_path / "e.vmdk", 2) > ZEROED_GTE


def test_write_zeroes_over_backing_marks_zeroed_grains(tmp_path: Path) -> None:
    z = make(tmp_path / "z.vmdk", zeroed_grain=True)

    def backing(offset: int, view: memoryview) -> None:
        view[:] = b"\x66" * len(view)

    try:
        z.write(0, memoryview(b"\x55" * G))
        z.write_zeroes(0, 4 * G, backing)
        z.flush()
        assert read(z, 0, 4 * G) == (bytes(4 * G), [])
    finally:
        z.close()
    path = tmp_path / "z.vmdk"
    assert gte(path, 0) > ZEROED_GTE  # stored: zeroed in place
    assert [gte(path, i) for i in (1, 2, 3)] == [ZEROED_GTE] * 3
    assert [gte(path, i, redundant=True) for i in (1, 2, 3)] == [ZEROED_GTE] * 3


def test_redundant_gt_equals_primary_after_flush(ext: SparseExtent, tmp_path: Path) -> None:
    path = tmp_path / "e.vmdk"
    for off in (0, G * 9, GT_SPAN * 3 + 5, SIZE - 10):
        ext.write(off, memoryview(b"\x42" * 10))
    ext.flush()
    h = header_of(path)
    n = CAPACITY // (GRAIN * GTES)
    gd = gd_entries(path, h.gd_offset, n)
    rgd = gd_entries(path, h.rgd_offset, n)
    assert any(any(gt_raw(path, s)) for s in gd)
    for primary, backup in zip(gd, rgd):
        assert gt_raw(path, primary) == gt_raw(path, backup)


def test_grain_table_allocated_on_demand(tmp_path: Path) -> None:
    path = tmp_path / "e.vmdk"
    make(path).close()
    h = header_of(path)
    # Drop GT 2 from both directories, as writers that skip empty tables leave it.
    with open(path, "r+b") as f:
        for sector in (h.gd_offset, h.rgd_offset):
            f.seek(sector * SECTOR_SIZE + 2 * 4)
            f.write(b"\0\0\0\0")
    e = SparseExtent.open(os.fspath(path), read_only=False)
    try:
        assert read(e, 2 * GT_SPAN, GT_SPAN) == (bytes(GT_SPAN), [(0, GT_SPAN)])
        e.write(2 * GT_SPAN + G + 3, memoryview(b"hello"))
        e.write(GT_SPAN, memoryview(b"\x09" * G))
    finally:
        e.close()
    n = CAPACITY // (GRAIN * GTES)
    gd = gd_entries(path, h.gd_offset, n)
    rgd = gd_entries(path, h.rgd_offset, n)
    assert gd[2] != 0 and rgd[2] != 0 and gd[2] != rgd[2]
    assert gt_raw(path, gd[2]) == gt_raw(path, rgd[2])
    again = SparseExtent.open(os.fspath(path))
    try:
        data = read(again, 0, SIZE)[0]
        assert data[2 * GT_SPAN + G + 3:2 * GT_SPAN + G + 8] == b"hello"
        assert data[GT_SPAN:GT_SPAN + G] == b"\x09" * G
        assert data.count(0) == SIZE - 5 - G + data[GT_SPAN:GT_SPAN + G].count(0)
    finally:
        again.close()


def test_tiny_gt_cache_still_reads_and_writes(tmp_path: Path) -> None:
    path = tmp_path / "e.vmdk"
    make(path).close()
    e = SparseExtent.open(os.fspath(path), read_only=False, gt_cache_bytes=1)
    model = bytearray(SIZE)
    rng = np.random.default_rng(5)
    try:
        limit = 4  # the fewest tables the cache keeps, whatever its budget
        assert limit < CAPACITY // (GRAIN * GTES)
        for _ in range(60):
            off = int(rng.integers(0, SIZE - 1))
            n = int(rng.integers(1, min(3 * GT_SPAN, SIZE - off) + 1))
            blob = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            e.write(off, memoryview(blob))
            model[off:off + n] = blob
            assert len(e._cached_tables()) <= limit
        assert read(e, 0, SIZE)[0] == bytes(model)
    finally:
        e.close()
    again = SparseExtent.open(os.fspath(path), gt_cache_bytes=1)
    try:
        assert read(again, 0, SIZE)[0] == bytes(model)
    finally:
        again.close()


def test_unclean_flag_while_open_for_writing(tmp_path: Path) -> None:
    path = tmp_path / "e.vmdk"
    make(path).close()
    assert header_of(path).unclean_shutdown == 0
    e = SparseExtent.open(os.fspath(path), read_only=False)
    assert header_of(path).unclean_shutdown == 1
    e.write(0, memoryview(b"x"))
    e.close()
    assert header_of(path).unclean_shutdown == 0
    ro = SparseExtent.open(os.fspath(path))
    try:
        assert header_of(path).unclean_shutdown == 0
    finally:
        ro.close()


def test_read_only_and_range_errors(tmp_path: Path) -> None:
    path = tmp_path / "e.vmdk"
    make(path).close()
    ro = SparseExtent.open(os.fspath(path))
    try:
        with pytest.raises(ReadOnlyError):
            ro.write(0, memoryview(b"x"))
        with pytest.raises(OutOfRangeError):
            ro.read_into(SIZE - 1, memoryview(bytearray(2)))
        assert isinstance(OutOfRangeError("x"), VmdkError)
    finally:
        ro.close()


def test_status_runs(ext: SparseExtent) -> None:
    ext.write(G, memoryview(b"\x01" * (2 * G)))
    runs = ext.status(0, 4 * G)
    kinds = [(r.offset, r.length, r.alloc.value) for r in runs]
    assert kinds == [(0, G, "unallocated"), (G, 2 * G, "data"), (3 * G, G, "unallocated")]


def _model_runs(entries: list[int], compressed: bool, zeroed: bool,
                step: int) -> list[tuple[int, int, int]]:
    """Grain runs, one grain at a time: what SparseExtent._runs must return."""
    def kind(e: int) -> int:
        if e == 0:
            return 0
        if zeroed and e == ZEROED_GTE:
            return 1
        return 3 if compressed else 2
    runs: list[tuple[int, int, int]] = []
    for i, e in enumerate(entries):
        k = kind(e)
        if runs and runs[-1][2] == k and k != 3 and (k != 2 or e == entries[i - 1] + step):
            first, count, _ = runs[-1]
            runs[-1] = (first, count + 1, k)
        else:
            runs.append((i, 1, k))
    return runs


@given(st.lists(st.tuples(st.sampled_from(["hole", "zero", "next", "jump"]),
                          st.integers(1, 80)), min_size=1, max_size=12),
       st.integers(2, 10**6), st.booleans(), st.booleans())
def test_grain_runs_match_a_grain_by_grain_model(pieces: list[tuple[str, int]], base: int,
                                                 compressed: bool, zeroed: bool) -> None:
    """The run splitter (with its whole-table shortcuts) agrees with a per-grain model."""
    extent = SparseExtent.__new__(SparseExtent)
    extent.header = SimpleNamespace(grain_size=128)  # type: ignore[assignment]
    extent.compressed, extent.zeroed_gte = compressed, zeroed
    entries: list[int] = []
    last = base * 128
    for what, count in pieces:
        for _ in range(count):
            if what == "hole":
                entries.append(0)
            elif what == "zero":
                entries.append(ZEROED_GTE)
            else:
                last = last + 128 if what == "next" else last + 128 * 1000
                entries.append(last)
    expected = _model_runs(entries, compressed, zeroed, 128)
    assert extent._runs(array("I", entries)) == expected


@given(st.lists(st.integers(0, 400), min_size=1, max_size=60), st.integers(0, 500),
       st.lists(st.tuples(st.integers(0, 300), st.integers(1, 40)), max_size=4),
       st.integers(1, 8))
def test_misplaced_directory_entries_agree_with_numpy(
        entries: list[int], limit: int, areas: list[tuple[int, int]], span: int) -> None:
    """Directory validation finds the same bad entries in plain Python and with numpy
    (used for huge directories), and both match the definition."""
    from vmdk.extents import sparse

    table = array("I", entries)
    ranges = [(a, a + n) for a, n in areas]
    expected = [i for i, v in enumerate(entries)
                if v and (v + span > limit or any(v < b and v + span > a for a, b in ranges))]
    assert sparse._misplaced(table, limit, ranges, span) == expected
    bulk, chunk = sparse._BULK_ENTRIES, sparse._BULK_CHUNK
    sparse._BULK_ENTRIES, sparse._BULK_CHUNK = 0, 7  # numpy, in pieces across the entries
    try:
        assert sparse._misplaced(table, limit, ranges, span) == expected
    finally:
        sparse._BULK_ENTRIES, sparse._BULK_CHUNK = bulk, chunk


@given(st.lists(st.tuples(st.sampled_from([0, 1, 0x100, 0x1000000, 0x10000, 0xFFFFFFFF, 0x1000100]),
                          st.sampled_from([0, 7, 0x1000000, 0x100])), max_size=40))
def test_directory_mismatch_matches_definition(pairs: list[tuple[int, int]]) -> None:
    """Entries where one directory has a table and the other none, whatever zero bytes the
    sector numbers hold (the byte-level shortcut must never hide one)."""
    from vmdk.extents import sparse

    gd, rgd = array("I", [a for a, _ in pairs]), array("I", [b for _, b in pairs])
    expected = [i for i, (a, b) in enumerate(pairs) if (a == 0) != (b == 0)]
    assert sparse._mismatched(memoryview(gd), memoryview(rgd)) == expected
    assert sparse.nonzero_slots(memoryview(gd)) == [i for i, (a, _) in enumerate(pairs) if a]
    bulk, chunk = sparse._BULK_ENTRIES, sparse._BULK_CHUNK
    sparse._BULK_ENTRIES, sparse._BULK_CHUNK = 0, 7  # numpy, in pieces across the entries
    try:
        assert sparse._mismatched(memoryview(gd), memoryview(rgd)) == expected
        assert sparse.nonzero_slots(memoryview(gd)) == [i for i, (a, _) in enumerate(pairs) if a]
    finally:
        sparse._BULK_ENTRIES, sparse._BULK_CHUNK = bulk, chunk


def test_a_new_table_past_the_2tib_file_limit_is_refused_cleanly(tmp_path: Path) -> None:
    """The table's sector would not fit its u32 directory entry: a clear error, nothing
    changed (the write is refused before any grain is stored)."""
    from vmdk.errors import UnsupportedFormatError
    from vmdk.extents.sparse import MAX_FILE_SECTORS

    extent = SparseExtent.create(str(tmp_path / "e.vmdk"), 4096 * 128, redundant=False)
    try:
        extent.gd[1] = 0  # grain table 1 not allocated yet
        end = extent._end = MAX_FILE_SECTORS - 3
        with pytest.raises(UnsupportedFormatError, match="2 TiB"):
            extent._allocate_table(1)
        assert extent._end == end and extent.gd[1] == 0
    finally:
        extent._end = os.path.getsize(tmp_path / "e.vmdk") // 512
        extent.close()


@given(st.lists(st.sampled_from([0, 0, 0, 1, 0x100, 0x1000000, 0xFFFFFFFF]), max_size=80),
       st.integers(0, 90), st.integers(0, 90), st.sampled_from([1, 3, 8, 1 << 14]))
def test_next_table_matches_definition(entries: list[int], start: int, stop: int,
                                       block: int) -> None:
    """Skipping empty directory slots a block at a time finds the same slot as looking at
    each entry, whatever bytes of the entries are zero and wherever blocks end."""
    from vmdk.extents import sparse

    stop = min(stop, len(entries))
    start = min(start, stop)
    gd = memoryview(array("I", entries))
    expected = next((i for i in range(start, stop) if entries[i]), stop)
    skip, zeros = sparse._SKIP_SLOTS, sparse._ZERO_SLOTS
    sparse._SKIP_SLOTS, sparse._ZERO_SLOTS = block, bytes(4 * block)
    try:
        assert sparse.next_table(gd, start, stop) == expected
    finally:
        sparse._SKIP_SLOTS, sparse._ZERO_SLOTS = skip, zeros


@pytest.mark.parametrize("kind", ["monolithicSparse", "streamOptimized"])
def test_threads_reading_one_image_share_its_caches(tmp_path: Path, kind: str) -> None:
    """convert and compare read a URL's image on several threads at once. With the table
    cache evicting all the time (a tiny budget) and the interpreter switching threads as
    often as it can, every read must still give the right bytes: the caches' bookkeeping
    once failed with "OrderedDict mutated during iteration" and KeyError."""
    import random
    import sys
    import threading

    import vmdk
    from vmdk.convert import convert

    size, stride = 1 << 30, 32 << 20  # one grain table per stride
    path = tmp_path / "many-tables.vmdk"
    with vmdk.create(path, size) as disk:
        for k in range(size // stride):
            disk.write_at(k * stride, bytes([k + 1]) * 4096)
    if kind == "streamOptimized":
        convert(path, tmp_path / "s.vmdk", subformat="streamOptimized", durable=False)
        path = tmp_path / "s.vmdk"
    errors: list[str] = []
    switching = sys.getswitchinterval()
    with vmdk.open(path) as disk:
        image = disk.image
        image.extents[0]._tables.budget = 1  # evict all but the few it must keep

        def reader(seed: int) -> None:
            rnd = random.Random(seed)
            buf = memoryview(bytearray(16))
            try:
                for _ in range(2000):
                    k = rnd.randrange(size // stride)
                    image.readinto_at(k * stride, buf)
                    if bytes(buf) != bytes([k + 1]) * 16:
                        errors.append(f"table {k} read {bytes(buf)!r}")
                        return
            except Exception as exc:  # noqa: BLE001 - reported by the test's thread
                errors.append(repr(exc))

        sys.setswitchinterval(1e-6)
        try:
            threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            sys.setswitchinterval(switching)
    assert errors == []
