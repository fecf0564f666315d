"""seSparse extents: the ESXi sample, images built from the published layout, corrupt variants."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import shutil
import struct
import subprocess
import tracemalloc
from contextlib import closing
from pathlib import Path

import pytest

from conftest import covered, qemu_data_ranges

from vmdk._structs import SESparseConstHeader, SESparseVolatileHeader
from vmdk.errors import (
    CorruptImageError,
    InvalidHeaderError,
    ReadOnlyError,
    UnsupportedFormatError,
)
from vmdk.extents.base import Alloc, Run
from vmdk.extents.sesparse import SESparseExtent

SAMPLE = Path("/work/shared/samples/dissect.hypervisor/sesparse.vmdk.gz")
SAMPLE_SHA256 = "3afa48010241335528fe402f083fc9f3a1013a49485221443a78d9a8604e2f90"
QEMU_IMG = shutil.which("qemu-img")
needs_qemu = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img is not installed")

GRAIN = 4096
GT_ENTRIES = 4096
GT_SPAN = GT_ENTRIES * GRAIN  # bytes one grain table covers


# -- the real ESXi sample ----------------------------------------------------------


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not SAMPLE.exists():
        pytest.skip("sample image not present")
    path = tmp_path_factory.mktemp("sesparse") / "sesparse.vmdk"
    with gzip.open(SAMPLE) as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return path


def test_sample_virtual_content(sample: Path) -> None:
    digest = hashlib.sha256()
    chunk = bytearray(1 << 20)
    view = memoryview(chunk)
    with closing(SESparseExtent.open(str(sample))) as ext:
        assert ext.size == 512 << 20
        for offset in range(0, ext.size, len(chunk)):
            for start, length in ext.read_into(offset, view):
                view[start : start + length] = bytes(length)
            if offset < 16 << 20:
                assert chunk == b"a" * len(chunk)
            digest.update(chunk)
    assert digest.hexdigest() == SAMPLE_SHA256


def test_sample_status_and_info(sample: Path) -> None:
    with closing(SESparseExtent.open(str(sample))) as ext:
        runs = ext.status(0, ext.size)
        assert [(r.offset, r.length, r.alloc) for r in runs] == [
            (0, 16 << 20, Alloc.DATA),
            (16 << 20, (512 - 16) << 20, Alloc.UNALLOCATED),
        ]
        assert runs[0].host_offset == 12288 * 512 and runs[0].filename == str(sample)
        assert ext.info() == {
            "filename": str(sample),
            "virtual-size": 512 << 20,
            "format": "SESPARSE",
            "cluster-size": 4096,
        }
        assert ext.allocated_bytes > 0
        with pytest.raises(ReadOnlyError):
            ext.write(0, memoryview(b"x"))


# -- synthetic images from the published layout ------------------------------------


def alloc(cluster: int) -> int:
    """A type-3 GT entry for ``cluster`` (its low 12 bits sit in bits 48..59)."""
    return (3 << 60) | ((cluster & 0xFFF) << 48) | (cluster >> 12)


UNMAPPED = 1 << 60
ZEROED = 2 << 60
GD_TAG = 0x10000000 << 32


@dataclasses.dataclass
class Layout:
    capacity: int = 3 * GT_ENTRIES * 8 - 8 * 100  # sectors; the last table is partial
    gd: list[int] = dataclasses.field(default_factory=list)
    tables: list[list[int]] = dataclasses.field(default_factory=list)
    grains: dict[int, bytes] = dataclasses.field(default_factory=dict)  # cluster -> 4 KiB
    grains_clusters: int = 8192
    replay_journal: int = 0
    header: dict[str, int] = dataclasses.field(default_factory=dict)

    GD_AT = 4
    GD_SECTORS = 4
    GT_AT = 8

    def write(self, path: Path) -> Path:
        gt_sectors = 64 * max(len(self.tables), 1)
        grains_at = self.GT_AT + gt_sectors
        fields: dict[str, int] = {
            "magic": 0xCAFEBABE,
            "version": 0x200000001,
            "capacity": self.capacity,
            "grain_size": 8,
            "grain_table_size": 64,
            "flags": 0,
            "volatile_header_offset": 1,
            "volatile_header_size": 1,
            "journal_header_offset": 2,
            "journal_header_size": 2,
            "journal_offset": 0,
            "journal_size": 0,
            "grain_dir_offset": self.GD_AT,
            "grain_dir_size": self.GD_SECTORS,
            "grain_tables_offset": self.GT_AT,
            "grain_tables_size": gt_sectors,
            "free_bitmap_offset": 0,
            "free_bitmap_size": 0,
            "backmap_offset": 0,
            "backmap_size": 0,
            "grains_offset": grains_at,
            "grains_size": self.grains_clusters * 8,
        }
        fields.update(self.header)
        with open(path, "wb") as fh:
            fh.write(SESparseConstHeader(**fields).pack())
            fh.write(SESparseVolatileHeader(0xCAFECAFE, 0, 1, self.replay_journal).pack())
            fh.seek(self.GD_AT * 512)
            fh.write(struct.pack(f"<{len(self.gd)}Q", *self.gd))
            for i, table in enumerate(self.tables):
                fh.seek((self.GT_AT + 64 * i) * 512)
                fh.write(struct.pack(f"<{len(table)}Q", *table))
            fh.truncate(grains_at * 512)
            for cluster, data in self.grains.items():
                fh.seek((grains_at + cluster * 8) * 512)
                fh.write(data)
        return path

    def expected(self) -> tuple[bytes, list[tuple[int, int, Alloc]]]:
        """The virtual bytes (holes as zeros) and the per-grain states."""
        size = self.capacity * 512
        out = bytearray(size)
        states: list[tuple[int, int, Alloc]] = []
        for t, entry in enumerate(self.gd):
            if not entry:
                continue
            table = self.tables[entry & 0xFFFFFFFF]
            for i, e in enumerate(table):
                offset = (t * GT_ENTRIES + i) * GRAIN
                if offset >= size:
                    break
                kind = e >> 60
                if kind == 3:
                    cluster = ((e >> 48) & 0xFFF) | ((e & 0xFFFFFFFFFFFF) << 12)
                    out[offset : offset + GRAIN] = self.grains[cluster]
                    states.append((offset, GRAIN, Alloc.DATA))
                elif kind in (1, 2):
                    states.append((offset, GRAIN, Alloc.ZERO))
        return bytes(out), states


def grain(tag: int) -> bytes:
    return bytes([tag]) * 1000 + bytes(range(256)) * 12 + bytes([tag ^ 0xFF]) * 24


def mixed_layout() -> Layout:
    """GD entries 0 and set, tables holding entries of every kind, clusters past 4095."""
    t0 = [0] * GT_ENTRIES
    t0[0] = alloc(0)
    t0[1] = alloc(1)  # contiguous with the first
    t0[2] = alloc(4097)  # a cluster whose number needs both halves
    t0[3] = UNMAPPED
    t0[4] = ZEROED
    t0[5] = ZEROED
    t0[GT_ENTRIES - 1] = alloc(2)
    t1 = [0] * GT_ENTRIES
    t1[0] = alloc(3)  # continues the host run of t0's last grain across tables
    t1[10] = UNMAPPED
    t1[11] = alloc(5000)
    grains = {c: grain(i + 1) for i, c in enumerate([0, 1, 4097, 2, 3, 5000])}
    # GD: table 0 uses GT #1, table 1 is absent, table 2 uses GT #0.
    return Layout(gd=[GD_TAG | 1, 0, GD_TAG | 0], tables=[t1, t0], grains=grains)


def test_synthetic_image_reads_each_entry_kind(tmp_path: Path) -> None:
    layout = mixed_layout()
    path = layout.write(tmp_path / "s.vmdk")
    content, states = layout.expected()
    with closing(SESparseExtent.open(str(path))) as ext:
        buf = bytearray(ext.size)
        holes = ext.read_into(0, memoryview(buf))
        for start, length in holes:
            assert buf[start : start + length] == bytes(length)  # untouched zeros
        assert bytes(buf) == content
        runs = ext.status(0, ext.size)
        assert sum(r.length for r in runs) == ext.size
        data_or_zero = [
            (r.offset, r.length, r.alloc) for r in runs if r.alloc is not Alloc.UNALLOCATED
        ]
        assert _expand(data_or_zero) == states
        # grains 0 and 1 are one host run; GT 0's last grain and table 2's first are not
        # neighbours in the virtual disk (table 1 is absent) so they stay apart.
        assert runs[0] == Run(0, 2 * GRAIN, Alloc.DATA, (layout.GT_AT + 128) * 512, str(path))
        # Holes: reads that touch only absent grains leave the buffer alone.
        probe = bytearray(b"\xee" * GRAIN)
        assert ext.read_into(GT_SPAN + 5 * GRAIN, memoryview(probe)) == [(0, GRAIN)]
        assert probe == b"\xee" * GRAIN


def test_unaligned_reads_match(tmp_path: Path) -> None:
    layout = mixed_layout()
    path = layout.write(tmp_path / "s.vmdk")
    content, _ = layout.expected()
    with closing(SESparseExtent.open(str(path))) as ext:
        for offset, length in [(1, 10000), (4095, 2), (2 * GT_SPAN - 7, 9000), (0, 0)]:
            buf = bytearray(length)
            for start, n in ext.read_into(offset, memoryview(buf)):
                buf[start : start + n] = bytes(n)
            assert buf == content[offset : offset + length]


def test_nominal_size_beyond_capacity_reads_as_holes(tmp_path: Path) -> None:
    layout = mixed_layout()
    path = layout.write(tmp_path / "s.vmdk")
    with closing(SESparseExtent.open(str(path), nominal_sectors=layout.capacity + 64)) as ext:
        runs = ext.status(layout.capacity * 512, 64 * 512)
        assert runs == [Run(layout.capacity * 512, 64 * 512, Alloc.UNALLOCATED)]


def _expand(runs: list[tuple[int, int, Alloc]]) -> list[tuple[int, int, Alloc]]:
    return [(o, GRAIN, a) for off, length, a in runs for o in range(off, off + length, GRAIN)]


@needs_qemu
@pytest.mark.interop
def test_qemu_img_agrees_on_synthetic_image(tmp_path: Path) -> None:
    layout = mixed_layout()
    layout.write(tmp_path / "s.vmdk")
    desc = tmp_path / "desc.vmdk"
    desc.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        f'createType="seSparse"\n\n# Extent description\nRW {layout.capacity} SESPARSE "s.vmdk"\n'
    )
    out = tmp_path / "out.raw"
    subprocess.run(
        [QEMU_IMG, "convert", "-f", "vmdk", "-O", "raw", str(desc), str(out)],
        check=True,
        capture_output=True,
    )
    with closing(SESparseExtent.open(str(tmp_path / "s.vmdk"))) as ext:
        buf = bytearray(ext.size)
        for start, length in ext.read_into(0, memoryview(buf)):
            buf[start : start + length] = bytes(length)
        ours_data = [(r.offset, r.length) for r in ext.status(0, ext.size) if r.alloc is Alloc.DATA]
    assert out.read_bytes() == bytes(buf)
    assert covered(qemu_data_ranges(desc)) == covered(ours_data)



def _with(**changes: object) -> Layout:
    layout = mixed_layout()
    header = changes.pop("header", {})
    for name, value in changes.items():
        setattr(layout, name, value)
    layout.header.update(header)  # type: ignore[arg-type]
    return layout


def _bad_gt_entry(entry: int) -> Layout:
    layout = mixed_layout()
    layout.tables[1][7] = entry
    return layout


@pytest.mark.parametrize(
    ("layout", "error", "words"),
    [
        (_with(header={"magic": 0xCAFEBABF}), InvalidHeaderError, "bad magic"),
        (_with(header={"version": 0x100000001}), UnsupportedFormatError, "version"),
        (_with(header={"flags": 1}), UnsupportedFormatError, "flags"),
        (_with(header={"grain_size": 16}), InvalidHeaderError, "grain size"),
        (_with(header={"grain_table_size": 128}), InvalidHeaderError, "grain table size"),
        (_with(header={"capacity": 1 << 37}), InvalidHeaderError, "64 TiB"),
        (_with(header={"grains_offset": 1 << 63}), InvalidHeaderError, "grains_offset"),
        (_with(header={"volatile_header_offset": 1 << 40}), InvalidHeaderError, "volatile"),
        (_with(replay_journal=1), UnsupportedFormatError, "journal needs replay"),
        (_with(header={"grain_dir_size": 0}), InvalidHeaderError, "too small"),
        (_with(header={"grain_dir_offset": 1 << 30}), InvalidHeaderError, "past the end"),
        (_with(gd=[GD_TAG | 1, 0, 0x20000000 << 32]), CorruptImageError, "entry 2"),
        (_with(gd=[GD_TAG | 1, GD_TAG | 2, 0]), CorruptImageError, "entry 1"),
        (_with(header={"grain_tables_offset": 1 << 40}), CorruptImageError, "entry 0"),
    ],
)
def test_corrupt_headers(tmp_path: Path, layout: Layout, error: type, words: str) -> None:
    path = layout.write(tmp_path / "bad.vmdk")
    tracemalloc.start()
    try:
        with pytest.raises(error, match=words) as info:
            SESparseExtent.open(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "entry",
    [
        5 << 60,
        0x0000000000000001,
        alloc(8192),
        alloc(1 << 40),
        (3 << 60) | (0xFFF << 48) | ((1 << 48) - 1),
    ],
    ids=["state-5", "state-0-nonzero", "past-grains-area", "huge-cluster", "max-cluster"],
)
def test_corrupt_grain_table_entries(tmp_path: Path, entry: int) -> None:
    path = _bad_gt_entry(entry).write(tmp_path / "bad.vmdk")
    with closing(SESparseExtent.open(str(path))) as ext:
        ext.read_into(GT_SPAN, memoryview(bytearray(GRAIN)))  # table 1 is absent: fine
        with pytest.raises(CorruptImageError, match="grain table 0 .* entry 7"):
            ext.read_into(0, memoryview(bytearray(GRAIN)))


def test_grain_past_end_of_file(tmp_path: Path) -> None:
    layout = _with(grains_clusters=1 << 20)
    layout.tables[1][9] = alloc(1 << 19)  # inside the grains area, but the file ends sooner
    path = layout.write(tmp_path / "bad.vmdk")
    with (
        closing(SESparseExtent.open(str(path))) as ext,
        pytest.raises(CorruptImageError, match="entry 9"),
    ):
        ext.status(0, GRAIN)


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "t.vmdk"
    path.write_bytes(struct.pack("<Q", 0xCAFEBABE) + bytes(100))
    with pytest.raises(InvalidHeaderError, match="past the end"):
        SESparseExtent.open(str(path))
    path.write_bytes(mixed_layout().write(tmp_path / "ok.vmdk").read_bytes()[:600])
    with pytest.raises(InvalidHeaderError):
        SESparseExtent.open(str(path))


def test_runs_merge_across_a_table_boundary(tmp_path: Path) -> None:
    t0 = [0] * GT_ENTRIES
    t1 = [0] * GT_ENTRIES
    t0[-1], t1[0], t1[1] = alloc(2), alloc(3), ZEROED
    layout = Layout(
        gd=[GD_TAG | 0, GD_TAG | 1],
        tables=[t0, t1],
        grains={2: grain(1), 3: grain(2)},
        capacity=2 * GT_ENTRIES * 8,
    )
    path = layout.write(tmp_path / "s.vmdk")
    with closing(SESparseExtent.open(str(path))) as ext:
        runs = ext.status(GT_SPAN - 2 * GRAIN, 4 * GRAIN)
    host = (layout.GT_AT + 128 + 2 * 8) * 512
    assert runs == [
        Run(GT_SPAN - 2 * GRAIN, GRAIN, Alloc.UNALLOCATED),
        Run(GT_SPAN - GRAIN, 2 * GRAIN, Alloc.DATA, host, str(path)),
        Run(GT_SPAN + GRAIN, GRAIN, Alloc.ZERO),
    ]
