"""Damaged monolithicSparse files: opening and reading either works or raises a VmdkError naming the file.

Never IndexError, struct.error, a bare ValueError, MemoryError, KeyError or
UnicodeDecodeError; never slow; never a huge allocation driven by a header field.
"""

from __future__ import annotations

import functools
import struct
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vmdk
from conftest import pattern
from vmdk._structs import SparseHeader

SIZE = 512 * 1024
CLUSTER = 4096
MAX_READ = 64 << 20  # read at most this much of a disk whose header claims more
TIME_LIMIT = 15.0  # catches hangs and runaway loops; speed is the benchmark's business
PEAK_LIMIT = 64 << 20

# Offsets of the header fields (VMDK 5.0 technote, "SparseExtentHeader").
VERSION, FLAGS, CAPACITY, GRAIN, DESC_OFF, DESC_SIZE = 4, 8, 12, 20, 28, 36
GTES, RGD, GD, OVERHEAD, UNCLEAN, NEWLINES, COMPRESS = 44, 48, 56, 64, 72, 73, 77


@functools.cache
def base_image() -> bytes:
    """A small valid image (allocated and unallocated grains) as bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "base.vmdk"
        with vmdk.create(path, SIZE, cluster_size=CLUSTER) as f:
            f.write(pattern(SIZE, seed=8, block=CLUSTER))
        return path.read_bytes()


def header() -> SparseHeader:
    return SparseHeader.unpack(base_image()[:512])


def patched(*edits: tuple[int, str, int]) -> bytes:
    data = bytearray(base_image())
    for offset, fmt, value in edits:
        struct.pack_into("<" + fmt, data, offset, value)
    return bytes(data)


def gd_entry_offset(index: int = 0, redundant: bool = False) -> int:
    h = header()
    return (h.rgd_offset if redundant else h.gd_offset) * 512 + 4 * index


def gt_entry_offset(grain: int) -> int:
    h = header()
    gt = struct.unpack_from("<I", base_image(), gd_entry_offset(grain // h.num_gtes_per_gt))[0]
    return gt * 512 + 4 * (grain % h.num_gtes_per_gt)


def with_descriptor(text: bytes) -> bytes:
    h = header()
    data = bytearray(base_image())
    area = h.descriptor_size * 512
    data[h.descriptor_offset * 512:h.descriptor_offset * 512 + area] = text[:area].ljust(area, b"\0")
    return bytes(data)


def descriptor_text() -> bytes:
    h = header()
    raw = base_image()[h.descriptor_offset * 512:(h.descriptor_offset + h.descriptor_size) * 512]
    return raw.split(b"\0", 1)[0]


def attempt(path: Path) -> str:
    """Open and read the whole disk; "ok" or the name of the VmdkError raised."""
    try:
        with vmdk.open(path) as f:
            size = f.size
            step = 1 << 20
            if size <= MAX_READ:
                spans = range(0, size, step)
            else:  # a claimed huge disk: its head, its tail, and a few places between
                spans = [0, size // 3 // 512 * 512, max(0, size - step)]
            for pos in spans:
                n = min(step, size - pos)
                assert len(f.read_at(pos, n)) == n
            f.map()
        return "ok"
    except vmdk.VmdkError as exc:
        assert path.name in str(exc), f"{type(exc).__name__} does not name the file: {exc}"
        return type(exc).__name__


def run_case(tmp: Path, data: bytes, *, measure_memory: bool = False) -> str:
    path = tmp / "damaged.vmdk"
    path.write_bytes(data)
    if measure_memory:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        outcome = attempt(path)
    finally:
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] if measure_memory else 0
        if measure_memory:
            tracemalloc.stop()
    assert elapsed < TIME_LIMIT, f"took {elapsed:.2f}s"
    assert peak < PEAK_LIMIT, f"peak allocation {peak >> 20} MiB"
    return outcome


def test_base_image_is_valid(tmp_path: Path) -> None:
    assert run_case(tmp_path, base_image()) == "ok"


U32, U64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF

HEADER_CASES = {
    "grain-0": [(GRAIN, "Q", 0)],
    "grain-3": [(GRAIN, "Q", 3)],
    "grain-1": [(GRAIN, "Q", 1)],
    "grain-2^40": [(GRAIN, "Q", 1 << 40)],
    "grain-max": [(GRAIN, "Q", U64)],
    "gtes-0": [(GTES, "I", 0)],
    "gtes-1": [(GTES, "I", 1)],
    "gtes-2^31": [(GTES, "I", 1 << 31)],
    "gtes-max": [(GTES, "I", U32)],
    "gtes-3": [(GTES, "I", 3)],
    "gd-past-eof": [(GD, "Q", 1 << 30)],
    "gd-0": [(GD, "Q", 0)],
    "gd-at-end-no-footer": [(GD, "Q", U64)],
    "gd-huge": [(GD, "Q", U64 - 1)],
    "rgd-past-eof": [(RGD, "Q", 1 << 30)],
    "rgd-0": [(RGD, "Q", 0)],
    "capacity-2^60": [(CAPACITY, "Q", 1 << 60)],
    "capacity-2^46": [(CAPACITY, "Q", 1 << 46)],
    "capacity-2^40": [(CAPACITY, "Q", 1 << 40)],
    "capacity-0": [(CAPACITY, "Q", 0)],
    "capacity-max": [(CAPACITY, "Q", U64)],
    "capacity-small": [(CAPACITY, "Q", 7)],
    "capacity-2^40-gtes-1": [(CAPACITY, "Q", 1 << 40), (GTES, "I", 1)],
    "capacity-2^46-grain-1-gtes-1": [(CAPACITY, "Q", (1 << 46) - 1), (GRAIN, "Q", 1),
                                     (GTES, "I", 1)],
    "desc-offset-past-eof": [(DESC_OFF, "Q", 1 << 40)],
    "desc-offset-max": [(DESC_OFF, "Q", U64)],
    "desc-size-huge": [(DESC_SIZE, "Q", 1 << 40)],
    "desc-size-max": [(DESC_SIZE, "Q", U64)],
    "desc-size-0": [(DESC_SIZE, "Q", 0)],
    "desc-offset-0": [(DESC_OFF, "Q", 0)],
    "desc-size-past-eof": [(DESC_SIZE, "Q", 1 << 20)],
    "newline-lf-only": [(NEWLINES, "I", int.from_bytes(b"\n \n\n", "little"))],
    "newline-cr": [(NEWLINES + 3, "B", 0x0D)],
    "incompat-flag": [(FLAGS, "I", 0x3 | 0x40000000)],
    "all-flags": [(FLAGS, "I", U32)],
    "compressed-no-markers": [(FLAGS, "I", 0x3 | 0x10000), (COMPRESS, "H", 1)],
    "compressed-bad-algo": [(FLAGS, "I", 0x3 | 0x30000), (COMPRESS, "H", 7)],
    "markers-only": [(FLAGS, "I", 0x3 | 0x20000)],
    "zeroed-gte-v1": [(FLAGS, "I", 0x7)],
    "version-0": [(VERSION, "I", 0)],
    "version-4": [(VERSION, "I", 4)],
    "version-max": [(VERSION, "I", U32)],
    "overhead-max": [(OVERHEAD, "Q", U64)],
    "overhead-0": [(OVERHEAD, "Q", 0)],
    "unclean": [(UNCLEAN, "B", 1)],
}


@pytest.mark.parametrize("edits", list(HEADER_CASES.values()), ids=list(HEADER_CASES))
def test_header_fields(tmp_path: Path, edits: list[tuple[int, str, int]]) -> None:
    run_case(tmp_path, patched(*edits), measure_memory=True)


def test_header_outcomes(tmp_path: Path) -> None:
    """Some damage must be refused, not read as something else."""
    assert run_case(tmp_path, patched((FLAGS, "I", 0x3 | 0x40000000))) != "ok"
    assert run_case(tmp_path, patched((GRAIN, "Q", 0))) != "ok"
    assert run_case(tmp_path, patched((GRAIN, "Q", 3))) != "ok"
    assert run_case(tmp_path, patched((GTES, "I", 0))) != "ok"
    assert run_case(tmp_path, patched((GD, "Q", 1 << 30))) != "ok"
    assert run_case(tmp_path, patched((VERSION, "I", 4))) != "ok"
    lf = int.from_bytes(b"\n \n\n", "little")
    assert run_case(tmp_path, patched((NEWLINES, "I", lf))) != "ok"
    assert run_case(tmp_path, patched((UNCLEAN, "B", 1))) == "ok"


TABLE_CASES = {
    "gd-entry-past-eof": lambda: [(gd_entry_offset(0), "I", 1 << 30)],
    "gd-entry-max": lambda: [(gd_entry_offset(0), "I", U32)],
    "gd-entry-into-header": lambda: [(gd_entry_offset(0), "I", 0)],
    "rgd-entry-differs": lambda: [(gd_entry_offset(0, redundant=True), "I", 0)],
    "gt-entry-past-eof": lambda: [(gt_entry_offset(0), "I", 1 << 30)],
    "gt-entry-max": lambda: [(gt_entry_offset(1), "I", U32)],
    "gt-entry-last-sector": lambda: [(gt_entry_offset(0), "I",
                                      len(base_image()) // 512 - 1)],
    "gt-entry-into-metadata": lambda: [(gt_entry_offset(0), "I", 2)],
    "gt-entry-zeroed-marker": lambda: [(gt_entry_offset(0), "I", 1)],
    "gt-last-entry-past-eof": lambda: [(gt_entry_offset(SIZE // CLUSTER - 1), "I", 1 << 31)],
}


@pytest.mark.parametrize("make", list(TABLE_CASES.values()), ids=list(TABLE_CASES))
def test_table_entries(tmp_path: Path, make) -> None:  # type: ignore[no-untyped-def]
    run_case(tmp_path, patched(*make()))


def test_gt_entry_past_eof_is_an_error(tmp_path: Path) -> None:
    assert run_case(tmp_path, patched((gt_entry_offset(0), "I", 1 << 30))) == "CorruptImageError"


def truncation_points() -> list[int]:
    h = header()
    n = len(base_image())
    return sorted({0, 1, 4, 100, 511, 512, 513, 1024, h.descriptor_offset * 512 + 100,
                   h.rgd_offset * 512, h.gd_offset * 512 + 2, h.overhead * 512 - 1,
                   h.overhead * 512, h.overhead * 512 + 1000, n // 2, n - 512, n - 1})


@pytest.mark.parametrize("size", truncation_points())
def test_truncated(tmp_path: Path, size: int) -> None:
    run_case(tmp_path, base_image()[:size])


DESCRIPTORS = {
    "huge-extent": lambda d: d.replace(f"RW {SIZE // 512} ".encode(), b"RW 99999999999999999999 "),
    "zero-extent": lambda d: d.replace(f"RW {SIZE // 512} ".encode(), b"RW 0 "),
    "negative-extent": lambda d: d.replace(f"RW {SIZE // 512} ".encode(), b"RW -5 "),
    "two-extents": lambda d: d.replace(b"# Extent description\n",
                                       b"# Extent description\nRW 8 SPARSE \"other.vmdk\"\n"),
    "flat-extent": lambda d: d.replace(b" SPARSE ", b" FLAT "),
    "no-extents": lambda d: b"\n".join(line for line in d.split(b"\n")
                                       if not line.startswith(b"RW ")),
    "not-utf8": lambda d: d.replace(b"ddb.adapterType", b"ddb.\xff\xfe\xc3"),
    "latin1-name": lambda d: d.replace(b'"damaged.vmdk"', b'"d\xe9j\xe0.vmdk"'),
    "nul-in-middle": lambda d: d[:40] + b"\0" + d[41:],
    "garbage": lambda d: bytes(range(1, 256)) * 4,
    "empty": lambda d: b"",
    "only-spaces": lambda d: b"   \n\n  ",
    "bad-cid": lambda d: d.replace(b"CID=", b"CID=zz"),
    "huge-cid": lambda d: d.replace(b"CID=", b"CID=123456789abcdef"),
    "bad-version": lambda d: d.replace(b"version=1", b"version=999999999999999999999"),
    "unknown-create-type": lambda d: d.replace(b"monolithicSparse", b"spaceship"),
    "unterminated-quote": lambda d: d.replace(b'"monolithicSparse"', b'"monolithicSparse'),
    "parent-missing": lambda d: d.replace(b"parentCID=ffffffff",
                                          b'parentCID=12345678\nparentFileNameHint="gone.vmdk"'),
    "parent-self": lambda d: d.replace(b"parentCID=ffffffff",
                                       b'parentCID=12345678\nparentFileNameHint="damaged.vmdk"'),
    "parent-escape": lambda d: d.replace(b"parentCID=ffffffff",
                                         b'parentCID=1\nparentFileNameHint="../../etc/passwd"'),
    "parent-absolute": lambda d: d.replace(b"parentCID=ffffffff",
                                           b'parentCID=1\nparentFileNameHint="/dev/zero"'),
    "crlf": lambda d: d.replace(b"\n", b"\r\n"),
    "long-line": lambda d: d + b"ddb.comment = \"" + b"x" * 9000 + b"\"\n",
}


@pytest.mark.parametrize("mangle", list(DESCRIPTORS.values()), ids=list(DESCRIPTORS))
def test_embedded_descriptor(tmp_path: Path, mangle) -> None:  # type: ignore[no-untyped-def]
    run_case(tmp_path, with_descriptor(mangle(descriptor_text())))


def test_parent_escape_is_refused(tmp_path: Path) -> None:
    text = DESCRIPTORS["parent-escape"](descriptor_text())
    assert run_case(tmp_path, with_descriptor(text)) == "UnsafePathError"


# -- random damage -----------------------------------------------------------------------------


def metadata_end() -> int:
    return header().overhead * 512


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_byte_mutations(data: st.DataObject) -> None:
    base = bytearray(base_image())
    n_edits = data.draw(st.integers(1, 8), label="edits")
    for _ in range(n_edits):
        where = data.draw(st.one_of(st.integers(0, 511), st.integers(0, metadata_end() - 1),
                                    st.integers(0, len(base) - 1)), label="offset")
        value = data.draw(st.one_of(st.integers(0, 255), st.sampled_from([0, 1, 0x7F, 0x80,
                                                                          0xFF])), label="byte")
        base[where] = value
    if data.draw(st.booleans(), label="truncate"):
        base = base[:data.draw(st.integers(0, len(base)), label="length")]
    with tempfile.TemporaryDirectory() as tmp:
        run_case(Path(tmp), bytes(base))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from([(CAPACITY, "Q"), (GRAIN, "Q"), (DESC_OFF, "Q"), (DESC_SIZE, "Q"),
                              (GTES, "I"), (RGD, "Q"), (GD, "Q"), (OVERHEAD, "Q"),
                              (VERSION, "I"), (FLAGS, "I")]),
       value=st.one_of(st.integers(0, 64), st.integers(0, 1 << 32),
                       st.integers(0, 1 << 64).map(lambda v: min(v, (1 << 64) - 1)),
                       st.sampled_from([1 << 31, 1 << 40, 1 << 47, 1 << 63])))
def test_random_header_values(field: tuple[int, str], value: int) -> None:
    offset, fmt = field
    if fmt == "I":
        value &= 0xFFFFFFFF
    with tempfile.TemporaryDirectory() as tmp:
        run_case(Path(tmp), patched((offset, fmt, value)), measure_memory=True)
